"""Readers for the official file formats: idx (MNIST, Fashion-MNIST), CIFAR python pickles,
CIFAR-N torch-saved label dicts, and the npz export of CIFAR-10.

Every reader turns any failure into a one-line `DataError` naming the file. Nothing here can
run code from a data file: CIFAR pickles go through an unpickler that admits only the numpy
globals those files hold, and CIFAR-N files through `torch.load(weights_only=True)` with an
allow-list of exactly the numpy types they hold.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import pickle
import re
import zlib
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from nrcore.data.errors import DataError

try:  # numpy >= 2 moved the array reconstructor; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# ---- official checksums ---------------------------------------------------------------------
# idx files: md5 of the *decompressed* content, so a re-compressed copy (Debian's
# dataset-fashion-mnist, or a user's gunzip) verifies too. Values: the MNIST ones are the
# decompressed content of the official .gz files (md5 f68b3c2d..., d53e105e..., 9fb629c4...,
# ec29112d...); Fashion-MNIST as published by zalandoresearch.
IDX_CONTENT_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
# CIFAR pickles: md5 of the files inside the official tarballs (cs.toronto.edu/~kriz/cifar.html).
CIFAR_FILE_MD5 = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    "cifar100": {
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
}

VERIFIED = "verified"
NO_OFFICIAL_CHECKSUM = "no official checksum"
NOT_CHECKED = "not checked (verify_checksums=False)"


def check_md5(path: Path, actual: str, expected: Optional[str], verify: bool) -> str:
    """The checksum status of one file; a mismatch with a known official value is an error."""
    if expected is None:
        return NO_OFFICIAL_CHECKSUM
    if not verify:
        return NOT_CHECKED
    if actual != expected:
        raise DataError(
            f"{path}: md5 {actual} differs from the official {expected}; replace it with the official file, "
            "or pass verify_checksums=False to use a modified copy on purpose"
        )
    return VERIFIED


def read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


# ---- idx ------------------------------------------------------------------------------------
_IDX_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> Tuple[np.ndarray, str]:
    """An idx file (optionally gzipped) of unsigned bytes with `ndim` dimensions.

    Returns the array and the md5 of the decompressed content.
    """
    raw = read_bytes(path)
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip ({exc}); replace it with the official file") from None
    if len(raw) < 4:
        raise DataError(f"{path}: only {len(raw)} bytes, not an idx file; replace it with the official file")
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = (_IDX_UBYTE << 8) | ndim
    if magic != expected_magic:
        raise DataError(
            f"{path}: wrong magic number 0x{magic:08x} (an idx {'image' if ndim == 3 else 'label'} file starts with "
            f"0x{expected_magic:08x}); is it the right file?"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated idx header; replace it with the official file")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    payload = len(raw) - header_len
    if payload != expected:
        raise DataError(
            f"{path}: header declares shape {shape} ({expected} bytes) but the file holds {payload} bytes "
            "(truncated?); replace it with the official file"
        )
    array = np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape).copy()  # writable, for torch
    return array, md5_hex(raw)


# ---- CIFAR pickles ---------------------------------------------------------------------------
class _ForbiddenGlobal(Exception):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Admits only the globals the official CIFAR pickles hold (numpy arrays of bytes, written
    by Python 2), plus `_codecs.encode`, which Python 3 uses for bytes under protocol 2."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def read_cifar_pickle(path: Path) -> Tuple[Dict[str, object], str]:
    """One CIFAR python-pickle file as a dict with str keys, and the file's md5."""
    raw = read_bytes(path)
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _ForbiddenGlobal as exc:
        raise DataError(
            f"{path}: the pickle imports {exc}, which no CIFAR data file holds; refusing to load it "
            "(replace it with the official file)"
        ) from None
    except Exception as exc:  # any decoding failure means the file is damaged
        raise DataError(f"{path}: truncated or corrupt CIFAR pickle ({type(exc).__name__}: {exc}); re-extract the official archive") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not the dict of a CIFAR batch")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}, md5_hex(raw)


def cifar_batch_arrays(path: Path, batch: Dict[str, object], label_keys: Tuple[str, ...]) -> Tuple[np.ndarray, list]:
    """Images [N, 3, 32, 32] uint8 and the label arrays named by `label_keys` of one batch dict."""
    data = batch.get("data")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072], got {got}")
    labels = []
    for key in label_keys:
        if key not in batch:
            raise DataError(f"{path}: no '{key}' entry (keys: {', '.join(sorted(batch))}); is it the right CIFAR file?")
        values = np.asarray(batch[key])
        if values.ndim != 1 or len(values) != len(data) or not np.issubdtype(values.dtype, np.integer):
            raise DataError(f"{path}: '{key}' has {values.shape} entries of {values.dtype}, expected {len(data)} integers")
        labels.append(values.astype(np.int64))
    return data.reshape(-1, 3, 32, 32), labels


def cifar_label_names(path: Path, meta: Dict[str, object], key: str) -> list:
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{path}: no '{key}' list; is it the right CIFAR meta file?")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


# ---- CIFAR-N ---------------------------------------------------------------------------------
def _cifar_n_safe_globals() -> list:
    """Exactly what the released CIFAR-10N/100N files hold: numpy int64 arrays, pickled by
    numpy 1.x (`numpy.core.multiarray._reconstruct`; numpy >= 2 writes `numpy._core...`)."""
    return [
        (_np_reconstruct, "numpy.core.multiarray._reconstruct"),
        (_np_reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.int64)),  # numpy.dtypes.Int64DType on numpy >= 1.25
    ]


def read_cifar_n(path: Path, required_keys: Tuple[str, ...]) -> Tuple[Dict[str, np.ndarray], str]:
    """A CIFAR-N human-label file: {name: int64 [N]} for the label arrays, and the file md5."""
    import torch

    raw = read_bytes(path)
    if not hasattr(torch.serialization, "safe_globals"):
        raise DataError(f"{path}: reading CIFAR-N label files safely needs torch >= 2.6 (torch.serialization.safe_globals)")
    try:
        with torch.serialization.safe_globals(_cifar_n_safe_globals()):
            obj = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:
        message = str(exc)
        forbidden = re.search(r"GLOBAL ([\w.]+)", message)  # torch names the refused global this way
        if forbidden:
            name = forbidden.group(1)
            raise DataError(
                f"{path}: the file imports {name}, which no CIFAR-N label file holds; refusing to load it "
                "(use the released CIFAR-N file)"
            ) from None
        first_line = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable CIFAR-N label file ({first_line}); use the released file") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: holds a {type(obj).__name__}, not the dict of a CIFAR-N label file")
    missing = [k for k in required_keys if k not in obj]
    if missing:
        raise DataError(f"{path}: lacks {', '.join(missing)} (keys: {', '.join(map(str, obj))}); is it the right CIFAR-N file?")
    arrays = {}
    for key in required_keys:
        values = np.asarray(obj[key])
        if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
            raise DataError(f"{path}: '{key}' is {values.dtype} {values.shape}, expected a 1-d integer array")
        arrays[key] = values.astype(np.int64)
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
        raise DataError(f"{path}: label arrays differ in length ({sorted(lengths)})")
    return arrays, md5_hex(raw)


# ---- npz ----------------------------------------------------------------------------------------
def read_npz(path: Path, required: Tuple[str, ...], optional: Tuple[str, ...] = ()) -> Tuple[Dict[str, np.ndarray], str]:
    """Arrays of an .npz (never unpickling objects) and the file md5."""
    raw = read_bytes(path)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
            missing = [k for k in required if k not in archive.files]
            if missing:
                raise DataError(f"{path}: lacks {', '.join(missing)} (holds: {', '.join(archive.files) or 'nothing'})")
            arrays = {k: archive[k] for k in required + tuple(k for k in optional if k in archive.files)}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None
    return arrays, md5_hex(raw)

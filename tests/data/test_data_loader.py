"""Task.loader: batches of (x, noisy label, index, true label), normalised and augmented on the
device, deterministic in the generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nrcore.data import Batch, build_task
from nrcore.data.task import task_from_dataset


@pytest.fixture(scope="module")
def digits():
    return build_task("digits", noise="sym40", clean_size=100, val_size=100, seed=0)


@pytest.fixture
def cifar(tmp_path, writers):
    writers.write_cifar10(tmp_path / "cifar-10-batches-py", per_batch=40)
    return build_task("cifar10", data_dir=tmp_path, noise="sym20", seed=0, verify_checksums=False)


def _normalise(task, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(task.mean).view(1, -1, 1, 1)
    std = torch.tensor(task.std).view(1, -1, 1, 1)
    return (images.float() / 255 - mean) / std


def test_batches_carry_images_labels_indices_and_true_labels(digits):
    loader = digits.loader("train", 100)
    batches = list(loader)
    assert len(loader) == len(batches) == -(-len(digits.train) // 100)
    first = batches[0]
    assert isinstance(first, Batch) and first.x.dtype == torch.float32 and first.x.shape == (100, 1, 8, 8)
    assert torch.equal(first.index, torch.arange(100))
    assert torch.equal(first.y, digits.train.labels[:100]) and torch.equal(first.y_true, digits.train.true_labels[:100])
    torch.testing.assert_close(first.x, _normalise(digits, digits.train.images[:100]))
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(len(digits.train)))


def test_shuffled_batches_match_their_indices_and_cover_the_split_once(digits):
    g = torch.Generator().manual_seed(3)
    batches = list(digits.loader("train", 64, shuffle=True, generator=g))
    index = torch.cat([b.index for b in batches])
    assert sorted(index.tolist()) == list(range(len(digits.train)))
    assert not torch.equal(index, torch.arange(len(digits.train)))
    for b in batches:
        torch.testing.assert_close(b.x, _normalise(digits, digits.train.images[b.index]))
        assert torch.equal(b.y, digits.train.labels[b.index])


def test_same_generator_seed_same_batches(cifar):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return [(b.index, b.x) for b in cifar.loader("train", 32, shuffle=True, augment=True, generator=g)]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(i, j) and torch.equal(x, y) for (i, x), (j, y) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])


def test_drop_last_and_every_split(digits):
    assert len(digits.loader("train", 100, drop_last=True)) == len(digits.train) // 100
    for name, n in (("clean", 100), ("val", 100), ("test", 360)):
        assert sum(len(b) for b in digits.loader(name, 50)) == n
    with pytest.raises(ValueError, match="batch_size"):
        digits.loader("train", 0)
    with pytest.raises(ValueError, match="split"):
        digits.loader("dev", 10)


def test_asking_for_a_missing_split_says_how_to_get_it():
    task = build_task("digits")
    with pytest.raises(ValueError, match="clean_size"):
        task.loader("clean", 10)


def test_cifar_augmentation_is_a_padded_random_crop_and_flip(cifar):
    """Replays the generator draws and checks each image against a per-image crop/flip."""
    seed, batch_size = 5, 16
    batch = next(iter(cifar.loader("train", batch_size, shuffle=True, augment=True, generator=torch.Generator().manual_seed(seed))))
    replay = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(cifar.train), generator=replay)[:batch_size]
    offsets = torch.randint(0, 9, (2, batch_size), generator=replay)
    flips = torch.rand(batch_size, generator=replay) < 0.5
    assert torch.equal(batch.index, order)
    for i, j in enumerate(order.tolist()):
        padded = F.pad(cifar.train.images[j], (4, 4, 4, 4))
        crop = padded[:, offsets[0, i] : offsets[0, i] + 32, offsets[1, i] : offsets[1, i] + 32]
        expected = crop.flip(-1) if flips[i] else crop
        torch.testing.assert_close(batch.x[i], _normalise(cifar, expected[None])[0])
    assert flips.any() and not flips.all()


def test_crop_and_flip_of_a_known_image_gives_the_expected_pixels():
    from nrcore.data.loader import crop_and_flip

    image = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)  # rows 1 2 3 / 4 5 6 / 7 8 9
    batch = image.expand(3, 2, 3, 3).contiguous()  # three copies, two channels
    offsets = torch.tensor([[0, 1, 2], [0, 1, 0]])  # (row, col) corners in the 1-pixel-padded 5x5 image
    flips = torch.tensor([False, False, True])
    out = crop_and_flip(batch, offsets, flips, pad=1, crop=3)
    assert out.shape == (3, 2, 3, 3) and out.dtype == torch.uint8
    top_left = torch.tensor([[0, 0, 0], [0, 1, 2], [0, 4, 5]], dtype=torch.uint8)
    centre = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=torch.uint8)
    bottom_left_flipped = torch.tensor([[5, 4, 0], [8, 7, 0], [0, 0, 0]], dtype=torch.uint8)
    for i, expected in enumerate((top_left, centre, bottom_left_flipped)):
        assert torch.equal(out[i, 0], expected) and torch.equal(out[i, 1], expected), i


def test_augmented_epochs_depend_only_on_seed_and_epoch(cifar):
    """The trainer's batches for epoch e come from MethodContext.generator(e, "train"): the same
    (seed, epoch) gives the same crops and flips (what makes resume exact), another epoch or seed
    others; the batch shape is the model's input."""
    from nrcore.methods.base import MethodContext

    def first_batch(seed, epoch):
        ctx = MethodContext(cifar, "cpu", lambda: None, None, epochs=3, batch_size=16, seed=seed)
        return next(iter(cifar.loader("train", 16, shuffle=True, augment=True, generator=ctx.generator(epoch, "train"))))

    a, again = first_batch(0, 1), first_batch(0, 1)
    assert a.x.shape == (16, 3, 32, 32) and a.x.dtype == torch.float32
    assert torch.equal(a.x, again.x) and torch.equal(a.index, again.index)
    for other in (first_batch(0, 2), first_batch(1, 1)):
        assert not torch.equal(a.x, other.x)
    # same images in another order still differ in their crops: compare one example across epochs
    b = next(iter(cifar.loader("train", len(cifar.train), shuffle=False, augment=True, generator=torch.Generator().manual_seed(1))))
    c = next(iter(cifar.loader("train", len(cifar.train), shuffle=False, augment=True, generator=torch.Generator().manual_seed(2))))
    assert not torch.equal(b.x, c.x) and torch.equal(b.index, c.index)


def test_augment_is_a_no_op_without_a_dataset_policy(digits):
    g = torch.Generator().manual_seed(0)
    plain = next(iter(digits.loader("train", 50)))
    augmented = next(iter(digits.loader("train", 50, augment=True, generator=g)))
    assert digits.augmentation is None and torch.equal(plain.x, augmented.x)


def test_eval_batches_of_cifar_are_not_augmented(cifar):
    batch = next(iter(cifar.loader("test", 20)))
    torch.testing.assert_close(batch.x, _normalise(cifar, cifar.test.images[:20]))


def test_cifar_normalisation_uses_the_dataset_statistics(cifar):
    assert cifar.mean == (0.4914, 0.4822, 0.4465) and cifar.std == (0.2470, 0.2435, 0.2616)


def test_streamed_clothing1m_batches_are_decoded_and_cropped(tmp_path, writers):
    writers.write_clothing1m(tmp_path / "clothing1m")
    task = build_task("clothing1m", data_dir=tmp_path, noise="real", seed=0)
    g = torch.Generator().manual_seed(0)
    batches = list(task.loader("train", 16, shuffle=True, augment=True, generator=g, num_workers=0))
    assert batches[0].x.shape == (16, 3, 224, 224) and len(batches) == -(-len(task.train) // 16)
    assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(len(task.train)))
    test = next(iter(task.loader("test", 4, num_workers=0)))
    full = torch.stack([task.test.source[i] for i in range(4)])  # 256x256, centre-cropped to 224
    torch.testing.assert_close(test.x, _normalise(task, full[:, :, 16:240, 16:240]))


def test_streamed_batches_with_worker_processes(tmp_path, writers):
    writers.write_clothing1m(tmp_path / "clothing1m")
    task = build_task("clothing1m", data_dir=tmp_path, noise="real", seed=0)
    inline = next(iter(task.loader("test", 7, num_workers=0)))
    workers = next(iter(task.loader("test", 7, num_workers=1)))
    assert torch.equal(inline.x, workers.x)


def test_device_copy_is_made_once_per_device(writers):
    raw = writers.synthetic_raw(np.arange(40) % 4, 4)
    task = task_from_dataset(raw, "clean")
    list(task.loader("train", 10, device="cpu"))
    assert task.train.images_on("cpu") is task.train.images and not task.train._device_images
    if torch.cuda.is_available():
        first = task.train.images_on("cuda")
        assert task.train.images_on("cuda") is first
        batch = next(iter(task.loader("train", 10, shuffle=True, generator=torch.Generator(), device="cuda")))
        assert batch.x.is_cuda and batch.y.is_cuda and batch.index.is_cuda

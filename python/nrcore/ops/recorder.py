"""PerSampleGradRecorder: per-example gradient products of a model from one forward/backward.

    rec = PerSampleGradRecorder(model, layers=[model.layer3, model.classifier])
    with rec.record():
        loss_per_example = F.cross_entropy(model(x), y, reduction="none")
        loss_per_example.sum().backward()
    rec.dot(direction)            # [B]     <g_i, direction>
    rec.dot_many(directions)      # [B, k]  <g_i, direction_k>
    rec.kernel(other_rec)         # [B, M]  <g_i, g'_j> (other_rec recorded another batch)
    rec.weighted_sum(w)           # {name: sum_i w_i g_i}
    rec.per_sample_grads()        # {name: [B, *shape]} explicit (small models, tests)

    with rec.record(directions=dirs):   # streaming: contract during the backward, keep nothing
        ...backward...
    rec.streamed()                # [B, k]; record(kernel_with=stored_rec) streams a kernel instead

g_i is example i's gradient of what was back-propagated, restricted to the recorded parameters.
Scale convention: back-propagate the SUM of per-example losses, so g_i = grad l_i and
weighted_sum(w) = grad sum_i w_i l_i. Back-propagating c * sum_i l_i scales every g_i by c (so
dot/weighted_sum by c, a kernel between two such recordings by c^2).

Supported layers: nn.Linear (inputs [B, ..., in]), nn.Conv2d (any stride/padding/dilation,
groups=1, padding_mode='zeros') and affine BatchNorm1d/2d/3d, biases included. The products go
through nrcore.ops.tangent_dot / tangent_kernel for Linear layers and conv_tangent_dot /
conv_tangent_kernel for Conv2d (ghost or explicit per layer, by cost; patches gathered inside the
kernel); per-example bias and BatchNorm gradients are small and formed explicitly.

BatchNorm in train mode couples the examples of a batch through its statistics; `batchnorm`
chooses how the recording treats that (eval-mode BatchNorm uses running statistics, couples
nothing, and both give the exact per-example gradient):
  "constant" (default, docs/method-contract.md, "Meta-reweighting"): while recording, every BatchNorm of the model that normalises
      with batch statistics treats them as constants in the backward (forward values unchanged,
      running statistics updated once as usual), so g_i is exactly the gradient of l_i with the
      batch statistics held fixed, and the parameters' .grad from that backward is sum_i g_i.
  "joint": BatchNorm's forward and backward are left alone; g_i is example i's slice of the
      batch's joint backward (the g_i sum to the exact batch gradient, but g_i is not the
      gradient of l_i alone). Use it when the same graph also drives the real training step.

layers=None records every supported layer with trainable parameters and raises if the model has
trainable parameters elsewhere (they would be silently missing from every product); pass an
explicit list (modules, names, or containers such as a ResNet stage) to record a subset.
Directions are dicts keyed by parameter name (as in model.named_parameters()) or by the
Parameter itself; recorded parameters missing from a direction count as zero, unknown keys raise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from nrcore.ops._backend import acc_dtype
from nrcore.ops.tangent import conv_tangent_dot, conv_tangent_kernel, tangent_dot, tangent_kernel, unfold

Tensor = torch.Tensor
DirectionKey = Union[str, nn.Parameter]

# Elements of unfolded Conv2d patches per_sample_grads materialises at once (16 MiB in float32;
# the products gather patches inside the kernels instead).
_UNFOLD_BUDGET = 4 << 20


@dataclass
class _Use:
    """One call of a recorded layer: its input (Linear/Conv2d) or normalised input (BatchNorm)
    and the gradient of its output. A BatchNorm use may instead keep its raw input and the
    (mean, var, eps) it was normalised with (`norm`), so x-hat is formed only when queried."""

    inp: Tensor
    version: int
    source: Optional[Tensor]
    grad: Optional[Tensor] = None
    norm: Optional[Tuple[Tensor, Tensor, float]] = None
    parts: Optional[Dict[str, Tensor]] = None  # BatchNorm: per-example gradients, formed in the backward

    def normalized(self) -> Tensor:
        if self.norm is None:
            return self.inp
        mean, var, eps = self.norm
        shape = [1, -1] + [1] * (self.inp.dim() - 2)
        return (self.inp - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    params: Dict[str, Tuple[str, nn.Parameter]]  # "weight"/"bias" -> (full name, parameter)
    uses: List[_Use] = field(default_factory=list)


def _conv_padding(name: str, conv: nn.Conv2d) -> Tuple[int, int]:
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    pads = []
    for k, d in zip(conv.kernel_size, conv.dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(f"PerSampleGradRecorder: layer {name!r} uses padding='same' with an even kernel (asymmetric padding is not supported)")
        pads.append(total // 2)
    return tuple(pads)


def _check_supported(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ValueError(f"PerSampleGradRecorder: layer {name!r} is a Conv2d with groups={module.groups}; only groups=1 is supported")
        if module.padding_mode != "zeros":
            raise ValueError(f"PerSampleGradRecorder: layer {name!r} uses padding_mode={module.padding_mode!r}; only 'zeros' is supported")
        _conv_padding(name, module)
    elif isinstance(module, nn.SyncBatchNorm) or getattr(getattr(module, "ranks", None), "distributed", False):
        # nrcore's --sync-bn layer under torchrun too: the recorder rebuilds the normalised input
        # from the slice's own statistics, which are not the ones the forward used
        raise ValueError(f"PerSampleGradRecorder: layer {name!r} normalises with statistics across processes "
                         "(SyncBatchNorm, or --sync-bn under torchrun) and is not supported")
    elif isinstance(module, _BatchNorm):
        if not module.affine:
            raise ValueError(f"PerSampleGradRecorder: layer {name!r} is a BatchNorm without affine parameters; nothing to record")
    elif not isinstance(module, nn.Linear):
        raise TypeError(
            f"PerSampleGradRecorder: layer {name!r} ({type(module).__name__}) is not supported; "
            "supported are nn.Linear, nn.Conv2d (groups=1) and affine BatchNorm"
        )


def _is_leaf_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, _BatchNorm))


def _batch_stats_mode(bn: _BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


class PerSampleGradRecorder:
    """Records inputs and output gradients of chosen layers; see the module docstring."""

    def __init__(
        self, model: nn.Module, layers: Optional[Sequence[Union[nn.Module, str]]] = None, *, batchnorm: str = "constant"
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"PerSampleGradRecorder: model must be an nn.Module, got {type(model).__name__}")
        if batchnorm not in ("constant", "joint"):
            raise ValueError(f"PerSampleGradRecorder: batchnorm must be 'constant' or 'joint', got {batchnorm!r}")
        self.model = model
        self.batchnorm = batchnorm
        names = {id(m): n for n, m in model.named_modules()}
        modules = dict(model.named_modules())
        chosen: List[Tuple[str, nn.Module]] = []
        if layers is None:
            for name, module in model.named_modules():
                if _is_leaf_layer(module) and any(p.requires_grad for p in module.parameters(recurse=False)):
                    _check_supported(name, module)
                    chosen.append((name, module))
            covered = {id(p) for _, m in chosen for p in m.parameters(recurse=False)}
            missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
            if missing:
                owners = {n: type(modules[n.rpartition(".")[0]]).__name__ for n in missing}
                listed = ", ".join(f"{n} ({owners[n]})" for n in missing[:8]) + (" ..." if len(missing) > 8 else "")
                raise ValueError(
                    "PerSampleGradRecorder: the model has trainable parameters outside supported layers, which "
                    f"would be missing from every product: {listed}. Pass layers=[...] to record a subset."
                )
        else:
            if isinstance(layers, (nn.Module, str)):
                layers = [layers]
            for entry in layers:
                if isinstance(entry, str):
                    if entry not in modules:
                        raise ValueError(f"PerSampleGradRecorder: model has no submodule named {entry!r}")
                    entry_name, entry_mod = entry, modules[entry]
                elif isinstance(entry, nn.Module):
                    if id(entry) not in names:
                        raise ValueError(f"PerSampleGradRecorder: layer {type(entry).__name__} is not a submodule of the model")
                    entry_name, entry_mod = names[id(entry)], entry
                else:
                    raise TypeError(f"PerSampleGradRecorder: layers must hold modules or names, got {type(entry).__name__}")
                # Containers expand to their modules with trainable parameters, which must be supported.
                for sub_name, sub in entry_mod.named_modules(prefix=entry_name):
                    if not any(p.requires_grad for p in sub.parameters(recurse=False)):
                        continue
                    _check_supported(sub_name, sub)
                    if all(m is not sub for _, m in chosen):
                        chosen.append((sub_name, sub))
        if not chosen:
            raise ValueError("PerSampleGradRecorder: no layer with trainable parameters to record")
        full = {id(p): n for n, p in model.named_parameters()}
        self._layers: List[_Layer] = []
        for name, module in chosen:
            params = {
                local: (full[id(p)], p)
                for local, p in module.named_parameters(recurse=False)
                if p.requires_grad and local in ("weight", "bias")
            }
            self._layers.append(_Layer(name, module, params))
        self._param_names = {id(p): n for layer in self._layers for n, p in layer.params.values()}
        self._params = {n: p for layer in self._layers for n, p in layer.params.values()}
        self._recording = False
        self._block = 0  # counts record() blocks: a hook acts only in the block that set it
        self._stream: Optional[Tuple[Dict[str, Tensor], int]] = None
        self._streamed: Optional[Tensor] = None

    # ------------------------------------------------------------------ recording

    @property
    def parameters(self) -> Dict[str, nn.Parameter]:
        """The recorded parameters by name."""
        return dict(self._params)

    @property
    def layer_names(self) -> List[str]:
        return [layer.name for layer in self._layers]

    def clear(self) -> None:
        for layer in self._layers:
            layer.uses = []

    @contextlib.contextmanager
    def record(self, directions=None, kernel_with: Optional["PerSampleGradRecorder"] = None) -> Iterator["PerSampleGradRecorder"]:
        """Record during the forward and backward run inside this block (previous data is dropped).

        Streaming (lowest memory: each layer's per-example gradients are contracted as soon as the
        backward reaches them and then dropped; the recording keeps only the running result):
          directions   as for dot_many (k direction dicts, or one dict of [k, ...] stacks):
                       streamed() is then dot_many(directions), [B, k]. For fbr-ntk, whose
                       directions are fixed before the backward.
          kernel_with  another recorder holding a finished (stored) recording on the same layers:
                       streamed() is then kernel(kernel_with), [B, M].

        Only backwards run inside the block are recorded; a later backward through the same graph
        (a training step after the recording, say) leaves the recording as it is. Several
        backwards inside one block add up on Linear and Conv2d layers; BatchNorm layers and
        streaming recordings drop their inputs at the first backward, so a second one raises
        RuntimeError naming the layer.
        """
        if self._recording:
            raise RuntimeError("PerSampleGradRecorder: record() blocks cannot nest")
        if directions is not None and kernel_with is not None:
            raise ValueError("PerSampleGradRecorder: stream either directions or kernel_with, not both")
        self.clear()
        self._block += 1
        self._stream = None
        if directions is not None:
            self._stream = ("dot",) + self._resolve_many(directions)
        elif kernel_with is not None:
            self._check_same_layers(kernel_with)
            self._stream = ("kernel", kernel_with, {layer.name: uses for layer, uses in kernel_with._checked_uses()})
        self._streamed = None
        handles = []
        recorded = {id(layer.module): layer for layer in self._layers}
        try:
            self._recording = True
            for module in self.model.modules():
                layer = recorded.get(id(module))
                if isinstance(module, _BatchNorm):
                    handles.append(module.register_forward_hook(self._bn_hook(layer)))
                elif layer is not None:
                    handles.append(module.register_forward_hook(self._layer_hook(layer)))
            yield self
        finally:
            self._recording = False
            for h in handles:
                h.remove()

    def _watch_grad(self, layer: _Layer, use: _Use, output: Tensor) -> None:
        block = self._block

        def hook(grad: Tensor) -> None:
            if not self._recording or block != self._block:
                return  # a backward outside its block (e.g. the real step through a kept graph)
            if use.inp is None:  # consumed by an earlier backward (see below): x-hat is gone
                raise RuntimeError(
                    f"PerSampleGradRecorder: layer {layer.name!r} got a second backward in one record() block; "
                    "BatchNorm layers and streaming recordings take one backward per block"
                )
            self._check_version(layer, use)
            if self._stream is None:
                if isinstance(layer.module, _BatchNorm):
                    # Keep BatchNorm's per-example gradients ([B, C]) instead of its input and
                    # output gradient (two activation-sized tensors).
                    use.grad = grad.detach()
                    use.parts = self._bn_grads(use)
                    use.inp = use.grad = use.source = use.norm = None
                else:
                    use.grad = grad.detach() if use.grad is None else use.grad + grad.detach()
                return
            use.grad = grad.detach()
            if self._stream[0] == "dot":
                _, dirs, k = self._stream
                if self._streamed is None:
                    self._streamed = torch.zeros(grad.shape[0], k, dtype=acc_dtype(grad.dtype), device=grad.device)
                self._dot_use(layer, use, dirs, k, self._streamed)
            else:
                _, other, other_uses = self._stream
                if self._streamed is None:
                    self._streamed = torch.zeros(grad.shape[0], other._batch, dtype=acc_dtype(grad.dtype), device=grad.device)
                for theirs in other_uses[layer.name]:
                    self._kernel_pair(layer, use, other, theirs, self._streamed)
            # Drop it: nothing is kept (this closure lives as long as the graph does).
            layer.uses = [u for u in layer.uses if u is not use]
            use.inp = use.grad = use.source = use.norm = None

        output.register_hook(hook)

    def streamed(self) -> Tensor:
        """The result accumulated by the last streaming record() block: [B, k] dots for
        record(directions=...), the [B, M] kernel for record(kernel_with=...)."""
        if self._recording:
            raise RuntimeError("PerSampleGradRecorder: query the recording after the record() block")
        if self._stream is None or self._streamed is None:
            raise RuntimeError("PerSampleGradRecorder: nothing streamed; use `with rec.record(directions=...)` or "
                               "record(kernel_with=...) around a backward")
        return self._streamed

    def _layer_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None
            x = inputs[0]
            use = _Use(x.detach(), x._version, x)
            layer.uses.append(use)
            self._watch_grad(layer, use, output)
            return None

        return hook

    def _bn_hook(self, layer: Optional[_Layer]):
        def hook(module: _BatchNorm, inputs, output):
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None
            batch_stats = _batch_stats_mode(module)
            constant = batch_stats and self.batchnorm == "constant"
            if layer is None and not constant:
                return None  # nothing to record and no backward to change
            x = inputs[0]
            shape = [1, -1] + [1] * (x.dim() - 2)
            new_output = None
            if constant:
                dims = [0] + list(range(2, x.dim()))
                var, mean = torch.var_mean(x.detach(), dim=dims, unbiased=False, keepdim=True)
                # Same values, but the backward treats the batch statistics as constants.
                xhat = (x - mean) * torch.rsqrt(var + module.eps)
                new_output = xhat * module.weight.view(shape) + module.bias.view(shape) if module.affine else xhat
            if layer is not None:
                if constant:  # x-hat is in the graph anyway
                    use = _Use(xhat.detach(), 0, None)
                else:  # keep x (autograd holds it until the backward) and normalise when queried
                    if batch_stats:  # "joint": this batch's statistics, the native output stays
                        dims = [0] + list(range(2, x.dim()))
                        var, mean = torch.var_mean(x.detach(), dim=dims, unbiased=False)
                    else:
                        mean, var = module.running_mean.clone(), module.running_var.clone()
                    use = _Use(x.detach(), x._version, x, norm=(mean, var, module.eps))
                layer.uses.append(use)
                self._watch_grad(layer, use, new_output if new_output is not None else output)
            return new_output

        return hook

    # ------------------------------------------------------------------ helpers

    def _checked_uses(self) -> List[Tuple[_Layer, List[_Use]]]:
        """Layers with their uses that received a gradient; checks batch sizes and in-place edits."""
        if self._recording:
            raise RuntimeError("PerSampleGradRecorder: query the recording after the record() block")
        if self._stream is not None:
            raise RuntimeError("PerSampleGradRecorder: a streaming record() keeps nothing but streamed()")
        out, batch, any_grad = [], None, False
        for layer in self._layers:
            uses = []
            for use in layer.uses:
                self._check_version(layer, use)
                if use.grad is None and use.parts is None:
                    continue  # the output did not reach the loss: zero gradient
                any_grad = True
                size = self._any_tensor(use).shape[0]
                if batch is None:
                    batch = size
                elif size != batch:
                    raise ValueError(f"PerSampleGradRecorder: layer {layer.name!r} saw batch size {size}, others {batch}")
                uses.append(use)
            out.append((layer, uses))
        if not any_grad:
            raise RuntimeError("PerSampleGradRecorder: nothing recorded; run the forward and backward inside `with rec.record():`")
        self._batch = batch
        return out

    @staticmethod
    def _check_version(layer: _Layer, use: _Use) -> None:
        if use.source is not None and use.source._version != use.version:
            raise RuntimeError(
                f"PerSampleGradRecorder: the input of layer {layer.name!r} was modified in place after the "
                "forward; its recorded activations are no longer valid"
            )

    @property
    def batch_size(self) -> int:
        self._checked_uses()
        return self._batch

    @staticmethod
    def _any_tensor(use: _Use) -> Tensor:
        return use.inp if use.inp is not None else next(iter(use.parts.values()))

    def _dtype_device(self) -> Tuple[torch.dtype, torch.device]:
        for layer in self._layers:
            for use in layer.uses:
                t = self._any_tensor(use)
                return t.dtype, t.device
        raise RuntimeError("PerSampleGradRecorder: nothing recorded")

    @staticmethod
    def _linear_parts(use: _Use, module: nn.Linear) -> Tuple[Tensor, Tensor]:
        b = use.inp.shape[0]
        return use.inp.reshape(b, -1, module.in_features), use.grad.reshape(b, -1, module.out_features)

    def _conv_chunks(self, layer: _Layer, use: _Use) -> Iterator[Tuple[int, int, Tensor, Tensor]]:
        """(b0, b1, acts [n, L, p], grads [n, L, q]) over chunks of examples (unfold is memory hungry)."""
        conv: nn.Conv2d = layer.module
        b, L = use.inp.shape[0], use.grad.shape[2] * use.grad.shape[3]
        p = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        step = max(1, _UNFOLD_BUDGET // max(1, p * L))
        geometry = self._conv_geometry(layer)
        for b0 in range(0, b, step):
            b1 = min(b, b0 + step)
            yield b0, b1, unfold(use.inp[b0:b1], *geometry), use.grad[b0:b1].flatten(2).transpose(1, 2)

    @staticmethod
    def _conv_geometry(layer: _Layer):
        conv: nn.Conv2d = layer.module
        return list(conv.kernel_size), list(conv.stride), list(_conv_padding(layer.name, conv)), list(conv.dilation)

    def _weight_segments(self, layer: _Layer, use: _Use) -> Iterator[Tuple[int, int, Tensor, Tensor]]:
        if isinstance(layer.module, nn.Conv2d):
            yield from self._conv_chunks(layer, use)
        else:
            acts, grads = self._linear_parts(use, layer.module)
            yield 0, acts.shape[0], acts, grads

    @staticmethod
    def _bn_grads(use: _Use) -> Dict[str, Tensor]:
        """Per-example BatchNorm gradients: weight sum_pos g * xhat, bias sum_pos g -> [B, C]."""
        if use.parts is not None:
            return use.parts
        dims = [d for d in range(use.grad.dim()) if d != 1]
        rest = dims[1:]
        xhat = use.normalized()
        gw = (use.grad * xhat).sum(rest) if rest else use.grad * xhat
        gb = use.grad.sum(rest) if rest else use.grad
        return {"weight": gw, "bias": gb}

    def _bias_grads(self, layer: _Layer, use: _Use) -> Tensor:
        """Per-example bias gradients of a Linear/Conv2d layer: [B, q]."""
        b = use.grad.shape[0]
        q = layer.module.out_channels if isinstance(layer.module, nn.Conv2d) else layer.module.out_features
        return use.grad.reshape(b, q, -1).sum(2) if isinstance(layer.module, nn.Conv2d) else use.grad.reshape(b, -1, q).sum(1)

    def _explicit_parts(self, layer: _Layer, use: _Use) -> Dict[str, Tensor]:
        """Per-example gradients of every recorded parameter of this use that has a compact form:
        bias of Linear/Conv2d ([B, q]) and both BatchNorm parameters ([B, C])."""
        if isinstance(layer.module, _BatchNorm):
            return self._bn_grads(use)
        return {"bias": self._bias_grads(layer, use)} if "bias" in layer.params else {}

    def _resolve(self, directions: Mapping, k: Optional[int]) -> Tuple[Dict[str, Tensor], int]:
        """{full name: [k, *shape]} from a direction mapping (k=None: single direction, no k axis)."""
        if not isinstance(directions, Mapping):
            raise TypeError(f"PerSampleGradRecorder: a direction must be a dict {{name or Parameter: tensor}}, got {type(directions).__name__}")
        out: Dict[str, Tensor] = {}
        for key, value in directions.items():
            if isinstance(key, nn.Parameter):
                if id(key) not in self._param_names:
                    raise ValueError("PerSampleGradRecorder: a direction is keyed by a Parameter that is not recorded")
                name = self._param_names[id(key)]
            elif isinstance(key, str):
                if key not in self._params:
                    raise ValueError(f"PerSampleGradRecorder: direction key {key!r} is not a recorded parameter; recorded: {', '.join(self._params)}")
                name = key
            else:
                raise TypeError(f"PerSampleGradRecorder: direction keys must be names or Parameters, got {type(key).__name__}")
            if not isinstance(value, Tensor):
                raise TypeError(f"PerSampleGradRecorder: direction[{name!r}] must be a tensor, got {type(value).__name__}")
            shape = tuple(self._params[name].shape)
            want = shape if k is None else (k,) + shape
            if tuple(value.shape) != want:
                raise ValueError(f"PerSampleGradRecorder: direction[{name!r}] has shape {tuple(value.shape)}, expected {want}")
            out[name] = value if k is not None else value[None]
        return out, 1 if k is None else k

    # ------------------------------------------------------------------ products

    def dot(self, direction: Mapping[DirectionKey, Tensor]) -> Tensor:
        """<g_i, direction> for every recorded example: [B] (accumulation dtype)."""
        dirs, _ = self._resolve(direction, None)
        return self._dot(dirs, 1)[:, 0]

    def dot_many(self, directions: Union[Sequence[Mapping[DirectionKey, Tensor]], Mapping[DirectionKey, Tensor]]) -> Tensor:
        """<g_i, direction_k>: [B, k]. `directions` is a list of k direction dicts, or one dict whose
        values are stacked [k, *param.shape]."""
        return self._dot(*self._resolve_many(directions))

    def _resolve_many(self, directions) -> Tuple[Dict[str, Tensor], int]:
        if isinstance(directions, Mapping):
            ks = {int(v.shape[0]) for v in directions.values() if isinstance(v, Tensor) and v.dim() > 0}
            if len(ks) != 1:
                raise ValueError("PerSampleGradRecorder: stacked directions must all have the same leading size k")
            return self._resolve(directions, ks.pop())
        if not isinstance(directions, (list, tuple)) or len(directions) == 0:
            raise ValueError("PerSampleGradRecorder: directions must be a non-empty list of dicts or a dict of stacks")
        singles = [self._resolve(d, None)[0] for d in directions]
        dirs = {}
        for name in {n for s in singles for n in s}:
            ref = next(s[name] for s in singles if name in s)
            dirs[name] = torch.cat([s[name] if name in s else torch.zeros_like(ref) for s in singles])
        return dirs, len(singles)

    def _dot(self, dirs: Dict[str, Tensor], k: int) -> Tensor:
        layers = self._checked_uses()
        dtype, device = self._dtype_device()
        out = torch.zeros(self._batch, k, dtype=acc_dtype(dtype), device=device)
        for layer, uses in layers:
            for use in uses:
                self._dot_use(layer, use, dirs, k, out)
        return out

    def _dot_use(self, layer: _Layer, use: _Use, dirs: Dict[str, Tensor], k: int, out: Tensor) -> None:
        """out += <g_i, direction_k> restricted to one use of one layer."""
        ref = self._any_tensor(use)
        dtype, device, acc = ref.dtype, ref.device, out.dtype
        weight = layer.params.get("weight")
        if weight is not None and weight[0] in dirs and not isinstance(layer.module, _BatchNorm):
            D = dirs[weight[0]].to(device=device, dtype=dtype)
            D = D.reshape(k, D.shape[1], -1)
            if isinstance(layer.module, nn.Conv2d):
                geometry = dict(zip(("kernel_size", "stride", "padding", "dilation"), self._conv_geometry(layer)))
                out += conv_tangent_dot(use.inp, use.grad, D, **geometry)
            else:
                out += tangent_dot(*self._linear_parts(use, layer.module), D)
        for local, g in self._explicit_parts(layer, use).items():
            if local in layer.params and layer.params[local][0] in dirs:
                out += g.to(acc) @ dirs[layer.params[local][0]].to(device=device, dtype=acc).reshape(k, -1).T

    def kernel(self, other: Optional["PerSampleGradRecorder"] = None) -> Tensor:
        """K_ij = <g_i, g'_j> over the recorded parameters: [B, M]; `other` recorded another batch
        on the same layers (a second recorder on the same model), None means this batch with itself."""
        other = self if other is None else other
        self._check_same_layers(other)
        mine, theirs = self._checked_uses(), other._checked_uses()
        dtype, device = self._dtype_device()
        out = torch.zeros(self._batch, other._batch, dtype=acc_dtype(dtype), device=device)
        for (layer, uses_a), (_, uses_b) in zip(mine, theirs):
            for ua in uses_a:
                for ub in uses_b:
                    self._kernel_pair(layer, ua, other, ub, out)
        return out

    def _check_same_layers(self, other) -> None:
        if not isinstance(other, PerSampleGradRecorder):
            raise TypeError(f"PerSampleGradRecorder.kernel: other must be a PerSampleGradRecorder, got {type(other).__name__}")
        if [(l.name, sorted(l.params)) for l in self._layers] != [(l.name, sorted(l.params)) for l in other._layers]:
            raise ValueError("PerSampleGradRecorder.kernel: the two recorders must record the same layers and parameters")

    def _kernel_pair(self, layer: _Layer, ua: _Use, other: "PerSampleGradRecorder", ub: _Use, out: Tensor) -> None:
        """out += <g_i, g'_j> restricted to one use of one layer on each side."""
        if "weight" in layer.params and not isinstance(layer.module, _BatchNorm):
            if isinstance(layer.module, nn.Conv2d):
                geometry = dict(zip(("kernel_size", "stride", "padding", "dilation"), self._conv_geometry(layer)))
                out += conv_tangent_kernel(ua.inp, ua.grad, ub.inp, ub.grad, **geometry)
            else:
                out += tangent_kernel(*self._linear_parts(ua, layer.module), *self._linear_parts(ub, layer.module))
        parts_a, parts_b = self._explicit_parts(layer, ua), other._explicit_parts(layer, ub)
        for local in parts_a:
            if local in layer.params:
                out += parts_a[local].to(out.dtype) @ parts_b[local].to(out.dtype).T

    def weighted_sum(self, weights: Tensor) -> Dict[str, Tensor]:
        """{name: sum_i weights[i] g_i} for every recorded parameter (the gradient of
        sum_i w_i l_i when the recording back-propagated sum_i l_i), in the parameter's dtype."""
        layers = self._checked_uses()
        if not isinstance(weights, Tensor) or weights.dim() != 1 or weights.shape[0] != self._batch:
            raise ValueError(f"PerSampleGradRecorder.weighted_sum: weights must be a [B] = [{self._batch}] tensor")
        out: Dict[str, Tensor] = {name: torch.zeros_like(p) for name, p in self._params.items()}
        for layer, uses in layers:
            module = layer.module
            for use in uses:
                ref = self._any_tensor(use)
                w = weights.to(device=ref.device, dtype=ref.dtype)
                weight = layer.params.get("weight")
                if weight is not None and not isinstance(module, _BatchNorm):
                    if isinstance(module, nn.Conv2d):
                        wg = use.grad * w.view([-1] + [1] * (use.grad.dim() - 1))
                        gw = torch.nn.grad.conv2d_weight(
                            use.inp, module.weight.shape, wg, module.stride, _conv_padding(layer.name, module), module.dilation, 1
                        )
                    else:
                        acts, grads = self._linear_parts(use, module)
                        gw = (grads * w.view(-1, 1, 1)).flatten(0, 1).T @ acts.flatten(0, 1)
                    out[weight[0]] += gw.to(out[weight[0]].dtype)
                for local, g in self._explicit_parts(layer, use).items():
                    if local in layer.params:
                        out[layer.params[local][0]] += (w.to(g.dtype) @ g).to(out[layer.params[local][0]].dtype)
        return out

    def per_sample_grads(self) -> Dict[str, Tensor]:
        """{name: [B, *shape]} explicit per-example gradients (memory B x #params; for small models,
        tests and debugging)."""
        layers = self._checked_uses()
        out: Dict[str, Tensor] = {
            name: torch.zeros((self._batch,) + tuple(p.shape), dtype=p.dtype, device=p.device) for name, p in self._params.items()
        }
        for layer, uses in layers:
            for use in uses:
                weight = layer.params.get("weight")
                if weight is not None and not isinstance(layer.module, _BatchNorm):
                    target = out[weight[0]].view(self._batch, layer.module.weight.shape[0], -1)
                    for b0, b1, acts, grads in self._weight_segments(layer, use):
                        target[b0:b1] += torch.einsum("btq,btp->bqp", grads, acts).to(target.dtype)
                for local, g in self._explicit_parts(layer, use).items():
                    if local in layer.params:
                        out[layer.params[local][0]] += g.to(out[layer.params[local][0]].dtype)
        return out

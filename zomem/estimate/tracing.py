"""What one forward (and backward) of a model keeps beyond its parameters, traced with fake tensors.

The model is built from its config under a ``FakeTensorMode`` (shapes without storage, so any size costs nothing)
and the workload's loss is run on fake CPU tensors under a dispatch mode that follows every storage from the op
that makes it to its release. That counts what the architecture really allocates — gated MLPs, grouped-query
attention, rotary tables, masks, untied heads, the loss's float32 copies, autocast's half copies of the weights —
with no constant of one family. Attention runs as PyTorch's fused kernels keep it (the output and per-row
statistics, not the S×S scores), as on a GPU. Decoder layers are alike, so a model is traced with two and with three
layers and the rest is extrapolated from their difference: a trace costs a fraction of a second whatever the depth. A
backward can be traced
with gradient checkpointing (transformers' own, on the fake model) and with each gradient freed as soon as it is
complete, as an optimizer that updates inside backward frees it (LOMO's).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zomem import models, workloads

KINDS = ("other", "gradients", "casts")
#: layers a trace runs (and one less): the first layer differs from the rest (its input is the embeddings'), so the
#: per-layer cost is read off the second and third
TRACED = 3


@dataclass(frozen=True)
class Moment:
    """Live bytes at one moment of a trace, by what holds them."""

    #: activations, the logits, the loss's temporaries: everything that is neither a gradient nor a weight's copy
    other: int = 0
    #: gradients of the parameters made so far
    gradients: int = 0
    #: autocast's half-precision copies of the weights
    casts: int = 0

    @property
    def total(self) -> int:
        """Every byte alive then."""
        return self.other + self.gradients + self.casts

    def extrapolated(self, fewer: Moment, layers: int) -> Moment:
        """This moment (of a trace of :data:`TRACED` layers) for ``layers`` layers, ``fewer`` being the same moment
        with one layer less."""
        return Moment(*(getattr(self, k) + (layers - TRACED) * (getattr(self, k) - getattr(fewer, k))
                        for k in KINDS))


@dataclass(frozen=True)
class Trace:
    """A forward (no_grad) or a forward and backward of one workload: the moments that can be its peak, and what
    is alive where."""

    #: the most alive during the forward (the loss included), during the backward of the head (every layer's
    #: activations still saved), and during the layers' backward to its end (a checkpointed layer's recomputed
    #: activations, a tied embedding's gradients summed); the last two only with a backward
    moments: tuple[Moment, ...]
    #: the most alive while a decoder layer runs, and from the LM head on (where layers and head sit on different
    #: GPUs, each holds its own)
    layer_peak: int
    head_peak: int
    #: alive as the LM head's matmul starts (a machine that computes it into a float32 buffer adds that buffer)
    at_head: Moment

    @property
    def peak(self) -> Moment:
        """The moment the most bytes are alive."""
        return max(self.moments, key=lambda m: m.total)


@dataclass
class _Span:
    size: int
    kind: str
    start: int
    end: int | None = None


class _Tracker(TorchDispatchMode):
    """Follows every storage made under it, from the op that makes it to the op during which it is freed."""

    def __init__(self, known: set[int], weights: set[int]) -> None:
        super().__init__()
        self.known = known  # storages that existed before (parameters, buffers, inputs): not counted
        self.weights = weights  # parameter storages: their casts are autocast's copies
        self.time = 0
        self.spans: list[_Span] = []
        self.current: dict[int, _Span] = {}
        self.regions: list[tuple[int, str]] = [(0, "outside")]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        kind = "casts" if func is torch.ops.aten._to_copy.default and _key(args[0]) in self.weights else "other"
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._made(tensor, kind)
        self.time += 1
        return out

    def _made(self, tensor: torch.Tensor, kind: str) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.known or key in self.current:
            return
        span = self.current[key] = _Span(storage.nbytes(), kind, self.time)
        self.spans.append(span)
        weakref.finalize(storage, self._free, key, span)

    def _free(self, key: int, span: _Span) -> None:
        span.end = self.time
        self.current.pop(key, None)

    def enter(self, region: str) -> None:
        """Attribute what follows to ``region`` (``layer``, ``head``, ``backward``, ``layer backward``)."""
        self.regions.append((self.time, region))

    def first(self, region: str) -> int | None:
        """When ``region`` was first entered."""
        return next((t for t, name in self.regions if name == region), None)

    def timeline(self, gradients: set[int]) -> list[Moment]:
        """Live bytes by kind after each op; the storages alive at the end that are ``gradients`` are gradients."""
        for key, span in self.current.items():
            if key in gradients:
                span.kind = "gradients"
        deltas = {kind: [0] * (self.time + 1) for kind in KINDS}
        for span in self.spans:
            deltas[span.kind][span.start] += span.size
            if span.end is not None:
                deltas[span.kind][span.end] -= span.size
        live = {kind: list(itertools.accumulate(d)) for kind, d in deltas.items()}
        # one moment after each op, and one for what was freed after the last
        return [Moment(*(live[kind][t] for kind in KINDS)) for t in range(self.time + 1)]


def _key(tensor: Any) -> int | None:
    return tensor.untyped_storage()._cdata if isinstance(tensor, torch.Tensor) else None


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Only errors from ``logger`` while the block runs: warnings about what the estimator does on purpose."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@functools.lru_cache(maxsize=32)
def _fake_model(spec: models.ModelSpec, layers: int, dtype: torch.dtype, checkpointing: bool = False,
                tuning: str = "full") -> tuple[Any, torch.nn.Module]:
    """A fake model of ``spec`` cut to ``layers`` decoder layers, tuned as ``tuning`` (peft's wrapping, as a cell
    does) and checkpointing its layers if asked, and the fake mode it lives in."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    config = spec.config()
    config.num_hidden_layers = layers
    for name in ("layer_types", "mlp_only_layers"):  # per-layer lists follow the depth
        if isinstance(getattr(config, name, None), list):
            setattr(config, name, getattr(config, name)[:layers])
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # transformers warns about configs cut to fewer layers than a per-layer setting names: nothing to act on here
    with mode, quiet("transformers"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # peft moves what it adds to the device of the layer it wraps, which torch cannot do to a fake tensor: its
    # adapters (a fraction of a percent of the weights) are made as real tensors, which the mode reads as fakes
    model = models.apply_tuning(model, tuning)
    return mode, models.enable_checkpointing(model) if checkpointing else model.eval()


def _region_peak(tracker: _Tracker, timeline: list[Moment], region: str) -> int:
    bounds = [*tracker.regions, (len(timeline), "end")]
    return max((timeline[t].total for (start, name), (stop, _) in itertools.pairwise(bounds) if name == region
                for t in range(start, min(stop, len(timeline)))), default=0)


def _trace_once(spec: models.ModelSpec, layers: int, workload: workloads.Workload, dtype: str, precision: str,
                backprop: bool, checkpointing: bool = False, fused: bool = False, tuning: str = "full") -> Trace:
    weights_dtype = models.dtype("float32" if precision == "mixed" else dtype)
    mode, model = _fake_model(spec, layers, weights_dtype, checkpointing, tuning)
    real = workloads.make_batch(workload, spec.vocab)  # token ids: small, and made the same way as a cell's
    with mode:
        batch = workloads.Batch(*(mode.from_tensor(t) for t in (real.input_ids, real.attention_mask, real.labels,
                                                                real.label_words)))
    trained = [p for p in model.parameters() if p.requires_grad or tuning == "full"]
    for param in trained:
        # trained parameters require grad even when a forward runs under no_grad: autocast caches their casts
        param.requires_grad_(True)
        param.grad = None
    weights = {_key(p) for p in model.parameters()}
    known = weights | {_key(b) for b in model.buffers()} | {_key(t) for t in vars(batch).values()}
    tracker = _Tracker(known, weights)
    hooks = []
    layers = [module for _, module in models.decoder_layers(model)]
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(lambda *_: tracker.enter("layer")))
        hooks.append(layer.register_forward_hook(lambda *_: tracker.enter("outside")))
    hooks.append(model.get_output_embeddings().register_forward_pre_hook(lambda *_: tracker.enter("head")))
    if backprop:
        hooks += [layer.register_full_backward_pre_hook(lambda *_: tracker.enter("layer backward"))
                  for layer in layers]
    if fused:
        hooks += [param.register_post_accumulate_grad_hook(_free_grad) for param in trained]
    autocast = (torch.autocast("cpu", dtype=models.dtype(dtype)) if precision == "mixed"
                else contextlib.nullcontext())
    try:
        with mode, tracker, torch.set_grad_enabled(backprop), warnings.catch_warnings():
            # a tuned model's frozen layers take no input that requires grad, which the backward hooks remark on;
            # peft hands a prefix to transformers under the name it deprecates
            warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
            warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
            with autocast:
                loss = workloads.loss(model, workload, batch)
            tracker.enter("backward")
            if backprop:
                loss.backward()
            del loss
    finally:
        for hook in hooks:
            hook.remove()
    timeline = tracker.timeline({_key(p.grad) for p in model.parameters() if p.grad is not None})
    backward = tracker.first("backward") or len(timeline)
    sections = [timeline[:backward]]
    if backprop:
        # the head's backward, every layer's activations still saved; then the layers' backward to the end
        layer_backward = tracker.first("layer backward") or len(timeline)
        sections += [timeline[backward:layer_backward], timeline[layer_backward:]]
    moments = tuple(max(section, key=lambda m: m.total, default=Moment()) for section in sections)
    head = tracker.first("head") or 0
    return Trace(moments, _region_peak(tracker, timeline, "layer"), _region_peak(tracker, timeline, "head"),
                 timeline[head] if timeline else Moment())


def _free_grad(param: torch.Tensor) -> None:
    param.grad = None


@functools.lru_cache(maxsize=512)
def trace(model: str, workload: workloads.Workload, dtype: str, precision: str, backprop: bool,
          checkpointing: bool = False, fused: bool = False, tuning: str = "full") -> Trace:
    """The trace of ``workload`` on ``model``: a forward under no_grad, or a forward and backward; weights in
    ``dtype`` (float32 in mixed precision, the forward then under autocast to ``dtype``). ``checkpointing``: the
    decoder layers recompute their activations in backward; ``fused``: each gradient is freed as soon as it is
    complete, as an optimizer that updates inside backward frees it; ``tuning``: only the adapters or the prefix
    train."""
    spec = models.spec(model)
    options = (workload, dtype, precision, backprop, checkpointing, fused, tuning)
    if spec.layers <= TRACED:
        return _trace_once(spec, spec.layers, *options)
    fewer, traced = (_trace_once(spec, n, *options) for n in (TRACED - 1, TRACED))
    layers = spec.layers
    more = layers - TRACED
    return Trace(tuple(m.extrapolated(f, layers) for m, f in zip(traced.moments, fewer.moments, strict=True)),
                 traced.layer_peak + more * (traced.layer_peak - fewer.layer_peak),
                 traced.head_peak + more * (traced.head_peak - fewer.head_peak),
                 traced.at_head.extrapolated(fewer.at_head, layers))

"""The memory tracker of one step: every tensor storage the step makes or frees, seen at the dispatcher.

A dispatch mode sees each operation's outputs; a storage it has not seen before is an allocation, and a weak
reference on it says when it is freed. What each storage is comes from what zomem knows of the cell: the model's
parameters and buffers, the optimizer's state and the parameters' ``.grad`` (by identity, at both ends of the step),
a zeroth-order walk's block buffers and what a perturb phase makes, what autograd saves for backward (a saved-tensor
hook), the head's output and what the loss makes outside the model, autocast's copies of the weights; the rest is
temporaries. Module hooks name the module running at each allocation (in a backward, the module whose output's
gradient arrived last), and the optimizer's phase hook the phase.

torch's own ``MemTracker`` cannot serve: it refuses a second root forward inside one tracking region (a zeroth-order
step has two or more), and it labels all that runs inside ``optimizer.step`` (zomem's forwards and backward do)
optimizer state.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from zomem import optim
from zomem.timelines import CATEGORIES, LOSS, OTHER, Band, Timeline

#: the CUDA caching allocator's smallest block: every allocation is rounded up to a multiple of it
CUDA_BLOCK_BYTES = 512
#: precedence when a storage is known several ways: a saved tensor that is also a weight is a weight, a copy of the
#: logits the loss saves is the loss's
_PRECEDENCE = ("weights", "optimizer_state", "gradients", "autocast_cache", "perturbation", "logits", "activations",
               "temporaries")
_ORDER = {category: rank for rank, category in enumerate(_PRECEDENCE)}
#: allocator events :func:`cuda_snapshot` keeps: enough for one step of a large model
SNAPSHOT_ENTRIES = 1_000_000
#: the phases whose allocations are perturbations, whatever holds them
PERTURBING = ("perturb", "regenerate")
#: the module indices of what runs outside every module: outside the forwards and backward, and the loss in them
_NO_MODULE, _LOSS_MODULE = 0, 1


class _Storage:
    """One tracked storage: its bytes, what it has been seen to be, and whether the step made it."""

    __slots__ = ("nbytes", "category", "made", "ref")

    def __init__(self, nbytes: int, category: str, made: bool) -> None:
        self.nbytes = nbytes
        self.category = category
        self.made = made
        self.ref: weakref.ref[torch.UntypedStorage] | None = None

    def know(self, category: str) -> None:
        """Record that the storage is ``category`` too; the category that ranks first wins."""
        if _ORDER[category] < _ORDER[self.category]:
            self.category = category


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return (leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


class Tracker(TorchDispatchMode):
    """Tracks the tensor storages of ``device`` over one step of ``model`` driven by ``optimizer``.

    Use as a context manager around the step, with :meth:`phase` as the step's phase hook; then :meth:`timeline`.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        super().__init__()
        self.model, self.optimizer, self.device = model, optimizer, device
        self.ops = 0
        #: (op, seconds, bytes added or freed, storage, module index), in the order they happened
        self.events: list[tuple[int, float, int, _Storage, int]] = []
        #: storages alive when the step began
        self.initial: list[_Storage] = []
        self._live: dict[int, _Storage] = {}
        self._started = self._ended = self._op_started = 0.0
        self.spans: list[Band] = []
        self._phase: str | None = None
        #: the net perturbation ε the weights carry (sum of the perturb calls since the step or the last update)
        self._offset = 0.0
        self.modules: list[str] = ["", LOSS]  # _NO_MODULE, _LOSS_MODULE
        self._module_index: dict[str, int] = {}
        self._stack: list[int] = []
        self._backward_module = _LOSS_MODULE
        self._hooked = WeakIdKeyDictionary()
        self._head: torch.nn.Module | None = model.get_output_embeddings() if hasattr(
            model, "get_output_embeddings") else None
        self._exit = contextlib.ExitStack()
        self.untracked_bytes: int | None = None

    # -- what a storage is ------------------------------------------------------------------------------------
    def _nbytes(self, storage: torch.UntypedStorage) -> int:
        n = storage.nbytes()
        if self.device.type == "cuda":
            return math.ceil(n / CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
        return n

    def _mine(self, t: torch.Tensor) -> bool:
        return t.layout == torch.strided and t.device == self.device and not t.is_meta

    def _freed(self, record: _Storage, key: int) -> None:
        if self._live.get(key) is record:
            del self._live[key]
            self._event(-record.nbytes, record)

    def _now(self) -> float:
        return time.perf_counter() - self._started

    def _event(self, delta: int, record: _Storage, at: float | None = None) -> None:
        # an operation's outputs are allocated when it starts; no event goes back before the one logged last
        seconds = self._now() if at is None else max(at, self.events[-1][1] if self.events else 0.0)
        self.events.append((self.ops, seconds, delta, record, self._current_module()))

    def _storage(self, t: torch.Tensor, category: str, *, existing: bool = False,
                 at: float | None = None) -> _Storage | None:
        """The record of ``t``'s storage, made on first sight: an allocation (at ``at`` seconds, or now), or
        (``existing``) a storage that was alive when the step began."""
        if not self._mine(t):
            return None
        storage = t.untyped_storage()
        key = storage._cdata
        record = self._live.get(key)
        if record is not None:
            record.know(category)
            size = self._nbytes(storage)
            if size != record.nbytes:  # an out= operation resized it
                self._event(size - record.nbytes, record, at)
                record.nbytes = size
            return record
        record = _Storage(self._nbytes(storage), category, made=not existing)
        record.ref = weakref.ref(storage, lambda _, record=record, key=key: self._freed(record, key))
        self._live[key] = record
        if existing:
            self.initial.append(record)
        else:
            self._event(record.nbytes, record, at)
        return record

    def _know(self, category: str, tensors: Iterable[torch.Tensor], existing: bool = True) -> None:
        for t in tensors:
            self._storage(t, category, existing=existing)

    def _known_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The storages zomem knows by identity: weights, optimizer state, gradients."""
        weights = [*self.model.parameters(), *self.model.buffers()]
        state = [v for s in self.optimizer.state.values() if isinstance(s, dict)
                 for v in s.values() if isinstance(v, torch.Tensor)]
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return {"weights": weights, "optimizer_state": state, "gradients": grads}

    def _walk_buffers(self) -> None:
        if isinstance(self.optimizer, optim.ZerothOrder):
            self._know("perturbation", self.optimizer.walk_buffers(), existing=False)

    # -- modules and phases -----------------------------------------------------------------------------------
    def _module(self, name: str) -> int:
        if name not in self._module_index:
            self._module_index[name] = len(self.modules)
            self.modules.append(name)
        return self._module_index[name]

    def _current_module(self) -> int:
        if self._stack:
            return self._stack[-1]
        if self._phase == "backward":
            return self._backward_module
        return _LOSS_MODULE if self._phase == "forward" else _NO_MODULE

    def _hooks(self) -> None:
        handles = []
        for name, module in self.model.named_modules():
            index = self._module(name or type(module).__name__)
            handles.append(module.register_forward_pre_hook(lambda m, args, index=index: self._stack.append(index)))
            handles.append(module.register_forward_hook(
                lambda m, args, out, index=index: self._after_forward(m, out, index)))
        self._exit.callback(lambda: [h.remove() for h in handles])

    def _after_forward(self, module: torch.nn.Module, out: Any, index: int) -> None:
        self._stack.pop()
        first = next(_tensors(out), None)
        if first is None:
            return
        if module is self._head:
            self._storage(first, "logits")
        if first.requires_grad and torch.is_grad_enabled() and first not in self._hooked:
            # Its gradient arrives when backward enters this module. A tensor several modules return (the head's
            # logits, the model's) is hooked once, for the innermost: it returned first.
            self._hooked[first] = True
            first.register_hook(lambda grad, index=index: setattr(self, "_backward_module", index))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """The step's phase hook: marks the operations of phase ``name`` (inside another phase, nothing: the outer
        one owns them, as the phase timer counts them). A forward is ``forward +`` or ``forward −`` while the
        weights carry a perturbation of that sign."""
        if self._phase is not None:
            yield
            return
        label = name
        if name == "forward" and self._offset:
            label = f"forward {'+' if self._offset > 0 else '−'}"
        self._phase, start, start_s = name, self.ops, self._now()
        if name == "backward":
            self._backward_module = _LOSS_MODULE  # the loss's gradient comes first
        try:
            yield
        finally:
            self._phase = None
            self.spans.append(Band(label, start, self.ops, start_s, self._now()))
            if name == "update":
                self._offset = 0.0

    def _follow_perturbations(self) -> None:
        """Note the sign of each perturbation the optimizer applies, so a forward's band says where θ is."""
        if not isinstance(self.optimizer, optim.ZerothOrder):
            return
        perturb = self.optimizer.perturb

        def following(step_seed: int, alpha: float) -> None:
            self._offset += alpha
            perturb(step_seed, alpha)

        self.optimizer.perturb = following  # type: ignore[method-assign]
        self._exit.callback(lambda: delattr(self.optimizer, "perturb"))

    def _saved(self, t: torch.Tensor) -> torch.Tensor:
        # What the step did not make (a weight, the batch's token ids) is saved but is no activation.
        record = self._storage(t, "temporaries", existing=True)
        if record is not None and record.made:
            record.know("activations")
        return t

    # -- the mode ---------------------------------------------------------------------------------------------
    def __enter__(self) -> Tracker:
        for category, tensors in self._known_tensors().items():
            self._know(category, tensors)
        if self.device.type == "cuda":
            tracked = sum(r.nbytes for r in self.initial)
            self.untracked_bytes = torch.cuda.memory_allocated(self.device) - tracked
        self._hooks()
        self._follow_perturbations()
        self._exit.enter_context(torch.autograd.graph.saved_tensors_hooks(self._saved, lambda t: t))
        self._started = time.perf_counter()
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ended = self._now()
        super().__exit__(*exc)
        self._exit.close()
        for category, tensors in self._known_tensors().items():
            self._know(category, tensors, existing=False)
        self._walk_buffers()
        # Storages still alive keep nothing of this tracker: their frees after the step are not its business.
        for record in self._live.values():
            record.ref = None
        self._live.clear()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # record_function's markers: no tensor, no operation of the step
            return func(*args, **kwargs)
        fresh = func is torch.ops.aten.lift_fresh.default  # its input was made just now, outside the dispatcher
        for t in _tensors((args, kwargs)):
            self._storage(t, "temporaries", existing=not fresh)
        started = self._now()
        out = func(*args, **kwargs)
        self.ops += 1
        category = self._category_of_output(func, args, out)
        for t in _tensors(out):
            self._storage(t, category, at=started)
        self._walk_buffers()
        return out

    def _category_of_output(self, func: Any, args: tuple[Any, ...], out: Any) -> str:
        if self._current_module() == _LOSS_MODULE:
            return "logits"  # the loss outside the model, and its gradient before backward reaches a module
        if self._phase in PERTURBING:
            return "perturbation"  # what a walk makes beside its blocks: forward-grad's tangents, a mask
        if func is torch.ops.aten._to_copy.default and torch.is_autocast_enabled(self.device.type):
            source = args[0].untyped_storage()._cdata if self._mine(args[0]) else None
            record = self._live.get(source) if source is not None else None
            if record is not None and record.category == "weights":
                return "autocast_cache"
        return "temporaries"

    # -- the result -------------------------------------------------------------------------------------------
    def bands(self) -> list[Band]:
        """The phases in order, the operations outside every named phase in bands of their own: ``other`` (after a
        backward: ``optimizer step``)."""
        bands: list[Band] = []
        at, at_s = 0, 0.0
        for span in self.spans:
            if span.start > at:
                bands.append(Band(self._gap_name(bands), at, span.start, at_s, span.start_s))
                at_s = span.start_s
            # the moments between two phases that dispatch nothing belong to the next: the bands tile the step
            bands.append(span._replace(start_s=at_s))
            at, at_s = span.end, span.end_s
        if self.ops > at:
            bands.append(Band(self._gap_name(bands), at, self.ops, at_s, self._ended))
        return bands

    @staticmethod
    def _gap_name(before: list[Band]) -> str:
        return "optimizer step" if before and before[-1].name == "backward" else OTHER

    def timeline(self, **cell: Any) -> Timeline:
        """The step as a :class:`Timeline`; ``cell`` names it (model, optimizer, workload … measured, baseline)."""
        values = dict.fromkeys(CATEGORIES, 0)
        for record in self.initial:
            values[record.category] += record.nbytes
        series: dict[str, list[Any]] = {"op": [0], "seconds": [0.0], "module": [_NO_MODULE],
                                        **{c: [v] for c, v in values.items()}}
        for op, seconds, delta, record, module in self.events:
            values[record.category] += delta
            series["op"].append(op)
            series["seconds"].append(round(seconds, 6))
            series["module"].append(module)
            for c in CATEGORIES:
                series[c].append(values[c])
        return Timeline(ops=self.ops, seconds=round(self._ended, 6), phases=self.bands(), modules=self.modules,
                        series=series,
                        untracked_bytes=self.untracked_bytes, **cell)


@contextlib.contextmanager
def cuda_snapshot(path: str, device: torch.device) -> Iterator[None]:
    """Record the CUDA caching allocator's history over the body and save it at ``path``: the snapshot file that
    PyTorch's memory viewer (pytorch.org/memory_viz) opens. Python stacks only: C++ ones cost seconds per step."""
    torch.cuda.memory._record_memory_history(max_entries=SNAPSHOT_ENTRIES, stacks="python", device=device)
    try:
        yield
    finally:
        try:
            torch.cuda.memory._dump_snapshot(path)
        finally:
            torch.cuda.memory._record_memory_history(enabled=None, device=device)

"""The machinery every zeroth-order optimizer shares: step seeds, regenerated perturbations, phases.

A perturbation z ~ N(0, I) is never stored. Parameter ``j`` at step seed ``s`` is walked in blocks of
``block_size`` elements, and block ``k`` of its z is drawn from a generator seeded with
``mix(s, j, k)``: any block of any tensor can be regenerated alone, on its own device, in any order.
With ``block_size=None`` a block is the whole tensor (the generator is seeded from ``(s, j)``).

A parameter sharded over ranks (FSDP2's DTensor, split along its first dimension) is walked over the blocks of the
whole flattened tensor that its shard covers, each drawn whole and cut to the shard: every element gets the z it gets
unsharded, so N ranks take the step one rank would.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from zomem.shards import local, offset

#: the dtypes a ``state_dtype`` option accepts (None: the parameter's own dtype)
STATE_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}
#: CPU default: a block that stays in cache between drawing z and adding it (measured 4.1 vs 6.6 ns
#: per element for whole tensors on a 2-core EPYC).
CPU_BLOCK = 1 << 20
#: CUDA default: large enough that each draw and add fills the GPU, small enough that a walk's buffers stay a
#: few tens of MiB whatever the model (an embedding of 103M elements would otherwise be drawn whole).
CUDA_BLOCK = 1 << 24
_MASK64 = (1 << 64) - 1

PhaseHook = Callable[[str], contextlib.AbstractContextManager[Any]]


def mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over each): nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & _MASK64
        state ^= state >> 31
    return state >> 1


def resolve_block_size(block_size: int | str | None, device: torch.device) -> int | None:
    """``"auto"``: :data:`CPU_BLOCK` elements on CPU, :data:`CUDA_BLOCK` on a GPU."""
    if block_size == "auto":
        return CPU_BLOCK if device.type == "cpu" else CUDA_BLOCK
    return block_size  # type: ignore[return-value]


def compute_dtype(param_dtype: torch.dtype, state_dtype: str | None = None) -> torch.dtype:
    """The dtype a walk draws z and does its arithmetic in: float32 at least, wider when the parameters or the
    state are. In half precision an Adam epsilon of 1e-8 is 0, z² underflows, and an increment below 1/2048 of
    a value vanishes; tensors are still *stored* in their own dtype."""
    candidates = [param_dtype, torch.float32, *([STATE_DTYPES[state_dtype]] if state_dtype else [])]
    return max(candidates, key=lambda dtype: torch.finfo(dtype).bits)


@dataclass
class Block:
    """One block of one parameter: its flat slice and, while the walk is on it, its z."""

    group: dict[str, Any]
    param: torch.Tensor
    index: int  # tensor index j
    block: int  # block index k within the tensor
    span: slice  # which elements of the flattened parameter (of this rank's shard, for a sharded one)
    x: torch.Tensor  # the parameter's elements (a view: updating it updates the parameter)
    z: torch.Tensor  # a reused buffer: valid until the walk moves on


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run a block walk on one CPU thread: drawing z is serial anyway, and an add into a cache-sized block gains
    nothing from a parallel region, whose barrier stalls at every block on a busy machine (a perturbation pass
    over opt-125m measured 0.5 s on one thread against 1.7 s on two at a load average of 3.5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Refuse a hyper-parameter outside its range, naming the value."""
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"invalid {name}: {value} (must be {'>= 0' if allow_zero else '> 0'})")


def check_fraction(name: str, value: float) -> None:
    """Refuse a share outside [0, 1), naming the value."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"invalid {name}: {value} (must be in [0, 1))")


def check_state_dtype(value: str | torch.dtype | None) -> str | None:
    """A ``state_dtype`` option as its name (None keeps the parameter dtype); anything else is refused."""
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if value is not None and value not in STATE_DTYPES:
        raise ValueError(f"invalid state_dtype: {value!r} (one of {', '.join(STATE_DTYPES)} or None)")
    return value


def decay_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]]) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weight decay skips biases and LayerNorms (the 1-D tensors). The names go
    along (torch keeps them as each group's ``param_names``), for methods that walk the model by layer."""
    decay, no_decay = [], []
    for name, param in named_params:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append((name, param))
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class ZerothOrder(Optimizer):
    """Base class: a closure that returns a loss from a forward pass (under no_grad); seeded perturbations.

    Subclasses implement ``step(closure)`` with :meth:`next_step_seed`, :meth:`blocks` and :meth:`perturb`.
    Their persistent state is what ``self.state`` holds: tensors per parameter, plus ``self.state["global"]``
    (step count and seed), which ``state_dict`` carries so a run resumes with the same seeds.
    """

    #: the harness runs the closure under no_grad and never calls backward
    forward_only: ClassVar[bool] = True
    #: persistent state in copies of the trainable parameters (SPEC §4's table), read by the estimator
    state_copies: ClassVar[float] = 0.0
    #: block-sized buffers (z and scratch, in the compute dtype) alive during the forwards, and during the update
    #: pass: the estimator's count of what a walk adds beyond the persistent state
    forward_buffers: ClassVar[int] = 1
    update_buffers: ClassVar[int] = 1
    #: whether the method runs on FSDP-sharded parameters, each rank walking its shards: its perturbation and state
    #: are element by element (a low-rank or masked one, built from a whole tensor, is not)
    shardable: ClassVar[bool] = True

    def __init__(self, params: Any, defaults: dict[str, Any], *, seed: int = 0,
                 block_size: int | str | None = "auto") -> None:
        if not (block_size is None or block_size == "auto" or (isinstance(block_size, int) and block_size > 0)):
            raise ValueError(f"invalid block_size: {block_size!r} (a positive element count, 'auto' or None)")
        super().__init__(params, {**defaults, "block_size": block_size})
        self.state["global"] = {"step": 0, "seed": int(seed)}
        #: wraps each phase of a step ("perturb", "update", …); the harness sets it to time them
        self.phase: PhaseHook = lambda name: contextlib.nullcontext()
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def step_count(self) -> int:
        """Steps taken so far."""
        return self.state["global"]["step"]

    def step_seed(self, step: int) -> int:
        """The seed of step ``step``: derived from the optimizer seed, so it needs no storage."""
        return mix(self.state["global"]["seed"], step)

    def next_step_seed(self) -> int:
        """Start a step: count it and return its seed."""
        seed = self.step_seed(self.step_count)
        self.state["global"]["step"] += 1
        return seed

    def reach_steady_state(self) -> None:
        """Bring the optimizer, without running any forward, to the state its later steps run in, so a timed step
        costs what a step of a long run costs (a method whose first steps differ overrides this); the harness calls
        it before the warm-up."""

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def _buffer(self, device: torch.device, dtype: torch.dtype, size: int, name: str | None = None) -> torch.Tensor:
        # One z buffer per device and dtype; methods that need more scratch space name each extra buffer.
        key: tuple[Any, ...] = (device, dtype) if name is None else (device, dtype, name)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < size:
            self._buffers.pop(key, None)  # free the smaller one before allocating
            buffer = self._buffers[key] = torch.empty(size, dtype=dtype, device=device)
        return buffer[:size]

    def release_buffers(self) -> None:
        """Drop the z buffers: they are transient, not state kept between steps."""
        self._buffers.clear()

    def walk_buffers(self) -> list[torch.Tensor]:
        """The block buffers a walk holds now (z and scratch): what a memory tracker calls perturbation buffers."""
        return list(self._buffers.values())

    def params(self) -> Iterator[tuple[int, dict[str, Any], torch.Tensor]]:
        """Every parameter with its tensor index j (its position across the groups) and its group."""
        j = 0
        for group in self.param_groups:
            for param in group["params"]:
                yield j, group, param
                j += 1

    @staticmethod
    def spans(param: torch.Tensor, group: dict[str, Any]) -> list[slice]:
        """The blocks of ``param`` as slices of its flattened elements: block k is ``spans(...)[k]``."""
        n = param.numel()
        size = resolve_block_size(group["block_size"], param.device) or n
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    @staticmethod
    def working_dtype(param: torch.Tensor, group: dict[str, Any]) -> torch.dtype:
        """The dtype z is drawn in and the arithmetic on ``param``'s blocks runs in (see :func:`compute_dtype`)."""
        return compute_dtype(param.dtype, group.get("state_dtype"))

    def blocks(self, step_seed: int,
               params: Iterable[tuple[int, dict[str, Any], torch.Tensor]] | None = None) -> Iterator[Block]:
        """Walk every parameter (or those of ``params``, as :meth:`params` yields them) block by block, with that
        block's z of step ``step_seed`` in a buffer (in the compute dtype: the same z, up to the rounding of storage,
        whatever the parameters' dtype)."""
        for j, group, param in self.params() if params is None else params:
            flat, start = local(param).detach().view(-1), offset(param)
            spans = self.spans(param, group)
            buffer = self._buffer(param.device, self.working_dtype(param, group), spans[0].stop)
            for k, span in enumerate(spans):
                first, stop = max(span.start, start), min(span.stop, start + flat.numel())
                if first >= stop:  # a block of another rank's shard
                    continue
                mine = slice(first - start, stop - start)
                b = Block(group, param, j, k, mine, flat[mine], buffer[: span.stop - span.start])
                self.sample(b, step_seed)
                b.z = b.z[first - span.start: stop - span.start]
                yield b
            # let go of the buffer: a larger one made for the next tensor must not sit beside this one
            b = buffer = None

    def scratch(self, b: Block, name: str, like: torch.Tensor | None = None) -> torch.Tensor:
        """A block-sized buffer ``name`` beside z, in z's (compute) dtype, reused across blocks and freed with the z
        buffer; ``like`` copies a block of another dtype into it, so arithmetic on stored state runs in float32."""
        buffer = self._buffer(b.param.device, b.z.dtype, self.spans(b.param, b.group)[0].stop, name)[: b.z.numel()]
        return buffer if like is None else buffer.copy_(like)

    def working(self, b: Block, name: str, stored: torch.Tensor) -> torch.Tensor:
        """A block of state to compute on: ``stored`` itself when it is in the compute dtype, else a scratch copy
        ``name`` of it (half-precision state is updated in float32 and stored once, by :meth:`store`)."""
        return stored if stored.dtype == b.z.dtype else self.scratch(b, name, like=stored)

    @staticmethod
    def store(stored: torch.Tensor, working: torch.Tensor) -> None:
        """Write a block computed by :meth:`working` back into its state (nothing to do when it was the state)."""
        if working is not stored:
            stored.copy_(working)

    def state_block(self, b: Block, key: str, fill: float = 0.0) -> torch.Tensor:
        """Block ``b``'s slice of the parameter's state tensor ``key``, created on first use in the state dtype."""
        return self.state_tensor(b.param, b.group, key, local(b.param).shape, fill).view(-1)[b.span]

    def state_tensor(self, param: torch.Tensor, group: dict[str, Any], key: str, shape: tuple[int, ...] | torch.Size,
                     fill: float = 0.0) -> torch.Tensor:
        """``param``'s state tensor ``key`` of ``shape`` (the parameter's, or a low-rank factor's), created on first
        use in the state dtype (``state_dtype``, else the parameter's)."""
        state = self.state[param]
        if key not in state:
            dtype = STATE_DTYPES[group["state_dtype"]] if group.get("state_dtype") else param.dtype
            state[key] = torch.full(tuple(shape), fill, dtype=dtype, device=param.device)
        return state[key]

    def draw(self, out: torch.Tensor, step_seed: int, index: int, block: int) -> torch.Tensor:
        """Fill ``out`` with block ``block`` of tensor ``index``'s z at ``step_seed``."""
        generator = self._generator(out.device)
        generator.manual_seed(mix(step_seed, index, block))
        return out.normal_(generator=generator)

    def sample(self, b: Block, step_seed: int) -> None:
        """Write block ``b``'s perturbation at ``step_seed`` into ``b.z``: :meth:`draw`'s z, unless a method builds it
        otherwise (from low-rank factors, say)."""
        self.draw(b.z, step_seed, b.index, b.block)

    def direction(self, b: Block) -> torch.Tensor:
        """The perturbation of block ``b`` along which the loss is probed: z itself, unless a method shapes it."""
        return b.z

    @torch.no_grad()
    def perturb(self, step_seed: int, alpha: float) -> None:
        """θ += alpha · direction in place, block by block."""
        with self.phase("perturb"), one_thread():
            for b in self.blocks(step_seed):
                b.x.add_(self.direction(b), alpha=alpha)

    def evaluate_pair(self, closure: Callable[[], torch.Tensor], step_seed: int,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """L+ = L(θ+εd), L− = L(θ−εd) along the step's direction d;
        θ is left at θ−εd for the update pass to restore."""
        self.perturb(step_seed, +eps)
        loss_plus = closure()
        self.perturb(step_seed, -2 * eps)
        return loss_plus, closure()

    @torch.no_grad()
    def descend(self, closure: Callable[[], torch.Tensor], step_seed: int,
                projected: Callable[[Block, float], float] | None = None) -> torch.Tensor:
        """MeZO's step without weight decay along the step's perturbation: g = (L+ − L−)/2ε from
        :meth:`evaluate_pair`, then one pass that restores θ and moves it by −η·g (``projected(b, g)`` instead of g
        where a method scales it per block) with one regeneration and one add per block. Returns L+."""
        eps = self.defaults["eps"]
        loss_plus, loss_minus = self.evaluate_pair(closure, step_seed, eps)
        grad = (float(loss_plus) - float(loss_minus)) / (2 * eps)
        with self.phase("update"), one_thread():
            for b in self.blocks(step_seed):
                g = grad if projected is None else projected(b, grad)
                b.x.add_(b.z, alpha=eps - b.group["lr"] * g)
        self.state["global"]["projected_grad"] = grad
        self.release_buffers()
        return loss_plus

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict with a snapshot of the global entry, so later steps do not rewrite a saved one."""
        saved = super().state_dict()
        saved["state"]["global"] = copy.deepcopy(saved["state"]["global"])
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict``; state tensors keep their saved dtype (torch casts them to the parameter's)."""
        super().load_state_dict(state_dict)
        self.state["global"] = copy.deepcopy(state_dict["state"]["global"])
        saved = state_dict["state"]
        for j, (_, _, param) in enumerate(self.params()):
            for key, value in self.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dtype != saved[j][key].dtype:
                    self.state[param][key] = value.to(saved[j][key].dtype)

    def state_bytes(self) -> int:
        """Bytes of the persistent state tensors (what the record calls optimizer_state)."""
        return state_bytes(self)


def state_bytes(optimizer: Optimizer) -> int:
    """Bytes of every tensor in an optimizer's state, each storage once (scalars such as step counters count too; so
    do the tensors of an object kept there, GaLore's projector say, and those inside a quantised tensor subclass)."""
    storages: dict[int, int] = {}
    for value in optimizer.state.values():
        for item in value.values() if isinstance(value, dict) else ():
            for tensor in _tensors(item):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def state_dtype(optimizer: Optimizer) -> torch.dtype | None:
    """The dtype of the largest state tensor, or None when the optimizer keeps no tensor state."""
    tensors = [t for v in optimizer.state.values() if isinstance(v, dict)
               for t in v.values() if isinstance(t, torch.Tensor)]
    return max(tensors, key=lambda t: t.numel()).dtype if tensors else None


def _tensors(item: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        if is_traceable_wrapper_subclass(item):  # torchao's 8-bit state: its codes and scales hold the bytes
            names, _ = item.__tensor_flatten__()
            for name in names:
                yield from _tensors(getattr(item, name), depth)
        else:
            yield item
    elif isinstance(item, (list, tuple)):
        for value in item:
            yield from _tensors(value, depth)
    elif depth == 0 and hasattr(item, "__dict__") and not isinstance(item, type):
        for value in vars(item).values():  # one level into an object: its tensors, not what they refer to
            yield from _tensors(value, depth + 1)

"""How a cell's ranks share the model: the strategies, which cells each can run, and the default. What a rank does
at run time is :mod:`zomem.ranks`'."""

from __future__ import annotations

from zomem.errors import UsageError

STRATEGIES = ("fsdp", "replicate", "pipeline")
#: the strategies whose ranks are processes (pipeline's are GPUs of one process)
SPAWNED = ("fsdp", "replicate")


def resolve(strategy: str | None, ranks: int) -> str | None:
    """The strategy a cell of ``ranks`` runs: the one named, else ``fsdp`` for several ranks, none for one."""
    return strategy or ("fsdp" if ranks > 1 else None)


def check(strategy: str | None, ranks: int, optimizer: str, device: str, tuning: str) -> None:
    """Refuse a strategy this cell cannot run, before anything is built (None: one process, one device)."""
    if ranks < 1:
        raise UsageError(f"need ranks >= 1 (got {ranks})")
    if strategy is None:
        return
    if strategy not in STRATEGIES:
        raise UsageError(f"unknown strategy {strategy!r}. Valid: {', '.join(STRATEGIES)}")
    if tuning != "full":
        raise UsageError(f"--strategy {strategy} runs full fine-tuning; --tuning {tuning} runs on one device")
    if ranks > 1 and ":" in device:
        raise UsageError(f"{ranks} ranks take the first {ranks} GPUs this process sees, not {device}: choose them "
                         "with CUDA_VISIBLE_DEVICES")
    from zomem import optim  # here: the pytest plugin reads STRATEGIES when it loads, before torch is wanted

    cls = optim.get(optimizer)
    if strategy == "pipeline":
        if not device.startswith("cuda"):
            raise UsageError("the pipeline strategy places layers over several GPUs of one process (CUDA only); "
                             f"on CPU, predict it: zomem estimate --device cuda --gpus {ranks} --strategy pipeline")
    elif strategy == "replicate" and not optim.forward_only(cls):
        raise UsageError(f"replicate keeps a whole model per rank with no gradient exchange: zeroth-order methods "
                         f"only; {optimizer} needs backprop (use --strategy fsdp)")
    elif strategy == "fsdp" and not optim.shardable(cls):
        raise UsageError(f"{optimizer} cannot run on FSDP shards (it builds its update from whole tensors, or wraps "
                         "an optimizer that does): use --strategy replicate for a zeroth-order method, or one rank")

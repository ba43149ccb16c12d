"""``zomem list``: the models, optimizers and workloads zomem knows."""

from __future__ import annotations

import argparse

from tabulate import tabulate

from zomem import models, optim, workloads


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem list``."""
    parser = sub.add_parser("list", help="list the known models (by family), optimizers and workloads")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Print one table per registry."""
    model_rows = []
    for family, names in models.FAMILIES.items():
        for name in names:
            spec = models.spec(name)
            params = spec.params or models.param_count(models.build_meta(spec))
            model_rows.append((family, name, f"{params:,}", spec.layers, spec.hidden, spec.heads, spec.kv_heads,
                               spec.vocab, "tied" if spec.tied else "untied"))
    print(tabulate(model_rows, headers=("family", "model", "parameters", "layers", "hidden", "heads", "kv heads",
                                        "vocab", "head"), tablefmt="github", disable_numparse=True))
    print("\nany causal LM from a local config: --model path/to/config.json (or its folder)")
    print()
    optimizer_rows = []
    for name in optim.OPTIMIZERS.names():
        cls = optim.get(name)
        kind = "forward only" if optim.forward_only(cls) else "backprop"
        optimizer_rows.append((name, cls.__name__, kind, (cls.__doc__ or "").strip().splitlines()[0]))
    print(tabulate(optimizer_rows, headers=("optimizer", "class", "kind", "what"), tablefmt="github"))
    print()
    workload_rows = [(w.name, w.batch_size, w.seq_len, w.candidates, w.loss)
                     for w in map(workloads.get, workloads.WORKLOADS.names())]
    print(tabulate(workload_rows, headers=("workload", "batch", "seq", "candidates", "loss"), tablefmt="github"))
    print("\ncustom workloads: custom:batch=B,seq=S[,loss=classification|multiple_choice|generation,"
          "candidates=C,targets=T]")
    return 0

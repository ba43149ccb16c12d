"""``zomem overhead``: what a MeZO step costs beyond its two forward passes.

The criterion (issue 3): a step costs at most 10% more than two forwards plus generating the perturbation z of
every parameter four times, as MeZO's reference code does (perturb, perturb, restore, update). zomem's MeZO draws
z three times (restoring and updating share a pass), each draw followed by an in-place add.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from tabulate import tabulate

from zomem.cell import Cell
from zomem.measure import prepare
from zomem.optim import ZerothOrder
from zomem.probes import PhaseTimer, StepTimer

LIMIT = 1.10


@dataclass(frozen=True)
class Overhead:
    """Median seconds of each part, measured in interleaved rounds so that a load change hits all alike."""

    forward: float  # one forward pass and its loss, under no_grad
    generate: float  # drawing z for every parameter once (no add)
    perturb: float  # one perturbation pass: draw z and add it to θ, for every parameter
    step: float  # one MeZO step
    phases: dict[str, float]  # the step's own phases: forward (both), perturb, update

    @property
    def budget(self) -> float:
        """Two forwards plus four generations of z."""
        return 2 * self.forward + 4 * self.generate

    @property
    def ratio(self) -> float:
        """Step time over the budget: at most :data:`LIMIT` passes."""
        return self.step / self.budget


def measure(model: str, workload: str, device: str, rounds: int) -> Overhead:
    """Build the MeZO cell in this process, warm it up, then time each part once per round."""
    prepared = prepare(Cell(model=model, optimizer="mezo", workload=workload, device=device))
    optimizer = cast(ZerothOrder, prepared.optimizer)
    seed = optimizer.step_seed(0)

    def generate() -> None:
        for _ in optimizer.blocks(seed):
            pass
        optimizer.release_buffers()

    def perturb() -> None:
        optimizer.perturb(seed, 0.0)  # adding 0·z leaves θ as it is and costs what any perturbation costs
        optimizer.release_buffers()

    parts: dict[str, Callable[[], object]] = {"forward": prepared.closure, "generate": generate, "perturb": perturb,
                                              "step": prepared.step}
    prepared.step()  # warm-up: allocator, thread pool, lazily built kernels
    timers = {name: StepTimer(prepared.device) for name in parts}
    step_phases = PhaseTimer(prepared.device)
    for _ in range(rounds):
        for name, part in parts.items():
            # the step's phases alone: the forward and perturb parts pass through the same phase hook
            prepared.phases.timer = step_phases if name == "step" else None
            with timers[name].step():
                part()
        step_phases.end_step()
    prepared.phases.timer = None
    medians = {name: statistics.median(timer.seconds) for name, timer in timers.items()}
    return Overhead(**medians, phases=step_phases.medians())


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem overhead``."""
    parser = sub.add_parser("overhead", help="time a MeZO step against two forwards plus four generations of z")
    parser.add_argument("--model", default="opt-125m",
                        help="the model whose MeZO step is timed, any name `zomem list` shows (default: opt-125m)")
    parser.add_argument("--workload", default="sst2",
                        help="the batch the forwards run on: a workload `zomem list` shows, or "
                        "custom:batch=B,seq=S (default: sst2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds, each part once per round (default: 5)")
    parser.set_defaults(func=main)


def report(result: Overhead) -> str:
    """The decomposition as a table, the verdict and what dominates."""
    rows = [
        ("forward pass (loss included)", result.forward, 2, 2 * result.forward),
        ("generate z for every parameter", result.generate, 4, 4 * result.generate),
        ("budget: 2 forwards + 4 generations", None, None, result.budget),
        ("MeZO step", result.step, None, None),
        ("  of which 3 perturbation passes (draw + add)", result.perturb, 3, 3 * result.perturb),
    ]
    table = tabulate([(name, *(f"{v:.3f}" if isinstance(v, float) else (v or "") for v in values))
                      for name, *values in rows], headers=("part", "seconds", "times", "seconds in total"),
                     tablefmt="github")
    forwards, passes = 2 * result.forward, 3 * result.perturb
    rest = result.step - forwards - passes
    shares = {"the two forwards": forwards, "regenerating z and adding it (3 passes)": passes,
              "everything else": rest}
    dominant = max(shares, key=shares.__getitem__)
    verdict = "within" if result.ratio <= LIMIT else "OVER"
    phases = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in result.phases.items())
    return (f"{table}\n\nstep / budget = {result.ratio:.3f} ({verdict} the limit of {LIMIT:.2f})\n"
            f"the step's own phases: {phases}\n"
            "shares of the step: " + ", ".join(f"{k} {v / result.step:.0%}" for k, v in shares.items()) +
            f"\ndominant: {dominant}")


def main(args: argparse.Namespace) -> int:
    """Measure and print; exit status 1 when the step is over the limit."""
    result = measure(args.model, args.workload, args.device, args.rounds)
    print(f"{args.model}, {args.workload}, {args.device}: median of {args.rounds} rounds\n")
    print(report(result))
    return 0 if result.ratio <= LIMIT else 1

"""``zomem blocks``: how a zeroth-order walk's throughput depends on its block size, on this device.

A perturbation pass draws z block by block and adds it to the weights. Each block costs a fixed amount (seeding
a generator, launching or dispatching two kernels) plus a cost per element; the fit of ``t(pass) = N·t_element +
(N/B)·t_block`` over block sizes B says both, and how large a block must be for the fixed part to vanish.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import torch
from tabulate import tabulate

from zomem.measure import torch_device
from zomem.optim import MeZO
from zomem.probes import StepTimer

#: block sizes timed by default: 2^10 … 2^24 elements, every second power of two
DEFAULT_SIZES = tuple(1 << k for k in range(10, 25, 2))
#: the share of a pass that per-element work must reach for a block size to count as saturating the device
SATURATED = 0.9


@dataclass(frozen=True)
class Sweep:
    """Seconds per pass of ``elements`` elements at each block size, and the fitted costs."""

    elements: int
    seconds: dict[int, float]
    per_element: float
    per_block: float

    def efficiency(self, block: int) -> float:
        """The share of a pass spent on elements rather than per-block overhead, by the fit."""
        work = self.per_element * block
        return work / (work + self.per_block) if work + self.per_block > 0 else 1.0

    @property
    def saturating_block(self) -> int:
        """The smallest block (a power of two) at which per-element work is :data:`SATURATED` of a pass."""
        needed = SATURATED / (1 - SATURATED) * self.per_block / max(self.per_element, 1e-15)
        return 1 << max(0, int(needed - 1).bit_length())


def measure(device: str, elements: int, sizes: tuple[int, ...], rounds: int) -> Sweep:
    """Time MeZO's perturbation pass (draw z, add it in place) over one flat tensor at each block size."""
    where = torch_device(device)
    param = torch.nn.Parameter(torch.zeros(elements, device=where))
    seconds = {}
    for size in (s for s in sizes if s <= elements):  # a block larger than the tensor is the tensor
        optimizer = MeZO([param], block_size=size)
        optimizer.perturb(0, 0.0)  # warm-up: the buffer, the generator, lazily built kernels
        timer = StepTimer(where)
        for _ in range(rounds):
            with timer.step():
                optimizer.perturb(0, 0.0)  # adding 0·z costs what any perturbation costs
        seconds[size] = statistics.median(timer.seconds)
    # least squares of t = a + b·(N/B): a is N·t_element, b the cost of one block
    blocks = torch.tensor([elements / size for size in seconds], dtype=torch.float64)
    x = torch.stack([torch.ones_like(blocks), blocks], dim=1)
    a, b = torch.linalg.lstsq(x, torch.tensor(list(seconds.values()), dtype=torch.float64)[:, None]).solution[:, 0]
    return Sweep(elements, seconds, max(float(a), 0.0) / elements, max(float(b), 0.0))


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem blocks``."""
    parser = sub.add_parser("blocks", help="time a zeroth-order walk's draw-and-add against its block size",
                            description="Time MeZO's perturbation pass over one flat tensor at several block sizes "
                            "and fit its cost per element and per block.")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--elements", type=int, default=1 << 24,
                        help="elements of the tensor walked (default: 2^24, 64 MiB of float32)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES),
                        help="block sizes in elements (default: 2^10 to 2^24, every second power of two)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per block size (default: 3)")
    parser.set_defaults(func=main)


def report(sweep: Sweep) -> str:
    """The timings, the fit and the block size that saturates the device."""
    rows = [(f"{size:,}", f"{s * 1e9 / sweep.elements:.3f}", f"{sweep.efficiency(size):.1%}")
            for size, s in sweep.seconds.items()]
    table = tabulate(rows, headers=("block (elements)", "ns per element", "share on elements (fit)"),
                     tablefmt="github")
    return (f"{table}\n\nfit: {sweep.per_element * 1e9:.3f} ns per element + {sweep.per_block * 1e6:.1f} µs per "
            f"block; {SATURATED:.0%} of a pass goes to elements from blocks of {sweep.saturating_block:,} elements")


def main(args: argparse.Namespace) -> int:
    """Measure and print."""
    sweep = measure(args.device, args.elements, tuple(args.sizes), args.rounds)
    print(f"perturbation pass over {args.elements:,} float32 elements on {args.device}, median of {args.rounds}\n")
    print(report(sweep))
    return 0

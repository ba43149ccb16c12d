"""``zomem calibrate``: fit the estimator's constants to measured records and show its residuals."""

from __future__ import annotations

import argparse
from pathlib import Path

from zomem import calibrate, estimate, records, tables
from zomem.errors import UsageError
from zomem.estimate import Calibration


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``zomem calibrate``."""
    parser = sub.add_parser("calibrate", help="fit the estimator's constants to measured records",
                            description="Fit the per-device overhead, the transient multipliers and each "
                            "optimizer's extra transient to the peaks of measured records of one device kind.")
    parser.add_argument("records", nargs="+", type=Path, metavar="RECORDS", help="JSON Lines files of records")
    parser.add_argument("--device", choices=list(estimate.DEVICE_KINDS), default=None,
                        help="device kind to calibrate (default: the kind the records were measured on)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--write", action="store_true",
                       help="store the constants with the package, where `zomem estimate` and `zomem fit` read them")
    where.add_argument("--out", type=Path, default=None, help="write the constants to this JSON file instead")
    parser.set_defaults(func=main)


def compute(args: argparse.Namespace) -> tuple[Calibration, list[calibrate.Residual]]:
    """The fitted constants and the residuals they leave."""
    measured = [r for path in args.records for r in records.read(path)]
    kinds = sorted({r.device.split(":")[0] for r in measured if r.status == "ok"})
    kind = args.device or (kinds[0] if len(kinds) == 1 else None)
    if kind is None:
        raise UsageError(f"the records were measured on {', '.join(kinds) or 'no device'}: choose one with --device")
    calibration = calibrate.fit(measured, kind, source=", ".join(p.name for p in args.records))
    return calibration, calibrate.residuals(measured, calibration)


def main(args: argparse.Namespace) -> int:
    """Print the constants and residuals; store them when asked."""
    calibration, residuals = compute(args)
    print(calibration.to_json())
    print(tables.residual_table(residuals).markdown())
    print(f"worst residual: {100 * (calibration.worst_residual or 0):.1f}% over {calibration.cells} cells")
    target = estimate.CALIBRATION_DIR / f"{calibration.device}.json" if args.write else args.out
    if target is not None:
        calibration.save(Path(str(target)))
        print(f"wrote {target}")
    return 0

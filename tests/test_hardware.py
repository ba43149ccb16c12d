"""Hardware rows and sizes: the catalog, user GPUs, and clear errors for what cannot be read."""

from __future__ import annotations

import pytest

from zomem import hardware
from zomem.errors import UnknownNameError, UsageError


def test_catalog_has_every_card_of_the_spec() -> None:
    for name in ("A100-40GB", "A100-80GB", "V100-16GB", "V100-32GB", "H100-80GB", "H200-141GB",
                 "RTX-3090-24GB", "RTX-4090-24GB"):
        assert hardware.gpu(name).memory_bytes > 15 * hardware.GIB
    assert hardware.gpu("A100-80GB").memory_bytes == 80 * hardware.GIB


@pytest.mark.parametrize(("name", "mib"), [
    ("B200-180GB", 183359), ("H100-NVL-94GB", 95830), ("H20-96GB", 97871), ("L40S-48GB", 46068),
    ("RTX-A6000-48GB", 49140), ("L4-24GB", 23034), ("A10G-24GB", 23028), ("RTX-5090-32GB", 32607),
])
def test_catalog_has_the_cards_rented_now_at_what_their_driver_reports(name: str, mib: int) -> None:
    gpu = hardware.parse_row(f"2x{name}").gpu
    assert gpu.memory_bytes == mib * hardware.MIB
    # the driver reports at most what the data sheet's NN GB (binary, as GPU memory is sold) names
    assert gpu.memory_gib <= int(name.rsplit("-", 1)[1].removesuffix("GB"))


@pytest.mark.parametrize(("text", "count", "name", "gib"), [
    ("4xA100-80GB", 4, "A100-80GB", 80.0),
    ("A100-80GB", 1, "A100-80GB", 80.0),
    ("2×V100-32GB", 2, "V100-32GB", 32510 / 1024),
    ("8xA6000:48", 8, "A6000:48", 48.0),
    ("RTX-4090-24GB", 1, "RTX-4090-24GB", 24564 / 1024),
])
def test_rows_parse(text: str, count: int, name: str, gib: float) -> None:
    row = hardware.parse_row(text)
    assert (row.count, row.gpu.name) == (count, name)
    assert row.gpu.memory_gib == pytest.approx(gib)
    assert hardware.parse_row(row.name) == row


def test_default_rows_are_the_spec_table() -> None:
    rows = [hardware.parse_row(text) for text in hardware.DEFAULT_ROWS]
    assert [(r.count, r.gpu.name) for r in rows] == [(n, g) for g in ("A100-80GB", "V100-32GB") for n in (1, 2, 4, 8)]


def test_unknown_card_gets_the_registry_error_with_a_suggestion() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean A100-80GB"):
        hardware.parse_row("2xA100-80G")


@pytest.mark.parametrize("text", ["0xA100-80GB", "2xA6000:", "2xA6000:-4", ":48", "2xA6000:lots"])
def test_bad_rows_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        hardware.parse_row(text)


@pytest.mark.parametrize(("text", "value"), [("2GiB", 2**31), ("512MiB", 2**29), ("1.5GB", 1_500_000_000),
                                             ("123", 123), ("64 kib", 65536)])
def test_sizes_parse(text: str, value: int) -> None:
    assert hardware.parse_bytes(text) == value


def test_bad_size_says_how_to_write_one() -> None:
    with pytest.raises(UsageError, match="2GiB"):
        hardware.parse_bytes("two gigs")

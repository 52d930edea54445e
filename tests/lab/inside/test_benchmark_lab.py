"""Scenario 7 (printed, not asserted): direct I/O through /dev/sdX on the Savepoint LUN
(f_mass_storage -> /dev/nbdN -> NBD -> store) against a plain-file LUN (the thaw space, a
file on tmpfs) of the same gadget in the same VM."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.lab.inside.appliance_vm import (
    MIB,
    RESULTS,
    Appliance,
    host_disk,
    read_direct,
    sh,
)

TOTAL = 16 * MIB
CHUNK = 1 * MIB


def throughput(dev: str, source: Path) -> tuple[float, float]:
    """(write MB/s, read MB/s) of dd with O_DIRECT and 1 MiB requests."""
    count = TOTAL // CHUNK
    started = time.monotonic()
    sh(f"dd if={source} of={dev} bs={CHUNK} count={count} oflag=direct status=none")
    wrote = time.monotonic() - started
    started = time.monotonic()
    sh(f"dd if={dev} of=/dev/null bs={CHUNK} count={count} iflag=direct status=none")
    read = time.monotonic() - started
    return TOTAL / MIB / wrote, TOTAL / MIB / read


def test_benchmark_savepoint_vs_plain_lun(appliance: Appliance, tmp_path: Path) -> None:
    dev = appliance.start(lock=False, thaw=str(tmp_path / "thaw.img"), thaw_size="32M")
    plain = host_disk("thaw")
    data = os.urandom(TOTAL)
    source = tmp_path / "source.bin"
    source.write_bytes(data)
    sp_w, sp_r = throughput(dev, source)
    pl_w, pl_r = throughput(plain, source)
    assert read_direct(dev, 0, TOTAL) == data
    assert read_direct(plain, 0, TOTAL) == data
    lines = [
        "benchmark: dd O_DIRECT, 1 MiB requests, 16 MiB, host side of dummy_hcd (TCG)",
        f"  Savepoint LUN  write {sp_w:7.2f} MB/s  read {sp_r:7.2f} MB/s",
        f"  plain-file LUN write {pl_w:7.2f} MB/s  read {pl_r:7.2f} MB/s",
        f"  ratio Savepoint/plain: write {sp_w / pl_w:.2f}  read {sp_r / pl_r:.2f}",
    ]
    print("\n".join(lines))
    (RESULTS / "benchmark.txt").write_text("\n".join(lines) + "\n")

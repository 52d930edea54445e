"""Scenario 7 (printed, not asserted): direct I/O through /dev/sdX on the Savepoint LUN
(f_mass_storage -> /dev/nbdN -> NBD -> store) against a plain-file LUN (the thaw space, a
file on tmpfs) of the same gadget in the same VM."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

from tests.lab.inside.appliance_vm import (
    MIB,
    RESULTS,
    Appliance,
    host_disk,
    open_direct,
    read_direct,
    sh,
    write_direct,
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


def test_benchmark_restore_and_save_as_the_host_sees_them(appliance: Appliance) -> None:
    """The README's RESTORE and SAVE claims, from the host's side: RESTORE command to the
    first read of restored data (the gadget ejects, re-inserts, the host re-reads), and SAVE
    with unsynced host writes pending (the sync before it has work to do)."""
    dev = appliance.start(lock=False)
    saved = os.urandom(4 * MIB)
    write_direct(dev, 0, saved)
    assert appliance.request("save")["ok"]
    restores, saves = [], []
    for _ in range(3):
        write_direct(dev, 0, os.urandom(4 * MIB))  # unsaved: RESTORE discards it
        started = time.monotonic()
        assert appliance.request("restore")["ok"]
        answered = time.monotonic() - started
        restores.append((answered, first_restored_read(dev, saved[:MIB], started)))
        fd = open_direct(dev)  # held open: closing it would make the gadget fsync
        try:
            write_direct(fd, 8 * MIB, os.urandom(4 * MIB))  # WRITE commands, no cache flush
            started = time.monotonic()
            save = appliance.request("save")
            saves.append(time.monotonic() - started)
            assert save["ok"] and save["data"]["host_synced"] is False, save
        finally:
            os.close(fd)
        saved = read_direct(dev, 0, 4 * MIB)
    lines = [
        "restore/save as the host sees them (dummy_hcd, TCG; 3 runs, min-max):",
        f"  RESTORE answered in {span(r[0] for r in restores)}; first read of restored "
        f"data {span(r[1] for r in restores)} after the command",
        f"  SAVE with 4 MiB of unsynced host writes pending: {span(saves)}",
    ]
    print("\n".join(lines))
    (RESULTS / "restore-save.txt").write_text("\n".join(lines) + "\n")


def first_restored_read(dev: str, want: bytes, started: float, timeout: float = 60) -> float:
    """Seconds from `started` until a direct read of the disk's first MiB gives `want`;
    while the gadget has ejected the medium the read fails and is tried again."""
    while time.monotonic() - started < timeout:
        try:
            if read_direct(dev, 0, len(want)) == want:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.01)
    raise AssertionError(f"{dev} did not give the restored data within {timeout:g} s")


def span(values: Iterable[float]) -> str:
    got = sorted(values)
    return f"{got[0] * 1000:.0f}-{got[-1] * 1000:.0f} ms"

#!/usr/bin/env python3
"""Store benchmarks: SAVE/RESTORE latency, throughput vs plain I/O, map RAM and open time.

Prints figures; every speed is also given as a ratio against a peer measured in the same run
(this machine is shared and noisy). Run: .venv/bin/python benchmarks/bench_store.py [--quick]

The 100%-written state of the 64 GiB and 1 TiB stores is produced by writing the unit map
directly (every record marked as written in the current epoch, both slots holding data):
writing 1 TiB of data would take hours and SAVE/RESTORE never look at the data anyway.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from appliance.store import Store, create_store  # noqa: E402
from appliance.store.format import HAS0_BIT, HAS1_BIT, UNITS_PER_PAGE  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def mark_written(st: Store, fraction: float) -> int:
    """Put `fraction` of the units in the DDM, then flush.

    Up to 20,000 units get real 4 KiB writes; beyond that the map records are set directly,
    in runs spread over the whole disk (SAVE and RESTORE never look at the data itself).
    """
    n = int(st.geo.unit_count * fraction)
    if n <= 20000:
        rng = random.Random(1)
        for u in rng.sample(range(st.geo.unit_count), n):
            st.write(u * st.unit_size, b"\x5a" * st.unit_size)
    else:
        run = 1024
        stride = max(run, int(run / fraction))
        runs = (
            [(0, st.geo.unit_count)]
            if fraction >= 1
            else [(f, min(f + run, st.geo.unit_count)) for f in range(0, st.geo.unit_count, stride)]
        )
        for first, end in runs:
            st.map.uniform(first, end)  # loads the map pages of the run
        with st.map.lock:
            for first, end in runs:
                st.map.fill(first, end, HAS0_BIT | HAS1_BIT | st.epoch)
        st.dirty_units = n
    st.flush()
    return n


def settle() -> None:
    """Let the disk finish writing back what the set-up wrote, so only the command is timed."""
    os.sync()
    time.sleep(0.2)


def time_cmd(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_latency(tmp: str, sizes: list[int]) -> None:
    print("\n== SAVE / RESTORE latency (after the written data was flushed) ==")
    print(f"{'disk':>8} {'written':>8} {'open s':>8} {'SAVE ms':>9} {'RESTORE ms':>11}")
    results = []
    for size in sizes:
        for frac in (0.0, 0.01, 1.0):
            path = os.path.join(tmp, "lat.img")
            create_store(path, size, force=True, allow_overcommit=True)
            t = time.perf_counter()
            st = Store.open(path)
            t_open = time.perf_counter() - t
            t_save, t_restore = [], []
            for _ in range(5 if size <= 64 * GiB else 3):  # median: fdatasync latency is noisy
                mark_written(st, frac)
                settle()
                t_save.append(time_cmd(partial(st.save, "bench")))
                mark_written(st, frac)
                settle()
                t_restore.append(time_cmd(partial(st.restore, "bench")))
            t_save, t_restore = statistics.median(t_save), statistics.median(t_restore)
            st.close()
            os.unlink(path)
            results.append((t_save, t_restore))
            print(
                f"{size // GiB:>6}Gi {frac:>8.0%} {t_open:>8.3f} {t_save * 1e3:>9.2f} "
                f"{t_restore * 1e3:>11.2f}"
            )
    for i, name in enumerate(("SAVE", "RESTORE")):
        col = [r[i] for r in results]
        print(f"{name}: slowest / fastest case {max(col) / min(col):.2f}x (goal: within 2x)")


def bench_qemu_commit(tmp: str) -> None:
    if not shutil.which("qemu-img"):
        print("qemu-img missing: skipping the qcow2 commit peer")
        return
    print("\n== peer: qemu-img commit of a qcow2 overlay holding 1 GiB of writes ==")
    base, top = os.path.join(tmp, "base.raw"), os.path.join(tmp, "top.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", base, "1G"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top], check=True
    )
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1G", top], check=True, capture_output=True
    )
    t = time.perf_counter()
    subprocess.run(["qemu-img", "commit", "-q", top], check=True)
    t_commit = time.perf_counter() - t
    path = os.path.join(tmp, "peer.img")
    create_store(path, GiB, force=True, allow_overcommit=True)
    st = Store.open(path)
    buf = b"\x5a" * MiB
    for off in range(0, GiB, MiB):
        st.write(off, buf)
    st.flush()
    t_save = time_cmd(partial(st.save, "bench"))
    st.close()
    print(
        f"qemu-img commit: {t_commit * 1e3:.1f} ms; Savepoint SAVE of the same 1 GiB: "
        f"{t_save * 1e3:.2f} ms; ratio {t_commit / t_save:.0f}x faster"
    )
    for p in (base, top, path):
        os.unlink(p)


def run_plain(fd: int, base: int, offs: list[int], data: bytes | None, buf: memoryview) -> None:
    for o in offs:
        if data is not None:
            os.pwrite(fd, data, base + o)
        else:
            os.preadv(fd, [buf], base + o)


def run_store(st: Store, offs: list[int], data: bytes | None, buf: memoryview) -> None:
    for o in offs:
        if data is not None:
            st.write(o, data)
        else:
            st.readinto(o, buf)


def bench_throughput(tmp: str, size: int) -> None:
    print(
        f"\n== throughput on a {size // MiB} MiB disk: store vs plain os.pread/os.pwrite "
        "on the same file =="
    )
    path = os.path.join(tmp, "tp.img")
    create_store(path, size, force=True, allow_overcommit=True)
    st = Store.open(path)
    fd = st._b.fd
    base = st.geo.slot_off[1]  # where first writes of a fresh store land
    rng = random.Random(2)
    cases = [
        ("1 MiB seq write", MiB, False, True),
        ("1 MiB seq read", MiB, False, False),
        ("4 KiB rand write", 4096, True, True),
        ("4 KiB rand read", 4096, True, False),
    ]
    for name, bs, rand, is_write in cases:
        count = size // bs if not rand else 20000
        offs = [rng.randrange(size // bs) * bs if rand else i * bs for i in range(count)]
        data = os.urandom(bs)
        buf = memoryview(bytearray(bs))

        plain = partial(run_plain, fd, base, offs, data if is_write else None, buf)
        store = partial(run_store, st, offs, data if is_write else None, buf)
        tp, ts = [], []
        for _ in range(3):  # interleave to share the noise
            tp.append(time_cmd(plain))
            ts.append(time_cmd(store))
        mbp = count * bs / min(tp) / MiB
        mbs = count * bs / min(ts) / MiB
        print(f"{name:<18} plain {mbp:>9.1f} MiB/s  store {mbs:>9.1f} MiB/s  ratio {mbs / mbp:.2f}")
    st.close()
    os.unlink(path)


def bench_ram(tmp: str) -> None:
    print("\n== map RAM and open time ==")
    path = os.path.join(tmp, "ram.img")
    for size in (GiB, 64 * GiB):
        create_store(path, size, force=True, allow_overcommit=True)
        with Store.open(path, map_cache=2 * GiB) as st:
            mark_written(st, 1.0)  # every map page holds records (a never-written one costs 0)
        for budget in (2 * GiB, None):
            st = Store.open(path, map_cache=budget)
            before = rss_kib()
            for unit in range(0, st.geo.unit_count, UNITS_PER_PAGE):
                st.read(unit * st.unit_size, 4096)  # every map page, through the map cache
            used = (rss_kib() - before) / 1024  # the map, measured
            ring = st.geo.hist_cap * 64 / MiB  # the history ring: a fixed 4 MiB
            what = (
                "whole map loaded"
                if budget
                else f"map cache {st.map.cache.budget // MiB} MiB (default)"
            )
            print(
                f"{size // GiB:>5} GiB disk, {what}: map {used:.2f} MiB RSS = "
                f"{used / (size / GiB):.3f} MiB per GiB (goal <= 1.25), plus the {ring:.0f} "
                "MiB history ring"
            )
            st.close()
    create_store(path, 1 << 40, force=True, allow_overcommit=True)
    t = time.perf_counter()
    st = Store.open(path)
    t_open = time.perf_counter() - t
    st.read(123 * GiB, 4096)
    print(
        f"1 TiB store opened in {t_open:.3f} s (goal <= 2 s), no map scan; max RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )
    st.close()
    os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 GiB and 64 GiB only, small runs")
    ap.add_argument("--dir", default=None, help="where to put the sparse files")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(dir=args.dir, prefix="sp-bench-")
    try:
        sizes = [GiB, 64 * GiB] + ([] if args.quick else [1 << 40])
        bench_latency(tmp, sizes)
        bench_qemu_commit(tmp)
        bench_throughput(tmp, 256 * MiB if args.quick else GiB)
        bench_ram(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

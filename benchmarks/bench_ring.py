#!/usr/bin/env python3
"""I/O while the history ring is nearly full: the forced background pass against no pass.

    .venv/bin/python benchmarks/bench_ring.py [--size 4G] [--runtime 5] [--dir /var/tmp]

Two stores of the same size, every unit pending for the background pass (all written in
epoch 1, then a SAVE). One also has a nearly full history ring (hundreds of RESTOREs, so the
daemon must run the pass under load); the other is served with the pass switched off. Each is
served by the real daemon (`savepoint daemon`) and driven by fio with 4 KiB random writes over
NBD at queue depth 16; prints IOPS, p99 and worst latency of both, their ratio, and how far the
pass got during the run, and the 1-minute load average after each run (on a shared
machine a stall in both runs is scheduling noise, not the pass). The goal: no request waits
more than 50 ms for the pass.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TOP)

from appliance.store import Store, create_store  # noqa: E402
from benchmarks.bench_nbd import fio_job, parse_size  # noqa: E402
from benchmarks.bench_store import mark_written  # noqa: E402

HIST_CAP = 1024  # the ring of a real store holds 65,536; a smaller one fills in seconds


def prepare(path: str, size: int, fill_ring: bool) -> dict[str, object]:
    create_store(path, size, hist_cap=HIST_CAP)
    with Store.open(path) as st:
        mark_written(st, 1.0)
        st.save("bench")  # every unit now waits for the pass
        for _ in range(HIST_CAP - 100 if fill_ring else 0):
            st.restore("bench")
        return {
            "ring_free": st.ring_free(),
            "urgent": st.pass_urgent(),
            "pending": st.status()["pending_units"],
        }


def serve(work: str, name: str, path: str, background: bool) -> tuple[subprocess.Popen, str]:
    cfg = os.path.join(work, f"{name}.toml")
    sock, ctl = os.path.join(work, f"{name}.sock"), os.path.join(work, f"{name}.ctl")
    with open(cfg, "w") as f:
        f.write(
            f'[store]\npath = "{path}"\nbackground = {str(background).lower()}\n'
            f'[nbd]\nsocket = "{sock}"\n[control]\nsocket = "{ctl}"\n'
            "[lock]\nenabled = false\n"
        )
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "daemon", "--config", cfg],
        cwd=TOP,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while not os.path.exists(ctl):
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError(f"the daemon serving {name} did not start")
        time.sleep(0.05)
    return proc, ctl


def pending(ctl: str) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "appliance.cli", "status", "--json", "--control", ctl],
        cwd=TOP,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(out.stdout)["data"]["pending_units"])


def fio(uri: str, size: int, runtime: int) -> dict[str, float]:
    w = fio_job(uri, "randwrite", size, f"--runtime={runtime}", "--time_based")["write"]
    clat = w["clat_ns"]
    return {
        "iops": w["iops"],
        "p99_ms": clat["percentile"]["99.000000"] / 1e6,
        "max_ms": clat["max"] / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="4G")
    ap.add_argument("--runtime", type=int, default=5, help="seconds of fio per run")
    ap.add_argument("--dir", default="/var/tmp", help="directory on the disk to test")
    args = ap.parse_args()
    if not shutil.which("fio"):
        sys.exit("fio is not installed (apt-get install fio)")
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="bench-ring-", dir=args.dir)
    try:
        rows = {}
        for name, fill, background in [("no pass", False, False), ("forced pass", True, True)]:
            path = os.path.join(work, name.replace(" ", "-") + ".img")
            state = prepare(path, size, fill)
            os.sync()
            proc, ctl = serve(work, name.replace(" ", "-"), path, background)
            try:
                before = pending(ctl)
                sock = ctl[:-4] + ".sock"
                rows[name] = fio(f"nbd+unix:///?socket={sock}", size, args.runtime)
                after = pending(ctl)
                load = os.getloadavg()[0]  # the machine is shared: a stall may be its noise
                rows[name].update(before=before, after=after, load=load, **state)
            finally:
                proc.terminate()
                proc.wait(120)
        report(rows)
    finally:
        shutil.rmtree(work)


def report(rows: dict[str, dict]) -> None:
    print(f"4 KiB random writes, QD16, every unit pending; ring of {HIST_CAP} records")
    print(
        f"{'run':12s} {'ring free':>9s} {'pending before':>15s} {'after':>9s} {'IOPS':>8s} "
        f"{'p99 ms':>7s} {'max ms':>7s} {'load':>5s}"
    )
    for name, r in rows.items():
        print(
            f"{name:12s} {r['ring_free']:9d} {r['before']:15d} {r['after']:9d} "
            f"{r['iops']:8.0f} {r['p99_ms']:7.2f} {r['max_ms']:7.1f} {r['load']:5.2f}"
        )
    a, b = rows["forced pass"], rows["no pass"]
    print(
        f"forced pass / no pass: IOPS {a['iops'] / b['iops']:.2f}, "
        f"p99 {a['p99_ms'] / b['p99_ms']:.2f}x; worst request {a['max_ms']:.1f} ms "
        f"(goal: under 50 ms)"
    )


if __name__ == "__main__":
    main()

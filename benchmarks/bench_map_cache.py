"""The map cache on a large disk: RSS and 4 KiB random-write IOPS over NBD on a 1 TiB store
against the same workload on a 1 GiB store (whose whole map fits in the cache).

    .venv/bin/python benchmarks/bench_map_cache.py [--writes 100000] [--budget 32M] [--dir D]

Each store is served by a child process (the daemon's NBD server over the store, as
bench_nbd.py runs it), and fio (nbd engine, QD16) writes `--writes` random 4 KiB blocks over
the whole disk. Prints the time to open each store, its RSS at rest, IOPS, RSS and peak RSS
after the writes, the map cache's hit rate, and the 1 TiB / 1 GiB ratios. The stores are
sparse files (about 1 GiB of map is allocated for the 1 TiB one).

The file system pays for the large disk too: a sparse file written at 100,000 scattered places
grows an extent tree, and a store's slots are sparse files. So each round also runs the same
job against plain sparse files of both sizes on the same file system, served by this NBD
server without a store (`plain`: the ceiling for the store's ratio) and by `nbdkit file`, and
prints their 1 TiB / 1 GiB ratios beside the store's.
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
GiB = 1 << 30

from benchmarks.bench_nbd import fio_job  # noqa: E402


def rss(pid: int | str = "self") -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                vals[key] = int(rest.split()[0]) * 1024
    return vals["VmRSS"], vals["VmHWM"]


def serve(path: str, sock: str, budget: int) -> None:
    """Child mode: open the store (timed), report, serve until stdin closes, report again."""
    sys.path.insert(0, TOP)
    from appliance.control.host_quiet import HostActivity
    from appliance.nbd.server import NbdServer
    from appliance.store import Store

    t0 = time.perf_counter()
    store = Store.open(path, map_cache=budget)
    opened = time.perf_counter() - t0
    srv = NbdServer(store, unix_path=sock)
    srv.activity = HostActivity()
    srv.start()
    print(json.dumps({"open_s": opened, "rss_rest": rss()[0]}), flush=True)
    sys.stdin.readline()
    print(json.dumps(store.status()["map_cache"]), flush=True)
    sys.stdin.read()
    srv.stop()
    store.close()


def fio_randwrite(uri: str, size: int, writes: int) -> float:
    extra = (f"--io_size={writes * 4096}", "--norandommap")
    return fio_job(uri, "randwrite", size, *extra)["write"]["iops"]


def run_one(work: str, size: int, writes: int, budget: int) -> dict[str, float]:
    sys.path.insert(0, TOP)
    from appliance.store import create_store

    path, sock = f"{work}/s{size}.img", f"{work}/s{size}.sock"
    create_store(path, size, unit=4096, allow_overcommit=True)
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", path, sock, str(budget)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout and child.stdin
        res = json.loads(child.stdout.readline())
        res["iops"] = fio_randwrite(f"nbd+unix:///?socket={sock}", size, writes)
        res["rss_after"], res["rss_peak"] = rss(child.pid)
        child.stdin.write("status\n")
        child.stdin.flush()
        res["cache"] = json.loads(child.stdout.readline())
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(120)
        os.unlink(path)
    return res


PEERS = ("plain", "nbdkit")  # the same job over plain sparse files: the file system's own cost


def run_plain(work: str, size: int, writes: int, peer: str) -> float:
    """IOPS of the job over a plain sparse file of `size` bytes, served by `peer`."""
    from benchmarks.bench_nbd import Server

    path, sock = f"{work}/{peer}{size}.raw", f"{work}/{peer}{size}.sock"
    if os.path.exists(sock):  # nbdkit leaves its socket: a stale one would be connected to
        os.unlink(sock)
    with open(path, "wb") as f:
        f.truncate(size)
    bench_nbd = os.path.join(TOP, "benchmarks", "bench_nbd.py")
    argv = {
        "plain": [sys.executable, bench_nbd, "--serve-plain", path, sock],
        "nbdkit": ["nbdkit", "-f", "-U", sock, "file", f"file={path}"],
    }[peer]
    server = Server(peer, argv, sock)
    try:
        return fio_randwrite(server.uri, size, writes)
    finally:
        server.close()
        os.unlink(path)


def unit_tradeoff(work: str, writes: int) -> None:
    """Per unit size: the whole map of a 1 TiB disk, SAVE after `writes` random 4 KiB writes
    (flushes their map sectors), the background pass after it, and the 4 KiB first writes
    after a SAVE over saved data (each copies up the rest of its unit)."""
    import random

    sys.path.insert(0, TOP)
    from appliance.store import Store, create_store
    from appliance.store.format import plan_geometry

    size = 64 * GiB
    print(
        f"\n== unit size: map RAM, SAVE and pass vs copy-up ({writes} random 4 KiB writes "
        "over 64 GiB) =="
    )
    print(
        f"{'unit':>5} {'map/TiB':>8} {'SAVE ms':>8} {'pass s':>7} {'1st-write/s':>12} "
        f"{'rewrite/s':>10}"
    )
    for unit in (4096, 16384, 65536):
        path = f"{work}/u{unit}.img"
        create_store(path, size, unit=unit, allow_overcommit=True)
        rng = random.Random(unit)
        offs = [rng.randrange(size // 4096) * 4096 for _ in range(writes)]
        block = rng.randbytes(4096)
        with Store.open(path) as st:
            for o in offs:  # saved data under every later write
                st.write(o, block)
            st.flush()
            t0 = time.perf_counter()
            st.save("bench")
            save_ms = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            while st.background_step():
                pass
            pass_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for o in offs:
                st.write(o + 512 if unit > 4096 else o, block[:3584] if unit > 4096 else block)
            first = writes / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for o in offs:
                st.write(o, block)
            again = writes / (time.perf_counter() - t0)
        meta = plan_geometry(1 << 40, unit).meta_len
        print(
            f"{unit >> 10:4}K {meta / (1 << 20):7.0f}M {save_ms:8.1f} {pass_s:7.2f} "
            f"{first:12.0f} {again:10.0f}"
        )
        os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=100_000)
    ap.add_argument("--budget", default="32M", help="[store] map_cache for both stores")
    ap.add_argument("--rounds", type=int, default=3, help="pairs of runs; the median is quoted")
    ap.add_argument("--dir", default=None, help="where to put the sparse files")
    ap.add_argument(
        "--units", action="store_true", help="only the unit-size trade-off (in-process, no NBD)"
    )
    ap.add_argument("--no-peers", action="store_true", help="no plain-file runs (faster)")
    ap.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve[0], args.serve[1], int(args.serve[2]))
    for tool in ("fio", "nbdkit"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install fio nbdkit)")
    sys.path.insert(0, TOP)
    from appliance.sizes import parse_size

    budget = parse_size(args.budget)
    work = tempfile.mkdtemp(prefix="bench-map-cache-", dir=args.dir)
    if args.units:
        try:
            return unit_tradeoff(work, min(args.writes, 20_000))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    try:
        pairs = []
        for r in range(args.rounds):  # side by side, fresh stores each round: noise hits both
            small = run_one(work, GiB, args.writes, budget)
            big = run_one(work, 1 << 40, args.writes, budget)
            for peer in () if args.no_peers else PEERS:
                small[peer] = run_plain(work, GiB, args.writes, peer)
                big[peer] = run_plain(work, 1 << 40, args.writes, peer)
            pairs.append((small, big))
            peers = "".join(
                f"; {p} {small[p]:.0f} / {big[p]:.0f}, {big[p] / small[p]:.2f}x"
                for p in PEERS
                if p in small
            )
            print(
                f"round {r + 1}: IOPS 1 GiB {small['iops']:.0f}, 1 TiB {big['iops']:.0f}, "
                f"ratio {big['iops'] / small['iops']:.2f}x{peers}; peak RSS "
                f"{small['rss_peak'] >> 20} / {big['rss_peak'] >> 20} MiB",
                flush=True,
            )
        report(args.writes, budget, pairs)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # slow where deleting discards (ext4 on SSD)


def report(writes: int, budget: int, pairs: list[tuple[dict, dict]]) -> None:
    mib = 1 << 20
    ratios = sorted(big["iops"] / small["iops"] for small, big in pairs)
    small, big = sorted(pairs, key=lambda p: p[1]["iops"] / p[0]["iops"])[len(pairs) // 2]
    print(
        f"== {writes} random 4 KiB writes over NBD (fio QD16), map cache {budget / mib:.0f} MiB, "
        f"median of {len(pairs)} rounds; load average {os.getloadavg()[0]:.1f} =="
    )
    print(
        f"{'disk':>6} {'open s':>8} {'RSS rest':>9} {'IOPS':>8} {'RSS after':>10} "
        f"{'RSS peak':>9} {'cache':>8} {'parked':>8} {'hits':>6}"
    )
    for name, r in (("1 GiB", small), ("1 TiB", big)):
        print(
            f"{name:>6} {r['open_s']:8.3f} {r['rss_rest'] / mib:8.1f}M {r['iops']:8.0f} "
            f"{r['rss_after'] / mib:9.1f}M {r['rss_peak'] / mib:8.1f}M "
            f"{r['cache']['size'] / mib:7.1f}M {r['cache'].get('parked', 0) / mib:7.1f}M "
            f"{r['cache']['hit_rate']:6.1%}"
        )
    print(
        f"IOPS 1 TiB / 1 GiB: median {ratios[len(ratios) // 2]:.2f}x "
        f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}; goal: at least 0.7x)"
    )
    for peer in PEERS:
        if peer in small:
            peer_ratios = sorted(b[peer] / s[peer] for s, b in pairs)
            mid = peer_ratios[len(peer_ratios) // 2]
            print(
                f"  {peer} sparse file, same job: median {mid:.2f}x "
                f"(rounds: {', '.join(f'{x:.2f}' for x in peer_ratios)}); "
                f"the store's ratio against it: {ratios[len(ratios) // 2] / mid:.2f}"
            )
    extra = (big["rss_peak"] - small["rss_peak"]) / mib
    print(
        f"peak RSS 1 TiB - 1 GiB: {extra:.1f} MiB (goal: within the {budget / mib:.0f} MiB budget)"
    )
    print(
        f"open: 1 TiB {big['open_s'] * 1e3:.1f} ms, 1 GiB {small['open_s'] * 1e3:.1f} ms; "
        f"RSS at rest {big['rss_rest'] / mib:.1f} vs {small['rss_rest'] / mib:.1f} MiB"
    )


if __name__ == "__main__":
    main()

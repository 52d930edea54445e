"""Savepoint's NBD server against `nbdkit file`, side by side, with the same clients.

    .venv/bin/python benchmarks/bench_nbd.py [--size 512M] [--runtime 4] [--dir /var/tmp]

Both servers serve a disk of the same size from a file in the same directory (same disk), each
as a subprocess on a Unix socket, so its CPU time can be read from /proc/<pid>/stat. Prints
MB/s per test, the ratio Savepoint/nbdkit, server CPU seconds per GiB moved, and, where the
machine supports it, `perf stat -e instructions` per byte on 128 KiB sequential I/O.
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
TICK = os.sysconf("SC_CLK_TCK")
FIO_TESTS = [  # name, rw, block size, iodepth
    ("seq-read 1M QD8", "read", "1m", 8),
    ("seq-write 1M QD8", "write", "1m", 8),
    ("rand-read 128K QD8", "randread", "128k", 8),
    ("rand-write 128K QD8", "randwrite", "128k", 8),
    ("rand-read 4K QD1", "randread", "4k", 1),
    ("rand-write 4K QD1", "randwrite", "4k", 1),
    ("rand-read 4K QD16", "randread", "4k", 16),
    ("rand-write 4K QD16", "randwrite", "4k", 16),
]


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


class PlainFile:
    """The store API over a plain file: isolates the server's own cost from the store's."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.size, self.unit_size, self.readonly = os.fstat(self.fd).st_size, 4096, False

    def readinto(self, offset: int, buf) -> None:
        os.preadv(self.fd, [buf], offset)

    def write(self, offset: int, data, fua: bool = False) -> None:
        os.pwritev(self.fd, [data], offset)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return [(offset, length, False)]

    def close(self) -> None:
        os.close(self.fd)


def serve_savepoint(path: str, sock: str, plain: bool = False) -> None:
    """Child mode: serve an existing store (or a plain file) until stdin closes."""
    sys.path.insert(0, TOP)
    from appliance.nbd.server import NbdServer
    from appliance.store import Store

    store = PlainFile(path) if plain else Store.open(path)
    srv = NbdServer(store, unix_path=sock)
    if not plain:  # as the daemon runs it: every write is counted for SAVE's settle wait
        from appliance.control.host_quiet import HostActivity

        srv.activity = HostActivity()
    srv.start()
    print("ready", flush=True)
    sys.stdin.read()
    srv.stop()
    store.close()


class Server:
    def __init__(self, name: str, argv: list[str], sock: str) -> None:
        self.name, self.sock = name, sock
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        deadline = time.time() + 30
        while not os.path.exists(sock):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.05)
        time.sleep(0.2)
        self.uri = f"nbd+unix:///?socket={sock}"

    def cpu(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        if self.name == "nbdkit":
            self.proc.terminate()
        self.proc.wait(60)


def fio_job(uri: str, rw: str, size: int, *extra: str, bs: str = "4k", qd: int = 16) -> dict:
    """One fio job over NBD (the nbd engine); its JSON result for the job."""
    out = subprocess.run(
        [
            "fio",
            "--name=b",
            "--ioengine=nbd",
            f"--uri={uri}",
            f"--rw={rw}",
            f"--bs={bs}",
            f"--iodepth={qd}",
            f"--size={size}",
            "--output-format=json",
            "--randrepeat=0",
            *extra,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out[out.index("{") :])["jobs"][0]


def run_fio(uri: str, rw: str, bs: str, qd: int, size: int, runtime: int) -> float:
    job = fio_job(uri, rw, size, f"--runtime={runtime}", "--time_based", bs=bs, qd=qd)
    side = job["read"] if "read" in rw else job["write"]
    return side["io_bytes"]


def measure(server: Server, action) -> tuple[float, float, float]:
    """(MB/s, server CPU s, bytes) for one client run."""
    os.sync()  # start clean: no server pays for writing back the previous server's dirty pages
    cpu0, t0 = server.cpu(), time.perf_counter()
    nbytes = action()
    secs, cpu = time.perf_counter() - t0, server.cpu() - cpu0
    return nbytes / secs / 1e6, cpu, nbytes


def perf_instructions(pid: int, action) -> float | None:
    """Instructions the server ran per byte moved, or None when perf cannot count them."""
    perf = subprocess.Popen(
        ["perf", "stat", "-x,", "-e", "instructions", "-p", str(pid)],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)
    nbytes = action()
    perf.send_signal(2)
    _, err = perf.communicate()
    for line in err.splitlines():
        value = line.split(",")[0]
        if "instructions" in line and value.isdigit():
            return int(value) / nbytes
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="512M")
    ap.add_argument("--runtime", type=int, default=4, help="seconds per fio test")
    ap.add_argument("--dir", default="/var/tmp", help="directory on the disk to test")
    ap.add_argument(
        "--only",
        default="",
        help="run only tests whose name contains one of "
        "these comma-separated words (e.g. --only 4K,nbdcopy)",
    )
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--serve-plain", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve or args.serve_plain:
        return serve_savepoint(*(args.serve or args.serve_plain), plain=bool(args.serve_plain))
    for tool in ("fio", "nbdcopy", "nbdkit"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install fio libnbd-bin nbdkit)")
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="bench-nbd-", dir=args.dir)
    try:
        run(work, size, args.runtime, [w for w in args.only.split(",") if w])
    finally:
        shutil.rmtree(work)


def run(work: str, size: int, runtime: int, only: list[str]) -> None:
    sys.path.insert(0, TOP)
    from appliance.store import create_store

    src, plain, plain2, store = (os.path.join(work, n) for n in ("src", "plain", "plain2", "store"))
    with open(src, "wb") as f:
        for _ in range(size // (1 << 20)):
            f.write(os.urandom(1 << 20))
    for name in (plain, plain2):
        with open(name, "wb") as f:
            f.truncate(size)
    create_store(store, size)
    servers = [
        Server(
            "savepoint",
            [sys.executable, __file__, "--serve", store, work + "/sp.sock"],
            work + "/sp.sock",
        ),
        Server(
            "nbdkit",
            ["nbdkit", "-f", "-U", work + "/kit.sock", "file", f"file={plain}"],
            work + "/kit.sock",
        ),
        Server(
            "server-only",
            [sys.executable, __file__, "--serve-plain", plain2, work + "/so.sock"],
            work + "/so.sock",
        ),
    ]
    results: dict[str, dict[str, tuple[float, float, float]]] = {}
    try:
        tests = [
            ("nbdcopy write", lambda s: nbdcopy(src, s.uri, size)),
            ("nbdcopy read", lambda s: nbdcopy(s.uri, "null:", size)),
        ]
        tests += [
            (name, lambda s, rw=rw, bs=bs, qd=qd: run_fio(s.uri, rw, bs, qd, size, runtime))
            for name, rw, bs, qd in FIO_TESTS
        ]
        tests = [t for t in tests if not only or any(w in t[0] for w in only)]
        for name, action in tests:  # servers take turns per test: background load hits all
            for s in servers:
                results.setdefault(s.name, {})[name] = measure(s, lambda s=s, a=action: a(s))
        report(results)
        for s in servers[:2] if not only else []:
            for rw in ("read", "write"):
                ipb = perf_instructions(
                    s.proc.pid, lambda s=s, rw=rw: run_fio(s.uri, rw, "128k", 8, size, 2)
                )
                shown = f"{ipb:.2f} instructions/byte" if ipb else "not supported here"
                print(f"perf {s.name:9s} 128K sequential {rw:5s}: {shown}")
    finally:
        for s in servers:
            s.close()


def nbdcopy(src: str, dst: str, size: int) -> int:
    subprocess.run(["nbdcopy", "--connections=4", src, dst], check=True)
    return size


def report(results: dict[str, dict[str, tuple[float, float, float]]]) -> None:
    """savepoint = server + store; server-only = the same server over a plain file (no store),
    which shows how much of the cost is the server's and how much the store's."""
    sp, kit, so = results["savepoint"], results["nbdkit"], results["server-only"]
    print(
        f"{'test':22s} {'savepoint':>10s} {'nbdkit':>8s} {'ratio':>6s} {'srv-only':>9s} "
        f"{'ratio':>6s} | CPU s/GiB: {'sp':>6s} {'kit':>6s} {'srv-only':>8s}"
    )
    for name in sp:
        (a, ca, na), (b, cb, nb), (c, cc, nc) = sp[name], kit[name], so[name]
        print(
            f"{name:22s} {a:10.1f} {b:8.1f} {a / b:6.2f} {c:9.1f} {c / b:6.2f} |"
            f"{'':11s} {ca / (na / 2**30):6.2f} {cb / (nb / 2**30):6.2f} "
            f"{cc / (nc / 2**30):8.2f}"
        )
    print("(MB/s; ratio = x / nbdkit; server-only = this server over a plain file, no store)")


if __name__ == "__main__":
    main()

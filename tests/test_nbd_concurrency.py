"""SAVE and RESTORE in the middle of concurrent I/O, checked against a model.

Two libnbd connections (multi-conn), four threads each sharing its connection (several requests
in flight per connection), write random partial and whole units and read them back, while
this process calls store.save()/store.restore() at random moments. Each thread owns its units,
so per unit there are two sequential histories: its thread's writes/reads and the SAVE/RESTORE
sequence. The checker searches every interleaving that real time allows (an operation that
finished before another started comes first) and requires one in which every read saw exactly
the model's content, ending in the store's final visible and saved contents.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import threading
import time

from tests.nbd_helpers import ENV, SYS_PYTHON, serve

UNIT = 4096
CONNS, THREADS, UNITS_PER_CHAIN = 2, 4, 6
SECONDS = 3

WRITER = r"""
import json, random, sys, threading, time, hashlib, nbd
uri, conn, threads, per, secs, unit = sys.argv[1], *map(int, sys.argv[2:6]), int(sys.argv[6])
h = nbd.NBD()
h.connect_uri(uri)
events, lock = [], threading.Lock()
def chain(t):
    cid = conn * threads + t
    rnd = random.Random(cid)
    units = [cid * per + i for i in range(per)]
    end, seq, out = time.monotonic() + secs, 0, []
    while time.monotonic() < end:
        u = rnd.choice(units)
        off = rnd.choice([0, 0, rnd.randrange(unit), rnd.randrange(0, unit, 512)])
        n = rnd.choice([unit - off, rnd.randint(1, unit - off)])
        seq += 1
        tag = f"{cid:02d}{seq:06d}".encode()
        t0 = time.monotonic()
        h.pwrite((tag * (n // 8 + 1))[:n], u * unit + off)
        out.append(["w", u, t0, time.monotonic(), off, n, tag.decode()])
        if rnd.random() < 0.5:
            t0 = time.monotonic()
            data = h.pread(unit, u * unit)
            out.append(["r", u, t0, time.monotonic(), hashlib.sha256(data).hexdigest()])
    with lock:
        events.extend(out)
ts = [threading.Thread(target=chain, args=(t,)) for t in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
h.shutdown()
print(json.dumps(events))
"""


def apply(state: tuple[bytes, bytes], ev: list) -> tuple[bytes, bytes] | None:
    """The model: one event applied to (saved, current) of one unit; None if a read disagrees."""
    saved, cur = state
    kind = ev[0]
    if kind == "save":
        return cur, cur
    if kind == "restore":
        return saved, saved
    if kind == "w":
        off, n, tag = ev[4], ev[5], ev[6].encode()
        return saved, cur[:off] + (tag * (n // 8 + 1))[:n] + cur[off + n :]
    return state if hashlib.sha256(cur).hexdigest() == ev[4] else None


def linearizable(chain: list, controls: list, final: tuple[bytes, bytes]) -> bool:
    """Search the interleavings of two sequential histories that real time allows."""
    start = (bytes(UNIT), bytes(UNIT))
    frontier = {(0, 0): {start}}
    done = (len(chain), len(controls))
    while frontier:
        (i, j) = min(frontier, key=sum)
        states = frontier.pop((i, j))
        if (i, j) == done:
            return final in states
        for nxt, ev, other in (
            (
                (i + 1, j),
                chain[i] if i < len(chain) else None,
                controls[j] if j < len(controls) else None,
            ),
            (
                (i, j + 1),
                controls[j] if j < len(controls) else None,
                chain[i] if i < len(chain) else None,
            ),
        ):
            if ev is None or (other is not None and other[3] < ev[2]):
                continue  # `other` finished before `ev` started: it must come first
            new = {s for s in (apply(st, ev) for st in states) if s is not None}
            if new:
                frontier.setdefault(nxt, set()).update(new)
    return False


def test_save_restore_during_concurrent_io_matches_the_model(tmp_path):
    with serve(tmp_path, size=4 << 20) as s:
        procs = [
            subprocess.Popen(
                [
                    SYS_PYTHON,
                    "-c",
                    WRITER,
                    s.uri,
                    str(c),
                    str(THREADS),
                    str(UNITS_PER_CHAIN),
                    str(SECONDS),
                    str(UNIT),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=ENV,
            )
            for c in range(CONNS)
        ]
        controls: list[list] = []
        stop = threading.Event()

        def control() -> None:
            rnd = random.Random(1)
            while not stop.is_set():
                time.sleep(rnd.uniform(0.005, 0.05))
                kind = rnd.choice(["save", "restore"])
                t0 = time.monotonic()
                getattr(s.store, kind)("test")
                controls.append([kind, -1, t0, time.monotonic()])

        ctl = threading.Thread(target=control)
        ctl.start()
        outs = [p.communicate(timeout=120) for p in procs]
        stop.set()
        ctl.join()
        assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
        events = [ev for out, _ in outs for ev in json.loads(out)]
        units = CONNS * THREADS * UNITS_PER_CHAIN
        visible, saved = s.store.read(0, units * UNIT), s.store.read_saved(0, units * UNIT)
    writes = sum(e[0] == "w" for e in events)
    reads = sum(e[0] == "r" for e in events)
    assert writes > 200 and reads > 100 and len(controls) > 20, (writes, reads, len(controls))
    for u in range(units):
        chain = sorted((e for e in events if e[1] == u), key=lambda e: e[2])
        final = (saved[u * UNIT : (u + 1) * UNIT], visible[u * UNIT : (u + 1) * UNIT])
        assert linearizable(chain, controls, final), f"unit {u}: no valid order explains it"
    print(f"\nmodel checked {writes} writes, {reads} reads, {len(controls)} SAVE/RESTORE")

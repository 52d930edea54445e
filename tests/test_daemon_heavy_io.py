"""Heavy I/O through `savepoint serve` while SAVE and RESTORE run through the bus.

Several libnbd clients (Debian's python3-libnbd, so they run under /usr/bin/python3), each
with several threads on one connection, write and read units they own. Meanwhile the test
sends SAVE and RESTORE over the control socket. Afterwards a model checks every read: each
unit's ops are sequential (one owner thread) and the bus runs commands one at a time, so the
only freedom is where each command falls relative to the ops it overlapped in time
(CLOCK_MONOTONIC is shared by all processes). A read must match some such placement;
a torn, misplaced or stale unit fails the test.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

import pytest

from tests.test_daemon_support import Served, request

UNIT = 4096
CLIENTS, THREADS, UNITS_PER_THREAD = 3, 4, 24
DURATION = 5.0

CLIENT = r"""
import json, random, struct, sys, threading, time
import nbd

uri, cid, units, duration, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    float(sys.argv[4]), sys.argv[5]
threads = int(sys.argv[6])
U = 4096
h = nbd.NBD()
h.connect_uri(uri)
logs = [[] for _ in range(threads)]

def block(tok, unit):
    return struct.pack("<QQ", tok, unit) * (U // 16)

def decode(data, unit):
    if data == bytes(U):
        return 0
    tok, where = struct.unpack_from("<QQ", data)
    return tok if where == unit and data == block(tok, unit) else -1

def worker(t):
    rng = random.Random(cid * 100 + t)
    first = (cid * threads + t) * units
    log, seq = logs[t], 0
    end = time.monotonic() + duration
    while time.monotonic() < end:
        u = first + rng.randrange(units)
        if rng.random() < 0.5:
            seq += 1
            tok = (cid * threads + t + 1) * 10_000_000 + seq
            flags = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
            s = time.monotonic()
            h.pwrite(block(tok, u), u * U, flags)
            log.append(("w", u, tok, s, time.monotonic()))
        else:
            s = time.monotonic()
            data = h.pread(U, u * U)
            log.append(("r", u, decode(data, u), s, time.monotonic()))
        if rng.random() < 0.02:
            h.flush()
    for u in range(first, first + units):  # a final sweep: every unit read once more
        s = time.monotonic()
        log.append(("r", u, decode(h.pread(U, u * U), u), s, time.monotonic()))

ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
h.shutdown()
json.dump([op for log in logs for op in log], open(out, "w"))
"""


def apply(states: set[tuple[int, int]], action: str) -> set[tuple[int, int]]:
    if action == "save":  # the working copy becomes the saved one
        return {(cur, cur) for _, cur in states}
    return {(saved, saved) for saved, _ in states}  # restore


def check_unit(ops: list[list], commands: list[tuple[str, float, float]]) -> str:
    """'' if every read of this unit fits some order of ops and commands, else why not."""
    states: dict[int, set[tuple[int, int]]] = {0: {(0, 0)}}  # commands applied -> (saved, cur)
    for kind, unit, tok, start, end in sorted(ops, key=lambda op: op[3]):
        if tok == -1:
            return f"unit {unit}: torn or misplaced data at {start:.3f}"
        kmin = sum(1 for _, _, done in commands if done < start)  # surely before the op
        kmax = sum(1 for _, sent, _ in commands if sent < end)  # possibly before it
        nxt: dict[int, set[tuple[int, int]]] = {}
        for k, sts in states.items():
            for k2 in range(k, kmax + 1):
                if k2 >= kmin:
                    got = (
                        {(s, tok) for s, _ in sts}
                        if kind == "w"
                        else {st for st in sts if st[1] == tok}
                    )
                    if got:
                        nxt.setdefault(k2, set()).update(got)
                if k2 < len(commands):
                    sts = apply(sts, commands[k2][0])
        if not nxt:
            return f"unit {unit}: read {tok} at {start:.3f}-{end:.3f} fits no order"
        states = nxt
    return ""


def test_model_checker_catches_a_lost_write():
    ops = [["w", 1, 5, 0.0, 0.1], ["r", 1, 5, 0.2, 0.3]]
    assert check_unit(ops, [("save", 0.15, 0.16)]) == ""
    assert (
        check_unit(ops + [["r", 1, 0, 0.6, 0.7]], [("save", 0.15, 0.16), ("restore", 0.4, 0.5)])
        != ""
    )
    assert check_unit(ops + [["r", 1, 0, 0.6, 0.7]], [("restore", 0.15, 0.16)]) != ""
    # a restore overlapping the write may take effect before or after it
    assert (
        check_unit([["w", 1, 5, 0.0, 0.1], ["r", 1, 0, 0.2, 0.3]], [("restore", 0.05, 0.15)]) == ""
    )


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs Debian's python3")
def test_save_and_restore_under_heavy_io_lose_and_mix_nothing(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    served = Served(str(tmp_path / "disk.img"), size="64M")
    commands: list[tuple[str, float, float]] = []
    try:
        env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
        clients = [
            subprocess.Popen(
                [
                    "/usr/bin/python3",
                    str(script),
                    served.uri,
                    str(c),
                    str(UNITS_PER_THREAD),
                    str(DURATION),
                    str(tmp_path / f"log{c}.json"),
                    str(THREADS),
                ],
                env=env,
            )
            for c in range(CLIENTS)
        ]
        rng = random.Random(7)
        while any(c.poll() is None for c in clients):
            action = rng.choice(["save", "restore", "save"])
            sent = time.monotonic()
            # SAVE in the middle of the writes, on purpose: --now skips the wait for quiet
            reply = request(served.control, action, **({"now": True} if action == "save" else {}))
            commands.append((action, sent, time.monotonic()))
            assert reply["ok"], reply
            time.sleep(rng.uniform(0.0, 0.08))
        assert all(c.wait() == 0 for c in clients)
        assert served.stop() == 0
    finally:
        served.cleanup()
    ops: dict[int, list[list]] = {}
    for c in range(CLIENTS):
        for op in json.loads((tmp_path / f"log{c}.json").read_text()):
            ops.setdefault(op[1], []).append(op)
    problems = [p for unit_ops in ops.values() if (p := check_unit(unit_ops, commands))]
    reads = sum(op[0] == "r" for unit_ops in ops.values() for op in unit_ops)
    writes = sum(op[0] == "w" for unit_ops in ops.values() for op in unit_ops)
    print(
        f"heavy I/O: {writes} writes, {reads} reads checked, {len(commands)} commands, "
        f"{len(ops)} units"
    )
    assert not problems, problems[:5]
    assert len(commands) >= 10 and reads >= 1000 and writes >= 1000
    assert any(a == "restore" for a, _, _ in commands)

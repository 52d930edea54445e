"""Power cuts at random points of random workloads: invariants 1-5 of DESIGN.md.

Each chain creates a small store on a CrashBacking, runs random writes (any size and
alignment, some FUA), flush, trim, write-zeroes, SAVE, RESTORE, background passes and clean
reopens, and cuts the power either between two commands or at a random backing operation
(so inside a write, a flush, a SAVE, a RESTORE, a ring-wrap pass, or the recovery of the
previous cut). After every cut the store is reopened and checked against a reference model:

(a) the saved image is exactly the last committed one (pre- or post-command if one was in
    flight; the store's epoch says which, and the history agrees);
(b) every 512-byte sector shows its saved content or a content written to it since the last
    SAVE/RESTORE, and never one older than the last write FLUSH or FUA acknowledged;
(c) a committed SAVE/RESTORE shows exactly the saved image; one that did not commit left
    the disk satisfying (b) as if it never started;
(d) the store opens, reports status, and the chain goes on writing and saving on it.
Invariant 1 is checked on every backing write: none may touch a unit's primary slot.

SAVEPOINT_CRASH_POINTS sets the number of crash points (default 2000).
SAVEPOINT_CRASH_SEED=<seed> replays one chain (the seed a failure prints).
"""

from __future__ import annotations

import os
import random
import sys
import threading

import pytest

from appliance.store import Store
from appliance.store_format import WEPOCH_MASK
from tests.crashsim import CrashBacking, PowerCut, new_backing

S = 512
POINTS = int(os.environ.get("SAVEPOINT_CRASH_POINTS", "2000"))
PER_CHAIN = 25
BATCHES = 4
BASE_SEED = 0x5A7E


class Model:
    """What the disk may hold: saved image, written versions per sector, flush floors."""

    def __init__(self, size: int, unit: int, units: int) -> None:
        self.size, self.unit = size, unit
        self.saved = bytearray(size)
        self.visible = bytearray(size)
        self.versions: dict[int, list[bytes]] = {}  # sector -> [content at T0, each write]
        self.floor: dict[int, int] = {}  # sector -> oldest version index still allowed
        self.epoch = 1
        self.primary = bytearray(units)  # slot holding each unit's saved copy
        self.dirty: set[int] = set()  # units written since the last SAVE/RESTORE

    def write(self, offset: int, data: bytes) -> None:
        """Record a write before the store sees it (it may be cut half-way)."""
        if not data:
            return
        self.visible[offset:offset + len(data)] = data
        for s in range(offset // S, -(-(offset + len(data)) // S)):
            v = self.versions.setdefault(s, [bytes(self.saved[s * S:(s + 1) * S])])
            v.append(bytes(self.visible[s * S:(s + 1) * S]))
        self.dirty.update(range(offset // self.unit, (offset + len(data) - 1) // self.unit + 1))

    def acked(self, offset: int, length: int) -> None:
        """A FUA write returned: its sectors must survive."""
        for s in range(offset // S, -(-(offset + length) // S)):
            self.floor[s] = len(self.versions[s]) - 1

    def flushed(self) -> None:
        for s, v in self.versions.items():
            self.floor[s] = len(v) - 1

    def committed(self, action: str) -> None:
        if action == "save":
            self.saved[:] = self.visible
            for u in self.dirty:
                self.primary[u] ^= 1
        else:
            self.visible[:] = self.saved
        self.versions.clear()
        self.floor.clear()
        self.dirty.clear()
        self.epoch += 1


class Chain:
    """One store, one seeded workload, a power cut every few commands."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        rng = self.rng
        self.unit = rng.choice([4096, 4096, 4096, 16384])
        self.units = rng.choices([64, 100, 256, 1100], [3, 3, 3, 1 if self.unit == 4096 else 0])[0]
        self.size = self.units * self.unit - rng.choice([0, 0, 3 * S])  # last unit may be partial
        self.hist_cap = rng.choice([8, 13, 64, 4096])
        self.model = Model(self.size, self.unit, self.units)
        self.log: list[tuple[object, ...]] = []
        self.backing = new_backing(self.size, self.unit, self.hist_cap, guard=self._guard)
        self.store: Store | None = Store(self.backing)
        self.geo = self.store.geo

    # ----- invariant 1 ----------------------------------------------------------------------

    def _guard(self, kind: str, offset: int, length: int) -> None:
        for slot in (0, 1):
            lo = self.geo.slot_off[slot]
            a, b = max(offset, lo), min(offset + length, lo + self.units * self.unit)
            for u in range((a - lo) // self.unit, (b - 1 - lo) // self.unit + 1) if a < b else ():
                if self.model.primary[u] == slot:
                    self.fail(f"{kind} {offset}+{length} overwrites the saved copy of unit {u} "
                              f"in slot {slot} (invariant 1)")

    def fail(self, what: str) -> None:
        tail = "\n".join(f"  {op}" for op in self.log[-60:])
        raise AssertionError(f"{what}\nseed {self.seed} (replay: SAVEPOINT_CRASH_SEED={self.seed}"
                             f"); units {self.units}, size {self.size}, hist_cap {self.hist_cap};"
                             f" last operations:\n{tail}")

    # ----- the workload -----------------------------------------------------------------------

    def _range(self) -> tuple[int, int]:
        rng, size = self.rng, self.size
        span = min(size, 16 * self.unit) if rng.random() < 0.6 else size  # a hot zone: overwrites
        r = rng.random()
        if r < 0.3:
            off = rng.randrange(span // self.unit) * self.unit
            length = rng.randint(1, 8) * self.unit  # 3+ whole units take the one-pwrite fast path
        elif r < 0.6:
            off = rng.randrange(span // S) * S
            length = rng.randint(1, 3 * self.unit // S) * S
        else:
            off = rng.randrange(span)
            length = rng.randint(1, rng.choice([3, 6]) * self.unit)
        return off, min(length, size - off)

    def _next_op(self) -> tuple[object, ...]:
        kind = self.rng.choices(
            ["write", "flush", "trim", "zero", "save", "restore", "bg", "reopen"],
            [40, 8, 6, 6, 10, 8, 5, 2])[0]
        if kind in ("write", "trim", "zero"):
            return (kind, *self._range(), self.rng.random() < 0.2)
        if kind == "bg":
            return (kind, self.rng.choice([1, 50, 10_000]))
        return (kind,)

    def _run(self, op: tuple[object, ...]) -> None:
        store, model, kind = self.store, self.model, op[0]
        assert store is not None
        if kind in ("write", "trim", "zero"):
            _, off, length, fua = op
            data = self.rng.randbytes(length) if kind == "write" else bytes(length)
            model.write(off, data)
            if kind == "write":
                store.write(off, data, fua=fua)
            elif kind == "trim":
                store.trim(off, length)
                fua = False
            else:
                store.write_zeroes(off, length, fua=fua)
            if fua:
                model.acked(off, length)
        elif kind == "flush":
            store.flush()
            model.flushed()
        elif kind in ("save", "restore"):
            rec = store.save("test") if kind == "save" else store.restore("test")
            if rec["epoch"] != model.epoch or rec["action"] != kind:
                self.fail(f"{kind} returned {rec}, expected epoch {model.epoch}")
            model.committed(kind)
        elif kind == "bg":
            store.background_step(op[1])
        elif kind == "reopen":
            store.close()
            model.flushed()
            self.store = Store(self.backing)
        if self.store.epoch != model.epoch:
            self.fail(f"epoch {self.store.epoch} after {op}, model says {model.epoch}")

    # ----- one crash point ----------------------------------------------------------------------

    def crash_point(self) -> None:
        rng = self.rng
        if rng.random() < 0.75:  # inside some backing operation
            self.backing.cut_at = self.backing.ops + rng.randint(1, 40)
            budget = 400
        else:  # between two commands
            self.backing.cut_at, budget = None, rng.randint(0, 12)
        inflight = None
        try:
            for _ in range(budget):
                op = self._next_op()
                self.log.append(op)
                inflight = op[0] if op[0] in ("save", "restore") else None
                self._run(op)
                inflight = None
        except PowerCut as e:
            self.log.append(("cut", str(e)))
        else:
            self.log.append(("cut", "between commands"))
        self._recover()
        self._check(inflight)

    def _recover(self) -> None:
        """Power back on; sometimes the power goes again while the store opens."""
        backing: CrashBacking = self.backing
        while True:
            backing = backing.power_cut(self.rng)
            backing.guard = self._guard
            if self.rng.random() < 0.1:
                backing.cut_at = 1
            try:
                self.store = Store(backing)
            except PowerCut:
                self.log.append(("cut", "while opening"))
                continue
            except Exception as e:  # noqa: BLE001 - report with the seed
                self.fail(f"the store does not open after a power cut: {e!r}")
            backing.cut_at = None
            self.backing = backing
            return

    def _check(self, inflight: str | None) -> None:
        store, model = self.store, self.model
        assert store is not None
        committed = False
        if inflight and store.epoch == model.epoch + 1:
            model.committed(inflight)
            committed = True
            last = store.history(limit=1)
            if not last or last[-1]["action"] != inflight or last[-1]["epoch"] != store.epoch - 1:
                self.fail(f"{inflight} committed but the history ends with {last}")
        elif store.epoch != model.epoch:
            self.fail(f"epoch {store.epoch} after the cut, expected {model.epoch}"
                      + (f" or {model.epoch + 1}" if inflight else ""))
        saved = store.read_saved(0, self.size)
        if saved != model.saved:  # (a)
            self.fail(f"saved image differs at byte {_first_diff(saved, model.saved)} "
                      f"after a cut ({inflight or 'no command'} in flight, "
                      f"committed={committed})")
        visible = store.read(0, self.size)
        if committed and visible != model.saved:  # (c)
            self.fail(f"{inflight} committed but the disk differs from the saved image at "
                      f"byte {_first_diff(visible, model.saved)}")
        self._check_sectors(visible, inflight)  # (b), and (c) for a command that did not commit
        self._check_map()
        status = store.status()  # (d)
        if status["epoch"] != store.epoch or status["size"] != self.size:
            self.fail(f"status after reopen is wrong: {status}")
        model.visible[:] = visible

    def _check_sectors(self, visible: bytes, inflight: str | None) -> None:
        model = self.model
        for s in range(self.size // S):
            got = visible[s * S:(s + 1) * S]
            v = model.versions.get(s)
            if v is None:
                if got != model.saved[s * S:(s + 1) * S]:
                    self.fail(f"sector {s} (unit {s * S // self.unit}) was never written since the "
                              f"last SAVE/RESTORE but differs from the saved image")
                continue
            floor = model.floor.get(s, 0)
            hits = [i for i in range(floor, len(v)) if v[i] == got]
            if not hits:
                older = [i for i in range(floor) if v[i] == got]
                what = (f"an older version {older} than the flushed one {floor}" if older else
                        "content never written to it")
                self.fail(f"sector {s} (unit {s * S // self.unit}) shows {what} after a cut "
                          f"({inflight or 'no command'} in flight; {len(v) - 1} writes since T0)")
            model.floor[s] = hits[0]  # what survived is durable now, and the latest content
            if got != v[-1]:
                v.append(got)
                model.floor[s] = len(v) - 1

    def _check_map(self) -> None:
        """The reopened map agrees with the model: primaries (invariant 1's basis) and DDM."""
        store, model = self.store, self.model
        assert store is not None
        for u in range(self.units):
            rec = store._record(u)
            if rec >> 31 != model.primary[u]:
                self.fail(f"unit {u}: saved copy in slot {rec >> 31}, model says "
                          f"{model.primary[u]}")
            if (rec & WEPOCH_MASK) == store.epoch and u not in model.dirty:
                self.fail(f"unit {u} is marked written though nothing wrote it this epoch")
        model.dirty = {u for u in model.dirty
                       if (store._record(u) & WEPOCH_MASK) == store.epoch}

    def finish(self) -> None:
        """(d) in full: the store still takes writes, a flush and a SAVE after all the cuts."""
        self.backing.cut_at = None
        for op in [("write", 0, min(self.size, 3 * self.unit + 7), False), ("flush",), ("save",)]:
            self.log.append(op)
            self._run(op)
        assert self.store is not None
        if self.store.read_saved(0, self.size) != self.model.saved:
            self.fail("the saved image is wrong after the final SAVE")


def _first_diff(a: bytes | bytearray, b: bytes | bytearray) -> int:
    return next((i for i in range(len(a)) if a[i] != b[i]), -1)


def run_chain(seed: int, points: int) -> None:
    chain = Chain(seed)
    for _ in range(points):
        chain.crash_point()
    chain.finish()


def _seeds(batch: int) -> list[int]:
    chains = -(-POINTS // PER_CHAIN)
    return [BASE_SEED + i for i in range(batch, chains, BATCHES)]


@pytest.mark.parametrize("batch", range(BATCHES))
def test_power_cuts_keep_the_durability_contract(batch: int) -> None:
    replay = os.environ.get("SAVEPOINT_CRASH_SEED")
    if replay:
        if batch == 0:
            run_chain(int(replay), PER_CHAIN)
        return
    for seed in _seeds(batch):
        run_chain(seed, PER_CHAIN)


def test_crashsim_power_cut_keeps_synced_data_and_tears_the_rest() -> None:
    """The simulator itself: synced data survives, volatile writes come out in all states."""
    b = CrashBacking(bytearray(8 * S))
    b.pwrite(b"A" * 8 * S, 0)
    b.sync()
    b.pwrite(b"B" * 4 * S, 0)
    seen = set()
    rng = random.Random(1)
    for _ in range(300):
        img = b.power_cut(rng).image
        assert img[4 * S:] == b"A" * 4 * S
        seen.add(bytes(img[:4 * S:S]))
    assert {b"AAAA", b"BBBB"} <= seen and len(seen) > 4  # lost, applied, and torn
    b.cut_at = b.ops + 1
    with pytest.raises(PowerCut):
        b.sync()
    with pytest.raises(PowerCut):
        b.pwrite(b"x", 0)


# ----- many requests in flight: the NBD server issues I/O from several threads ---------------

THREAD_ROUNDS = max(10, POINTS // 20)


def _threaded_round(seed: int) -> None:
    """Writers on disjoint regions (FUA, flush) and the background pass, then a power cut."""
    rng = random.Random(seed)
    unit, units, writers = 4096, 64, 4
    size = units * unit
    backing = new_backing(size, unit, 64)
    store = Store(backing)
    saved = rng.randbytes(size)
    store.write(0, saved)
    store.save("test")  # every unit pending in the background pass, copy-ups read saved data
    versions: dict[int, list[bytes]] = {}
    floor: dict[int, int] = {}
    lock = threading.Lock()
    backing.cut_at = backing.ops + rng.randint(1, 200)

    def writer(t: int, wrng: random.Random) -> None:
        lo = t * units // writers * unit
        span = units // writers * unit
        mine = bytearray(saved[lo:lo + span])
        try:
            for _ in range(60):
                if wrng.random() < 0.15:
                    with lock:
                        mark = {s: len(versions[s]) - 1 for s in range(lo // S, (lo + span) // S)
                                if s in versions}
                    store.flush()
                    with lock:
                        floor.update(mark)
                    continue
                off = wrng.randrange(span)
                data = wrng.randbytes(wrng.randint(1, min(3 * unit, span - off)))
                mine[off:off + len(data)] = data
                sectors = range((lo + off) // S, -(-(lo + off + len(data)) // S))
                with lock:
                    for s in sectors:
                        r = s * S - lo
                        versions.setdefault(s, [saved[s * S:(s + 1) * S]]).append(
                            bytes(mine[r:r + S]))
                fua = wrng.random() < 0.2
                store.write(lo + off, data, fua=fua)
                if fua:
                    with lock:
                        floor.update({s: len(versions[s]) - 1 for s in sectors})
        except PowerCut:
            return

    def background() -> None:
        try:
            while store.background_step(1):
                pass
        except PowerCut:
            return

    threads = [threading.Thread(target=writer, args=(t, random.Random(rng.random())))
               for t in range(writers)] + [threading.Thread(target=background)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    after = Store(backing.power_cut(rng))
    where = f"threaded round seed {seed} (replay: _threaded_round({seed}))"
    assert after.read_saved(0, size) == saved, f"saved image changed: {where}"
    visible = after.read(0, size)
    for s in range(size // S):
        got, v = visible[s * S:(s + 1) * S], versions.get(s, [saved[s * S:(s + 1) * S]])
        assert got in v[floor.get(s, 0):], (
            f"sector {s}: {'older than its flushed version' if got in v else 'never written'}"
            f" ({len(v) - 1} writes, floor {floor.get(s, 0)}): {where}")
    after.write(0, b"still works")
    after.save("test")
    assert after.read_saved(0, 11) == b"still works"


def test_power_cuts_with_many_requests_in_flight() -> None:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads inside store calls, not between them
    try:
        for i in range(THREAD_ROUNDS):
            _threaded_round(BASE_SEED * 7 + i)
    finally:
        sys.setswitchinterval(old)

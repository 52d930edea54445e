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

Fault points do the same with I/O errors: any backing operation (pread, pwrite, sync, discard)
fails with EIO or ENOSPC, once or until the disk "recovers", in the middle of the same random
workload; the chain goes on through the errors, then retries, writes, commands, background
steps, power cuts and reopens. On top of (a)-(d): a failed write leaves each of its sectors
old or new, a failed SAVE/RESTORE committed or not (never a mix, never with later writes),
a retried FLUSH makes everything before it durable, a clean reopen shows exactly what was
written, and a read-only open shows what a read-write one does (same epoch, history, saved
and visible data).

SAVEPOINT_CRASH_POINTS and SAVEPOINT_FAULT_POINTS set the number of crash and fault points
(default 2000 each). SAVEPOINT_CRASH_SEED=<seed> replays one chain (the seed a failure prints;
SAVEPOINT_FAULT_SEED for a fault chain).
"""

from __future__ import annotations

import errno
import os
import random
import sys
import threading

import pytest

from appliance.store import Store, StoreError
from appliance.store.format import PAGE, WEPOCH_MASK
from tests.crashsim import OPS, CrashBacking, PowerCut, new_backing

S = 512
POINTS = int(os.environ.get("SAVEPOINT_CRASH_POINTS", "2000"))
FAULT_POINTS = int(os.environ.get("SAVEPOINT_FAULT_POINTS", "2000"))
TINY_CACHE = PAGE  # one map page: every request touching another one evicts (and flushes)
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
        self.visible[offset : offset + len(data)] = data
        for s in range(offset // S, -(-(offset + len(data)) // S)):
            v = self.versions.setdefault(s, [bytes(self.saved[s * S : (s + 1) * S])])
            v.append(bytes(self.visible[s * S : (s + 1) * S]))
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
        # A third of the chains run with a map cache of one page over a map of two or three.
        self.cache = None if self.unit != 4096 or rng.random() < 0.67 else TINY_CACHE
        if self.cache:
            self.units = rng.choice([1100, 2100])
        self.size = self.units * self.unit - rng.choice([0, 0, 3 * S])  # last unit may be partial
        self.hist_cap = rng.choice([8, 13, 64, 4096])
        self.model = Model(self.size, self.unit, self.units)
        self.log: list[tuple[object, ...]] = []
        self.backing = new_backing(self.size, self.unit, self.hist_cap, guard=self._guard)
        self.store: Store | None = Store(self.backing, map_cache=self.cache)
        self.geo = self.store.geo
        self.uncertain: str | None = None  # a SAVE/RESTORE that failed and may yet commit
        self.replay_var = "SAVEPOINT_CRASH_SEED"

    # ----- invariant 1 ----------------------------------------------------------------------

    def _guard(self, kind: str, offset: int, length: int) -> None:
        for slot in (0, 1):
            lo = self.geo.slot_off[slot]
            a, b = max(offset, lo), min(offset + length, lo + self.units * self.unit)
            for u in range((a - lo) // self.unit, (b - 1 - lo) // self.unit + 1) if a < b else ():
                if self.model.primary[u] == slot:
                    self.fail(
                        f"{kind} {offset}+{length} overwrites the saved copy of unit {u} "
                        f"in slot {slot} (invariant 1)"
                    )

    def fail(self, what: str) -> None:
        tail = "\n".join(f"  {op}" for op in self.log[-60:])
        raise AssertionError(
            f"{what}\nseed {self.seed} (replay: {self.replay_var}={self.seed}"
            f"); units {self.units}, size {self.size}, hist_cap {self.hist_cap};"
            f" last operations:\n{tail}"
        )

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
            [40, 8, 6, 6, 10, 8, 5, 2],
        )[0]
        if kind in ("write", "trim", "zero"):
            return (kind, *self._range(), self.rng.random() < 0.2)
        if kind == "bg":
            return (kind, self.rng.choice([1, 50, 10_000]))
        return (kind,)

    def _attempt(self, op: tuple[object, ...]) -> bool:
        """Run op while faults are injected: an I/O error is an answer, not a test failure."""
        store, model = self.store, self.model
        assert store is not None
        before, dirty = bytes(model.visible), set(model.dirty)
        was_unsettled, seq = store._unsettled, store.sb.seq
        try:
            self._run(op)
        except (StoreError, OSError) as e:
            self.log.append(("failed", repr(e)))
            fault = self.backing.fault
            if fault is not None and fault.kinds == {"discard"}:  # docs/format.md, "Faults"
                self.fail(f"{op[0]} failed because a hole punch failed: {e!r}")
            if op[0] in ("write", "trim", "zero"):
                model.visible[:] = before
                model.dirty = dirty
                self._settle_range(int(op[1]), int(op[2]))  # type: ignore[call-overload]
            elif (
                op[0] in ("save", "restore")
                and store._unsettled
                and not (was_unsettled and store.sb.seq == seq)
            ):  # it got to its superblock
                self.uncertain = str(op[0])
            if store.epoch != model.epoch:
                self.fail(f"epoch {store.epoch} after a failed {op}, model says {model.epoch}")
            return False
        if self.uncertain and not store._unsettled:
            self.uncertain = None  # a later superblock settled it: the command did not commit
        return True

    def _settle_range(self, off: int, length: int) -> None:
        """After a failed write: each sector shows its old or its new content, and the model
        learns which (a read with the fault held back: reads change nothing)."""
        if not length:
            return
        fault, self.backing.fault = self.backing.fault, None
        try:
            assert self.store is not None
            lo, hi = off // S * S, -(-(off + length) // S) * S
            got = self.store.read(lo, hi - lo)
            for u in range(off // self.unit, (off + length - 1) // self.unit + 1):
                if (self.store._record(u) & WEPOCH_MASK) == self.store.epoch:
                    self.model.dirty.add(u)  # the write reached this unit's map record
        finally:
            self.backing.fault = fault
        model = self.model
        for s in range(lo // S, hi // S):
            now = got[s * S - lo : (s + 1) * S - lo]
            v = model.versions[s]
            if now not in v[model.floor.get(s, 0) :]:
                self.fail(f"sector {s} shows content never written to it after a failed write")
            if now != v[-1]:
                v.append(now)
            model.visible[s * S : (s + 1) * S] = now

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
            try:
                self.store = Store(self.backing, map_cache=self.cache)
            except (StoreError, OSError) as e:
                if self.backing.fault is None:
                    raise
                self.log.append(("failed", f"open: {e!r}; opened again once the disk answers"))
                fault, self.backing.fault = self.backing.fault, None
                self.store = Store(self.backing, map_cache=self.cache)
                self.backing.fault = fault
            self._check_exact("a clean reopen")
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
        self._check(inflight or self.uncertain)
        self.uncertain = None

    def _recover(self) -> None:
        """Power back on; sometimes the power goes again while the store opens, or an I/O
        error stops the open (then it is simply tried again)."""
        backing: CrashBacking = self.backing
        while True:
            backing = backing.power_cut(self.rng)
            backing.guard = self._guard
            readonly = self._open_readonly(backing)
            r = self.rng.random()
            if r < 0.1:
                backing.cut_at = 1
            elif r < 0.2:
                backing.inject(self.rng.choice([OPS, ("pwrite",), ("sync",)]), after=1)
            try:
                self.store = Store(backing, map_cache=self.cache)
            except PowerCut:
                self.log.append(("cut", "while opening"))
                continue
            except (StoreError, OSError) as e:
                if backing.fault is None or not backing.fault.fired:
                    self.fail(f"the store does not open after a power cut: {e!r}")
                self.log.append(("failed", f"open: {e!r}"))
                backing.heal()
                self.store = Store(backing, map_cache=self.cache)
            except Exception as e:  # noqa: BLE001 - report with the seed
                self.fail(f"the store does not open after a power cut: {e!r}")
            backing.cut_at = None
            backing.heal()
            self.backing = backing
            self._compare(readonly, self.store)
            return

    def _open_readonly(self, backing: CrashBacking) -> Store:
        try:
            # before the read-write open repairs anything
            return Store(backing, readonly=True, map_cache=self.cache)
        except Exception as e:  # noqa: BLE001 - report with the seed
            self.fail(f"a read-only open fails after a power cut: {e!r}")
            raise

    def _compare(self, ro: Store, rw: Store) -> None:
        """A read-only open (inspect, history, check) agrees with the read-write one."""
        n = self.size
        for what, a, b in [
            ("epoch", ro.epoch, rw.epoch),
            ("history", ro.history(), rw.history()),
            ("saved image", ro.read_saved(0, n), rw.read_saved(0, n)),
            ("visible disk", ro.read(0, n), rw.read(0, n)),
        ]:
            if a != b:
                self.fail(f"a read-only open disagrees with a read-write one on the {what}")

    def _check_exact(self, when: str) -> None:
        """No cut since everything was flushed: the disk is exactly what the model holds."""
        assert self.store is not None
        if self.store.read_saved(0, self.size) != self.model.saved:
            self.fail(f"the saved image differs from the last SAVE after {when}")
        visible = self.store.read(0, self.size)
        if visible != self.model.visible:
            self.fail(
                f"the disk differs at byte {_first_diff(visible, self.model.visible)} "
                f"from what was written, after {when}"
            )

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
            self.fail(
                f"epoch {store.epoch} after the cut, expected {model.epoch}"
                + (f" or {model.epoch + 1}" if inflight else "")
            )
        saved = store.read_saved(0, self.size)
        if saved != model.saved:  # (a)
            self.fail(
                f"saved image differs at byte {_first_diff(saved, model.saved)} "
                f"after a cut ({inflight or 'no command'} in flight, "
                f"committed={committed})"
            )
        visible = store.read(0, self.size)
        if committed and visible != model.saved:  # (c)
            self.fail(
                f"{inflight} committed but the disk differs from the saved image at "
                f"byte {_first_diff(visible, model.saved)}"
            )
        self._check_sectors(visible, inflight)  # (b), and (c) for a command that did not commit
        self._check_map()
        status = store.status()  # (d)
        if status["epoch"] != store.epoch or status["size"] != self.size:
            self.fail(f"status after reopen is wrong: {status}")
        model.visible[:] = visible

    def _check_sectors(self, visible: bytes, inflight: str | None) -> None:
        model = self.model
        for s in range(self.size // S):
            got = visible[s * S : (s + 1) * S]
            v = model.versions.get(s)
            if v is None:
                if got != model.saved[s * S : (s + 1) * S]:
                    self.fail(
                        f"sector {s} (unit {s * S // self.unit}) was never written since the "
                        f"last SAVE/RESTORE but differs from the saved image"
                    )
                continue
            floor = model.floor.get(s, 0)
            hits = [i for i in range(floor, len(v)) if v[i] == got]
            if not hits:
                older = [i for i in range(floor) if v[i] == got]
                what = (
                    f"an older version {older} than the flushed one {floor}"
                    if older
                    else "content never written to it"
                )
                self.fail(
                    f"sector {s} (unit {s * S // self.unit}) shows {what} after a cut "
                    f"({inflight or 'no command'} in flight; {len(v) - 1} writes since T0)"
                )
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
                self.fail(
                    f"unit {u}: saved copy in slot {rec >> 31}, model says {model.primary[u]}"
                )
            if (rec & WEPOCH_MASK) == store.epoch and u not in model.dirty:
                self.fail(f"unit {u} is marked written though nothing wrote it this epoch")
        model.dirty = {u for u in model.dirty if (store._record(u) & WEPOCH_MASK) == store.epoch}
        if self.rng.random() < 0.3:  # the first pass after an open recounts the map exactly
            while store.background_step(self.rng.choice([50, 10_000])):
                pass
            words = [store.map.raw(u) & WEPOCH_MASK for u in range(self.units)]
            counted = (
                sum(w == store.epoch for w in words),
                sum(0 < w < store.epoch for w in words),
            )
            st = store.status()
            if (st["dirty_units"], st["pending_units"]) != counted:
                self.fail(
                    f"after the pass: {st['dirty_units']} written and "
                    f"{st['pending_units']} pending units, the map holds {counted}"
                )

    # ----- one fault point ----------------------------------------------------------------------

    def fault_point(self) -> None:
        """I/O errors in the middle of a workload, then a power cut, or recovery and retries."""
        rng = self.rng
        kinds = rng.choice(
            [OPS, ("pwrite",), ("sync",), ("pread",), ("discard",), ("pwrite", "sync")]
        )
        err = rng.choice([errno.EIO, errno.ENOSPC])
        fault = self.backing.inject(kinds, err, rng.randint(1, 30), rng.random() < 0.3)
        self.backing.rng = random.Random(rng.random())
        self.log.append(
            (
                "fault",
                sorted(kinds),
                errno.errorcode[err],
                fault.after,
                "persistent" if fault.persistent else "once",
            )
        )
        for _ in range(rng.randint(3, 30)):
            op = self._next_op()
            self.log.append(op)
            self._attempt(op)
        self.backing.heal()
        r = rng.random()
        if r < 0.3:  # the power goes while the disk is still failing
            self.backing.cut_at = self.backing.ops + 1
            self.crash_point_now()
            return
        self.log.append(("healed",))
        self._run(("flush",))  # the retry must succeed and make everything before it durable
        if self.store is not None and self.store._unsettled:
            self.fail("a successful flush left the store unsettled")
        self.uncertain = None
        self._check_exact("the faults and a successful retry")
        if r < 0.65:
            self.crash_point()
        else:
            self._run(("reopen",))

    def crash_point_now(self) -> None:
        self.log.append(("cut", "during the faults"))
        self._recover()
        self._check(self.uncertain)
        self.uncertain = None

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


def run_chain(seed: int, points: int, faults: bool = False) -> None:
    chain = Chain(seed)
    if faults:
        chain.replay_var = "SAVEPOINT_FAULT_SEED"
    for _ in range(points):
        chain.fault_point() if faults else chain.crash_point()
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


def _fault_seeds(batch: int) -> list[int]:
    chains = -(-FAULT_POINTS // PER_CHAIN)
    return [BASE_SEED * 3 + i for i in range(batch, chains, BATCHES)]


@pytest.mark.parametrize("batch", range(BATCHES))
def test_io_errors_keep_the_durability_contract(batch: int) -> None:
    replay = os.environ.get("SAVEPOINT_FAULT_SEED")
    if replay:
        if batch == 0:
            run_chain(int(replay), PER_CHAIN, faults=True)
        return
    for seed in _fault_seeds(batch):
        run_chain(seed, PER_CHAIN, faults=True)


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
        assert img[4 * S :] == b"A" * 4 * S
        seen.add(bytes(img[: 4 * S : S]))
    assert {b"AAAA", b"BBBB"} <= seen and len(seen) > 4  # lost, applied, and torn
    b.cut_at = b.ops + 1
    with pytest.raises(PowerCut):
        b.sync()
    with pytest.raises(PowerCut):
        b.pwrite(b"x", 0)


# ----- many requests in flight: the NBD server issues I/O from several threads ---------------

THREAD_ROUNDS = max(10, POINTS // 20)
NEVER = 1 << 62


class History:
    """Concurrent writes to shared sectors, ordered by a logical clock: a sector may show any
    write to it, unless a later write to it had finished before a FLUSH that returned."""

    def __init__(self, saved: bytes) -> None:
        self.saved = saved
        self.lock = threading.Lock()
        self.clock = 0
        self.writes: dict[int, list[tuple[bytes, int, int]]] = {}  # sector -> (data, start, end)
        self.flushed = 0  # clock at the start of the latest FLUSH that returned

    def tick(self) -> int:
        with self.lock:
            self.clock += 1
            return self.clock

    def writing(self, offset: int, data: bytes) -> list[tuple[int, int]]:
        """Before the store sees the write (a cut may land half-way): it has no end yet."""
        start = self.tick()
        with self.lock:
            keys = []
            for i in range(0, len(data), S):
                ws = self.writes.setdefault((offset + i) // S, [])
                ws.append((data[i : i + S], start, NEVER))
                keys.append(((offset + i) // S, len(ws) - 1))
            return keys

    def wrote(self, keys: list[tuple[int, int]]) -> None:
        end = self.tick()
        with self.lock:
            for s, i in keys:
                data, start, _ = self.writes[s][i]
                self.writes[s][i] = (data, start, end)

    def flush_done(self, start: int) -> None:
        with self.lock:
            self.flushed = max(self.flushed, start)

    def allowed(self, s: int, got: bytes) -> bool:
        ws = [(self.saved[s * S : (s + 1) * S], 0, 0), *self.writes.get(s, [])]
        for data, _start, end in ws:
            if data == got and not any(st > end and e < self.flushed for _d, st, e in ws):
                return True
        return False


def _threaded_round(seed: int) -> None:
    """Writers sharing units (partial and whole-unit runs, flushes) and the background pass on
    a store whose every unit is pending, then a power cut."""
    rng = random.Random(seed)
    unit, units, writers = 4096, 64, 4
    cache = TINY_CACHE if seed % 2 else None  # half the rounds evict all the time
    if cache:
        units = 1100  # two map pages for a cache of one
    size = units * unit
    backing = new_backing(size, unit, 64)
    store = Store(backing, map_cache=cache)
    saved = rng.randbytes(size)
    store.write(0, saved)
    store.save("test")  # every unit pending, records uniform: whole-unit runs take one pwrite
    hist = History(saved)
    live = rng.random() < 0.3  # no cut while the threads run: then the live counters are checked
    backing.cut_at = None if live else backing.ops + rng.randint(1, 300)

    def writer(wrng: random.Random) -> None:
        try:
            for _ in range(40):
                if wrng.random() < 0.15:
                    start = hist.tick()
                    store.flush()
                    hist.flush_done(start)
                    continue
                if wrng.random() < 0.4:  # whole units: the one-pwrite run path
                    n = wrng.randint(3, 8)
                    off = wrng.randrange(units - n + 1) * unit
                    data = wrng.randbytes(n * unit)
                else:  # sectors: copy-ups and in-place writes in units others write too
                    off = wrng.randrange(size // S) * S
                    data = wrng.randbytes(min(wrng.randint(1, 3 * unit // S) * S, size - off))
                keys = hist.writing(off, data)
                store.write(off, data)
                hist.wrote(keys)
        except PowerCut:
            return

    def background() -> None:
        try:
            while store.background_step(1):
                pass
        except PowerCut:
            return

    threads = [
        threading.Thread(target=writer, args=(random.Random(rng.random()),)) for _ in range(writers)
    ] + [threading.Thread(target=background)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    where = f"threaded round seed {seed} (replay: _threaded_round({seed}))"
    if live:
        epoch = store.epoch
        pending = sum(1 for u in range(units) if 0 < store.map.raw(u) & WEPOCH_MASK < epoch)
        ddm = sum(1 for u in range(units) if store.map.raw(u) & WEPOCH_MASK == epoch)
        st = store.status()
        assert (st["pending_units"], st["dirty_units"]) == (pending, ddm), (
            f"counters {st['pending_units']}, {st['dirty_units']} but the map holds {pending} "
            f"pending and {ddm} written units: {where}"
        )
    after = Store(backing.power_cut(rng))
    assert after.read_saved(0, size) == saved, f"saved image changed: {where}"
    visible = after.read(0, size)
    for s in range(size // S):
        assert hist.allowed(s, visible[s * S : (s + 1) * S]), (
            f"sector {s}: older than a flushed write, or never written: {where}"
        )
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

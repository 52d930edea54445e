"""The command bus on a real store: every policy cell, lock mode, relock timing, events."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from appliance.control.bus import CommandBus
from appliance.control.commands import Action, Command, Mode
from tests.support import FakeClock, run

UNIT = 4096

# Issue 4's defaults, written out independently of appliance/control/policy.py:
# RESTORE from any authenticated source in any mode; SAVE only while UNLOCKED; the host may
# ask STATUS and SAVE only while UNLOCKED; commodity fobs never RESTORE or UNLOCK; UNLOCK only
# from a deliberate gesture (button, authenticated fob, local CLI).
A, U, N = "always", "unlocked", "never"
EXPECTED = {
    #            save restore unlock lock status history pair
    "button": (U, A, A, A, A, A, A),
    "fob:f1": (U, A, A, A, A, A, N),
    "itag:aa": (U, N, N, A, A, A, N),
    "host": (U, A, N, A, A, A, N),
    "cli": (U, A, A, A, A, A, A),
    "policy": (N, A, N, A, A, A, N),
}
ORDER = [
    Action.SAVE,
    Action.RESTORE,
    Action.UNLOCK,
    Action.LOCK,
    Action.STATUS,
    Action.HISTORY,
    Action.PAIR,
]


def cells():
    for (source, rules), mode in itertools.product(EXPECTED.items(), Mode):
        for action, rule in zip(ORDER, rules, strict=True):
            yield source, action, mode, rule == A or (rule == U and mode is Mode.UNLOCKED)


@pytest.mark.parametrize(
    "source,action,mode,allowed",
    list(cells()),
    ids=lambda v: str(v.value if hasattr(v, "value") else v),
)
def test_policy_cell(store, source, action, mode, allowed):
    async def go():
        bus = CommandBus(store)
        bus.mode = mode
        authenticated = not source.startswith("itag:")
        outcome = await bus.submit(Command(action, source, authenticated))
        return bus, outcome

    epoch = store.epoch
    bus, outcome = run(go())
    assert outcome.ok is allowed, outcome.reason
    if not allowed:
        assert outcome.reason
        assert store.epoch == epoch  # a refusal changes nothing
        if mode is Mode.LOCKED and EXPECTED[source][ORDER.index(action)] == U:
            assert "LOCKED" in outcome.reason
    elif action in (Action.SAVE, Action.RESTORE):
        assert store.epoch == epoch + 1
        assert store.history()[-1]["source"] == source


def test_unauthenticated_fob_id_is_a_commodity_fob(store):
    async def go():
        bus = CommandBus(store)
        return await bus.submit(Command(Action.UNLOCK, "fob:x", authenticated=False))

    outcome = run(go())
    assert not outcome.ok and "unauthenticated" in outcome.reason


def test_unknown_source_is_refused(store):
    outcome = run(CommandBus(store).submit(Command(Action.STATUS, "martian")))
    assert not outcome.ok and "unknown source" in outcome.reason


def test_policy_table_overrides_a_cell(store):
    from appliance.config import validate

    cfg = validate({"policy": {"host": {"restore": "never"}, "cli": {"unlock": "never"}}})
    bus = CommandBus(store, cfg["policy"])

    async def go():
        refused = await bus.submit(Command(Action.RESTORE, "host"))
        unlock = await bus.submit(Command(Action.UNLOCK, "cli"))
        return refused, unlock

    refused, unlock = run(go())
    assert not refused.ok and "policy.host" in refused.reason
    assert not unlock.ok and "policy.cli" in unlock.reason and bus.mode is Mode.LOCKED


@pytest.mark.parametrize("cls", ["host", "commodity", "policy"])
def test_no_table_lets_a_non_gesture_source_unlock(store, cls):
    from appliance.config import ConfigError, validate

    with pytest.raises(ConfigError, match=rf"\[policy.{cls}\] unlock: only a person's gesture"):
        validate({"policy": {cls: {"unlock": "always"}}})
    table = validate({})["policy"]
    table[cls]["unlock"] = "always"  # a table built in code: the bus still refuses
    source = {"host": "host", "commodity": "itag:aa", "policy": "policy"}[cls]
    bus = CommandBus(store, table)
    outcome = run(bus.submit(Command(Action.UNLOCK, source, cls != "commodity")))
    assert not outcome.ok and "gesture" in outcome.reason and bus.mode is Mode.LOCKED


def test_starts_locked_and_save_is_refused_with_a_clear_reason(store):
    async def go():
        bus = CommandBus(store)
        assert bus.mode is Mode.LOCKED
        refused = await bus.submit(Command(Action.SAVE, "button"))
        await bus.submit(Command(Action.UNLOCK, "button"))
        saved = await bus.submit(Command(Action.SAVE, "button"))
        return refused, saved

    refused, saved = run(go())
    assert not refused.ok
    assert "LOCKED" in refused.reason and "unlock" in refused.reason
    assert saved.ok and saved.data["action"] == "save"


def test_unlock_lasts_relock_after_from_the_gesture(store):
    clock = FakeClock()

    async def go():
        bus = CommandBus(store, relock_after=300, single_use=False, clock=clock)
        events = bus.subscribe()
        unlocked = await bus.submit(Command(Action.UNLOCK, "cli"))
        assert unlocked.data == {"mode": "unlocked", "relock_after": 300, "single_use": False}
        clock.advance(200)
        assert (await bus.submit(Command(Action.SAVE, "cli"))).ok  # a command is no gesture
        clock.advance(99)
        await bus.tick()
        assert bus.mode is Mode.UNLOCKED and bus.relock_in() == pytest.approx(1)
        clock.advance(1)
        await bus.tick()
        assert bus.mode is Mode.LOCKED
        kinds = []
        while not events.empty():
            kinds.append(events.get_nowait())
        relock = [e for e in kinds if e.kind == "outcome" and e.data["source"] == "policy"]
        assert relock and relock[0].data == {
            "ok": True,
            "action": "lock",
            "source": "policy",
            "reason": "",
            "data": {"why": "deadline"},
        }
        # a SAVE after the deadline is refused even if no tick ran in between
        assert (await bus.submit(Command(Action.UNLOCK, "cli"))).ok
        clock.advance(301)
        return await bus.submit(Command(Action.SAVE, "cli"))

    late = run(go())
    assert not late.ok and "LOCKED" in late.reason


@pytest.mark.parametrize("gesture", ["button", "fob:f1", "cli"])
def test_only_a_new_gesture_moves_the_deadline(store, gesture):
    clock = FakeClock()

    async def go():
        bus = CommandBus(store, relock_after=300, single_use=False, clock=clock)
        await bus.submit(Command(Action.UNLOCK, "button"))
        for _ in range(5):  # host and iTag keep busy: RESTORE, SAVE, a refused UNLOCK
            clock.advance(50)
            await bus.submit(Command(Action.RESTORE, "host"))
            await bus.submit(Command(Action.SAVE, "itag:aa", authenticated=False))
            await bus.submit(Command(Action.UNLOCK, "host"))
        left = bus.relock_in()
        await bus.submit(Command(Action.UNLOCK, gesture))  # a person again: 300 s from now
        return left, bus.relock_in()

    left, renewed = run(go())
    assert left == pytest.approx(50) and renewed == pytest.approx(300)


def test_a_save_ends_the_unlock_by_default(store):
    async def go():
        bus = CommandBus(store)
        events = bus.subscribe()
        await bus.submit(Command(Action.UNLOCK, "button"))
        first = await bus.submit(Command(Action.SAVE, "host"))
        second = await bus.submit(Command(Action.SAVE, "host"))
        seen = []
        while not events.empty():
            seen.append(events.get_nowait())
        return bus, first, second, seen

    bus, first, second, seen = run(go())
    assert first.ok and not second.ok and "LOCKED" in second.reason
    assert bus.mode is Mode.LOCKED and bus.relock_in() is None
    order = [(e.data["action"], e.data["source"]) for e in seen if e.kind == "outcome"]
    assert order == [("unlock", "button"), ("lock", "policy"), ("save", "host"), ("save", "host")]


def test_single_use_can_be_turned_off(store):
    from appliance.config import validate

    assert validate({})["lock"]["single_use"] is True
    assert validate({"lock": {"single_use": False}})["lock"]["single_use"] is False

    async def go():
        bus = CommandBus(store, single_use=False)
        await bus.submit(Command(Action.UNLOCK, "button"))
        return [(await bus.submit(Command(Action.SAVE, "cli"))).ok for _ in range(3)], bus.mode

    assert run(go()) == ([True, True, True], Mode.UNLOCKED)


def test_status_queries_do_not_keep_it_unlocked(store):
    clock = FakeClock()

    async def go():
        bus = CommandBus(store, relock_after=10, clock=clock)
        await bus.submit(Command(Action.UNLOCK, "button"))
        for _ in range(3):
            clock.advance(4)
            await bus.submit(Command(Action.STATUS, "host"))
        return bus.mode

    assert run(go()) is Mode.LOCKED


def test_lock_mode_off_never_relocks(store):
    clock = FakeClock()

    async def go():
        bus = CommandBus(store, lock_enabled=False, relock_after=10, clock=clock)
        clock.advance(10_000)
        await bus.tick()
        return bus.mode, await bus.submit(Command(Action.SAVE, "cli"))

    mode, outcome = run(go())
    assert mode is Mode.UNLOCKED and outcome.ok


def test_pairing_window_opens_and_closes(store):
    clock = FakeClock()

    async def go():
        bus = CommandBus(store, pairing_window=60, clock=clock, wall=lambda: 5000.0)
        events = bus.subscribe()
        outcome = await bus.submit(Command(Action.PAIR, "button"))
        clock.advance(59)
        await bus.tick()
        opened = (await bus.snapshot())["pairing"]
        clock.advance(1)
        await bus.tick()
        seen = []
        while not events.empty():
            seen.append(events.get_nowait())
        return outcome, opened, [e.data for e in seen if e.kind == "pairing"]

    outcome, opened, pairing = run(go())
    assert outcome.ok and outcome.data == {"open": True, "until": 5060.0, "ble": "off"}
    assert opened == {"open": True, "until": 5060.0, "closed_by": None}
    assert pairing == [{"open": True, "until": 5060.0}, {"open": False}]


def test_the_ble_part_closes_the_window_early_and_status_says_why(store):
    async def go():
        bus = CommandBus(store, pairing_window=60, clock=FakeClock(), wall=lambda: 5000.0)
        await bus.submit(Command(Action.PAIR, "button"))
        events = bus.subscribe()
        bus.close_pairing("3 wrong setup codes")
        bus.close_pairing("again")  # already closed: nothing more
        closed = (await bus.snapshot())["pairing"]
        await bus.submit(Command(Action.PAIR, "button"))
        reopened = (await bus.snapshot())["pairing"]
        return closed, reopened, events.get_nowait().data, events.qsize()

    closed, reopened, event, more = run(go())
    assert closed == {"open": False, "until": None, "closed_by": "3 wrong setup codes"}
    assert event == {"open": False, "why": "3 wrong setup codes"} and more >= 1
    assert reopened["open"] and reopened["closed_by"] is None


def test_every_outcome_is_published(store):
    async def go():
        bus = CommandBus(store)
        events = bus.subscribe()
        await bus.submit(Command(Action.SAVE, "host"))
        await bus.submit(Command(Action.RESTORE, "host"))
        seen = []
        while not events.empty():
            seen.append(events.get_nowait())
        return seen

    seen = run(go())
    outcomes = [e.data for e in seen if e.kind == "outcome"]
    assert [(o["action"], o["ok"]) for o in outcomes] == [("save", False), ("restore", True)]
    assert "LOCKED" in outcomes[0]["reason"]
    progress = [(e.data["action"], e.data["phase"]) for e in seen if e.kind == "progress"]
    assert progress == [("restore", "start"), ("restore", "end")]
    states = [e.data for e in seen if e.kind == "state"]
    assert states[-1]["epoch"] == 2 and states[-1]["mode"] == "locked"


def test_save_and_restore_change_what_the_disk_reads(store):
    async def go():
        bus = CommandBus(store, lock_enabled=False)
        store.write(0, b"A" * UNIT)
        assert (await bus.submit(Command(Action.SAVE, "cli"))).ok
        store.write(0, b"B" * UNIT)
        status = (await bus.submit(Command(Action.STATUS, "cli"))).data
        assert (await bus.submit(Command(Action.RESTORE, "cli"))).ok
        history = (await bus.submit(Command(Action.HISTORY, "cli", args={"limit": 1}))).data
        return status, history

    status, history = run(go())
    assert store.read(0, UNIT) == b"A" * UNIT
    assert status["dirty_units"] == 1 and status["unsaved_fraction"] == pytest.approx(1 / 256)
    assert [(r["action"], r["source"]) for r in history["history"]] == [("restore", "cli")]


def test_bad_history_limit_is_a_clear_error(store):
    outcome = run(CommandBus(store).submit(Command(Action.HISTORY, "cli", args={"limit": "x"})))
    assert not outcome.ok and "limit" in outcome.reason


class Hooks:
    """Stands in for the USB gadget (needs a UDC); records the order of calls."""

    def __init__(self, store) -> None:
        self.store, self.calls = store, []

    async def before_save(self) -> bool:
        self.calls.append(("before_save", self.store.epoch))
        return True

    async def around_restore(self, restore):
        self.calls.append(("eject", self.store.epoch))
        result = await restore()
        self.calls.append(("reinsert", self.store.epoch))
        return result


def test_gadget_hooks_wrap_save_and_restore(store):
    hooks = Hooks(store)

    async def go():
        bus = CommandBus(store, lock_enabled=False)
        bus.hooks = hooks
        save = await bus.submit(Command(Action.SAVE, "button"))
        restore = await bus.submit(Command(Action.RESTORE, "button"))
        return save, restore

    save, restore = run(go())
    assert save.ok and restore.ok
    assert hooks.calls == [("before_save", 1), ("eject", 2), ("reinsert", 3)]
    assert store.history()[0]["host_synced"] is True


def test_commands_run_one_at_a_time(store):
    async def go():
        bus = CommandBus(store, lock_enabled=False)
        running, peak = 0, 0
        real_save = store.save

        def slow_save(source, synced=False):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            import time

            time.sleep(0.02)
            running -= 1
            return real_save(source, synced)

        store.save = slow_save
        try:
            outs = await asyncio.gather(
                *(bus.submit(Command(Action.SAVE, "cli")) for _ in range(5))
            )
        finally:
            del store.save
        return peak, outs

    peak, outs = run(go())
    assert peak == 1 and all(o.ok for o in outs)
    assert [r["epoch"] for r in store.history()] == [1, 2, 3, 4, 5]


def test_host_events_update_status(store):
    async def go():
        bus = CommandBus(store)
        before = (await bus.snapshot())["host_connected"]
        bus.set_host_connected(True)
        after = (await bus.snapshot())["host_connected"]
        return before, after

    assert run(go()) == (None, True)

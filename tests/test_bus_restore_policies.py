"""Restore policies through the bus (source "policy"), with time injected, on a real store."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import shutil
import time

import pytest

from appliance.control.bus import CommandBus
from appliance.control.restore_policies import RestorePolicies, next_daily
from appliance.store import Store, create_store

UNIT = 4096


@pytest.fixture(autouse=True)
def utc_plus_two(monkeypatch):
    """A fixed local zone, so "03:00 local" is a known instant whatever the CI machine says."""
    monkeypatch.setenv("TZ", "EET-2")  # UTC+2, no daylight saving
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tpl") / "disk.img")
    create_store(path, 1 << 20, UNIT)
    return path


@pytest.fixture
def store(template, tmp_path):
    path = str(tmp_path / "disk.img")
    shutil.copy(template, path)
    st = Store.open(path)
    st.write(0, b"saved".ljust(UNIT, b"."))
    st.save("test")
    st.write(0, b"unsaved".ljust(UNIT, b"."))  # work a RESTORE would discard
    yield st
    st.close()


def unsaved_gone(st: Store) -> bool:
    return st.read(0, UNIT).startswith(b"saved")


def local(y, mo, d, h, mi) -> float:
    return dt.datetime(y, mo, d, h, mi).timestamp()  # naive = local time (TZ above)


def test_never_keeps_unsaved_work(store):
    async def go():
        bus = CommandBus(store)
        pol = RestorePolicies(bus, ["never"], now=lambda: local(2026, 1, 1, 3, 0))
        assert await pol.on_boot() is None
        bus.set_host_connected(True)
        bus.set_host_connected(False)
        await asyncio.sleep(0)
        assert await pol.tick() is None

    asyncio.run(go())
    assert not unsaved_gone(store) and store.epoch == 2


def test_on_boot_discards_unsaved_work_even_while_locked(store):
    async def go():
        bus = CommandBus(store)
        return await RestorePolicies(bus, ["on_boot"]).on_boot()

    outcome = asyncio.run(go())
    assert outcome.ok and unsaved_gone(store)
    last = store.history()[-1]
    assert (last["action"], last["source"]) == ("restore", "policy")


def test_on_host_disconnect(store):
    async def go():
        bus = CommandBus(store)
        RestorePolicies(bus, ["on_host_disconnect"])
        bus.set_host_connected(False)  # never connected: nothing to discard for
        await asyncio.sleep(0.05)
        assert not unsaved_gone(store)
        bus.set_host_connected(True)
        await asyncio.sleep(0.05)
        assert not unsaved_gone(store)
        bus.set_host_connected(False)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if unsaved_gone(store):
                break

    asyncio.run(go())
    assert unsaved_gone(store)
    assert store.history()[-1]["source"] == "policy"


def test_schedule_daily_at_local_time(store):
    now = [local(2026, 3, 10, 2, 59)]

    async def go():
        bus = CommandBus(store)
        pol = RestorePolicies(bus, ["schedule"], at="03:00", now=lambda: now[0])
        assert pol.next_run == local(2026, 3, 10, 3, 0)
        assert await pol.tick() is None and not unsaved_gone(store)
        now[0] = local(2026, 3, 10, 3, 0)
        first = await pol.tick()
        assert first.ok and unsaved_gone(store)
        store.write(0, b"unsaved".ljust(UNIT, b"."))
        now[0] = local(2026, 3, 10, 23, 0)  # later the same day: no second RESTORE
        assert await pol.tick() is None and not unsaved_gone(store)
        now[0] = local(2026, 3, 14, 9, 0)  # days later (suspended): one RESTORE, not four
        assert (await pol.tick()).ok and unsaved_gone(store)
        assert await pol.tick() is None
        assert pol.next_run == local(2026, 3, 15, 3, 0)

    asyncio.run(go())
    assert [r["source"] for r in store.history()] == ["test", "policy", "policy"]


def test_next_daily_is_in_local_time():
    after = local(2026, 6, 1, 12, 0)
    assert next_daily(after, 3, 0) == local(2026, 6, 2, 3, 0)
    assert next_daily(after, 12, 30) == local(2026, 6, 1, 12, 30)
    # 03:00 in UTC+2 is 01:00 UTC
    assert dt.datetime.fromtimestamp(next_daily(after, 3, 0), dt.UTC).hour == 1
    assert os.environ["TZ"] == "EET-2"

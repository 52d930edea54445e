"""The store's lazy map normaliser as the daemon runs it: when to take a step, how big, and
what a failing pass does (a fault row, retries with backoff; it never stops for good).

The steps themselves are `Store.background_step` (appliance/store/core.py); this is only
their schedule, which trades the pass against the host's I/O on one interpreter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from appliance.control.bus import CommandBus
from appliance.store import Store

log = logging.getLogger("savepoint.daemon")

IDLE = 1.0  # seconds between looks once the map is up to date
BACKGROUND_UNITS = 4096  # map units per background step: short, so I/O never waits long
BACKGROUND_UNITS_LOADED = 1008  # one map page per step while I/O runs (a nearly full ring)
BACKGROUND_BACKOFF, BACKGROUND_BACKOFF_MAX = 1.0, 60.0  # seconds between retries of a failed pass


async def background_pass(store: Store, bus: CommandBus, io_busy: Callable[[], bool]) -> None:
    """The store's lazy map normaliser: while no I/O and no command is running, or, once
    few history records are left, under load too (short steps, I/O flows between them).
    An error is logged, shown as a fault, and retried with backoff: the pass never stops."""
    failures = 0
    while True:
        urgent = store.pass_urgent()
        io = io_busy()
        if not urgent and (bus.busy or io):
            await asyncio.sleep(0.05)
            continue
        loaded = urgent and (bus.busy or io)
        started = time.monotonic()
        try:
            more = await asyncio.to_thread(
                store.background_step, BACKGROUND_UNITS_LOADED if loaded else BACKGROUND_UNITS
            )
        except Exception as e:  # noqa: BLE001 - the pass must survive any store error
            failures += 1
            delay = min(BACKGROUND_BACKOFF_MAX, BACKGROUND_BACKOFF * 2 ** (failures - 1))
            _failed(bus, e, failures, delay)
            await asyncio.sleep(delay)
            continue
        if failures:
            log.info("background pass works again after %d failed attempts", failures)
            bus.set_part("background", "up")
            failures = 0
        if not more:
            await asyncio.sleep(IDLE)
        elif loaded:  # half the time to the pass, half to the I/O (one GIL for both)
            await asyncio.sleep(max(0.002, time.monotonic() - started))
        else:
            await asyncio.sleep(0.01)


def _failed(bus: CommandBus, error: Exception, failures: int, delay: float) -> None:
    reason = f"background pass failed: {error}"
    hint = (
        f"retrying in {delay:g} s (attempt {failures}); check the backing storage "
        "(journalctl -k, free space); SAVE and RESTORE still work until the history "
        "ring is full"
    )
    (log.exception if failures == 1 else log.warning)("%s; %s", reason, hint)
    bus.set_part("background", "failed", reason, hint)

"""Restore policies: when the appliance discards unsaved work by itself.

  never               unsaved work persists across power cycles (the default)
  on_boot             kiosk mode: RESTORE at every start, before the host sees the disk
  on_host_disconnect  RESTORE when the host goes away (USB unplugged)
  schedule            RESTORE daily at [restore] at = "HH:MM", local time

Each RESTORE goes through the bus with source "policy", so it is decided, logged and
recorded like any other. Time is injected (`now` returns a Unix time) so tests do not sleep.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable

from appliance.control.bus import CommandBus
from appliance.control.commands import Action, Command, Outcome

log = logging.getLogger("savepoint.policy")


def next_daily(after: float, hour: int, minute: int) -> float:
    """The first local HH:MM strictly after `after` (Unix time); DST-aware via the local zone."""
    today = dt.datetime.fromtimestamp(after).date()
    for days in range(3):
        naive = dt.datetime.combine(today + dt.timedelta(days=days), dt.time(hour, minute))
        moment = naive.astimezone().timestamp()  # a naive time is read as local time
        if moment > after:
            return moment
    raise AssertionError("unreachable: a day later is always after")


class RestorePolicies:
    def __init__(
        self,
        bus: CommandBus,
        policies: list[str],
        at: str = "03:00",
        now: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.policies = [p for p in policies if p != "never"]
        hour, minute = (int(x) for x in at.split(":"))
        self.at = (hour, minute)
        self.now = now
        self.next_run: float | None = None
        if "schedule" in self.policies:
            self.next_run = next_daily(now(), hour, minute)
        if "on_host_disconnect" in self.policies:
            bus.host_listeners.append(self._host_changed)

    async def _restore(self, why: str) -> Outcome:
        log.info("restore policy %s: discarding unsaved work", why)
        return await self.bus.submit(Command(Action.RESTORE, "policy", args={"why": why}))

    async def on_boot(self) -> Outcome | None:
        """Run once at start, after the store opens and before the host is served."""
        if "on_boot" in self.policies:
            return await self._restore("on_boot")
        return None

    async def _host_changed(self, connected: bool) -> None:
        if not connected:
            await self._restore("on_host_disconnect")

    async def tick(self) -> Outcome | None:
        """Called every second by the daemon: runs the daily RESTORE once it is due.

        A clock that jumps past several days (suspend, NTP) still gives one RESTORE, not many.
        """
        if self.next_run is None or self.now() < self.next_run:
            return None
        self.next_run = next_daily(self.now(), *self.at)
        return await self._restore("schedule")

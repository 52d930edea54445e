"""How the bus runs SAVE and RESTORE: a SAVE waits for a quiet host, then the gadget's hooks
sync the host's writes into the store; a RESTORE runs inside the gadget's eject and re-insert;
the store's blocking calls run in a thread (they wait for in-flight I/O).

A mixin of CommandBus (appliance/control/bus.py), which decides, records and tells; the
attributes below are the bus's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from appliance.control.commands import Command, Event, Mode, Outcome, StoreHooks
from appliance.control.host_quiet import HostActivity, QuietReport
from appliance.control.policy import decide
from appliance.store.format import FLAG_BUSY, FLAG_FORCED, FLAG_QUIET_KNOWN

log = logging.getLogger("savepoint.bus")


class SaveRestore:
    store: Any
    activity: HostActivity | None  # the host's writes; None: SAVE cannot tell, never waits
    settle: float  # seconds of host quiet a SAVE waits for; 0: no wait
    max_wait: float
    hooks: StoreHooks | None  # the gadget, once it is up
    policy: dict[str, dict[str, str]]
    mode: Mode
    _hurry: asyncio.Event | None  # set: the waiting SAVE commits now

    if TYPE_CHECKING:  # CommandBus's

        def publish(self, event: Event) -> None:
            raise NotImplementedError

        async def snapshot(self) -> dict[str, Any]:
            raise NotImplementedError

    async def _save(self, source: str, now: bool = False) -> dict[str, Any]:
        self.publish(Event("progress", {"action": "save", "phase": "start"}))
        try:
            report = await self._wait_for_host(now)
            synced = None if report is None else report.synced
            if self.hooks is not None:  # the gadget pushes the host's writes into the store
                with self._own_flush():
                    fsync_clean = await self.hooks.before_save()
                if synced is None:  # no write counter: "nothing left to sync" is the best guess
                    synced = fsync_clean
            # store.save flushes first (in serve mode that is all the syncing there is)
            settle = _settle_bits(report)
            extra = () if settle is None else (settle,)
            record = await asyncio.to_thread(self.store.save, source, bool(synced), *extra)
        finally:
            self.publish(Event("progress", {"action": "save", "phase": "end"}))
        if report is not None:
            record["waited"] = round(report.waited, 3)
        return record

    async def _wait_for_host(self, now: bool) -> QuietReport | None:
        """Wait (at most max_wait) until the host wrote nothing for `settle` seconds."""
        if self.activity is None:
            return None
        hurry = asyncio.Event()
        if now:
            hurry.set()
        elif self.settle > 0 and self.activity.sample() < self.settle:
            self._hurry = hurry  # a second SAVE meanwhile sets it
            self.publish(
                Event(
                    "progress",
                    {
                        "action": "save",
                        "phase": "waiting",
                        "settle": self.settle,
                        "max_wait": self.max_wait,
                    },
                )
            )
            self.publish(Event("state", await self.snapshot()))
        try:
            report = await self.activity.wait_quiet(self.settle, self.max_wait, hurry)
        finally:
            self._hurry = None
        if report.busy:
            log.warning("SAVE: the host was still writing after %g s; saving anyway", self.max_wait)
        self.publish(Event("progress", {"action": "save", "phase": "commit"}))
        return report

    def _hurry_save(self, command: Command) -> Outcome:
        """A SAVE while one waits for the host: the waiting one commits now (a second press)."""
        reason = decide(self.policy, command, self.mode)
        if reason:
            return Outcome(False, command.action, command.source, reason)
        assert self._hurry is not None
        self._hurry.set()
        log.info("SAVE from %s: the waiting SAVE commits now", command.source)
        return Outcome(
            True,
            command.action,
            command.source,
            "",
            {"hurried": True, "note": "the waiting SAVE commits now"},
        )

    def _own_flush(self) -> Any:
        return self.activity.own_flush() if self.activity else contextlib.nullcontext()

    async def _restore(self, source: str) -> dict[str, Any]:
        self.publish(Event("progress", {"action": "restore", "phase": "start"}))
        try:

            def restore() -> Awaitable[dict[str, Any]]:
                return asyncio.to_thread(self.store.restore, source)

            if self.hooks is not None:  # eject, drop caches, restore, re-insert
                with self._own_flush():
                    return await self.hooks.around_restore(restore)
            return await restore()
        finally:
            self.publish(Event("progress", {"action": "restore", "phase": "end"}))


def _settle_bits(report: QuietReport | None) -> tuple[int, int] | None:
    """The history record's flag bits and quiet deciseconds for what the SAVE knew."""
    if report is None:
        return None
    bits = FLAG_QUIET_KNOWN | (FLAG_FORCED * report.forced) | (FLAG_BUSY * report.busy)
    return bits, int(report.quiet * 10)

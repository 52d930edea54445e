"""The command bus: every control source submits here; one place decides, runs, records, tells.

Commands run one at a time (an asyncio.Lock). Each is checked against lock mode and the
policy table (appliance/control/policy.py), run, logged, and published as an "outcome" Event, then
a "state" Event with the new status snapshot. SAVE and RESTORE run the store's blocking
calls in a thread (they wait for in-flight I/O) and go into the store's history; how they
run (host quiet, the gadget's hooks) is appliance/control/save_restore.py.

An unlock is a deadline a person sets: only an UNLOCK from a gesture source (button,
authenticated fob, admin CLI) opens it or moves it, to `relock_after` seconds from that
gesture. No other command extends it, so host software that keeps busy cannot keep the
appliance unlocked; with `single_use` (the default) the first SAVE ends it.

A SAVE first waits for a quiet host (appliance/control/host_quiet.py): while it waits, the status
says "saving, waiting for the host", and a second SAVE (a second press) or `--now` commits
it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.control.commands import (
    Action,
    Command,
    Event,
    Mode,
    Outcome,
    PartHandler,
    StoreHooks,
)
from appliance.control.host_quiet import HostActivity
from appliance.control.policy import decide, default_policy
from appliance.control.save_restore import SaveRestore

log = logging.getLogger("savepoint.bus")

QUEUE_DEPTH = 256  # events a slow subscriber may lag behind before old ones are dropped


class CommandBus(SaveRestore):
    def __init__(
        self,
        store: Any,
        policy: dict[str, dict[str, str]] | None = None,
        *,
        lock_enabled: bool = True,
        relock_after: float = 300,
        single_use: bool = True,
        pairing_window: float = 60,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        activity: HostActivity | None = None,
        settle: float = 0,
        max_wait: float = 60,
    ) -> None:
        self.store = store
        self.activity = activity  # the host's writes; None: SAVE cannot tell, never waits
        self.settle = settle  # seconds of host quiet a SAVE waits for; 0: no wait
        self.max_wait = max_wait
        self._hurry: asyncio.Event | None = None  # set: the waiting SAVE commits now
        self.policy = policy or default_policy()
        self.lock_enabled = lock_enabled
        self.mode = Mode.LOCKED if lock_enabled else Mode.UNLOCKED  # LOCKED at every boot
        self.relock_after = relock_after
        self.single_use = single_use  # a SAVE re-locks: each SAVE needs its own gesture
        self.pairing_window = pairing_window
        self.pairing_closed_by: str | None = None  # why the last window ended early
        self.clock = clock
        self.wall = wall
        self.hooks: StoreHooks | None = None  # the gadget, once it is up
        self.host_connected: bool | None = None  # None: no part can tell
        self.parts: dict[str, dict[str, str]] = {}
        self.status_extras: list[Callable[[], dict[str, Any]]] = []
        # part name -> its history events (PartSpec.history), for the local control socket
        self.history_sources: dict[str, Callable[[], list[dict[str, Any]]]] = {}
        self.host_listeners: list[Callable[[bool], Awaitable[None]]] = []
        self.busy = False  # a command is running (the background pass waits)
        self.pairing_until: float | None = None  # wall-clock time the pairing window closes
        self._pairing_deadline = 0.0  # the same on `clock`
        self.last_outcome: dict[str, Any] | None = None
        self._unlock_deadline: float | None = None  # on `clock`; None: until LOCK or a SAVE
        self._lock = asyncio.Lock()
        self._subscribers: list[asyncio.Queue[Event]] = []
        self._handlers: dict[str, PartHandler] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- subscribers ---------------------------------------------------------------
    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_DEPTH)
        self._subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)

    def publish(self, event: Event) -> None:
        """Deliver to every subscriber; a part may publish too ("host", "fault")."""
        if event.kind == "host":
            self._host_changed(bool(event.data.get("connected")))
        for queue in list(self._subscribers):
            if queue.full():  # never block the bus on a slow reader: drop its oldest event
                queue.get_nowait()
            queue.put_nowait(event)

    # -- extensions ----------------------------------------------------------------
    def register_handler(self, name: str, handler: PartHandler) -> None:
        if name in {a.value for a in Action} or name == "watch":
            raise ValueError(f"command {name!r} is built in; choose another name")
        self._handlers[name] = handler  # a part that restarts registers again: replace

    def handler(self, name: str) -> PartHandler | None:
        return self._handlers.get(name)

    def set_part(self, name: str, state: str, reason: str = "", hint: str = "") -> None:
        self.parts[name] = {"state": state, "reason": reason, "hint": hint}
        if state == "failed":
            self.publish(Event("fault", {"part": name, "reason": reason, "hint": hint}))

    def set_host_connected(self, connected: bool) -> None:
        self.publish(Event("host", {"connected": connected}))

    def _host_changed(self, connected: bool) -> None:
        was, self.host_connected = self.host_connected, connected
        if was is True and not connected:
            for listener in self.host_listeners:
                self._spawn(listener(connected))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the commands ----------------------------------------------------------------
    async def close(self) -> None:
        """Shutdown: let a running command finish; every later one is refused."""
        self._closed = True
        async with self._lock:
            pass

    async def submit(self, command: Command) -> Outcome:
        if self._closed:
            return Outcome(False, command.action, command.source, "the daemon is stopping")
        if self._hurry is not None and command.action in (
            Action.SAVE,
            Action.STATUS,
            Action.HISTORY,
        ):
            # a SAVE is waiting for the host: a second SAVE hurries it, reads do not queue
            outcome = (
                self._hurry_save(command)
                if command.action is Action.SAVE
                else await self._decide_and_run(command)
            )
            self._record(outcome)
            return outcome
        async with self._lock:
            self.busy = True
            try:
                outcome = await self._decide_and_run(command)
            finally:
                self.busy = False
        self._record(outcome)
        if command.action not in (Action.STATUS, Action.HISTORY):
            self.publish(Event("state", await self.snapshot()))
        return outcome

    async def _decide_and_run(self, command: Command) -> Outcome:
        await self.tick()
        reason = decide(self.policy, command, self.mode)
        if reason:
            return Outcome(False, command.action, command.source, reason)
        try:
            data = await self._run(command)
        except Exception as e:  # the store's errors say what to do; report, stay up
            log.exception("%s from %s failed", command.action.value.upper(), command.source)
            return Outcome(False, command.action, command.source, f"failed: {e}")
        if command.action is Action.SAVE and self.single_use and self.lock_enabled:
            self._relock("saved")  # after the outcome is known, before anyone else runs
        return Outcome(True, command.action, command.source, "", data)

    async def _run(self, command: Command) -> dict[str, Any]:
        action = command.action
        if action is Action.SAVE:
            return await self._save(command.source, bool(command.args.get("now")))
        if action is Action.RESTORE:
            return await self._restore(command.source)
        if action is Action.UNLOCK:  # policy.decide let only a gesture source get here
            self.mode = Mode.UNLOCKED
            seconds = self._relock_seconds()
            self._unlock_deadline = self.clock() + seconds if seconds else None
            return {
                "mode": self.mode.value,
                "relock_after": seconds,
                "single_use": self.single_use and self.lock_enabled,
            }
        if action is Action.LOCK:
            self.mode = Mode.LOCKED
            self._unlock_deadline = None
            return {"mode": self.mode.value}
        if action is Action.STATUS:
            return await self.snapshot()
        if action is Action.HISTORY:
            limit = command.args.get("limit")
            if limit is not None and (not isinstance(limit, int) or limit < 1):
                raise ValueError(f"history limit must be a positive integer, got {limit!r}")
            data = {"history": await asyncio.to_thread(self.store.history, limit)}
            if command.source == "cli" and self.history_sources:  # not the host's business
                data["events"] = await asyncio.to_thread(self._part_events, limit)
            return data
        if action is Action.PAIR:
            return self._open_pairing()
        raise ValueError(f"unknown action {action!r}")

    def _part_events(self, limit: int | None) -> list[dict[str, Any]]:
        """The parts' history events, oldest first (the last `limit`); a part whose files
        cannot be read is one event saying so, not a failed `history`."""
        events: list[dict[str, Any]] = []
        for name, source in self.history_sources.items():
            try:
                events += [{**e, "part": name} for e in source()]
            except Exception as e:  # its registry is unreadable: SAVE/RESTORE still show
                log.warning("history of part %s: %s", name, e)
                events.append({"time": self.wall(), "part": name, "action": "unreadable",
                               "source": name, "detail": str(e)})  # fmt: skip
        events.sort(key=lambda e: float(e.get("time", 0)))
        return events[-limit:] if limit else events

    def _open_pairing(self) -> dict[str, Any]:
        self.pairing_until = self.wall() + self.pairing_window
        self.pairing_closed_by = None
        self._pairing_deadline = self.clock() + self.pairing_window
        data = {"open": True, "until": self.pairing_until}
        self.publish(Event("pairing", data))
        # the window opens anyway (the LED shows it), but the caller should know no fob can pair
        return {**data, "ble": self.parts.get("ble", {}).get("state", "off")}

    def close_pairing(self, why: str) -> None:
        """The BLE part ended the window early (a fob paired, or wrong setup codes)."""
        if self.pairing_until is None:
            return
        self.pairing_until = None
        self.pairing_closed_by = why
        self.publish(Event("pairing", {"open": False, "why": why}))

    def _record(self, outcome: Outcome) -> None:
        name = outcome.action.value.upper()
        if outcome.ok:
            if outcome.action not in (Action.STATUS, Action.HISTORY):
                log.info("%s from %s: done %s", name, outcome.source, _brief(outcome.data))
        else:
            log.warning("%s from %s: refused: %s", name, outcome.source, outcome.reason)
        self.last_outcome = {**outcome.summary(), "time": self.wall()}
        self.publish(Event("outcome", {**outcome.summary(), "data": outcome.data}))

    # -- time ------------------------------------------------------------------------
    def _relock_seconds(self) -> float:
        return self.relock_after if self.lock_enabled else 0

    def relock_in(self) -> float | None:
        if self.mode is not Mode.UNLOCKED or self._unlock_deadline is None:
            return None
        return max(0.0, self._unlock_deadline - self.clock())

    def _relock(self, why: str) -> None:
        self.mode = Mode.LOCKED
        self._unlock_deadline = None
        log.info(
            "re-locked: %s",
            {
                "saved": "a SAVE used the unlock",
                "deadline": f"{self.relock_after:g} s after the UNLOCK",
            }[why],
        )
        self.publish(
            Event(
                "outcome",
                {
                    "ok": True,
                    "action": "lock",
                    "source": "policy",
                    "reason": "",
                    "data": {"why": why},
                },
            )
        )

    async def tick(self) -> None:
        """Called every second by the daemon (and before each command): re-lock, close pairing."""
        left = self.relock_in()
        if left is not None and left <= 0:
            self._relock("deadline")
            self.publish(Event("state", await self.snapshot()))
        if self.pairing_until is not None and self.clock() >= self._pairing_deadline:
            self.pairing_until = None
            self.publish(Event("pairing", {"open": False}))

    # -- status ----------------------------------------------------------------------
    async def snapshot(self) -> dict[str, Any]:
        st = dict(await asyncio.to_thread(self.store.status))
        size = st.get("size") or 0
        st["unsaved_fraction"] = (st.get("dirty_bytes", 0) / size) if size else 0.0
        st.update(
            mode=self.mode.value,
            lock_enabled=self.lock_enabled,
            single_use=self.single_use and self.lock_enabled,
            relock_in=self.relock_in(),
            host_connected=self.host_connected,
            pairing={
                "open": self.pairing_until is not None,
                "until": self.pairing_until,
                "closed_by": self.pairing_closed_by,
            },
            last_action=self.last_outcome,
            parts=dict(self.parts),
            saving="waiting for the host" if self._hurry is not None else None,
        )
        for extra in self.status_extras:
            st.update(extra())
        return st


def _brief(data: dict[str, Any]) -> str:
    keys = ("epoch", "units", "bytes", "mode", "open")
    shown = {k: data[k] for k in keys if k in data}
    return " ".join(f"{k}={v}" for k, v in shown.items())

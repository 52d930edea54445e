"""The status LED: which pattern the daemon's state calls for, and playing it on gpiozero LEDs.

`choose()` is pure (state -> Pattern) so the table in docs/controls.md is testable; `Player`
plays patterns as an asyncio task that sets the gpiozero device's value at each step, so a
one-shot signal (three quick blinks) runs to its end and then hands back to the current
pattern in order, which gpiozero's own blink() threads cannot chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

from appliance.control.commands import Event
from gpio.gestures import Cue

FOREVER = math.inf
Step = tuple[float, float]  # (brightness 0..1, seconds)

# colours for an RGB LED; with a second LED the "alert" ones light the second LED instead
COLOURS: dict[str, tuple[float, float, float]] = {
    "green": (0.0, 1.0, 0.0),
    "amber": (1.0, 0.5, 0.0),
    "red": (1.0, 0.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
ALERT_COLOURS = ("red",)
STORAGE = "storage"  # the daemon's part name for the backing storage (full: its own pattern)


@dataclass(frozen=True)
class Pattern:
    name: str
    steps: tuple[Step, ...]  # repeated; a single step is a steady level
    colour: str = "green"


@dataclass(frozen=True)
class LedTimings:
    slow: float = 1.0  # half-period of the slow blink
    fast: float = 0.1  # half-period of the fast blink; also quick blinks and SOS dots
    no_host: float = 5.0  # a short blink every this many seconds with no host; 0 = dark
    status_show: float = 5.0  # how long a short press shows the status


@dataclass
class DaemonView:
    """What the LED knows of the daemon, folded from bus events."""

    host_connected: bool | None = None  # None: unknown or no USB gadget (show the store)
    dirty: bool = False
    locked: bool = True
    busy: bool = False  # SAVE or RESTORE in progress
    waiting: bool = False  # a SAVE waits for the host to stop writing
    pairing: bool = False
    faults: dict[str, str] = field(default_factory=dict)

    def apply_state(self, snap: dict[str, Any]) -> None:
        if "mode" in snap:
            self.locked = str(snap["mode"]) == "locked"
        if "dirty_units" in snap:
            self.dirty = bool(snap["dirty_units"])
        if "host_connected" in snap:
            hc = snap["host_connected"]
            self.host_connected = None if hc is None else bool(hc)
        if "pairing" in snap:
            p = snap["pairing"]
            self.pairing = bool(p.get("open")) if isinstance(p, dict) else bool(p)
        parts = snap.get("parts")
        if isinstance(parts, dict):  # a part that came back up clears its fault
            self.faults = {
                name: str(p.get("reason", ""))
                for name, p in parts.items()
                if isinstance(p, dict) and p.get("state") == "failed" and name != "gpio"
            }

    def apply(self, event: Event) -> str | None:
        """Fold one event in; returns a one-shot signal to flash ("refused", "unlocked")."""
        d = event.data
        if event.kind == "state":
            self.apply_state(d)
        elif event.kind == "host":
            self.host_connected = bool(d.get("connected"))
        elif event.kind == "pairing":
            self.pairing = bool(d.get("open"))
            why = str(d.get("why", ""))  # the BLE part ended the window early
            if "setup code" in why:
                return "refused"  # wrong setup codes closed it: red, like a refusal
            if "paired" in why:
                return "paired"
        elif event.kind == "progress":
            self.busy = d.get("phase") in ("start", "commit")
            self.waiting = d.get("phase") == "waiting"
        elif event.kind == "fault":
            part = str(d.get("part", "?"))
            if part == "gpio":  # our own absence cannot be shown on our own LED
                return None
            if d.get("cleared") or not d.get("reason"):
                self.faults.pop(part, None)
            else:
                self.faults[part] = str(d["reason"])
        elif event.kind == "warning":  # a part's advice (a button's battery is low): flash it
            return "warning"
        elif event.kind == "outcome":
            action = str(d.get("action", ""))
            if action == "save" and not d.get("ok"):
                return "refused"
            if action == "unlock" and d.get("ok"):
                self.locked = False
                return "unlocked"
            if action == "lock" and d.get("ok"):
                self.locked = True
        return None


def _blink(on: float, off: float) -> tuple[Step, ...]:
    return ((1.0, on), (0.0, off))


def patterns(t: LedTimings) -> dict[str, Pattern]:
    f, s = t.fast, t.slow
    dot, dash = ((1.0, f), (0.0, f)), ((1.0, 3 * f), (0.0, f))
    sos = (*dot * 3, (0.0, 2 * f), *dash * 3, (0.0, 2 * f), *dot * 3, (0.0, 6 * f))
    no_host = _blink(f, t.no_host - f) if t.no_host > f else ((0.0, FOREVER),)
    return {
        "off": Pattern("off", ((0.0, FOREVER),)),
        "clean": Pattern("clean", ((1.0, FOREVER),), "green"),
        "unsaved": Pattern("unsaved", _blink(s, s), "amber"),
        "busy": Pattern("busy", _blink(f, f), "white"),
        "waiting": Pattern("waiting", _blink(f, 5 * f), "green"),
        "no_host": Pattern("no_host", no_host, "white"),
        "pairing": Pattern("pairing", (*_blink(f, f), *_blink(f, 2 * s)), "blue"),
        "fault": Pattern("fault", sos, "red"),
        # the store's file system is full: long red flashes (RESTORE gives the space back)
        "storage_full": Pattern("storage_full", ((1.0, 2 * s), (0.0, 2 * f)), "red"),
        # while a button is held (gpio/gestures.py Cue)
        "held": Pattern("held", ((0.0, FOREVER),)),
        "save_armed": Pattern("save_armed", ((1.0, FOREVER),), "green"),
        "restore_warning": Pattern("restore_warning", _blink(f, f), "red"),
        "restore_armed": Pattern("restore_armed", ((1.0, FOREVER),), "red"),
    }


def signals(t: LedTimings) -> dict[str, Pattern]:
    """One-shot sequences, played once before the current pattern resumes."""
    f = t.fast
    return {
        "refused": Pattern("refused", ((0.0, 2 * f), *_blink(f, f) * 3, (0.0, 2 * f)), "red"),
        "locked": Pattern("locked", ((0.0, 2 * f), *_blink(f, f) * 3, (0.0, 2 * f)), "red"),
        "unlocked": Pattern("unlocked", ((0.0, 2 * f), (1.0, 2 * t.slow), (0.0, 2 * f)), "blue"),
        "paired": Pattern("paired", ((0.0, 2 * f), (1.0, 2 * t.slow), (0.0, 2 * f)), "blue"),
        "warning": Pattern("warning", ((0.0, 2 * f), *_blink(3 * f, f) * 2, (0.0, 2 * f)), "amber"),
    }


def choose(view: DaemonView, cue: Cue, showing_status: bool, t: LedTimings) -> Pattern:
    """The one pattern the LED shows now; the first matching row of the table wins."""
    p = patterns(t)
    if cue != Cue.IDLE:
        return p[cue.value]
    if view.faults.get(STORAGE, "").startswith("backing storage full"):  # fixed at once:
        # RESTORE or free space (its other faults, e.g. a failing hole punch, are faults)
        return p["storage_full"]
    if view.faults:
        return p["fault"]
    if view.waiting:
        return p["waiting"]
    if view.busy:
        return p["busy"]
    if view.pairing:
        return p["pairing"]
    if view.host_connected is False and not showing_status:
        return p["no_host"]
    return p["unsaved"] if view.dirty else p["clean"]


class Output:
    """One LED, a status LED plus an alert LED, or an RGB LED (gpiozero devices)."""

    def __init__(
        self, main: Any | None = None, alert: Any | None = None, rgb: Any | None = None
    ) -> None:
        self.main, self.alert, self.rgb = main, alert, rgb

    def set(self, level: float, colour: str) -> None:
        if self.rgb is not None:
            self.rgb.value = tuple(c * level for c in COLOURS.get(colour, COLOURS["white"]))
            return
        on_alert = self.alert is not None and colour in ALERT_COLOURS
        if self.main is not None:
            self.main.value = 0 if on_alert else level
        if self.alert is not None:
            self.alert.value = level if on_alert else 0

    def devices(self) -> list[Any]:
        return [d for d in (self.main, self.alert, self.rgb) if d is not None]


class Player:
    """Plays a repeating pattern; `flash()` plays a one-shot sequence first, then resumes."""

    def __init__(self, output: Output) -> None:
        self.output = output
        self._base = Pattern("off", ((0.0, FOREVER),))
        self._flash: list[Pattern] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.history: list[str] = []  # names of patterns started, for `status` and tests

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gpio-led")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.output.set(0.0, "off")

    @property
    def current(self) -> str:
        return self.history[-1] if self.history else ""

    def play(self, pattern: Pattern) -> None:
        if pattern != self._base:  # same pattern: keep its phase, do not restart
            self._base = pattern
            self._wake.set()

    def flash(self, signal: Pattern) -> None:
        self._flash.append(signal)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            if self._flash:
                signal = self._flash.pop(0)
                self.history.append(signal.name)
                for level, seconds in signal.steps:  # not interrupted: it always ends
                    self.output.set(level, signal.colour)
                    await asyncio.sleep(seconds)
                continue
            base = self._base
            self.history.append(base.name)
            await self._loop(base)

    async def _loop(self, pattern: Pattern) -> None:
        while True:
            for level, seconds in pattern.steps:
                self.output.set(level, pattern.colour)
                timeout = None if seconds == FOREVER else seconds
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                if self._wake.is_set():
                    return

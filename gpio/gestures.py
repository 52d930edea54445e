"""Button gestures as pure state machines: fed (time, pressed) edges and a clock, no threads.

The driver (gpio/button.py) calls `edge(t, pressed)` for every raw pin change and `tick(now)`
at `next_deadline()`; both return what happened: an `Action` to submit to the bus, or a `Cue`
the LED shows while a button is held. All times are seconds on one monotonic clock.

The main button's ladder (defaults; docs/controls.md is the user's version):
  release before 2 s ........ STATUS (short press: the LED shows the status)
  release 2 s - 3 s ......... SAVE             LED steady: "let go now to SAVE"
  release 3 s - 5 s ......... nothing          LED fast blink: "RESTORE coming, let go to cancel"
  release 5 s - 10 s ........ RESTORE          LED steady: "let go now to RESTORE"
  reach 10 s while held ..... PAIR, at once; the release then does nothing
  short press, then within 0.5 s press again and hold 2 s: UNLOCK, at once
Destructive actions fire on release only, so passing through a rung never triggers it, and a
button found held at start-up, or still held after PAIR/UNLOCK, is ignored until released.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from appliance.control.commands import Action


class Cue(StrEnum):
    """What a held button would do if released now; the LED shows it."""

    IDLE = "idle"  # not held (or ignored): the LED shows the daemon's state
    HELD = "held"  # release = short press (STATUS) or, on a second press, nothing
    SAVE_ARMED = "save_armed"  # release = SAVE
    RESTORE_WARNING = "restore_warning"  # release = cancel; keep holding = RESTORE
    RESTORE_ARMED = "restore_armed"  # release = RESTORE


Output = Action | Cue
EPS = 1e-6  # a timer due at start + span may see now - start a hair short (float rounding)


@dataclass(frozen=True)
class Timings:
    """Seconds; the [gpio] config section sets them (CI uses tens of milliseconds)."""

    debounce: float = 0.03
    save_hold: float = 2.0
    restore_warn: float = 3.0
    restore_hold: float = 5.0
    pair_hold: float = 10.0
    double_gap: float = 0.5
    unlock_hold: float = 2.0
    key_hold: float = 1.0

    def check(self) -> None:
        """ValueError naming the keys when the ladder is out of order."""
        ladder = ("debounce", "save_hold", "restore_warn", "restore_hold", "pair_hold")
        for lower, upper in zip(ladder, ladder[1:], strict=False):
            if not getattr(self, lower) < getattr(self, upper):
                raise ValueError(
                    f"{lower} ({getattr(self, lower)}) must be shorter than {upper} "
                    f"({getattr(self, upper)}): the hold ladder is "
                    "debounce < save_hold < restore_warn < restore_hold < pair_hold"
                )
        for key in ("double_gap", "unlock_hold", "key_hold"):
            if not getattr(self, key) > self.debounce:
                raise ValueError(
                    f"{key} ({getattr(self, key)}) must be longer than debounce ({self.debounce})"
                )
        if self.debounce < 0:
            raise ValueError("debounce must be 0 or more seconds")


class Debounced:
    """A contact that counts as changed once its raw level has been stable for `debounce`."""

    def __init__(self, debounce: float, pressed: bool, now: float) -> None:
        self._debounce = debounce
        self.pressed = pressed  # the debounced level
        self._raw = pressed
        self._raw_t = now

    def edge(self, t: float, pressed: bool) -> list[Output]:
        if pressed != self._raw:
            self._raw, self._raw_t = pressed, t
        return self.tick(t)

    def tick(self, now: float) -> list[Output]:
        out: list[Output] = []
        if self._raw != self.pressed:
            # events held while the level settles happened before the pending change
            out += self._timers(min(now, self._raw_t))
            if now - self._raw_t >= self._debounce - EPS:
                self.pressed = self._raw
                out += self._changed(self._raw_t, self._raw)
        out += self._timers(now if self._raw == self.pressed else min(now, self._raw_t))
        return out

    def next_deadline(self) -> float | None:
        nxt = self._next_timer()
        if self._raw == self.pressed:
            return nxt
        # a change is settling: timers after it wait until it is confirmed or undone
        settle = self._raw_t + self._debounce
        return nxt if nxt is not None and nxt <= self._raw_t else settle

    # subclasses: react to debounced changes and to time passing while in a state
    def _changed(self, t: float, pressed: bool) -> list[Output]:
        return []

    def _timers(self, now: float) -> list[Output]:
        return []

    def _next_timer(self) -> float | None:
        return None


class _State(StrEnum):
    IDLE = "idle"
    FIRST = "first"  # held, first press
    GAP = "gap"  # released after a short press; a quick second press leads to UNLOCK
    SECOND = "second"  # held, second press of a double-press
    SPENT = "spent"  # held, but ignored until released (start-up, after PAIR/UNLOCK)


class MainButton(Debounced):
    """The enclosure button: the whole gesture ladder on one contact."""

    def __init__(self, timings: Timings, pressed: bool, now: float) -> None:
        super().__init__(timings.debounce, pressed, now)
        self.t = timings
        self.state = _State.SPENT if pressed else _State.IDLE
        self._since = now  # when the current state began
        self.cue = Cue.IDLE

    def _enter(self, state: _State, t: float) -> None:
        self.state, self._since = state, t

    def _cue(self, cue: Cue) -> list[Output]:
        if cue == self.cue:
            return []
        self.cue = cue
        return [cue]

    def _changed(self, t: float, pressed: bool) -> list[Output]:
        if pressed:
            if self.state == _State.GAP and t - self._since <= self.t.double_gap:
                self._enter(_State.SECOND, t)
            else:
                self._enter(_State.FIRST, t)
            return self._cue(Cue.HELD)
        held, state = t - self._since, self.state
        out = self._cue(Cue.IDLE)
        self._enter(_State.IDLE, t)
        if state == _State.FIRST:
            action = self._release_action(held)
            if action is Action.STATUS:
                self._enter(_State.GAP, t)
            if action is not None:
                out.append(action)
        elif state == _State.SECOND and held >= self.t.unlock_hold:
            out.append(Action.UNLOCK)  # the timer missed it (loop stalled): still honour it
        return out

    def _release_action(self, held: float) -> Action | None:
        t = self.t
        if held < t.save_hold:
            return Action.STATUS
        if held < t.restore_warn:
            return Action.SAVE
        if held < t.restore_hold:
            return None  # let go during the warning: cancelled
        if held < t.pair_hold:
            return Action.RESTORE
        return Action.PAIR  # only when the timer missed it (loop stalled)

    def _timers(self, now: float) -> list[Output]:
        held = now - self._since + EPS
        if self.state == _State.GAP and held > self.t.double_gap:
            self._enter(_State.IDLE, self._since + self.t.double_gap)
        if self.state == _State.SECOND and held >= self.t.unlock_hold:
            self._enter(_State.SPENT, now)
            return [*self._cue(Cue.IDLE), Action.UNLOCK]
        if self.state != _State.FIRST:
            return []
        if held >= self.t.pair_hold:
            self._enter(_State.SPENT, now)
            return [*self._cue(Cue.IDLE), Action.PAIR]
        if held >= self.t.restore_hold:
            return self._cue(Cue.RESTORE_ARMED)
        if held >= self.t.restore_warn:
            return self._cue(Cue.RESTORE_WARNING)
        if held >= self.t.save_hold:
            return self._cue(Cue.SAVE_ARMED)
        return []

    def _next_timer(self) -> float | None:
        t = self.t
        if self.state == _State.GAP:
            return self._since + t.double_gap + 1e-6
        if self.state == _State.SECOND:
            return self._since + t.unlock_hold
        if self.state != _State.FIRST:
            return None
        rungs = (t.save_hold, t.restore_warn, t.restore_hold, t.pair_hold)
        cues = (Cue.SAVE_ARMED, Cue.RESTORE_WARNING, Cue.RESTORE_ARMED, None)
        for rung, cue in zip(rungs, cues, strict=True):
            if cue is None or self._rank(cue) > self._rank(self.cue):
                return self._since + rung
        return None

    @staticmethod
    def _rank(cue: Cue) -> int:
        order = (Cue.IDLE, Cue.HELD, Cue.SAVE_ARMED, Cue.RESTORE_WARNING, Cue.RESTORE_ARMED)
        return order.index(cue)


class HoldKey(Debounced):
    """A dedicated key (SAVE, RESTORE or UNLOCK): fires once it has been held `key_hold`.

    While held before that, the cue warns (RESTORE) or shows it is armed; letting go cancels.
    """

    def __init__(self, action: Action, timings: Timings, pressed: bool, now: float) -> None:
        super().__init__(timings.debounce, pressed, now)
        self.action, self.hold = action, timings.key_hold
        self._held_since: float | None = None  # None: released, or ignored until released
        self.cue = Cue.IDLE
        self._warn = Cue.RESTORE_WARNING if action is Action.RESTORE else Cue.HELD

    def _changed(self, t: float, pressed: bool) -> list[Output]:
        self._held_since = t if pressed else None
        cue = self._warn if pressed else Cue.IDLE
        if cue == self.cue:
            return []
        self.cue = cue
        return [cue]

    def _timers(self, now: float) -> list[Output]:
        if self._held_since is None or now - self._held_since + EPS < self.hold:
            return []
        self._held_since = None  # spent until released
        self.cue = Cue.IDLE
        return [Cue.IDLE, self.action]

    def _next_timer(self) -> float | None:
        return None if self._held_since is None else self._held_since + self.hold


class KeySwitch(Debounced):
    """A key switch read as the lock state: closed = UNLOCK, opened = LOCK."""

    def _changed(self, t: float, pressed: bool) -> list[Output]:
        return [Action.UNLOCK if pressed else Action.LOCK]

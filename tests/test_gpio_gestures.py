"""The gesture recognisers, on a simulated clock: every rung of the ladder, bounce, start-up."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.control.commands import Action
from gpio import GpioSettings, validate_config
from gpio.gestures import Cue, Debounced, HoldKey, KeySwitch, MainButton, Output, Timings
from gpio.settings import timings

T = Timings()  # the defaults: 2 s SAVE, 3 s warning, 5 s RESTORE, 10 s PAIR


def run(machine: Debounced, edges: list[tuple[float, bool]], until: float) -> list[Output]:
    """Feed edges in time order, ticking at every deadline the machine asks for."""
    out: list[Output] = []
    pending = sorted(edges)
    now = 0.0
    for _ in range(10_000):  # a machine that keeps asking for the same deadline fails here
        deadline = machine.next_deadline()
        nxt_edge = pending[0][0] if pending else None
        if deadline is not None and deadline <= until and (nxt_edge is None or deadline < nxt_edge):
            now = max(now, deadline)
            out += machine.tick(now)
        elif nxt_edge is not None and nxt_edge <= until:
            t, pressed = pending.pop(0)
            now = t
            out += machine.edge(t, pressed)
        else:
            return out
    raise AssertionError(f"the recogniser never settled: {out}")


def actions(outs: list[Output]) -> list[Action]:
    return [o for o in outs if isinstance(o, Action)]


def cues(outs: list[Output]) -> list[Cue]:
    return [o for o in outs if isinstance(o, Cue)]


def hold(seconds: float, start: float = 1.0) -> list[tuple[float, bool]]:
    return [(start, True), (start + seconds, False)]


@pytest.mark.parametrize(
    "held, expected",
    [
        (0.3, [Action.STATUS]),  # short press: show the status
        (1.9, [Action.STATUS]),
        (2.5, [Action.SAVE]),  # released between 2 s and 3 s
        (3.5, []),  # released during the RESTORE warning: cancelled
        (4.9, []),
        (5.5, [Action.RESTORE]),  # released between 5 s and 10 s
        (9.9, [Action.RESTORE]),
        (10.5, [Action.PAIR]),  # PAIR at 10 s while still held; the release adds nothing
        (60.0, [Action.PAIR]),  # something resting on the button: PAIR once, nothing else
    ],
)
def test_each_hold_time_does_one_thing(held: float, expected: list[Action]) -> None:
    outs = run(MainButton(T, False, 0.0), hold(held), until=100)
    assert actions(outs) == expected


def test_the_led_cues_climb_the_ladder_and_end_idle() -> None:
    outs = run(MainButton(T, False, 0.0), hold(7.0), until=100)
    assert cues(outs) == [
        Cue.HELD,
        Cue.SAVE_ARMED,
        Cue.RESTORE_WARNING,
        Cue.RESTORE_ARMED,
        Cue.IDLE,
    ]
    assert outs[-1] is Action.RESTORE  # the LED says "idle" before the action is submitted


def test_destructive_actions_never_fire_while_the_button_is_still_held() -> None:
    outs = run(MainButton(T, False, 0.0), [(1.0, True)], until=9.9)
    assert actions(outs) == []
    assert cues(outs)[-1] is Cue.RESTORE_ARMED


def test_pair_fires_at_the_hold_time_without_release() -> None:
    outs = run(MainButton(T, False, 0.0), [(1.0, True)], until=11.5)
    assert actions(outs) == [Action.PAIR]


def test_double_press_then_hold_unlocks_at_once() -> None:
    edges = [(1.0, True), (1.2, False), (1.5, True)]
    outs = run(MainButton(T, False, 0.0), edges, until=3.6)
    assert actions(outs) == [Action.STATUS, Action.UNLOCK]
    # letting go afterwards does nothing more
    outs = run(MainButton(T, False, 0.0), [*edges, (4.0, False)], until=10)
    assert actions(outs) == [Action.STATUS, Action.UNLOCK]


def test_double_press_released_early_or_too_slow_does_not_unlock() -> None:
    early = [(1.0, True), (1.2, False), (1.5, True), (2.5, False)]
    assert actions(run(MainButton(T, False, 0.0), early, until=10)) == [Action.STATUS]
    slow = [(1.0, True), (1.2, False), (2.0, True), (4.5, False)]  # 0.8 s gap: a new press
    assert actions(run(MainButton(T, False, 0.0), slow, until=10)) == [Action.STATUS, Action.SAVE]


def test_a_bounce_is_one_press_and_a_glitch_during_a_hold_is_ignored() -> None:
    chatter = [(1.0, True), (1.002, False), (1.004, True), (1.006, False), (1.008, True)]
    release = [(3.5, False), (3.501, True), (3.503, False)]
    outs = run(MainButton(T, False, 0.0), chatter + release, until=10)
    assert actions(outs) == [Action.SAVE]  # not STATUS x3: held 2.5 s as one press
    # a 10 ms opening mid-hold: still one 2.6 s press (SAVE), not two short ones (STATUS)
    glitch = [(1.0, True), (2.4, False), (2.41, True), (3.6, False)]
    assert actions(run(MainButton(T, False, 0.0), glitch, until=10)) == [Action.SAVE]


def test_a_glitch_shorter_than_debounce_is_not_a_press() -> None:
    outs = run(MainButton(T, False, 0.0), [(1.0, True), (1.01, False)], until=10)
    assert outs == []


def test_a_button_held_at_start_up_is_ignored_until_released() -> None:
    button = MainButton(T, True, 0.0)  # held across the reboot
    outs = run(button, [(12.0, False)], until=20)
    assert outs == []
    assert actions(run(button, hold(2.5, start=21.0), until=30)) == [Action.SAVE]


@given(st.floats(min_value=0.0, max_value=T.save_hold - 0.001))
def test_no_short_press_can_save_or_restore(held: float) -> None:
    outs = run(MainButton(T, False, 0.0), hold(held), until=100)
    assert not {Action.SAVE, Action.RESTORE} & set(actions(outs))


@given(st.lists(st.floats(min_value=0.0, max_value=30.0), max_size=12))
def test_any_edge_sequence_yields_at_most_one_action_per_press(times: list[float]) -> None:
    edges = [(t, i % 2 == 0) for i, t in enumerate(sorted(times))]
    outs = run(MainButton(T, False, 0.0), edges, until=100)
    presses = sum(1 for _, p in edges if p)
    assert len(actions(outs)) <= presses


def test_dedicated_restore_key_warns_then_fires_and_cancels_on_early_release() -> None:
    key = HoldKey(Action.RESTORE, T, False, 0.0)
    outs = run(key, [(1.0, True), (5.0, False)], until=10)
    assert outs == [Cue.RESTORE_WARNING, Cue.IDLE, Action.RESTORE]
    key = HoldKey(Action.RESTORE, T, False, 0.0)
    assert actions(run(key, [(1.0, True), (1.5, False)], until=10)) == []


def test_dedicated_save_key_held_at_start_does_nothing() -> None:
    key = HoldKey(Action.SAVE, T, True, 0.0)
    assert actions(run(key, [(3.0, False)], until=10)) == []


def test_key_switch_reports_lock_state_changes() -> None:
    switch = KeySwitch(T.debounce, False, 0.0)
    outs = run(switch, [(1.0, True), (1.001, False), (1.002, True), (5.0, False)], until=10)
    assert outs == [Action.UNLOCK, Action.LOCK]


def test_config_schema_drives_the_timings() -> None:
    assert set(Timings.__dataclass_fields__) <= set(GpioSettings.defaults())
    t = timings(
        {
            "save_hold": 0.1,
            "restore_warn": 0.2,
            "restore_hold": 0.3,
            "pair_hold": 0.5,
            "debounce": 0.01,
        }
    )
    assert (t.save_hold, t.pair_hold) == (0.1, 0.5)


@pytest.mark.parametrize(
    "cfg, words",
    [
        ({"save_hold": 4.0}, "save_hold (4.0) must be shorter than restore_warn"),
        ({"button_pin": 99}, "bad pin 99"),
        ({"led_pin": "pin seven"}, "bad pin 'pin seven'"),
        ({"save_pin": 17}, "pin 17 is used twice"),
        ({"rgb_pins": [5, 6]}, "three pins"),
        ({"debounce": -1}, "negative"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(cfg: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        validate_config(cfg)

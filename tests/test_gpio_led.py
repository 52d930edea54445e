"""The LED pattern table (docs/controls.md) and the player, on MockPWMPin LEDs."""

from __future__ import annotations

import asyncio

import pytest
from gpiozero import LED, PWMLED, RGBLED
from gpiozero.pins.mock import MockFactory

from appliance.control.commands import Event
from gpio.gestures import Cue
from gpio.led import DaemonView, LedTimings, Output, Player, choose, patterns, signals
from tests.gpio_helpers import levels, wait_for

T = LedTimings(slow=0.06, fast=0.02, no_host=0.3, status_show=0.4)


def view(*events: Event) -> DaemonView:
    v = DaemonView()
    for e in events:
        v.apply(e)
    return v


def state(**kw: object) -> Event:
    return Event(
        "state",
        {
            "mode": "locked",
            "dirty_units": 0,
            "host_connected": True,
            "pairing": {"open": False, "until": None},
            "parts": {},
            **kw,
        },
    )


@pytest.mark.parametrize(
    "events, cue, name",
    [
        ([state()], Cue.IDLE, "clean"),  # protected, nothing unsaved: on
        ([state(dirty_units=3)], Cue.IDLE, "unsaved"),  # slow blink
        ([state(host_connected=False)], Cue.IDLE, "no_host"),  # short blink every few s
        ([state(), Event("host", {"connected": False})], Cue.IDLE, "no_host"),
        ([state(), Event("progress", {"action": "save", "phase": "start"})], Cue.IDLE, "busy"),
        # a SAVE waiting for the host to stop writing, then committing, then done
        (
            [
                state(),
                Event("progress", {"action": "save", "phase": "start"}),
                Event("progress", {"action": "save", "phase": "waiting"}),
            ],
            Cue.IDLE,
            "waiting",
        ),
        (
            [
                state(),
                Event("progress", {"action": "save", "phase": "waiting"}),
                Event("progress", {"action": "save", "phase": "commit"}),
            ],
            Cue.IDLE,
            "busy",
        ),
        (
            [
                state(),
                Event("progress", {"action": "save", "phase": "waiting"}),
                Event("progress", {"action": "save", "phase": "end"}),
            ],
            Cue.IDLE,
            "clean",
        ),
        ([state(), Event("pairing", {"open": True, "until": 1.0})], Cue.IDLE, "pairing"),
        ([state(pairing={"open": True, "until": 1.0})], Cue.IDLE, "pairing"),
        ([state(), Event("fault", {"part": "gadget", "reason": "UDC gone"})], Cue.IDLE, "fault"),
        # a part reported failed, then back up in the next snapshot: the fault clears
        (
            [
                Event("fault", {"part": "gadget", "reason": "x"}),
                state(parts={"gadget": {"state": "up"}}),
            ],
            Cue.IDLE,
            "clean",
        ),
        # the store's file system is full: its own pattern, above any other fault, until cleared
        (
            [
                state(),
                Event("fault", {"part": "storage", "reason": "backing storage full: 0 B free"}),
                Event("fault", {"part": "ble", "reason": "no adapter"}),
            ],
            Cue.IDLE,
            "storage_full",
        ),
        (
            [
                Event("fault", {"part": "storage", "reason": "backing storage full"}),
                Event("fault", {"part": "storage", "cleared": True}),
            ],
            Cue.IDLE,
            "clean",
        ),
        # the storage part failing for another reason (a hole punch) is an ordinary fault
        (
            [
                state(),
                Event("fault", {"part": "storage", "reason": "backing cannot free space: EIO"}),
            ],
            Cue.IDLE,
            "fault",
        ),
        # our own absence is not a fault we could show
        ([state(), Event("fault", {"part": "gpio", "reason": "no GPIO chip"})], Cue.IDLE, "clean"),
        # a held button outranks everything: the user needs to see what a release would do
        (
            [Event("fault", {"part": "gadget", "reason": "x"})],
            Cue.RESTORE_WARNING,
            "restore_warning",
        ),
        ([state()], Cue.SAVE_ARMED, "save_armed"),
        ([state()], Cue.HELD, "held"),
    ],
)
def test_pattern_table(events: list[Event], cue: Cue, name: str) -> None:
    assert choose(view(*events), cue, False, T).name == name


def test_status_display_shows_the_store_even_with_no_host() -> None:
    v = view(state(host_connected=False, dirty_units=1))
    assert choose(v, Cue.IDLE, True, T).name == "unsaved"


def test_outcomes_give_one_shot_signals() -> None:
    v = DaemonView()
    assert (
        v.apply(Event("outcome", {"ok": False, "action": "save", "source": "fob:1"})) == "refused"
    )
    assert v.apply(Event("outcome", {"ok": True, "action": "unlock"})) == "unlocked"
    assert not v.locked
    assert v.apply(Event("outcome", {"ok": True, "action": "lock", "source": "policy"})) is None
    assert v.locked


def test_no_host_can_be_dark() -> None:
    dark = LedTimings(no_host=0)
    assert patterns(dark)["no_host"].steps == ((0.0, float("inf")),)


def test_a_pairing_window_closed_early_says_why() -> None:
    v = DaemonView()
    assert v.apply(Event("pairing", {"open": True})) is None and v.pairing
    assert v.apply(Event("pairing", {"open": False, "why": "3 wrong setup codes"})) == "refused"
    assert not v.pairing
    assert v.apply(Event("pairing", {"open": False, "why": "fob 2 paired"})) == "paired"
    assert v.apply(Event("pairing", {"open": False})) is None  # the 60 s ran out


def test_player_plays_sos_then_a_signal_then_resumes(factory: MockFactory) -> None:
    led = PWMLED(27)
    pin = factory.pin(27)

    async def main() -> None:
        player = Player(Output(led))
        player.start()
        player.play(patterns(T)["fault"])
        await wait_for(lambda: len(pin.states) >= 19, what="one SOS")  # 9 flashes
        player.play(patterns(T)["clean"])
        player.flash(signals(T)["refused"])
        await wait_for(lambda: player.current == "clean", what="resume")
        await asyncio.sleep(0.05)
        await player.stop()

    asyncio.run(main())
    seen = levels(pin)
    assert seen[:19] == [0.0, *[1.0, 0.0] * 9]  # ... --- ... as nine on/off flashes
    assert seen[-8:] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # 3 quick, steady on, off
    led.close()


def test_same_pattern_twice_keeps_its_phase(factory: MockFactory) -> None:
    led = LED(27)
    pin = factory.pin(27)

    async def main() -> None:
        player = Player(Output(led))
        player.start()
        for _ in range(20):
            player.play(patterns(T)["unsaved"])
            await asyncio.sleep(0.01)
        await player.stop()
        assert player.history == ["unsaved"]  # started once, never restarted

    asyncio.run(main())
    assert len(levels(pin)) >= 4  # it blinked through the repeated requests
    led.close()


def test_rgb_led_colours(factory: MockFactory) -> None:
    rgb = RGBLED(5, 6, 13)
    out = Output(rgb=rgb)
    out.set(1.0, "red")
    assert rgb.value == (1.0, 0.0, 0.0)
    out.set(1.0, "green")
    assert rgb.value == (0.0, 1.0, 0.0)
    out.set(0.0, "green")
    assert rgb.value == (0.0, 0.0, 0.0)
    rgb.close()

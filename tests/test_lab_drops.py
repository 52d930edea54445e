"""The BLE lab scenario's drop classifier (tests/lab/drops.py): a drop is explained only by a
known BlueZ race on that very link, so a new cause fails the scenario."""

from __future__ import annotations

from tests.lab import drops

CONNECT = f"bluetoothd[270]: src/device.c:{drops.FOB_CONNECT}\n"
CONNECTED_NEVER = (
    "bluetoothd[270]: src/device.c:device_add_connection() Device "
    "00:5A:7E:00:00:01 is already connected\n"
)
EINVAL = (
    "bluetoothd[237]: src/device.c:device_attach_att() bt_io_set: "
    "setsockopt(BT_SECURITY): Invalid argument (22)\n"
)
LOST = (
    "savepoint-fob: link lost while connecting (failed to discover services, device "
    "disconnected); reconnecting"
)


def test_each_drop_at_connection_is_matched_to_its_links_race() -> None:
    log = CONNECT + CONNECTED_NEVER + CONNECT + CONNECT + EINVAL + CONNECT
    assert drops.causes(log) == ["Connected never signalled", "BT_SECURITY race"]
    assert drops.unexplained([LOST, LOST], log) == []


def test_both_races_on_one_link_explain_one_drop_not_two() -> None:
    log = CONNECT + EINVAL + CONNECTED_NEVER + CONNECT
    assert drops.causes(log) == ["BT_SECURITY race and Connected never signalled"]
    assert drops.unexplained([LOST, LOST], log) == [LOST]


def test_a_drop_without_a_known_race_is_unexplained() -> None:
    log = CONNECT + (
        "src/adapter.c:dev_disconnected() Device 00:5A:7E:00:00:01 disconnected, reason 2\n"
    )
    assert drops.unexplained([LOST], log) == [LOST]


def test_a_drop_after_connecting_is_unexplained_even_beside_a_race() -> None:
    late = "savepoint-fob: link lost while writing the command frame (Not connected); reconnecting"
    log = CONNECT + CONNECTED_NEVER + CONNECT
    assert drops.unexplained([late], log) == [late]


def test_the_race_lines_are_the_ones_bluez_5_66_logs() -> None:
    # one saved run's log lines, as docs/lab.md quotes them
    assert drops.CAUSES["BT_SECURITY race"] in EINVAL
    assert drops.CAUSES["Connected never signalled"] in CONNECTED_NEVER

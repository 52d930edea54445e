"""Which BlueZ race dropped each fob link in the BLE scenario (docs/lab.md, "The BLE
scenario"): pure functions over bluetoothd's log and savepoint-fob's `link lost` lines, so
they run (and are tested) outside the lab VM too."""

from __future__ import annotations

APPLIANCE = "00:5A:7E:00:00:01"  # hci0's address (tests/lab/inside/ble_stack.py)

# The two BlueZ 5.66 races a fob's link meets at connection, before any frame is sent, each
# by the line it leaves in bluetoothd's log:
CAUSES = {
    # the appliance's side: the link is already encrypted with the bond when bluetoothd
    # attaches its ATT socket; the kernel refuses BT_SECURITY, bluetoothd drops the bearer
    "BT_SECURITY race": "device_attach_att() bt_io_set: setsockopt(BT_SECURITY): Invalid argument",
    # the fob's side: its ATT connect callback runs before the mgmt Device Connected event,
    # so Connected is never signalled true; bleak reads "disconnected" and disconnects
    "Connected never signalled": f"device_add_connection() Device {APPLIANCE} is already connected",
}
FOB_CONNECT = f"device_connect_le() Connection attempt to: {APPLIANCE}"  # one per fob link


def causes(log: str) -> list[str]:
    """The known race each fob link met, in order, for the links that met one."""
    links = log.split(FOB_CONNECT)[1:]
    found = ([c for c, line in CAUSES.items() if line in link] for link in links)
    return [" and ".join(c) for c in found if c]


def unexplained(drops: list[str], log: str) -> list[str]:
    """The drops no known cause explains: any after connecting, and those while connecting
    beyond the links that met a known race."""
    connecting = [d for d in drops if "while connecting" in d]
    return [d for d in drops if d not in connecting] + connecting[len(causes(log)) :]

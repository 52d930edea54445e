"""Is the fob's LE link to the appliance encrypted? Asked of the Linux kernel, not of BlueZ.

Neither BlueZ's D-Bus API (Device1 has Paired and Bonded, no security level) nor bleak say
whether the current link is encrypted. The kernel does: the HCIGETCONNLIST ioctl on an HCI
socket lists each adapter's connections with their link mode, and HCI_LM_ENCRYPT is set once
the controller reported Encryption Change (what `hcitool con` prints as ENCRYPT). It needs no
privilege. Elsewhere (macOS, Windows, a kernel without Bluetooth sockets) the answer is None:
the fob then relies on the MAC over Status alone (docs/fob-protocol.md, "The fob's checks").
"""

from __future__ import annotations

import array
import contextlib
import socket
import struct
import sys

AF_BLUETOOTH, BTPROTO_HCI = 31, 1  # Linux's numbers; Python built without them lacks the names
HCIGETCONNLIST = 0x800448D4  # _IOR('H', 212, int)
HCI_LM_ENCRYPT = 0x0004
LE_LINK = 0x80
MAX_CONNS = 20  # the kernel lists at most what fits; a fob has one or two links
MAX_ADAPTERS = 16  # hci0..hci15 are tried when no adapter is named
_REQ = struct.Struct("<HH")  # struct hci_conn_list_req: dev_id, conn_num
_INFO = struct.Struct("<H6sBBHI")  # struct hci_conn_info: handle, bdaddr, type, out, state, mode


def parse_conn_list(raw: bytes) -> dict[str, int]:
    """LE connections in an HCIGETCONNLIST answer: "AA:BB:..." -> link mode bits."""
    _dev, count = _REQ.unpack_from(raw)
    links = {}
    for i in range(min(count, MAX_CONNS)):
        at = _REQ.size + i * _INFO.size
        _handle, bdaddr, kind, _out, _state, mode = _INFO.unpack_from(raw, at)
        if kind == LE_LINK:
            links[":".join(f"{b:02X}" for b in reversed(bdaddr))] = mode
    return links


def _conn_list(sock: socket.socket, dev_id: int) -> bytes:
    import fcntl  # not on Windows

    buf = array.array("B", _REQ.pack(dev_id, MAX_CONNS) + bytes(MAX_CONNS * _INFO.size))
    fcntl.ioctl(sock.fileno(), HCIGETCONNLIST, buf, True)
    return buf.tobytes()


def encrypted(address: str, adapter: str = "") -> bool | None:
    """Whether the kernel's LE link to `address` is encrypted; None when it cannot tell (not
    Linux, no Bluetooth sockets, or no such link listed)."""
    if not sys.platform.startswith("linux"):
        return None
    ids = [int(adapter[3:])] if adapter.startswith("hci") and adapter[3:].isdigit() else None
    try:
        sock = socket.socket(AF_BLUETOOTH, socket.SOCK_RAW | socket.SOCK_CLOEXEC, BTPROTO_HCI)
    except OSError:
        return None
    with sock:
        for dev_id in ids if ids is not None else range(MAX_ADAPTERS):
            with contextlib.suppress(OSError):  # ENODEV: no such adapter
                mode = parse_conn_list(_conn_list(sock, dev_id)).get(address.upper())
                if mode is not None:
                    return bool(mode & HCI_LM_ENCRYPT)
    return None

"""The text edits the installer makes, as pure functions: easy to test, nothing touched here.

- the firmware config.txt gets `dtoverlay=dwc2,dr_mode=peripheral` under [all];
- /etc/group gets the `savepoint` and `savepoint-admin` system groups (only under --root; a
  live system uses groupadd);
- /etc/savepoint/config.toml is rendered with documented defaults;
- BlueZ's /etc/bluetooth/main.conf gets `[GATT] Channels = 1` (EATT off, see eatt_off);
- the Pi model (from the device tree) decides which port the user must plug in.
"""

from __future__ import annotations

import re
from pathlib import Path

DWC2_LINE = "dtoverlay=dwc2,dr_mode=peripheral"
DWC2_COMMENT = "# Savepoint: USB device (gadget) mode on the OTG port"
_SECTION = re.compile(r"^\s*\[([^\]]*)\]\s*$")
_DWC2 = re.compile(r"^\s*dtoverlay\s*=\s*dwc2\b")


def firmware_config(root: Path) -> Path:
    """config.txt the firmware reads: /boot/firmware on Bookworm, /boot before it."""
    for rel in ("boot/firmware/config.txt", "boot/config.txt"):
        if (root / rel).is_file():
            return root / rel
    raise FileNotFoundError(
        f"no firmware config.txt under {root}/boot/firmware or {root}/boot: is this Raspberry "
        "Pi OS, and is the boot partition mounted?"
    )


def _sections(lines: list[str]) -> list[str]:
    """The conditional-filter section each line is in ("all" before any header)."""
    current, out = "all", []
    for line in lines:
        m = _SECTION.match(line)
        if m:
            current = m.group(1).strip().lower()
        out.append(current)
    return out


def add_dwc2(text: str) -> str:
    """Return config.txt with our dwc2 line active under [all]; unchanged if already there.

    Other active dwc2 lines under [all] (e.g. dr_mode=host) would fight ours, so they are
    commented out; [cm4]/[cm5] and other filtered sections are left alone.
    """
    lines = text.splitlines(keepends=True)
    sections = _sections(lines)
    ours = [i for i, line in enumerate(lines) if sections[i] == "all" and line.strip() == DWC2_LINE]
    others = [
        i
        for i, line in enumerate(lines)
        if sections[i] == "all" and _DWC2.match(line) and line.strip() != DWC2_LINE
    ]
    if ours and not others:
        return text
    for i in others:
        lines[i] = "#" + lines[i]
    if not ours:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        if sections and sections[-1] != "all":
            lines.append("\n[all]\n")
        lines += [DWC2_COMMENT + "\n", DWC2_LINE + "\n"]
    return "".join(lines)


EATT_LINE = "Channels = 1"
EATT_COMMENT = "# Savepoint: EATT off (BlueZ 5.66's EATT drops fob links; docs/install.md)"
_CHANNELS = re.compile(r"^\s*#?\s*Channels\s*=")


def eatt_off(text: str) -> str:
    """main.conf with `Channels = 1` active under [GATT]; unchanged if already so.

    BlueZ 5.66 with EATT (Channels > 1) sometimes answers the fob's Exchange MTU on the other
    EATT channel and the fob drops the link (docs/lab.md). The first Channels line in [GATT],
    commented or not, becomes ours; other active ones there are commented out.
    """
    lines = text.splitlines(keepends=True)
    sections = _sections(lines)
    found = [i for i, line in enumerate(lines) if sections[i] == "gatt" and _CHANNELS.match(line)]
    active = [i for i in found if not lines[i].lstrip().startswith("#")]
    if [lines[i].strip() for i in active] == [EATT_LINE]:
        return text
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    if found:
        first = found[0]
        for i in active:
            if i != first:
                lines[i] = "#" + lines[i]
        lines[first] = f"{EATT_COMMENT}\n{EATT_LINE}\n"
        return "".join(lines)
    gatt = [i for i, s in enumerate(sections) if s == "gatt"]
    if gatt:  # no Channels line at all: ours goes right after the header
        lines.insert(gatt[0] + 1, f"{EATT_COMMENT}\n{EATT_LINE}\n")
    else:
        lines.append(f"\n[GATT]\n{EATT_COMMENT}\n{EATT_LINE}\n")
    return "".join(lines)


def add_group(group_file: str, name: str) -> str:
    """/etc/group text with a system group `name` (first free gid counting down from 999)."""
    used, lines = set(), group_file.splitlines(keepends=True)
    for line in lines:
        fields = line.split(":")
        if fields[0] == name:
            return group_file
        if len(fields) > 2 and fields[2].strip().isdigit():
            used.add(int(fields[2]))
    gid = next(g for g in range(999, 99, -1) if g not in used)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    return "".join(lines) + f"{name}:x:{gid}:\n"


def pi_model(root: Path) -> str:
    """'Raspberry Pi 4 Model B Rev 1.4' etc., or '' when this is not a Pi (or unknown)."""
    path = root / "proc/device-tree/model"
    try:
        return path.read_bytes().rstrip(b"\0\n").decode(errors="replace").strip()
    except OSError:
        return ""


def port_advice(model: str) -> str:
    """Which socket to plug into the host computer, in the user's words."""
    m = model.lower()
    if "zero" in m:
        return (
            "Plug the host computer into the Zero's micro-USB port marked USB (the one in "
            "the middle), not the one marked PWR IN. The host also powers the Zero."
        )
    if re.search(r"raspberry pi (4|400|5|500)\b", m):
        return (
            "Plug the host computer into the Pi's USB-C port (the power socket): it carries "
            "both the USB disk and power. Use a port that supplies enough current "
            "(a USB-C port or a powered hub), or the Pi may brown out."
        )
    if "compute module" in m:
        return (
            "Plug the host computer into the IO board's USB device (OTG) port, and set "
            "its USB jumper/switch to device mode."
        )
    if "model b" in m:  # Pi 1, 2, 3 Model B: the USB sockets hang off a hub chip
        return (
            f"Warning: the {model} has no USB device port (its USB sockets go through a "
            "hub), so no host will see a disk. Savepoint still serves the store over NBD. "
            "Use a Zero 2 W, 4 or 5 for the USB disk."
        )
    return (
        "Could not tell the Raspberry Pi model: plug the host computer into the Pi's USB "
        "device (OTG) port: the micro-USB port marked USB on a Zero, the USB-C port on a "
        "4 or 5."
    )


CONFIG_TOML = """\
# Savepoint configuration, written by provisioning/install.sh. Every key, its type and
# default: docs/config.md. Restart after editing: sudo systemctl restart savepoint

[store]
# The backing file or block device holding the store (created by `savepoint init`).
path = "{path}"
# The storage unit of the map (a power of two, 4K to 1M); fixed when the store is created.
unit = "{unit}"
# Bring the map up to date in the background while the disk is idle.
background = true

[nbd]
# Unix socket of the NBD server; empty = /run/savepoint/nbd.sock.
socket = ""
# Empty: the socket is mode 0600, root only (the kernel's NBD client runs as root). NBD has
# no authentication: a group here could read and overwrite the whole disk, SAVE or not.
group = ""
# NBD clients served at once; more are refused.
max_connections = 8

[control]
# Control socket for `savepoint status|save|restore|...`; empty = /run/savepoint/control.sock.
socket = ""
# Members of this group may run `savepoint status`, `history` and `watch` (read only).
group = "savepoint"
# Members of this group may also UNLOCK, SAVE, RESTORE, LOCK, PAIR and manage fobs.
admin_group = "savepoint-admin"

[lock]
# Start LOCKED: SAVE is refused until a deliberate UNLOCK (button, paired fob, local CLI).
enabled = true
# Seconds without a command before re-locking; 0 = never.
relock_after = 300

[restore]
# When to RESTORE on its own: "never", "on_boot", "on_host_disconnect", "schedule".
policy = "never"

[gadget]
# Present the store to the host computer as a USB disk (needs the dwc2 overlay).
enabled = true

[serial]
# The USB serial channel host software uses (savepoint-host).
enabled = true

[gpio]
# The enclosure button and status LED.
enabled = true

[ble]
# The Bluetooth LE service for paired fobs.
enabled = true

[log]
# debug, info, warning or error.
level = "info"
"""


def render_config(store_path: str, unit: str = "4K") -> str:
    if '"' in store_path or "\\" in store_path:
        raise ValueError(
            f"store path {store_path!r} contains a quote or backslash: use a plain path"
        )
    return CONFIG_TOML.format(path=store_path, unit=unit)

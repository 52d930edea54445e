"""Turn a fresh Raspberry Pi OS (Bookworm) into a Savepoint appliance; run via install.sh.

Plan every change, show it (diff-like), ask, apply, record it in the manifest. A second run
plans nothing and says so; --dry-run stops after showing the plan; --uninstall undoes it all.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tomllib
from pathlib import Path

from appliance.sizes import parse_size
from provisioning import disks, edits, firstboot, system, undo
from provisioning.changes import Change, Manifest, dir_change, file_change, on, symlink_change

SRC = Path(__file__).resolve().parent.parent
CONFIG = "/etc/savepoint/config.toml"
UNIT = "/etc/systemd/system/savepoint.service"
DROPIN = "/etc/systemd/system/savepoint.service.d/store.conf"
WANTS = "/etc/systemd/system/multi-user.target.wants/savepoint.service"
MODULES = "/etc/modules-load.d/savepoint.conf"
CLI_LINK = "/usr/local/bin/savepoint"  # the CLI on the PATH
BT_MAIN = "/etc/bluetooth/main.conf"  # BlueZ's; ours to edit only for [GATT] Channels
BT_DROPIN = "/etc/systemd/system/bluetooth.service.d/savepoint.conf"
BT_EXPERIMENTAL = """\
# Written by provisioning/install.sh: bluetoothd --experimental offers advertisement monitors,
# which BTHome buttons need for passive scanning ([bthome], docs/buttons.md).
[Service]
ExecStart=
ExecStart=/usr/libexec/bluetooth/bluetoothd --experimental
"""
DEFAULT_STORE = "/var/lib/savepoint/store.img"
DEFAULT_SIZE = "4G"


class InstallError(Exception):
    """Bad input or an unusable system: the message says what to do. Nothing was changed."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="install.sh", description="Install (or --uninstall) the Savepoint appliance."
    )
    p.add_argument(
        "--root",
        default="/",
        help="install into this directory (a fake root "
        "or a mounted SD card): files only, no apt, no systemctl",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
    p.add_argument(
        "--uninstall",
        action="store_true",
        help="undo every change the installer made; the store's data is left alone",
    )
    p.add_argument(
        "--device",
        help="block device (or file) for the store; default: a file "
        f"{DEFAULT_STORE}; list disks with: python3 -m provisioning.disks",
    )
    p.add_argument(
        "--size",
        help=f"disk size for a store file (default {DEFAULT_SIZE}); a "
        "block device's size is its own",
    )
    p.add_argument("--unit", default="4K", help="store unit, 4K to 1M (default 4K)")
    p.add_argument(
        "--force",
        action="store_true",
        help="use a device that holds a filesystem or partition table (its data is lost)",
    )
    p.add_argument("--yes", "-y", action="store_true", help="do not ask before changing")
    p.add_argument(
        "--reboot",
        action="store_true",
        help="reboot at the end when the USB device controller needs it (a fresh Pi does)",
    )
    p.add_argument(
        "--bthome-passive",
        action="store_true",
        help="run bluetoothd "
        "--experimental, for passive BTHome scanning (done anyway when config.toml "
        "enables [bthome])",
    )
    p.add_argument("--first-boot", action="store_true", help=argparse.SUPPRESS)  # the unit's
    args = p.parse_args(argv)
    if args.first_boot:
        args.yes = True
    return args


def _store_options(args: argparse.Namespace) -> list[str]:
    """The store choices made under --root, for the first boot to act on."""
    out = []
    for flag in ("device", "size", "unit"):
        if getattr(args, flag) and (flag, getattr(args, flag)) != ("unit", "4K"):
            out += [f"--{flag}", getattr(args, flag)]
    return out + (["--force"] if args.force else [])


def _existing_store(root: Path) -> str | None:
    try:
        return tomllib.loads(on(root, CONFIG).read_text())["store"]["path"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None


def _free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _ask_device() -> str | None:
    """Let a user at a terminal pick a disk; None keeps the store file on the SD card."""
    try:
        found = [d for d in disks.candidates() if not d.note]
    except ImportError:  # pyudev arrives with the packages; until then offer the file store
        return None
    if not found:
        return None
    print("Where should the store live?")
    print(f"  0) a file on the SD card ({DEFAULT_STORE})")
    for i, d in enumerate(found, 1):
        print(f"  {i}) {d.model} {disks.human(d.size)} {d.by_id or d.node}")
    answer = input("Choose [0]: ").strip() or "0"
    if not answer.isdigit() or int(answer) > len(found):
        raise InstallError(f"{answer!r} is not one of the choices; run again")
    return None if answer == "0" else (found[int(answer) - 1].by_id or found[int(answer) - 1].node)


def choose_store(args: argparse.Namespace, root: Path) -> tuple[str, str | None]:
    """The store path and (for a file) its size; refuses unsafe disks before anything changes."""
    device = args.device or _existing_store(root)
    if device is None and sys.stdin.isatty() and not (args.yes or args.dry_run):
        device = _ask_device()
    if device is None or not device.startswith("/dev/"):
        store = device or DEFAULT_STORE
        if not store.startswith("/"):
            raise InstallError(f"--device {store}: give an absolute path")
        size = args.size or DEFAULT_SIZE
        try:
            parse_size(size)
        except ValueError as e:
            raise InstallError(f"--size: {e}") from None
    else:
        store, size = disks.stable_path(device), None
        if args.size:
            raise InstallError("--size is only for a store file: a disk's size is its own")
    checked = store if store.startswith("/dev/") else str(on(root, store))
    if args.device:  # an existing store of ours (from config.toml) is not re-checked
        why = disks.refusal(checked, args.force)
        if why:
            raise InstallError(why)
    return store, size


def _check_space(root: Path, store: str, size: str | None) -> None:
    """A store file of SIZE needs about 2 x SIZE: two slots per unit (saved + working)."""
    path = on(root, store)
    if size and not path.exists() and _free_bytes(path.parent) < 2 * _bytes(size):
        raise InstallError(
            f"not enough free space for a {size} store file (it needs about "
            "twice that): use a smaller --size or a USB disk (--device)"
        )


def _bytes(size: str) -> int:
    return parse_size(size)


def _config_text(root: Path, store: str, unit: str) -> str:
    path = on(root, CONFIG)
    if not path.exists():
        return edits.render_config(store, unit)
    text = path.read_text()  # keep the user's edits; only point it at the chosen store
    text = re.sub(r'(?m)^path\s*=\s*"[^"]*"', f'path = "{store}"', text, count=1)
    return _nbd_root_only(text)


def _nbd_root_only(text: str) -> str:
    """Older installs gave the NBD socket to the savepoint group (raw access to the whole
    disk, past every SAVE/RESTORE rule): that line of [nbd] becomes root only."""
    head, sep, rest = text.partition("\n[nbd]\n")
    if not sep:
        return text
    body, nxt, tail = rest.partition("\n[")
    body = re.sub(
        r"(?m)^# Members of this group may use the socket \(mode 0660\)\.\n"
        r'group\s*=\s*"savepoint"$',
        "# Empty: the socket is root only (0600); a group could read and overwrite "
        'the disk.\ngroup = ""',
        body,
    )
    return head + sep + body + nxt + tail


def _dropin_text(store: str) -> str:
    lines = [
        "# Written by provisioning/install.sh: access to the store the user chose.",
        "[Service]",
    ]
    if store.startswith("/dev/"):
        lines.append(f"DeviceAllow={store} rw")
    elif not store.startswith("/var/lib/savepoint/"):
        lines.append(f"ReadWritePaths={Path(store).parent}")
    return "\n".join(lines) + "\n"


def _cli_link(root: Path, notes: list[str]) -> Change | None:
    """`savepoint` on the PATH, unless something of the user's already has that name."""
    link = on(root, CLI_LINK)
    if link.exists() and not link.is_symlink():
        notes.append(
            f"{CLI_LINK} exists and is not ours: left alone; the CLI is {system.VENV}/bin/savepoint"
        )
        return None
    return symlink_change(root, CLI_LINK, f"{system.VENV}/bin/savepoint")


_GROUPS_NOTE = (
    "groups: `savepoint` members may run savepoint status, history and watch; "
    "`savepoint-admin` members may also UNLOCK, SAVE, RESTORE, LOCK, PAIR and "
    "manage fobs (sudo usermod -aG savepoint-admin USER)"
)


def _section(config_text: str, name: str) -> dict:
    try:
        return tomllib.loads(config_text).get(name, {})
    except tomllib.TOMLDecodeError:
        return {}  # the daemon's own check reports a broken config


def _passive_scan(config_text: str, asked: bool) -> bool:
    """BTHome buttons scanned passively: [bthome] on (and not scan = "active"), or the flag."""
    bthome = _section(config_text, "bthome")
    return asked or (bool(bthome.get("enabled", False)) and bthome.get("scan") != "active")


def _bluetooth_changes(
    root: Path, config_text: str, args: argparse.Namespace, notes: list[str]
) -> list[Change | None]:
    """EATT off in BlueZ's main.conf when the fob service runs ([ble] enabled); bluetoothd
    --experimental when BTHome buttons are scanned passively."""
    out = (
        [file_change(root, BT_DROPIN, BT_EXPERIMENTAL)]
        if _passive_scan(config_text, args.bthome_passive)
        else []
    )
    if not _section(config_text, "ble").get("enabled", True):
        return out
    main = on(root, BT_MAIN)
    if not main.is_file():
        notes.append(
            f"{BT_MAIN} not found (BlueZ not installed yet?): left alone; fobs need "
            "`[GATT] Channels = 1` in it, so run the installer again once bluez is in"
        )
        return out
    return [file_change(root, BT_MAIN, edits.eatt_off(main.read_text())), *out]


def plan(args: argparse.Namespace, root: Path, m: Manifest) -> tuple[list[Change], list[str]]:
    """Every change still needed, in order; plus notes on what is skipped and why."""
    live = root == Path("/")
    store, size = choose_store(args, root)
    notes: list[str] = []
    firmware = edits.firmware_config(root)
    fw_path = "/" + str(firmware.relative_to(root))
    changes = [
        system.packages_change() if live else None,
        file_change(root, fw_path, edits.add_dwc2(firmware.read_text())),
        file_change(root, MODULES, (SRC / "systemd/savepoint-modules.conf").read_text()),
        *(groups := system.group_changes(root)),
        dir_change(root, "/etc/savepoint"),
        dir_change(root, "/var/lib/savepoint", 0o700),
    ]
    if any(groups):
        notes.append(_GROUPS_NOTE)
    full = live or os.environ.get("SAVEPOINT_ROOT_FULL") == "1"
    venv = system.venv_change(root, SRC) if full else None
    changes.append(venv)
    if full and (
        venv is not None or not on(root, "/usr/local/share/man/man1/savepoint.1").exists()
    ):
        changes.append(system.docs_change(root))  # regenerated with every new venv
    changes.append(_cli_link(root, notes))
    config = _config_text(root, store, args.unit)
    changes += _bluetooth_changes(root, config, args, notes)
    changes += [
        file_change(root, CONFIG, config, private=True, show_all=True),
        file_change(root, UNIT, (SRC / "systemd/savepoint.service").read_text()),
        file_change(root, DROPIN, _dropin_text(store)),
        symlink_change(root, WANTS, UNIT),
    ]
    runs_init = full or "SAVEPOINT_CMD" in os.environ  # tests: init with the dev venv's CLI
    init = system.store_change(m, root, store, size, args.unit, args.force) if runs_init else None
    if init:
        _check_space(root, store, size)
    changes.append(init)
    if not full and not args.first_boot:
        changes += firstboot.changes(root, SRC, _store_options(args))
        notes.append(
            f"left to the first boot on the Pi ({firstboot.UNIT}): apt packages, "
            f"virtualenv {system.VENV}, man pages"
            + ("" if runs_init else f", `savepoint init {store}`")
        )
    return [c for c in changes if c is not None], notes


def confirm(args: argparse.Namespace, what: str) -> None:
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise InstallError(f"not a terminal, so cannot ask whether to {what}: add --yes")
    if input(f"Go ahead and {what}? [y/N] ").strip().lower() not in ("y", "yes"):
        raise InstallError("nothing changed")


def install(args: argparse.Namespace, root: Path) -> int:
    m = Manifest(root)
    changes, notes = plan(args, root, m)
    model = edits.pi_model(root)
    if not changes:
        print("Nothing to change: Savepoint is already installed as configured.")
        if args.first_boot:
            firstboot.disable(root)
        return 0
    print(
        f"Savepoint installer: {len(changes)} change(s) to {root}"
        + (" (dry run: nothing will be changed)" if args.dry_run else "")
    )
    for c in changes:
        print(c.show())
    for note in notes:
        print(f"  ({note})")
    if args.dry_run:
        return 0
    confirm(args, f"make these {len(changes)} change(s)")
    for i, c in enumerate(changes, 1):
        print(f"[{i}/{len(changes)}] {c.summary}", flush=True)
        c.apply(m)
    print(f"Done. Every change is recorded in {m.file} (undo: install.sh --uninstall).")
    if args.first_boot:  # savepoint.service is ordered after this unit: it starts next
        firstboot.disable(root)
        return 0
    done = " ".join(c.summary for c in changes)
    if root == Path("/") and "bluetooth" in done:  # main.conf or its drop-in changed
        system.systemctl("daemon-reload")
        system.systemctl("try-restart", "bluetooth.service")
    _finish(root, model, reboot="config.txt" in done, now=args.reboot)
    return 0


def _finish(root: Path, model: str, reboot: bool, now: bool = False) -> None:
    if root != Path("/"):
        print(
            "Put the card in the Pi and power it up: its first boot finishes the install "
            "(packages and virtualenv need the network; follow it with `journalctl -fu "
            "savepoint-firstboot`)."
        )
    if root == Path("/"):
        system.systemctl("daemon-reload")
        if (reboot or not system.has_udc()) and now:
            print(edits.port_advice(model))
            print("Rebooting to turn on the USB device controller.", flush=True)
            system.systemctl("reboot")
            return
        if reboot or not system.has_udc():
            print("Reboot to turn on the USB device controller: sudo reboot")
        else:
            system.systemctl("restart", "savepoint.service")
            print("Started: systemctl status savepoint")
    print(edits.port_advice(model))


def uninstall(args: argparse.Namespace, root: Path) -> int:
    m = Manifest(root)
    if not m.file.exists():
        print(f"Nothing to undo: no install manifest at {m.file}.")
        return 0
    changes = [c for rec in reversed(m.records) if (c := undo.undo_change(m, rec))]
    print(
        f"Savepoint uninstall: {len(changes)} change(s) to undo in {root}"
        + (" (dry run: nothing will be changed)" if args.dry_run else "")
    )
    for c in changes:
        print(c.show())
    stores = undo.store_paths(m) or ([s] if (s := _existing_store(root)) else [])
    if args.dry_run:
        return 0
    confirm(args, "undo them")
    if root == Path("/"):
        system.systemctl("disable", "--now", "savepoint.service")  # clean stop first
    for c in changes:
        c.apply(m)
    m.remove()
    kept = undo.remove_dirs(m)
    if root == Path("/"):
        system.systemctl("daemon-reload")
        if any("bluetooth" in c.summary for c in changes):
            system.systemctl("try-restart", "bluetooth.service")
    for d in kept:
        print(f"Kept {d}: it holds files the installer did not create.")
    for s in stores:
        if s.startswith("/dev/") or on(root, s).exists():
            print(f"The store's data is untouched: {s}")
    print("Savepoint is uninstalled.")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.root).resolve()
    try:
        if root == Path("/") and os.geteuid() != 0 and not args.dry_run:
            raise InstallError("run it as root: sudo provisioning/install.sh")
        return uninstall(args, root) if args.uninstall else install(args, root)
    except (InstallError, FileNotFoundError, ValueError) as e:
        print(f"install.sh: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

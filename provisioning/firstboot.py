"""An SD card prepared on another machine (--root) finishes installing on its first boot.

Under --root there is no apt, no network of the Pi's and no running systemd, so packages, the
virtualenv, man pages and the store are left to a one-shot unit that runs this installer on
the Pi (`--first-boot`), ordered before savepoint.service, and disables itself once it has
succeeded. If it fails (no network yet), it runs again on the next boot.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from provisioning import system
from provisioning.changes import Change, Manifest, file_change, make_dirs, on, symlink_change

UNIT = "/etc/systemd/system/savepoint-firstboot.service"
WANTS = "/etc/systemd/system/multi-user.target.wants/savepoint-firstboot.service"
SRC = f"{system.VENV_HOME}/src"  # the project's sources, copied onto the card
_TREES = (*system._SOURCES, "systemd", "README.md")  # pyproject names the README


def unit_text(options: list[str]) -> str:
    cmd = shlex.join(["/usr/bin/python3", "-m", "provisioning.installer", "--first-boot", *options])
    return f"""# Written by provisioning/install.sh --root: finishes the install on the Pi.
[Unit]
Description=Savepoint: finish installing (packages, virtualenv, store), then disable this unit
Wants=network-online.target
After=network-online.target
Before=savepoint.service
ConditionPathExists={SRC}/provisioning/installer.py

[Service]
Type=oneshot
Environment=PYTHONPATH={SRC}
ExecStart={cmd}
StandardOutput=journal+console
TimeoutStartSec=45min

[Install]
WantedBy=multi-user.target
"""


def source_change(root: Path, src: Path) -> Change | None:
    """Copy the sources the first boot installs from; only when they differ."""
    copy = on(root, SRC)
    if copy.is_dir() and system.source_hash(copy) == system.source_hash(src):
        return None
    fresh = not on(root, system.VENV_HOME).exists()

    def apply(manifest: Manifest) -> None:
        make_dirs(manifest, system.VENV_HOME)
        if fresh:  # the whole /opt/savepoint is ours: uninstall removes it
            manifest.add({"type": "tree", "path": system.VENV_HOME})
        for top in _TREES:
            item = src / top
            if item.is_dir():
                shutil.copytree(
                    item,
                    copy / top,
                    dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                )
            elif item.is_file():
                copy.mkdir(parents=True, exist_ok=True)
                shutil.copy2(item, copy / top)

    return Change(f"+ {SRC} (the sources the first boot installs from)", apply)


def changes(root: Path, src: Path, options: list[str]) -> list[Change | None]:
    """A later run without store options keeps the unit (and the choices) it has."""
    keep = not options and on(root, UNIT).exists()
    return [
        source_change(root, src),
        None if keep else file_change(root, UNIT, unit_text(options)),
        symlink_change(root, WANTS, UNIT),
    ]


def disable(root: Path) -> None:
    """Done: this unit never runs again (what `systemctl disable` does, without systemd)."""
    link = on(root, WANTS)
    if link.is_symlink():
        link.unlink()
    print("First boot finished: savepoint-firstboot.service is now disabled.")

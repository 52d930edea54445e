"""Steps that act on the running system rather than on files: packages, group, virtualenv,
store, services. Under --root most are shown and skipped (a fake root has no apt or systemd).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from provisioning import edits
from provisioning.changes import Change, Manifest, file_change, make_dirs, on, run, sha256

PACKAGES = ["nbd-client", "bluez", "python3-venv", "python3-pyudev"]
PI_PACKAGES = ["python3-lgpio"]  # Raspberry Pi OS only: gpiozero's lgpio pin factory
VENV_HOME = "/opt/savepoint"
VENV = f"{VENV_HOME}/venv"
STAMP = f"{VENV_HOME}/installed-source"
SAVEPOINT = f"{VENV}/bin/savepoint"
GROUP = "savepoint"
ADMIN_GROUP = "savepoint-admin"  # [control] admin_group's default (appliance/control/roles.py)
GROUPS = {
    GROUP: "members may run savepoint status, history and watch",
    ADMIN_GROUP: "members may also UNLOCK, SAVE, RESTORE, LOCK, PAIR and manage fobs",
}
_SOURCES = ("pyproject.toml", "appliance", "ble", "gpio", "mqtt", "provisioning")


def _installed(pkg: str) -> bool:
    res = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Status}", pkg], capture_output=True, text=True, check=False
    )
    return res.stdout.endswith("installed")


def _available(pkg: str) -> bool:
    res = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True, check=False)
    return "Candidate:" in res.stdout and "Candidate: (none)" not in res.stdout


def packages_change() -> Change | None:
    wanted = PACKAGES + [p for p in PI_PACKAGES if _available(p)]
    missing = [p for p in wanted if not _installed(p)]
    if not missing:
        return None

    def apply(manifest: Manifest) -> None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update"], env=env)
        run(["apt-get", "install", "-y", *missing], env=env)
        manifest.add({"type": "packages", "names": missing})

    return Change("+ apt-get install " + " ".join(missing), apply)


def group_changes(root: Path) -> list[Change | None]:
    """Live: groupadd (locks /etc/group properly). Under --root: edit the files directly."""
    if root != Path("/"):
        group = on(root, "/etc/group")
        text = group.read_text() if group.exists() else ""
        for name in GROUPS:
            text = edits.add_group(text, name)
        changes = [file_change(root, "/etc/group", text)]
        gshadow = on(root, "/etc/gshadow")
        if gshadow.exists():
            text = old = gshadow.read_text()
            for name in GROUPS:
                if not re.search(rf"(?m)^{name}:", text):
                    sep = "" if not text or text.endswith("\n") else "\n"
                    text = f"{text}{sep}{name}:!::\n"
            if text != old:
                changes.append(file_change(root, "/etc/gshadow", text))
        return changes
    return [_groupadd(name, why) for name, why in GROUPS.items()]


def _groupadd(name: str, why: str) -> Change | None:
    if subprocess.run(["getent", "group", name], capture_output=True, check=False).returncode == 0:
        return None

    def apply(manifest: Manifest) -> None:
        run(["groupadd", "--system", name])
        manifest.add({"type": "group", "name": name})

    return Change(f"+ group {name} (system group: {why})", apply)


def source_hash(src: Path) -> str:
    """A digest of the project's sources: reinstall the venv only when they changed."""
    h = hashlib.sha256()
    for top in _SOURCES:
        paths = [src / top] if (src / top).is_file() else sorted((src / top).rglob("*"))
        for p in paths:
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def venv_change(root: Path, src: Path) -> Change | None:
    stamp = on(root, STAMP)
    digest = source_hash(src)
    if stamp.exists() and stamp.read_text().strip() == digest:
        return None
    fresh = not on(root, VENV_HOME).exists()
    # A card made with --root has /opt/savepoint/src but no venv yet: that is an install.
    update = (on(root, VENV) / "bin/python").exists()

    def apply(manifest: Manifest) -> None:
        make_dirs(manifest, VENV_HOME)
        if fresh:  # record the whole tree only when we created it
            manifest.add({"type": "tree", "path": VENV_HOME})
        venv = on(root, VENV)
        if not update:
            # System site packages: gpiozero's lgpio backend comes from python3-lgpio (apt).
            run(["python3", "-m", "venv", "--system-site-packages", str(venv)])
        pip = str(venv / "bin/pip")
        run([pip, "install", str(src)])  # the project and its dependencies
        if update:  # same version number, new code: pip would call it satisfied
            run([pip, "install", "--no-deps", "--force-reinstall", str(src)])
        stamp.write_text(digest + "\n")

    verb = "update" if update else "install"
    return Change(f"+ {VENV} ({verb} the savepoint package from {src})", apply)


def docs_change(root: Path) -> Change:
    """Man pages and shell completion under /usr/local, generated by the venv's own parsers."""
    prefix = on(root, "/usr/local")

    def apply(manifest: Manifest) -> None:
        out = subprocess.run(
            [str(on(root, f"{VENV}/bin/python")), "-m", "appliance.manpages", str(prefix)],
            check=True,
            capture_output=True,
            text=True,
        )
        for line in out.stdout.split():
            written = Path(line)
            manifest.add(
                {
                    "type": "file",
                    "path": "/" + str(written.relative_to(root)),
                    "backup": None,
                    "sha256": sha256(written.read_bytes()),
                    "added": [],
                }
            )

    return Change(
        "+ man pages and bash/zsh completion for savepoint, savepoint-host and "
        "savepoint-fob under /usr/local/share (man savepoint)",
        apply,
    )


def store_change(
    manifest: Manifest, root: Path, store: str, size: str | None, unit: str, force: bool
) -> Change | None:
    """`savepoint init` on the chosen store, once: a second run must never wipe it."""
    if manifest.find("store", store):
        return None
    target = store if store.startswith("/dev/") else str(on(root, store))
    cmd = [
        os.environ.get("SAVEPOINT_CMD", str(on(root, SAVEPOINT))),
        "init",
        target,
        "--unit",
        unit,
        *(["--size", size] if size else []),
        *(["--force"] if force else []),
    ]

    def apply(manifest: Manifest) -> None:
        if not store.startswith("/dev/"):
            make_dirs(manifest, str(Path(store).parent))
        run(cmd)
        manifest.add({"type": "store", "path": store})

    return Change(f"+ store {store}: {' '.join(cmd)}", apply)


def systemctl(*args: str) -> None:
    if shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", *args], check=False)


def has_udc() -> bool:
    udc = Path("/sys/class/udc")
    return udc.is_dir() and any(udc.iterdir())

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
from provisioning.changes import Change, Manifest, file_change, make_dirs, on, run

PACKAGES = ["nbd-client", "bluez", "python3-venv", "python3-pyudev"]
PI_PACKAGES = ["python3-lgpio"]  # Raspberry Pi OS only: gpiozero's lgpio pin factory
VENV_HOME = "/opt/savepoint"
VENV = f"{VENV_HOME}/venv"
STAMP = f"{VENV_HOME}/installed-source"
SAVEPOINT = f"{VENV}/bin/savepoint"
GROUP = "savepoint"
_SOURCES = ("pyproject.toml", "appliance", "ble", "gpio", "mqtt", "provisioning")


def _installed(pkg: str) -> bool:
    res = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", pkg],
                         capture_output=True, text=True, check=False)
    return res.stdout.endswith("installed")


def _available(pkg: str) -> bool:
    res = subprocess.run(["apt-cache", "policy", pkg], capture_output=True, text=True,
                         check=False)
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
        changes = [file_change(root, "/etc/group", edits.add_group(text, GROUP))]
        gshadow = on(root, "/etc/gshadow")
        if gshadow.exists() and not re.search(rf"(?m)^{GROUP}:", gshadow.read_text()):
            text = gshadow.read_text()
            sep = "" if not text or text.endswith("\n") else "\n"
            changes.append(file_change(root, "/etc/gshadow", f"{text}{sep}{GROUP}:!::\n"))
        return changes
    if subprocess.run(["getent", "group", GROUP], capture_output=True,
                      check=False).returncode == 0:
        return [None]

    def apply(manifest: Manifest) -> None:
        run(["groupadd", "--system", GROUP])
        manifest.add({"type": "group", "name": GROUP})

    return [Change(f"+ group {GROUP} (system group: members may use the savepoint CLI)", apply)]


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

    def apply(manifest: Manifest) -> None:
        make_dirs(manifest, VENV_HOME)
        if fresh:  # record the whole tree only when we created it
            manifest.add({"type": "tree", "path": VENV_HOME})
        venv = on(root, VENV)
        if not (venv / "bin/python").exists():
            # System site packages: gpiozero's lgpio backend comes from python3-lgpio (apt).
            run(["python3", "-m", "venv", "--system-site-packages", str(venv)])
        pip = str(venv / "bin/pip")
        run([pip, "install", str(src)])  # the project and its dependencies
        if not fresh:  # same version number, new code: pip would call it satisfied
            run([pip, "install", "--no-deps", "--force-reinstall", str(src)])
        stamp.write_text(digest + "\n")

    verb = "install" if fresh else "update"
    return Change(f"+ {VENV} ({verb} the savepoint package from {src})", apply)


def store_change(manifest: Manifest, root: Path, store: str, size: str | None, unit: str,
                 force: bool) -> Change | None:
    """`savepoint init` on the chosen store, once: a second run must never wipe it."""
    if manifest.find("store", store):
        return None
    target = store if store.startswith("/dev/") else str(on(root, store))
    cmd = [os.environ.get("SAVEPOINT_CMD", str(on(root, SAVEPOINT))), "init", target,
           "--unit", unit, *(["--size", size] if size else []), *(["--force"] if force else [])]

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

"""An SD card made with `install.sh --root`, booted by systemd in the lab VM (issue 20).

The card is the lab's root (the host's Debian over 9p under a tmpfs overlay, standing in for
Raspberry Pi OS) with what Pi OS has and the host lacks: a boot partition's config.txt, the
packages Pi OS Lite ships that the installer wants (bluez, python3-pyudev: debs fetched on the
host, unpacked and recorded as installed), and the project's dependencies on the system
Python's path (installed once on the host with pip --target; the VM has no network). The job
mounts that root a second time at /mnt/card, as another machine mounts a card, and runs
`install.sh --root /mnt/card` with the system Python: files only, no apt, pip or systemctl.
Then /init execs systemd on it (guest_init.sh), and the first boot runs as on a Pi:
savepoint-firstboot.service creates the virtualenv (pip finds the dependencies installed and
builds the package, its build backend from a local wheelhouse), writes the man pages, creates
the store and disables itself; savepoint.service then starts the daemon in its sandbox.

`savepoint-lab-report.service`, ordered after both, runs `python3 -m tests.lab.firstboot
--report`: it writes what a user would check to /lab-results/firstboot.json (and the journal
beside it), stops the daemon as `systemctl stop` does, and powers the VM off.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from tests.lab.kernel import _run
from tests.lab.vm import CACHE, REPO, job_prelude

SIZE = "64M"  # the store the card asks for (--size), created by the first boot
PI_OS_PACKAGES = ["bluez", "python3-pyudev"]  # on Raspberry Pi OS Lite, not on the lab root
REPORT = "/lab-results/firstboot.json"
UNIT_DIR = "/etc/systemd/system"
GUEST_SITE = "/usr/local/lib/savepoint-lab-deps"  # in the VM: the dependencies (bound there)
GUEST_WHEELS = "/usr/local/lib/savepoint-lab-wheels"  # in the VM: the build backend's wheels
WAIT_ACTIVE = 300  # seconds the report waits for savepoint.service to settle


def _key(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def _once(out: Path, what: list[str], cmd: list[str]) -> Path:
    """Run `cmd` (which fills `out`) unless a finished run for the same `what` is there."""
    if (out / ".ready").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _run(cmd, REPO)
    (out / ".ready").write_text("\n".join(what) + "\n")
    return out


def pi_site_packages(cache: Path = CACHE) -> tuple[Path, Path]:
    """The project's dependencies, installed once on the host into a directory the card's
    system Python gets on its path (a .pth file), so the first boot's pip finds every one
    of them installed; and a wheelhouse with the build backend, which pip installs into its
    isolated build environment. Both with the host's pip, whatever index it is set up with."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = project["project"]["dependencies"]
    backend = [*project["build-system"]["requires"], "wheel"]
    pip = [sys.executable, "-m", "pip"]
    site = _once(
        cache / "firstboot" / f"site-{_key(deps)}",
        deps,
        [*pip, "install", "-q", "--target", str(cache / "firstboot" / f"site-{_key(deps)}"), *deps],
    )
    wheels = cache / "firstboot" / f"wheels-{_key(backend)}"
    _once(wheels, backend, [*pip, "wheel", "-q", "--wheel-dir", str(wheels), *backend])
    return site, wheels


def pi_os_debs(cache: Path = CACHE) -> list[Path]:
    """The Pi OS packages the lab root lacks, downloaded once (`apt-get download`)."""
    out = cache / "firstboot" / "debs"
    out.mkdir(parents=True, exist_ok=True)
    if any(not list(out.glob(f"{name}_*.deb")) for name in PI_OS_PACKAGES):
        _run(["apt-get", "download", *PI_OS_PACKAGES], out)
    return [max(out.glob(f"{name}_*.deb")) for name in PI_OS_PACKAGES]


def dpkg_status(deb: Path) -> str:
    """The dpkg status stanza of an installed `deb`: the card's Pi OS has it installed. The
    lab unpacks it with tar instead of dpkg -i, which reads every installed package's file
    list (minutes over 9p under TCG) and cannot meet bluez's udev and kmod dependencies."""
    fields = ("Package", "Version", "Architecture", "Maintainer", "Depends", "Description")
    text = _run(["dpkg-deb", "-f", str(deb), *fields], REPO)
    return "Status: install ok installed\n" + text.rstrip("\n") + "\n\n"


def _unit(description: str, service: str, install: str = "WantedBy=multi-user.target") -> str:
    return f"[Unit]\nDescription={description}\n{service}\n[Install]\n{install}\n"


# Under TCG on a loaded machine a python start takes seconds, so the lab gives the daemon's
# start and watchdog more time than a Pi needs (the unit's own values stay as they are).
SLOW_START = "[Service]\nTimeoutStartSec=600\nWatchdogSec=300\n"


def job(debs: list[Path], site: Path, wheels: Path) -> str:
    """The guest shell: make the card, install into it with --root, hand over to systemd."""
    offline = (
        "[Service]\nEnvironment=PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null "
        f"PIP_FIND_LINKS={GUEST_WHEELS}\nTimeoutStartSec=20min\n"
    )
    report = _unit(
        "Lab: report the first boot and power off",
        "After=savepoint-firstboot.service savepoint.service\n\n[Service]\nType=oneshot\n"
        f"WorkingDirectory={REPO}\nEnvironment=PYTHONPATH={REPO}\n"
        "ExecStart=/usr/bin/python3 -m tests.lab.firstboot --report\n"
        "StandardOutput=journal+console\n",
    )
    lean = " ".join(
        f"/etc/systemd/system/{t}.wants/*" for t in ("multi-user.target", "timers.target")
    )
    # tar keeps /lib -> usr/lib (merged /usr) a symlink; dpkg-deb -x would make it a directory
    unpack = "\n".join(
        f"dpkg-deb --fsys-tarfile {shlex.quote(str(d))} | tar -x --keep-directory-symlink -C /"
        for d in debs
    )
    status = "".join(dpkg_status(d) for d in debs)
    sitedir = "/usr/local/lib/python3.11/dist-packages"
    keep = shlex.quote(str(REPO))  # the lab cache is inside it
    return (
        job_prelude()
        + f"""set -e
up() {{ echo "guest: $1 at $(cut -d' ' -f1 /proc/uptime) s"; }}
# Raspberry Pi OS, as far as the installer and the daemon look: a boot partition's
# config.txt, bluez and pyudev installed, the dependencies on the system's Python path.
mkdir -p /boot/firmware && printf '[all]\\n' > /boot/firmware/config.txt
{unpack}
cat >> /var/lib/dpkg/status <<'EOF'
{status}EOF
# The dependencies and wheels outside /tmp: the daemon's unit has a private /tmp of its own.
mkdir -p {GUEST_SITE} {GUEST_WHEELS}
mount --bind {shlex.quote(str(site))} {GUEST_SITE}
mount --bind {shlex.quote(str(wheels))} {GUEST_WHEELS}
mkdir -p {sitedir} && echo {GUEST_SITE} > {sitedir}/savepoint-lab-deps.pth
rm -f {lean}  # the host's own services (databases, brokers) only slow the boot down
ln -sf /lib/systemd/system/multi-user.target /etc/systemd/system/default.target
# A card's /tmp is empty at boot (systemd-tmpfiles empties it: here that would walk the
# host's over 9p), and it is no container: the host root's marker goes. A checkout or lab
# cache under /tmp (a CI clone, say) stays visible: bound aside first, then back in place.
keep={keep}
case "$keep" in /tmp/*) mkdir -p /run/lab-keep && mount --bind "$keep" /run/lab-keep ;; esac
mount -t tmpfs tmpfs /tmp && rm -f /.dockerenv
case "$keep" in /tmp/*) mkdir -p "$keep" && mount --bind /run/lab-keep "$keep" ;; esac
cd {shlex.quote(str(REPO))}
up "card prepared"
# The card, mounted as on another machine; the installer writes files only.
mkdir -p /mnt/card && mount --bind / /mnt/card
PYTHON=/usr/bin/python3 provisioning/install.sh --root /mnt/card --yes --size {SIZE}
umount /mnt/card
up "installed with --root"
mkdir -p {UNIT_DIR}/savepoint-firstboot.service.d {UNIT_DIR}/savepoint.service.d
cat > {UNIT_DIR}/savepoint-firstboot.service.d/lab-offline.conf <<'EOF'
{offline}EOF
cat > {UNIT_DIR}/savepoint.service.d/lab-slow.conf <<'EOF'
{SLOW_START}EOF
cat > {UNIT_DIR}/savepoint-lab-report.service <<'EOF'
{report}EOF
ln -s {UNIT_DIR}/savepoint-lab-report.service \\
    {UNIT_DIR}/multi-user.target.wants/savepoint-lab-report.service
touch /run/lab-boot-systemd
"""
    )


# -- inside the VM, under systemd -----------------------------------------------------------


def _out(*cmd: str, timeout: float = 60) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{cmd[0]}: {e}"
    return (done.stdout + done.stderr).strip()


def _show(unit: str) -> dict[str, str]:
    props = "ActiveState,SubState,Result,ExecMainStatus,UnitFileState,StatusText"
    text = _out("systemctl", "show", unit, "-p", props)
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _seconds(unit: str) -> float:
    """How long a oneshot's ExecStart ran (monotonic timestamps, in microseconds)."""
    props = "ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic"
    text = _out("systemctl", "show", unit, "-p", props)
    values = [int(line.split("=", 1)[1] or 0) for line in text.splitlines() if "=" in line]
    return round((values[1] - values[0]) / 1e6, 1) if len(values) == 2 else -1.0


def _usb_disks() -> list[str]:
    """Vendor and model of every disk the host side (usb-storage) sees."""
    out = []
    for dev in sorted(Path("/sys/block").glob("sd*")):
        parts = [(dev / "device" / f).read_text().strip() for f in ("vendor", "model")]
        out.append(" ".join(parts))
    return out


def report() -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_ACTIVE
    while _show("savepoint.service").get("ActiveState") in ("activating", "reloading"):
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    status = _out("/usr/local/bin/savepoint", "status", "--json")
    facts: dict[str, Any] = {
        "firstboot": _show("savepoint-firstboot.service"),
        "firstboot_seconds": _seconds("savepoint-firstboot.service"),
        "firstboot_wants_link": Path(
            f"{UNIT_DIR}/multi-user.target.wants/savepoint-firstboot.service"
        ).is_symlink(),
        "daemon": _show("savepoint.service"),
        "venv_savepoint": _out("/opt/savepoint/venv/bin/savepoint", "--version"),
        "man_page": Path("/usr/local/share/man/man1/savepoint.1").is_file(),
        "store_bytes": _size("/var/lib/savepoint/store.img"),
        "status": _json(status),
        "status_text": status,
        "usb_disks": _usb_disks(),
        "uptime": float(Path("/proc/uptime").read_text().split()[0]),
        "failed_units": _out("systemctl", "list-units", "--failed", "--plain", "--no-legend"),
    }
    _out("systemctl", "stop", "savepoint.service", timeout=90)
    facts["daemon_after_stop"] = _show("savepoint.service")
    facts["usb_disks_after_stop"] = _usb_disks()
    return facts


def _size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return -1


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="inside the VM: report, power off")
    args = parser.parse_args()
    if not args.report:
        parser.error("run by savepoint-lab-report.service inside the lab VM (--report)")
    try:
        facts = report()
    finally:
        journal = _out(
            "journalctl", "-b", "--no-pager", "-o", "short-monotonic",
            "-u", "savepoint-firstboot", "-u", "savepoint",
        )  # fmt: skip
        Path("/lab-results/firstboot-journal.log").write_text(journal + "\n")
        Path("/lab-results/systemd-journal.log").write_text(
            _out("journalctl", "-b", "--no-pager", "-o", "short-monotonic") + "\n"
        )
    Path(REPORT).write_text(json.dumps(facts, indent=1) + "\n")
    subprocess.run(["sync"], check=False)
    subprocess.run(["systemctl", "poweroff", "--force"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

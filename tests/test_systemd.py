"""The unit files: `systemd-analyze verify` (no error, no warning), plus the contract the
daemon and the installer rely on. The verify runs on a copy whose ExecStart binary exists
(the real one lives in /opt/savepoint/venv on a Pi); everything else is verified as shipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from provisioning import installer, system

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted(
    p
    for p in (REPO / "systemd").iterdir()
    if p.suffix in (".service", ".socket", ".timer", ".path", ".mount")
)
SERVICE = REPO / "systemd/savepoint.service"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (keys may repeat)."""
    out, section = [], ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(key: str, path: Path = SERVICE) -> list[str]:
    return [v for _, k, v in directives(path) if k == key]


def verify(unit: Path, tmp: Path, dropin: str = "", edit: str = "") -> str:
    """Run systemd-analyze verify on a copy of `unit`; returns its complaints ('' = clean)."""
    text = unit.read_text()
    for exe in {v.split()[0].lstrip("-@!+:") for v in values("ExecStart", unit)}:
        stand_in = tmp / "bin" / Path(exe).name
        stand_in.parent.mkdir(exist_ok=True)
        shutil.copy("/bin/true", stand_in)
        text = text.replace(exe, str(stand_in))
    copy = tmp / unit.name
    copy.write_text(text + edit)
    if dropin:
        (tmp / f"{unit.name}.d").mkdir(exist_ok=True)
        (tmp / f"{unit.name}.d/store.conf").write_text(dropin)
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp}:"}  # trailing ':' keeps the defaults
    res = subprocess.run(
        [ANALYZE, "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    complaints = (res.stdout + res.stderr).strip()
    return complaints or ("" if res.returncode == 0 else f"exit {res.returncode}")


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies_cleanly(unit: Path, tmp_path: Path) -> None:
    assert verify(unit, tmp_path) == ""


@pytest.mark.parametrize(
    "store",
    ["/dev/disk/by-id/usb-Samsung_T7_S5X-0:0", "/var/lib/savepoint/store.img", "/srv/store.img"],
)
def test_unit_with_the_installers_store_dropin_verifies(store: str, tmp_path: Path) -> None:
    dropin = installer._dropin_text(store)
    assert verify(SERVICE, tmp_path, dropin=dropin) == ""


@pytest.mark.parametrize(
    "mistake",
    ["ProtectSystem=stricter", "Bogus=1", "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_NOT_A_CAP"],
)
def test_verify_catches_a_real_mistake(mistake: str, tmp_path: Path) -> None:
    """The check above is not vacuous: a broken unit fails it."""
    complaints = verify(SERVICE, tmp_path, edit=f"\n[Service]\n{mistake}\n")
    if "CAP_NOT_A_CAP" in mistake:  # systemd 252 ignores unknown names silently: our check
        assert unknown_capabilities(["CAP_SYS_ADMIN", "CAP_NOT_A_CAP"]) == ["CAP_NOT_A_CAP"]
    else:
        assert complaints


def unknown_capabilities(names: list[str]) -> list[str]:
    res = subprocess.run([ANALYZE, "capability"], capture_output=True, text=True, check=True)
    known = {line.split()[0].upper() for line in res.stdout.splitlines()[1:] if line.strip()}
    return [n for n in names if n.lstrip("~") not in known]


def test_every_capability_exists_and_says_why() -> None:
    caps = " ".join(values("CapabilityBoundingSet")).split()
    assert caps == ["CAP_SYS_ADMIN"]  # see the comment in the unit for why only this one
    assert unknown_capabilities(caps) == []
    text = SERVICE.read_text()
    for cap in caps:
        assert f"#  {cap} - " in text, f"{cap} needs a comment saying why it remains"


def test_service_contract() -> None:
    one = {k: v for _, k, v in directives(SERVICE)}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"] == (f"{system.SAVEPOINT} daemon --config {installer.CONFIG}")
    assert one["WatchdogSec"] == "30" and one["Restart"] == "on-failure"
    assert {"bluetooth.service", "systemd-modules-load.service"} <= set(
        " ".join(values("After")).split()
    )
    for hard in ("Requires", "Wants", "BindsTo", "Requisite", "PartOf"):
        assert not values(hard), f"{hard}= would make the daemon depend on a part it can lack"
    assert "GPIOZERO_PIN_FACTORY=lgpio" in values("Environment")
    assert one["WorkingDirectory"] == "/var/lib/savepoint"
    assert one["StateDirectory"] == one["RuntimeDirectory"] == "savepoint"
    assert "User" not in one  # root with a one-capability bounding set: see the unit
    assert one["Group"] == system.GROUP
    for key, want in {
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "DevicePolicy": "closed",
    }.items():
        assert one[key] == want, key
    assert {"/var/lib/savepoint", "-/sys/kernel/config"} <= set(values("ReadWritePaths"))
    devices = {v.split()[0] for v in values("DeviceAllow")}
    assert {"block-nbd", "char-ttyGS", "char-gpiochip"} <= devices
    assert int(one["TimeoutStopSec"]) >= 30 and one["KillMode"] == "mixed"
    assert values("WantedBy") == ["multi-user.target"]  # what the installer's symlink mirrors


def test_execstart_command_line_is_one_the_cli_accepts() -> None:
    """`savepoint daemon --config PATH` exists (the lab runs exactly this line)."""
    from appliance.cli import build_parser

    args = build_parser().parse_args(["daemon", "--config", installer.CONFIG])
    assert args.config == installer.CONFIG


def test_modules_file_loads_the_three_modules() -> None:
    lines = (REPO / "systemd/savepoint-modules.conf").read_text().splitlines()
    assert [m for m in lines if m and not m.startswith("#")] == ["libcomposite", "dwc2", "nbd"]

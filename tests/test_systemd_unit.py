"""systemd/savepoint.service's sandbox (issue 15, finding 8): systemd's own exposure score
stays at 3.0 or lower, the system-call filter keeps the mount family out while leaving what
the daemon needs, and the daemon, run inside the same sandbox (rebuilt by the lab's
unit_sandbox), serves NBD and SAVEs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.lab.inside import unit_sandbox
from tests.test_daemon_support import qemu_io

REPO = Path(__file__).resolve().parent.parent
SERVICE = REPO / "systemd/savepoint.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package systemd, in .ci/apt-packages.txt)",
)
MAX_EXPOSURE = 3.0


@needs_analyze
def test_exposure_score_is_at_most_3(tmp_path: Path) -> None:
    copy = tmp_path / SERVICE.name
    shutil.copy(SERVICE, copy)
    res = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert found, res.stdout + res.stderr
    score = float(found.group(1))
    print(f"systemd-analyze security --offline=yes: exposure {score} (was 5.2 before issue 15)")
    assert score <= MAX_EXPOSURE, res.stdout


@needs_analyze
def test_filter_keeps_mounts_and_other_admin_calls_out_and_the_daemons_calls_in() -> None:
    allowed = unit_sandbox.allowed_syscalls(unit_sandbox.settings(SERVICE))
    denied = {
        "mount",
        "umount2",
        "pivot_root",
        "fsopen",
        "fsmount",
        "fsconfig",
        "move_mount",
        "open_tree",
        "mount_setattr",
        "chroot",
        "swapon",
        "reboot",
        "kexec_load",
        "init_module",
        "finit_module",
        "delete_module",
        "bpf",
        "sethostname",
        "settimeofday",
        "ptrace",
        "iopl",
        "acct",
        "quotactl",
        "open_by_handle_at",
        "sched_setscheduler",
        "setrlimit",
        "setuid",
        "setgroups",
    }
    assert denied & allowed == set()
    needed = {
        "ioctl",
        "socket",
        "connect",
        "sendmsg",
        "recvmsg",
        "bind",
        "listen",
        "accept4",
        "chown",
        "fchmod",
        "fallocate",
        "ftruncate",
        "fsync",
        "mmap",
        "munmap",
        "madvise",
        "epoll_wait",
        "clone",
        "execve",
        "wait4",
        "prctl",
        "getrandom",
        "pread64",
        "pwrite64",
        "unshare",
        "setns",
    }  # the last two: refused by RestrictNamespaces
    assert needed - allowed == set()


def test_sandbox_settings() -> None:
    unit = unit_sandbox.settings(SERVICE)
    one = {k: v[-1] for k, v in unit.items()}
    for key, want in {
        "UMask": "0077",
        "StateDirectoryMode": "0700",
        "RestrictNamespaces": "yes",
        "ProtectProc": "invisible",
        "PrivateMounts": "yes",
        "MemoryDenyWriteExecute": "yes",
        "ProtectKernelTunables": "yes",
        "IPAddressDeny": "any",
        "IPAddressAllow": "localhost",
        "SystemCallErrorNumber": "EPERM",
        "SystemCallArchitectures": "native",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
    }.items():
        assert one.get(key) == want, key
    assert unit["SystemCallFilter"][0] == "@system-service"
    assert "~@privileged @resources" in unit["SystemCallFilter"]
    assert unit["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"]
    assert set(one["RestrictAddressFamilies"].split()) == {
        "AF_UNIX",
        "AF_NETLINK",
        "AF_INET",
        "AF_INET6",
    }
    assert "ProcSubset" not in unit  # gpiozero reads /proc/device-tree and /proc/cpuinfo


def _unit_in(name: str) -> str:
    """The unit with its state and runtime directory renamed, so a test run touches no
    installed daemon's files; the group is left out (it may not exist here)."""
    text = SERVICE.read_text().replace("Group=savepoint\n", "")
    return re.sub(
        r"(?m)^(StateDirectory|RuntimeDirectory)=savepoint$", rf"\1={name}", text
    ).replace("/var/lib/savepoint", f"/var/lib/{name}")


@needs_analyze
@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="rebuilding the unit's sandbox needs root (a mount namespace and setpriv)",
)
def test_daemon_serves_and_saves_inside_the_units_sandbox(tmp_path: Path) -> None:
    """seccomp allow list, MemoryDenyWriteExecute, RestrictNamespaces, ProtectSystem=strict,
    UMask: Python, cffi/cryptography and the NBD server work under all of them."""
    name = f"savepoint-test-{uuid.uuid4().hex[:8]}"
    state, runtime = Path(f"/var/lib/{name}"), Path(f"/run/{name}")
    for d in (state, runtime):
        d.mkdir(mode=0o700)
    unit = state / "savepoint.service"  # where the sandbox still sees it
    unit.write_text(_unit_in(name))
    sock, control = runtime / "nbd.sock", runtime / "control.sock"
    argv = [
        str(REPO / ".venv/bin/savepoint")
        if (REPO / ".venv/bin/savepoint").exists()
        else "savepoint",
        "serve",
        str(state / "disk.img"),
        "--size",
        "64M",
        "--socket",
        str(sock),
        "--control",
        str(control),
    ]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        unit_sandbox.command(unit, argv),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        uri = f"nbd+unix:///savepoint?socket={sock}"
        for _ in range(300):
            if control.exists() or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        assert control.exists(), (tmp_path / "serve.log").read_text()
        qemu_io(uri, "write -P 0x3c 0 1M", "read -P 0x3c 0 1M")
        from tests.test_daemon_support import cli

        assert cli("save", control=str(control)).stdout.startswith("SAVE done")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(r"(?m)^Seccomp:\s+2$", status) and re.search(
            r"(?m)^NoNewPrivs:\s+1$", status
        )
        assert (state / "disk.img").stat().st_mode & 0o777 == 0o600
    finally:
        proc.terminate()
        code = proc.wait(30)
        log.close()
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)
    assert code == 0, (tmp_path / "serve.log").read_text()

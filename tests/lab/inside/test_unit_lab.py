"""Issue 8: the daemon run as systemd/savepoint.service runs it, on the real kernel.

The command line, environment, group, working directory and capability bounding set all come
from the unit file itself (setpriv stands in for systemd, which is not PID 1 in the lab). The
daemon must reach READY=1 over $NOTIFY_SOCKET with the gadget up and the host seeing the disk,
ping the watchdog, and on SIGTERM exit 0 with the gadget removed and /dev/nbd0 detached.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from appliance.gadget import Gadget, defaults
from appliance.nbd_device import NbdDevice
from provisioning.edits import render_config
from tests.lab.inside.appliance_vm import RESULTS, host_disk, sh

UNIT = Path(__file__).resolve().parents[3] / "systemd" / "savepoint.service"
VENV_BIN = Path(sys.executable).parent


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def command_line(unit: dict[str, list[str]]) -> list[str]:
    """setpriv + the unit's ExecStart, with the lab's venv in place of /opt/savepoint/venv."""
    exec_start = unit["ExecStart"][0].split()
    exec_start[0] = str(VENV_BIN / Path(exec_start[0]).name)
    caps = ",".join(f"+{c.lower().removeprefix('cap_')}"
                    for c in unit["CapabilityBoundingSet"][0].split())
    return ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--ambient-caps=-all",
            "--no-new-privs", f"--regid={unit['Group'][0]}", "--clear-groups", *exec_start]


class NotifyReader:
    """$NOTIFY_SOCKET as systemd serves it: read all the time, in a thread. Left unread, its
    queue (net.unix.max_dgram_qlen, 10) fills with the daemon's WATCHDOG=1 pings and the
    daemon blocks in sendto() on its way out: "no clean stop", stuck in unix_wait_for_peer."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.closed.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def receive(self, wanted: str, timeout: float, start: int = 0) -> list[str]:
        """The messages from index `start` up to the first that contains `wanted`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.messages[start:]
            for n, message in enumerate(seen):
                if wanted in message.splitlines():
                    return seen[:n + 1]
            time.sleep(0.05)
        raise AssertionError(f"no {wanted} from the daemon in {timeout:g} s; "
                             f"got {self.messages[start:]}")

    def close(self) -> None:
        self.closed.set()
        self.thread.join(5)
        self.sock.close()


def stacks(pid: int) -> str:
    """Kernel stacks of the daemon's threads and the processes it started (lab runs as root)."""
    out = [sh("ps -eo pid,ppid,stat,wchan:24,args --forest", check=False).stdout]
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        with contextlib.suppress(OSError):
            out.append(f"-- task {task.name} ({(task / 'comm').read_text().strip()}):\n"
                       f"{(task / 'stack').read_text()}")
    return "\n".join(out)


def test_daemon_as_its_systemd_unit_runs_it(tmp_path: Path) -> None:
    unit = unit_settings()
    sh("getent group savepoint >/dev/null || groupadd --system savepoint")
    state, runtime = Path("/var/lib/savepoint"), Path("/run/savepoint")
    for d in (state, runtime):  # StateDirectory= and RuntimeDirectory= (0750, group savepoint)
        d.mkdir(parents=True, exist_ok=True)
        shutil.chown(d, group="savepoint")
        d.chmod(0o750)
    store = state / "store.img"
    sh(f"{VENV_BIN / 'savepoint'} init {store} --size 32M --force")
    Path("/etc/savepoint").mkdir(exist_ok=True)
    Path("/etc/savepoint/config.toml").write_text(render_config(str(store)))

    notify_path = str(tmp_path / "notify.sock")
    notify = NotifyReader(notify_path)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LANG": "C.UTF-8", "NOTIFY_SOCKET": notify_path,
           "WATCHDOG_USEC": str(int(unit["WatchdogSec"][0]) * 1_000_000),
           "RUNTIME_DIRECTORY": str(runtime), "STATE_DIRECTORY": str(state)}
    env.update(dict(e.split("=", 1) for e in unit.get("Environment", [])))
    log = open(RESULTS / "daemon-unit.log", "wb")
    proc = subprocess.Popen(command_line(unit), cwd=unit["WorkingDirectory"][0], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # systemd passes the main PID for the watchdog; setpriv execs, so it is proc.pid.
        seen = notify.receive("READY=1", float(unit["TimeoutStartSec"][0]))
        assert any(line.startswith("STATUS=") for m in seen for line in m.splitlines())
        assert Path("/sys/kernel/config/usb_gadget/savepoint/UDC").read_text().strip()
        disk = host_disk("disk")
        assert int(Path(f"/sys/block/{Path(disk).name}/size").read_text()) * 512 == 32 << 20
        status = subprocess.run([str(VENV_BIN / "savepoint"), "status", "--json"],
                                capture_output=True, text=True, timeout=120)
        assert '"locked"' in status.stdout, status.stdout + status.stderr  # LOCKED at boot
        notify.receive("WATCHDOG=1", 60, start=len(notify.messages))

        proc.send_signal(signal.SIGTERM)
        # TCG runs this kernel ~10x slower than a Pi: allow 3x the unit's TimeoutStopSec.
        try:
            assert proc.wait(3 * float(unit["TimeoutStopSec"][0])) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no clean stop; where it hangs:\n{stacks(proc.pid)}") from None
        assert not Path("/sys/kernel/config/usb_gadget/savepoint").exists()
        assert not Path("/sys/block/nbd0/pid").exists(), "/dev/nbd0 still attached after stop"
        assert not os.path.exists(runtime / "control.sock")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
        notify.close()
        NbdDevice("/dev/nbd0", str(runtime / "nbd.sock")).detach()  # whatever a failure left
        Gadget(defaults()).remove()

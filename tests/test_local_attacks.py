"""A local user on the appliance as the adversary, against a real `savepoint` daemon: idle
connections by the thousand, a watcher that never reads, a member of the `savepoint` group
trying to UNLOCK, a runtime directory made by someone else. docs/security.md points here.

The role tests need a second uid and throwaway groups; they are made with groupadd/useradd
and removed afterwards, so they run only as root (as CI does)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import resource
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from appliance import runtime_dirs
from appliance.control.client import ControlClient
from tests.test_daemon import start_daemon, write_config
from tests.test_daemon_support import SAVEPOINT, env, pattern_matches, qemu_io, short_dir

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to create a throwaway user and groups"
)


@pytest.fixture
def daemon() -> Iterator:
    procs: list[tuple[subprocess.Popen, str]] = []

    def make(control_keys: str = "") -> tuple[subprocess.Popen, str]:
        """A daemon whose [control] section also has `control_keys`."""
        d = short_dir()
        config = write_config(d)
        with open(config) as f:
            text = f.read().replace("[control]\n", "[control]\n" + control_keys)
        with open(config, "w") as f:
            f.write(text)
        proc = start_daemon(d, config)
        procs.append((proc, d))
        return proc, d

    yield make
    for proc, d in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            shutil.rmtree(d, ignore_errors=True)


def timed_status(control: str, bound: float = 1.0) -> float:
    t0 = time.monotonic()
    with ControlClient(control, timeout=bound + 4) as client:
        reply = client.request("status")
    took = time.monotonic() - t0
    assert reply["ok"], reply
    assert took < bound, f"STATUS took {took:.2f} s"
    return took


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_thousand_idle_clients_cannot_starve_others(daemon) -> None:
    proc, d = daemon()
    control = os.path.join(d, "c.sock")
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))  # what systemd allows
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), max(hard, 4096)))
    idle = []
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX)
            s.connect(control)  # and never say anything
            idle.append(s)
        time.sleep(0.5)
        took = timed_status(control)
        fds = open_fds(proc.pid)
        with ControlClient(control, timeout=5) as client:
            st = client.request("status")["data"]["control"]
        print(
            f"\n1,000 idle clients: STATUS in {took * 1000:.0f} ms, daemon holds {fds} fds; "
            f"control: {st}"
        )
        assert fds < 100 and st["clients"] <= 32 and st["evicted"] >= 1000 - 32
        uri = f"nbd+unix:///savepoint?socket={d}/nbd.sock"
        qemu_io(uri, "write -P 7 0 64k")  # NBD still gets its descriptors
        assert pattern_matches(uri, 0, 65536, 7)
        closed = idle[0].recv(4096)  # the first idle one was told why it was closed
        assert b"control socket is full and this connection was idle" in closed
    finally:
        for s in idle:
            s.close()


def test_idle_request_clients_are_closed(daemon) -> None:
    _, d = daemon("idle_timeout = 1\n")
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(os.path.join(d, "c.sock"))
        s.settimeout(5)
        t0 = time.monotonic()
        note = s.recv(4096)
        assert b"closed: no request for 1 s" in note and s.recv(4096) == b""
        assert 0.8 < time.monotonic() - t0 < 5


def test_a_watcher_that_never_reads_is_dropped_and_the_bus_goes_on(daemon) -> None:
    proc, d = daemon("watch_stall = 1\n")
    control = os.path.join(d, "c.sock")
    with socket.socket(socket.AF_UNIX) as watcher:
        watcher.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        watcher.connect(control)
        watcher.sendall(b'{"cmd": "watch"}\n')  # then never read
        t0, worst = time.monotonic(), 0.0
        with ControlClient(control, timeout=10) as client:
            while time.monotonic() - t0 < 15:
                for _ in range(50):  # each one publishes an event with the status in it
                    assert client.request("lock")["ok"]
                worst = max(worst, timed_status(control))
                if client.request("status")["data"]["control"]["watchers_dropped"]:
                    break
            st = client.request("status")["data"]["control"]
        print(
            f"\nslow watcher dropped after {time.monotonic() - t0:.1f} s; slowest STATUS "
            f"meanwhile {worst * 1000:.0f} ms; RSS "
            f"{_rss_mib(proc.pid):.1f} MiB"
        )
        assert st["watchers_dropped"] == 1 and st["watchers"] == 0
    with open(os.path.join(d, "log")) as f:
        assert "dropped a watcher" in f.read()


def test_the_client_cap_refuses_with_a_reason(daemon) -> None:
    _, d = daemon("max_clients = 2\nmax_watchers = 2\n")
    control = os.path.join(d, "c.sock")
    watchers = [ControlClient(control, timeout=5) for _ in range(2)]
    try:
        for w in watchers:  # watchers are busy, not idle: nobody can be closed for room
            assert w.request("watch")["ok"]
        with ControlClient(control, timeout=5) as extra:
            reply = extra.read()
        assert not reply["ok"] and "too many control clients (2 connected" in reply["reason"]
    finally:
        for w in watchers:
            w.close()


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024


# -- roles: a member of the socket's group is a reader, not an admin --------------------------
class Throwaway:
    """A user and two groups that exist only for one test."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.reader, self.admin, self.user = f"spr-{tag}", f"spa-{tag}", f"spu-{tag}"
        self.other = f"spo-{tag}"
        for group in (self.reader, self.admin):
            subprocess.run(["groupadd", group], check=True)
        for user in (self.user, self.other):
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", user], check=True)
        self.uid = pwd.getpwnam(self.user).pw_uid
        self.other_uid = pwd.getpwnam(self.other).pw_uid

    def gid(self, group: str) -> int:
        return grp.getgrnam(group).gr_gid

    def run(
        self, args: list[str], groups: list[str], uid: int | None = None, **kw: object
    ) -> subprocess.CompletedProcess[str]:
        e = env()
        e.pop("XDG_RUNTIME_DIR", None)
        e["HOME"] = "/tmp"
        gids = ",".join(str(self.gid(g)) for g in groups) or None
        priv = [
            "setpriv",
            f"--reuid={uid or self.uid}",
            "--regid=65534",
            f"--groups={gids}" if gids else "--clear-groups",
        ]
        return subprocess.run(
            [*priv, *SAVEPOINT, *args], capture_output=True, text=True, env=e, timeout=60, **kw
        )  # type: ignore[call-overload]

    def remove(self) -> None:
        for user in (self.user, self.other):
            subprocess.run(["userdel", user], check=False)
        for group in (self.reader, self.admin):
            subprocess.run(["groupdel", group], check=False)


@pytest.fixture
def throwaway() -> Iterator[Throwaway]:
    t = Throwaway()
    try:
        yield t
    finally:
        t.remove()


@needs_root
def test_a_group_member_may_read_but_not_unlock(daemon, throwaway: Throwaway) -> None:
    _, d = daemon(f'group = "{throwaway.reader}"\nadmin_group = "{throwaway.admin}"\n')
    os.chmod(d, 0o755)  # the test's socket folder; /run/savepoint is 0750 root:savepoint
    control = os.path.join(d, "c.sock")
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o660

    def cli(*args: str, groups: tuple[str, ...] = (throwaway.reader,)):
        return throwaway.run([*args, "--control", control], list(groups))

    for read in (("status",), ("history",), ("fobs", "list")):
        proc = cli(*read)
        assert proc.returncode == 0 or "BLE is off" in proc.stderr, proc.stderr
    for write in (
        ("unlock",),
        ("save",),
        ("restore", "--yes"),
        ("lock",),
        ("pair",),
        ("fobs", "revoke", "1"),
    ):
        proc = cli(*write)
        assert proc.returncode == 1, (write, proc.stdout)
        assert f"needs root or the `{throwaway.admin}` group" in proc.stderr, proc.stderr
    with ControlClient(control) as client:
        st = client.request("status")["data"]
    assert st["mode"] == "locked" and st["control"]["denied"] == 6
    no_group = cli("status", groups=())
    assert no_group.returncode == 1 and "permission denied" in no_group.stderr
    admin = cli("unlock", groups=(throwaway.reader, throwaway.admin))
    assert admin.returncode == 0 and admin.stdout.startswith("UNLOCKED"), admin.stderr


@needs_root
def test_watch_is_for_readers_too(daemon, throwaway: Throwaway) -> None:
    _, d = daemon(f'group = "{throwaway.reader}"\n')
    os.chmod(d, 0o755)
    control = os.path.join(d, "c.sock")
    e = env()
    gid = throwaway.gid(throwaway.reader)
    watcher = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={throwaway.uid}",
            "--regid=65534",
            f"--groups={gid}",
            *SAVEPOINT,
            "watch",
            "--json",
            "--control",
            control,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=e,
    )
    try:
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())
        assert first["event"] == "state"
    finally:
        watcher.kill()
        watcher.wait()


# -- a runtime directory somebody else made ------------------------------------------------
@needs_root
def test_a_spoofed_runtime_dir_is_refused_by_cli_and_daemon(throwaway: Throwaway) -> None:
    spoof = f"/tmp/savepoint-{throwaway.uid}"  # where the victim's sockets go without XDG
    shutil.rmtree(spoof, ignore_errors=True)
    os.mkdir(spoof, 0o755)
    os.chown(spoof, throwaway.other_uid, -1)  # another user got there first
    heard: list[bytes] = []
    fake = socket.socket(socket.AF_UNIX)
    fake.bind(os.path.join(spoof, "control.sock"))
    os.chmod(os.path.join(spoof, "control.sock"), 0o777)
    fake.listen()
    fake.settimeout(15)

    def answer_ok() -> None:  # the spoofer says yes to everything
        try:
            conn, _ = fake.accept()
            heard.append(conn.recv(4096))
            conn.sendall(b'{"ok": true, "reason": "", "data": {"epoch": 1}}\n')
            conn.close()
        except OSError:
            pass

    listener = threading.Thread(target=answer_ok, daemon=True)
    listener.start()
    work = short_dir()
    os.chown(work, throwaway.uid, -1)
    try:
        save = throwaway.run(["save"], [])
        assert save.returncode == 1 and not heard
        assert f"refusing to talk to {spoof}/control.sock" in save.stderr
        assert f"belongs to uid {throwaway.other_uid}, not to uid {throwaway.uid}" in save.stderr
        serve = throwaway.run(["serve", f"{work}/disk.img", "--size", "16M"], [])
        assert serve.returncode == 1 and "runtime directory" in serve.stderr, serve.stderr
        assert "another user may have made it" in serve.stderr
        # without the spoof the daemon makes the directory itself, private
        fake.close()
        shutil.rmtree(spoof)
        _serve_once_as(throwaway, work)
    finally:
        fake.close()
        listener.join(1)
        shutil.rmtree(spoof, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _serve_once_as(throwaway: Throwaway, work: str) -> None:
    e = env()
    e.pop("XDG_RUNTIME_DIR", None)
    proc = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={throwaway.uid}",
            "--regid=65534",
            "--clear-groups",
            *SAVEPOINT,
            "serve",
            f"{work}/disk.img",
            "--size",
            "16M",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline()]
        while lines[-1] and not lines[-1].startswith("Stop with Ctrl-C."):
            lines.append(proc.stdout.readline())
        assert lines[-1].startswith("Stop with Ctrl-C."), lines
        folder = f"/tmp/savepoint-{throwaway.uid}"
        st = os.lstat(folder)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == throwaway.uid
        status = throwaway.run(["status", "--json"], [])
        assert status.returncode == 0 and json.loads(status.stdout)["ok"], status.stderr
        own = throwaway.run(["save"], [])  # the daemon's own user is its admin
        assert own.returncode == 0 and own.stdout.startswith("SAVE done"), own.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(f"/tmp/savepoint-{throwaway.uid}", ignore_errors=True)


@pytest.mark.parametrize("kind", ["symlink", "group-writable", "other-writable", "file"])
def test_an_unsafe_runtime_dir_is_refused_with_the_reason(tmp_path, kind: str) -> None:
    path = str(tmp_path / "savepoint")
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    if kind == "symlink":
        os.symlink(real, path)
    elif kind == "file":
        open(path, "w").close()
    else:
        os.mkdir(path)
        os.chmod(path, 0o770 if kind == "group-writable" else 0o707)
    reason = {
        "symlink": "is a symlink",
        "group-writable": "is writable by group",
        "other-writable": "is writable by others",
        "file": "is not a directory",
    }[kind]
    with pytest.raises(runtime_dirs.UnsafeDir, match=reason):
        runtime_dirs.prepare(path)
    with pytest.raises(runtime_dirs.UnsafeDir, match=reason):
        runtime_dirs.check_client(path)


def test_a_missing_runtime_dir_is_made_private(tmp_path) -> None:
    runtime_dirs.prepare(str(tmp_path / "mine"))
    assert stat.S_IMODE(os.stat(tmp_path / "mine").st_mode) == 0o700
    gid = os.getegid()
    runtime_dirs.prepare(str(tmp_path / "shared"), gid)
    st = os.stat(tmp_path / "shared")
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_gid == gid
    runtime_dirs.prepare(str(tmp_path / "mine"))  # ours already: fine

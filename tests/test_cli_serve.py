"""`savepoint serve` end to end as a subprocess, driven by qemu-io and the CLI."""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import time

import pytest

from tests.test_daemon_support import (
    SAVEPOINT,
    Served,
    cli,
    env,
    pattern_matches,
    qemu_io,
    request,
    status,
)


@pytest.fixture
def served(tmp_path):
    s = Served(str(tmp_path / "disk.img"))
    yield s
    s.cleanup()


def test_write_save_write_restore_reads_the_saved_data(served):
    assert served.uri in served.banner
    assert f"nbdinfo '{served.uri}'" in served.banner
    assert "qemu-system-x86_64" in served.banner
    qemu_io(served.uri, "write -P 0xA1 0 1M")
    out = cli("save", control=served.control).stdout
    assert out.startswith("SAVE done")
    qemu_io(served.uri, "write -P 0xB2 0 1M", "write -P 0xB2 32M 4k")
    before = status(served.control)
    assert before["dirty_units"] == 257 and before["dirty_bytes"] == 257 * 4096
    cli("restore", "--yes", control=served.control)
    assert pattern_matches(served.uri, 0, 1 << 20, 0xA1)
    assert pattern_matches(served.uri, 32 << 20, 4096, 0)
    hist = json.loads(cli("history", "--json", control=served.control).stdout)["data"]
    assert [(r["action"], r["source"], r["units"]) for r in hist["history"]] == [
        ("save", "cli", 256),
        ("restore", "cli", 257),
    ]
    assert served.stop() == 0
    assert "stopped: store flushed and closed" in served.stderr()
    assert not os.path.exists(served.control) and not os.path.exists(served.nbd)


def test_restart_keeps_saved_data_and_offline_history(tmp_path):
    disk = str(tmp_path / "disk.img")
    first = Served(disk)
    try:
        qemu_io(first.uri, "write -P 0xC3 4096 8k")
        cli("save", control=first.control)
        assert first.stop() == 0
    finally:
        first.cleanup()
    offline = subprocess.run(
        [*SAVEPOINT, "history", disk], capture_output=True, text=True, env=env(), timeout=30
    )
    assert offline.returncode == 0 and "save" in offline.stdout and "cli" in offline.stdout
    as_json = subprocess.run(
        [*SAVEPOINT, "history", disk, "--json"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=30,
    )
    reply = json.loads(as_json.stdout)  # the daemon's reply shape: one parser reads both
    assert reply["ok"] and [(r["action"], r["source"]) for r in reply["data"]["history"]] == [
        ("save", "cli")
    ]
    second = Served(disk, size=None)
    try:
        assert pattern_matches(second.uri, 4096, 8192, 0xC3)
        assert status(second.control)["epoch"] == 2
    finally:
        assert second.stop() == 0
        second.cleanup()


def test_status_shows_mode_gauge_and_parts(served):
    qemu_io(served.uri, "write -P 1 0 64k")
    out = cli("status", control=served.control).stdout
    assert "UNLOCKED (lock mode off: SAVE needs no unlock)" in out
    assert "16 units, 64.0 KiB" in out and "of 64.0 MiB" in out
    assert "part nbd     up" in out and "part gadget  off" in out
    assert "of 32.0 MiB budget" in out and "hits" in out  # the map cache
    st = status(served.control)
    assert st["nbd_uris"] == [served.uri] and st["parts"]["nbd"]["state"] == "up"


def test_map_cache_budget_from_the_command_line(tmp_path):
    s = Served(str(tmp_path / "disk.img"), "--map-cache", "8M")
    try:
        assert "of 8.0 MiB budget" in cli("status", control=s.control).stdout
    finally:
        s.cleanup()
    proc = subprocess.run(
        [*SAVEPOINT, "serve", str(tmp_path / "y.img"), "--size", "1G", "--map-cache", "1K"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=30,
    )
    assert proc.returncode != 0 and "--map_cache" not in proc.stderr
    assert "--map-cache" in proc.stderr and "too small" in proc.stderr
    assert not (tmp_path / "y.img").exists()


def test_restore_on_a_terminal_asks_first(served):
    qemu_io(served.uri, "write -P 7 0 4k")
    main, sub = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*SAVEPOINT, "restore", "--control", served.control],
            stdin=sub,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env(),
            text=True,
        )
        os.write(main, b"n\n")
        out, err = proc.communicate(timeout=30)
    finally:
        os.close(main)
        os.close(sub)
    assert proc.returncode == 1 and "cancelled" in err
    assert "Discard 1 unsaved units" in out
    assert pattern_matches(served.uri, 0, 4096, 7)  # nothing changed


def test_errors_are_one_line_and_non_zero(served, tmp_path):
    nobody = os.path.join(served.dir, "none.sock")
    proc = cli("status", control=nobody, check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "no savepoint daemon" in proc.stderr
    proc = subprocess.run(
        [*SAVEPOINT, "serve", str(tmp_path / "new.img")],
        capture_output=True,
        text=True,
        env=env(),
        timeout=30,
    )
    assert proc.returncode != 0 and "--size" in proc.stderr
    assert not (tmp_path / "new.img").exists()
    proc = subprocess.run(
        [*SAVEPOINT, "serve", str(tmp_path / "x.img"), "--size", "1G", "--tcp", "nowhere"],
        capture_output=True,
        text=True,
        env=env(),
    )
    assert proc.returncode != 0 and "HOST:PORT" in proc.stderr
    proc = cli("history", "--limit", "0", control=served.control, check=False)
    assert proc.returncode == 2 and "--limit 0: give a positive number" in proc.stderr


def test_control_path_from_environment(served):
    e = env()
    e["SAVEPOINT_CONTROL"] = served.control
    proc = subprocess.run(
        [*SAVEPOINT, "status", "--json"], capture_output=True, text=True, env=e, timeout=30
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True


def test_watch_prints_live_events(served):
    watcher = subprocess.Popen(
        [*SAVEPOINT, "watch", "--json", "--control", served.control],
        stdout=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        assert watcher.stdout is not None
        first = json.loads(watcher.stdout.readline())  # subscribed: the current state
        assert first["event"] == "state" and first["data"]["epoch"] == 1
        cli("save", control=served.control)
        events = []
        while not events or events[-1]["event"] != "state":
            event = json.loads(watcher.stdout.readline())
            if event["event"] != "status":  # the CLI's own polled changes, not the daemon's
                events.append(event)
        while events[-1]["data"].get("saving"):  # the SAVE waits for a quiet host first
            events.append(json.loads(watcher.stdout.readline()))
            while events[-1]["event"] != "state":
                event = json.loads(watcher.stdout.readline())
                if event["event"] != "status":
                    events.append(event)
        phases = [e["data"]["phase"] for e in events if e["event"] == "progress"]
        assert phases[0] == "start" and phases[-1] == "end", phases
        assert [e["event"] for e in events][-2:] == ["outcome", "state"]
        assert events[-2]["data"]["action"] == "save" and events[-2]["data"]["ok"]
        assert events[-1]["data"]["epoch"] == 2
    finally:
        watcher.send_signal(signal.SIGINT)
        watcher.wait(10)
        watcher.stdout.close()


def test_sigint_stops_cleanly(served):
    qemu_io(served.uri, "write -P 9 0 4k")
    assert served.stop(signal.SIGINT) == 0


def test_background_pass_runs_while_idle(served):
    qemu_io(served.uri, "write -P 1 0 2M", "flush")
    assert request(served.control, "save")["ok"]
    qemu_io(served.uri, "write -P 2 0 1M", "flush")  # units whose map bit is now out of date
    assert request(served.control, "restore")["ok"]
    deadline = time.monotonic() + 20
    while (st := status(served.control))["pending_units"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert st["pending_units"] == 0 and st["background_progress"] == 1.0
    assert pattern_matches(served.uri, 0, 2 << 20, 1)


def test_lock_unlock_and_pair_from_the_cli(served):
    assert cli("lock", control=served.control).stdout.strip() == "LOCKED"
    refused = cli("save", control=served.control, check=False)
    assert refused.returncode == 1 and "LOCKED" in refused.stderr
    assert refused.stderr.count("\n") == 1
    assert cli("unlock", control=served.control).stdout.startswith("UNLOCKED")
    assert cli("save", control=served.control).returncode == 0
    paired = cli("pair", control=served.control, check=False)  # serve runs without BLE
    assert paired.returncode == 1 and "no fob can pair: BLE is off" in paired.stderr
    assert status(served.control)["pairing"]["open"] is True

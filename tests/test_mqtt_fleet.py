"""A room of 20 appliances (`savepoint serve --config`) on one mosquitto: one RESTORE on the
group topic brings every store back; prints the time from publish to the last reply."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.mqtt_broker import MISSING, Broker, Client, mosquitto_installed, write_secrets
from tests.test_daemon_support import Served, pattern_matches, qemu_io, status

pytestmark = pytest.mark.skipif(not mosquitto_installed(), reason=MISSING)

FLEET = 20


class Appliance(Served):
    """Served, but started without waiting, so 20 start side by side."""

    def __init__(self, target: str, conf: str) -> None:
        import os

        from tests.test_daemon_support import SAVEPOINT, env, short_dir

        self.dir = short_dir()
        self.nbd = os.path.join(self.dir, "nbd.sock")
        self.control = os.path.join(self.dir, "c.sock")
        self.uri = f"nbd+unix:///savepoint?socket={self.nbd}"
        self.log_path = os.path.join(self.dir, "stderr.log")
        self.log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *SAVEPOINT,
                "serve",
                target,
                "--size",
                "8M",
                "--socket",
                self.nbd,
                "--control",
                self.control,
                "--config",
                conf,
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env(),
        )

    def ready(self) -> None:
        self.banner = self._wait_ready(120)


def test_one_group_restore_restores_a_room_of_20(tmp_path):
    t_start = time.monotonic()
    nodes = {f"lab{i:02d}": f"secret-{i}" for i in range(FLEET)}
    broker = Broker(tmp_path / "broker", nodes)
    room: dict[str, Appliance] = {}
    admin = None
    try:
        for node, password in nodes.items():
            secrets = write_secrets(tmp_path / f"{node}.secrets", node, password)
            conf = tmp_path / f"{node}.toml"
            conf.write_text(f"""
[mqtt]
enabled = true
broker = "{broker.url}"
ca_file = "{broker.pki["ca.pem"]}"
secrets = "{secrets}"
node_id = "{node}"
groups = ["room-101"]
discovery = false
""")
            room[node] = Appliance(str(tmp_path / f"{node}.img"), str(conf))
        admin = Client(broker)
        for node, appliance in room.items():
            appliance.ready()
            admin.wait(f"savepoint/{node}/availability", lambda p: p == b"online", timeout=60)
        t_up = time.monotonic()
        for appliance in room.values():
            qemu_io(appliance.uri, "write -P 42 0 8k")
        t0 = time.monotonic()
        admin.publish(
            "savepoint/group/room-101/cmd", json.dumps({"id": "morning", "action": "restore"})
        )
        replies = {}
        for node in room:
            reply = admin.wait_reply(node, "morning", timeout=60)
            replies[node] = (reply, time.monotonic())
        last = max(t for _r, t in replies.values())
        print(
            f"\n{FLEET} appliances up in {t_up - t_start:.1f} s; group RESTORE: "
            f"{(last - t0) * 1000:.0f} ms from publish to the last of {len(replies)} replies"
        )
        assert all(r["ok"] and r["via"] == "mqtt:room-101" for r, _t in replies.values())
        for node, appliance in room.items():
            st = status(appliance.control)
            assert st["epoch"] == 2 and st["dirty_bytes"] == 0, (node, st)
            assert pattern_matches(appliance.uri, 0, 8192, 0), node  # the write is gone
    finally:
        if admin is not None:
            admin.close()
        for appliance in room.values():
            if appliance.proc.poll() is None:
                appliance.proc.terminate()
        for appliance in room.values():
            appliance.cleanup()
        broker.stop()

"""The [mqtt] section, the secrets file, the request grammar, the policy cell and the Home
Assistant discovery payloads, without a broker."""

from __future__ import annotations

import json
import os

import pytest

from appliance.config import ConfigError, validate
from appliance.control.commands import Action, Command, Mode
from appliance.control.policy import decide, default_policy
from mqtt import discovery, settings
from mqtt.messages import RateLimit, RequestError, Topics, parse_request, status_payload


def test_a_secrets_file_others_can_read_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "secrets.toml"
    path.write_text('username = "pi1"\npassword = "hunter2"\n')
    path.chmod(0o644)
    with pytest.raises(settings.SecretsError) as e:
        settings.read_secrets(str(path))
    assert "mode 0644" in str(e.value) and f"chmod 600 {path}" in str(e.value)
    path.chmod(0o640)
    with pytest.raises(settings.SecretsError, match="mode 0640"):
        settings.read_secrets(str(path))
    path.chmod(0o600)
    assert settings.read_secrets(str(path)) == ("pi1", "hunter2")


def test_secrets_file_symlink_missing_and_junk(tmp_path):
    real = tmp_path / "real.toml"
    real.write_text('username = "a"\n')
    real.chmod(0o600)
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    with pytest.raises(settings.SecretsError, match="symlink"):
        settings.read_secrets(str(link))
    with pytest.raises(settings.SecretsError, match="does not exist"):
        settings.read_secrets(str(tmp_path / "none.toml"))
    real.write_text('username = "a"\ntoken = "x"\n')
    with pytest.raises(settings.SecretsError, match="only username and password"):
        settings.read_secrets(str(real))
    assert settings.read_secrets("") == (None, None)


def test_broker_urls():
    assert settings.parse_broker("mqtts://broker.example.org") == settings.Broker(
        "broker.example.org", 8883, True
    )
    assert settings.parse_broker("mqtt://127.0.0.1:1884").port == 1884
    with pytest.raises(ValueError, match="in clear"):
        settings.parse_broker("mqtt://broker.example.org")
    with pytest.raises(ValueError, match="secrets"):
        settings.parse_broker("mqtts://user:pw@broker.example.org")
    with pytest.raises(ValueError, match="mqtts://HOST"):
        settings.parse_broker("http://broker.example.org")


def test_the_config_checks_the_mqtt_section():
    base = {"store": {"path": "/tmp/x"}}
    cfg = validate({**base, "mqtt": {"enabled": True, "broker": "mqtts://b", "groups": ["r1"]}})
    assert cfg["parts"]["mqtt"]["groups"] == ["r1"] and cfg["parts"]["mqtt"]["max_payload"] == 4096
    for bad, words in (
        ({"groups": ["room 1"]}, "groups"),
        ({"node_id": "group"}, "node_id"),
        ({"topic_prefix": "a/#"}, "topic_prefix"),
        ({"max_payload": 10}, "max"),
        ({"broker": "mqtt://10.0.0.1"}, "in clear"),
        ({"bogus": 1}, "unknown"),
    ):
        with pytest.raises(ConfigError, match=words):
            validate({**base, "mqtt": {"enabled": True, **bad}})


def test_the_part_takes_its_settings_instance_and_a_bad_one_fails_its_start():
    """The daemon hands the part the validated MqttSettings (no table in between); a section
    that would not have passed the loader still fails the part's start, with the key."""
    from appliance.control.commands import PartUnavailable
    from appliance.parts import PartContext
    from mqtt.spec import SPEC
    from tests.support import RecordingBus, run

    given = settings.MqttSettings(node_id="pi7", topic_prefix="lab/site", rate=0.5, burst=3)
    part = SPEC.make(given, PartContext(RecordingBus(), "/nonexistent/nbd.sock"))
    assert part.cfg is given
    assert part.topics.command == "lab/site/pi7/cmd" and part.limit.rate == 0.5
    assert part.limit.burst == 3
    bad = SPEC.make(
        settings.MqttSettings(broker="mqtts://b", node_id="a/b"),
        PartContext(RecordingBus(), "/nonexistent/nbd.sock"),
    )
    with pytest.raises(PartUnavailable, match="node_id 'a/b'"):
        run(bad.start())


def test_policy_mqtt_may_restore_and_lock_save_only_unlocked_never_unlock():
    table = default_policy()

    def reason(action, mode=Mode.LOCKED):
        return decide(table, Command(action, source="mqtt:room-101"), mode)

    for action in (Action.STATUS, Action.HISTORY, Action.LOCK, Action.RESTORE):
        assert reason(action) == ""
    assert "LOCKED" in reason(Action.SAVE) and reason(Action.SAVE, Mode.UNLOCKED) == ""
    assert reason(Action.UNLOCK) and reason(Action.UNLOCK, Mode.UNLOCKED)
    assert reason(Action.PAIR)
    table["mqtt"]["unlock"] = "always"  # a table built in code cannot open it either
    assert "can never unlock" in reason(Action.UNLOCK)
    with pytest.raises(ConfigError, match="only a person's gesture may unlock"):
        validate({"store": {"path": "/x"}, "policy": {"mqtt": {"unlock": "always"}}})


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"x" * 5000, "5000 bytes; at most 4096"),
        (b"\xff\xfe", "not UTF-8"),
        (b"{nope", "not JSON"),
        (b"[" * 4000, "nested too deeply"),
        (b'["status"]', "JSON object"),
        (b'{"action": "status"}', "request id"),
        (b'{"id": "' + b"i" * 65 + b'", "action": "status"}', "request id"),
        (b'{"id": "1", "action": "format"}', "unknown action 'format'"),
        (b'{"id": "1", "action": "status", "sudo": true}', "unknown field"),
        (b'{"id": "1", "action": "history", "args": {"limit": 10000}}', "limit"),
        (b'{"id": "1", "action": "restore", "args": {"force": true}}', "takes no args"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(payload, words):
    with pytest.raises(RequestError) as e:
        parse_request(payload, 4096)
    assert words in e.value.reason


def test_good_requests():
    assert parse_request(b'{"id": "a1", "action": "restore"}', 4096) == ("a1", Action.RESTORE, {})
    assert parse_request(b'{"id": "h", "action": "history"}', 4096)[2] == {"limit": 20}


def test_rate_limit_allows_a_burst_then_the_rate():
    now = [0.0]
    limit = RateLimit(2, 5, lambda: now[0])
    assert [limit.take() for _ in range(7)] == [True] * 5 + [False] * 2
    now[0] += 1.0
    assert [limit.take() for _ in range(3)] == [True, True, False]


def test_status_payload_names_faults_and_times():
    snap = {
        "mode": "locked",
        "epoch": 3,
        "dirty_bytes": 8192,
        "dirty_units": 2,
        "last_save": 1_700_000_000.0,
        "host_connected": True,
        "parts": {
            "gpio": {"state": "failed", "reason": "no GPIO chip found"},
            "nbd": {"state": "up"},
        },
    }
    doc = status_payload(snap, "pi1", {})
    assert doc["last_save"] == "2023-11-14T22:13:20+00:00" and doc["last_restore"] is None
    assert doc["faults"] == [{"part": "gpio", "reason": "no GPIO chip found", "hint": ""}]
    assert doc["unsaved_bytes"] == 8192 and doc["unsaved_units"] == 2


def test_discovery_is_one_device_with_sensors_binary_sensors_and_buttons():
    topics = Topics("savepoint", "pi1")
    cfgs = discovery.configs(topics, "Lab PC 1", "homeassistant")
    assert sorted(cfgs) == sorted(
        f"homeassistant/{c}/savepoint_pi1/{k}/config"
        for k, c in (
            ("mode", "sensor"),
            ("unsaved", "sensor"),
            ("last_save", "sensor"),
            ("host", "binary_sensor"),
            ("fault", "binary_sensor"),
            ("save", "button"),
            ("restore", "button"),
            ("lock", "button"),
        )
    )
    devices = {json.dumps(c["device"], sort_keys=True) for c in cfgs.values()}
    assert len(devices) == 1 and '"Lab PC 1"' in devices.pop()
    for cfg in cfgs.values():
        assert cfg["availability_topic"] == "savepoint/pi1/availability"
        assert cfg["unique_id"].startswith("savepoint_pi1_")
    press = json.loads(cfgs["homeassistant/button/savepoint_pi1/restore/config"]["payload_press"])
    assert parse_request(json.dumps(press).encode(), 4096)[1] is Action.RESTORE
    assert (
        cfgs["homeassistant/sensor/savepoint_pi1/last_save/config"]["device_class"] == "timestamp"
    )


def test_node_id_defaults_to_the_hostname(monkeypatch):
    monkeypatch.setattr(settings.socket, "gethostname", lambda: "lab pc.example.org")
    assert settings.node_id(settings.MqttSettings()) == "lab-pc"
    assert os.path.basename(settings.node_id(settings.MqttSettings(node_id="x"))) == "x"


def test_serve_config_takes_part_sections_but_not_the_store():
    from appliance.config import serve_config

    extra = {
        "mqtt": {"enabled": True, "broker": "mqtts://b", "node_id": "vm1"},
        "lock": {"enabled": True},
        "nbd": {"max_connections": 2},
    }
    cfg = serve_config("/tmp/d.img", 1 << 20, 4096, "/tmp/n.sock", None, False, None, extra=extra)
    assert cfg["parts"]["mqtt"]["node_id"] == "vm1" and cfg["parts"]["mqtt"]["rate"] == 2.0
    assert cfg["lock"]["enabled"] is True and cfg["nbd"]["max_connections"] == 2
    assert cfg["nbd"]["socket"] == "/tmp/n.sock" and cfg["store"]["path"] == "/tmp/d.img"
    assert (
        serve_config("/tmp/d.img", None, 4096, None, None, False, None)["lock"]["enabled"] is False
    )
    with pytest.raises(ConfigError, match=r"\[store\] comes from the command line"):
        serve_config(
            "/tmp/d.img",
            None,
            4096,
            None,
            None,
            False,
            None,
            extra={"store": {"path": "/elsewhere"}},
        )
    with pytest.raises(ConfigError, match="max_payload"):
        serve_config(
            "/tmp/d.img", None, 4096, None, None, False, None, extra={"mqtt": {"max_payload": 1}}
        )


def test_serve_config_file_errors_are_one_line(tmp_path):
    import subprocess

    from tests.test_daemon_support import SAVEPOINT, env

    bad = tmp_path / "bad.toml"
    bad.write_text("[mqtt\n")
    for conf, words in ((tmp_path / "none.toml", "No such file"), (bad, "not valid TOML")):
        proc = subprocess.run(
            [*SAVEPOINT, "serve", str(tmp_path / "d.img"), "--size", "1M", "--config", str(conf)],
            capture_output=True,
            text=True,
            env=env(),
            timeout=60,
        )
        assert proc.returncode != 0 and words in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1

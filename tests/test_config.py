"""Config validation: precise messages, defaults filled in, docs/config.md lists every key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance.config import (
    PARTS,
    ConfigError,
    load,
    part_settings,
    serve_config,
    validate,
)
from appliance.config_docs import markdown_tables
from appliance.config_sections import CORE_SECTIONS, parse_size
from appliance.settings import NoSettings

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def test_defaults():
    cfg = validate({})
    assert cfg["lock"] == {"enabled": True, "relock_after": 300, "single_use": True}
    assert cfg["restore"] == {"policy": ["never"], "at": "03:00"}
    assert cfg["store"]["unit"] == 4096
    assert cfg["save"] == {"settle": 2, "max_wait": 60}
    assert all(not cfg["parts"][p]["enabled"] for p in PARTS)
    assert cfg["policy"]["host"]["save"] == "unlocked"


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"lock": {"relock_aftr": 5}}, "[lock] unknown key 'relock_aftr'"),
        ({"lock": {"relock_after": "5"}}, "[lock] relock_after: expected an integer or a number"),
        ({"lock": {"enabled": 1}}, "[lock] enabled: expected true/false, got an integer 1"),
        ({"store": {"unit": "3K"}}, "[store] unit: 3072 is not a power of two"),
        ({"store": {"unit": "2M"}}, "between 4K and 1M"),
        ({"store": {"size": "lots"}}, "[store] size: size 'lots' is not a size"),
        ({"restore": {"policy": "sometimes"}}, "[restore] policy: unknown policy 'sometimes'"),
        ({"restore": {"policy": ["never", "on_boot"]}}, "cannot be combined"),
        ({"restore": {"at": "25:00"}}, "[restore] at: time '25:00' is not HH:MM"),
        ({"nbd": {"tcp": "localhost"}}, "[nbd] tcp: 'localhost' is not HOST:PORT"),
        ({"log": {"level": "loud"}}, "[log] level"),
        ({"save": {"settle": -1}}, "[save] settle: -1 is not a number of seconds from 0 to 600"),
        ({"save": {"max_wait": 3601}}, "[save] max_wait: 3601 is not a number of seconds"),
        ({"bogus": {}}, "unknown section [bogus]"),
        ({"policy": {"martians": {}}}, "[policy] unknown source class 'martians'"),
        ({"policy": {"host": {"explode": "always"}}}, "[policy.host] unknown action 'explode'"),
        ({"policy": {"host": {"save": "sometimes"}}}, "rule 'sometimes' is not one of"),
        ({"gpio": {"enabled": "yes"}}, "[gpio] enabled: expected true/false"),
        ({"gpio": {"enabled": True, "button_pin": 99}}, "bad pin 99"),
        ({"gpio": {"enabled": True, "led_pin": "PIN7"}}, "bad pin 'PIN7'"),
        ({"gadget": {"enabled": True, "udcc": "x"}}, "[gadget] unknown key 'udcc'"),
        ({"ble": {"enabled": True, "name": "Savepoint1"}}, "[ble] name 'Savepoint1' does not fit"),
        (
            {
                "ble": {
                    "enabled": True,
                    "itags": [{"address": "AA:BB:CC:DD:EE:FF", "action": "restore"}],
                }
            },
            "[ble] itags[0]: action 'restore' is not allowed",
        ),
    ],
)
def test_precise_errors(raw, message):
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert message in str(err.value)


def test_policy_override_keeps_other_cells():
    cfg = validate({"policy": {"commodity": {"restore": "unlocked"}}})
    assert cfg["policy"]["commodity"]["restore"] == "unlocked"
    assert cfg["policy"]["commodity"]["unlock"] == "never"


def test_restore_policy_list_and_sizes():
    cfg = validate(
        {
            "restore": {"policy": ["on_boot", "schedule"], "at": "3:30"},
            "store": {"size": "1G", "unit": "64K"},
        }
    )
    assert cfg["restore"]["policy"] == ["on_boot", "schedule"]
    assert (cfg["store"]["size"], cfg["store"]["unit"]) == (1 << 30, 65536)


@pytest.mark.parametrize(
    "text,value",
    [
        ("1G", 1 << 30),
        ("512M", 512 << 20),
        ("4K", 4096),
        ("4KiB", 4096),
        ("65536", 65536),
        (" 2 g ", 2 << 30),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_load_reports_file_and_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[lock\nrelock_after = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(bad))
    good = tmp_path / "good.toml"
    good.write_text('[lock]\nrelock_after = 60\n[restore]\npolicy = "on_boot"\n')
    cfg = load(str(good))
    assert cfg["lock"]["relock_after"] == 60 and cfg["restore"]["policy"] == ["on_boot"]


def test_serve_config_is_store_and_nbd_only():
    cfg = serve_config("/tmp/d.img", 1 << 20, 4096, None, "127.0.0.1:0", False, None)
    assert cfg["store"]["create"] and cfg["store"]["size"] == 1 << 20
    assert not any(cfg["parts"][p]["enabled"] for p in PARTS)
    assert cfg["nbd"]["tcp"] == "127.0.0.1:0"


def test_docs_list_every_key_with_its_default():
    text = DOCS.read_text()
    generated = markdown_tables()
    assert generated in text, (
        "docs/config.md is out of date with the config schemas: "
        "run `python -m appliance.config --docs`"
    )
    for section, cls in CORE_SECTIONS.items():
        body = re.search(rf"^## \[{section}\]\n(.*?)(?=^## |\Z)", generated, re.M | re.S)
        assert body, section
        for key in cls.defaults():
            assert re.search(rf"^\| `{key}` \| .* \| `", body.group(1), re.M), (section, key)
    for name in PARTS:
        for key in (part_settings(name) or NoSettings).defaults():
            assert f"| `{key}` |" in generated, (name, key)


def test_default_socket_paths(monkeypatch):
    from appliance import runtime_dirs

    monkeypatch.delenv("SAVEPOINT_CONTROL", raising=False)
    monkeypatch.setattr(runtime_dirs.os, "geteuid", lambda: 0)
    assert runtime_dirs.default_control_path() == "/run/savepoint/control.sock"
    assert runtime_dirs.default_nbd_path() == "/run/savepoint/nbd.sock"
    monkeypatch.setattr(runtime_dirs.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert runtime_dirs.default_control_path() == "/run/user/1000/savepoint/control.sock"
    assert runtime_dirs.default_nbd_path() == "/run/user/1000/savepoint/nbd.sock"
    monkeypatch.setenv("SAVEPOINT_CONTROL", "/elsewhere/c.sock")
    assert runtime_dirs.default_control_path() == "/elsewhere/c.sock"


def test_the_cli_finds_its_own_daemon_then_the_system_daemon(tmp_path, monkeypatch) -> None:
    """A `savepoint` group member (not root) reaches the installed daemon in /run/savepoint."""
    from appliance import runtime_dirs

    monkeypatch.setattr(runtime_dirs.os, "geteuid", lambda: 1000)
    monkeypatch.delenv("SAVEPOINT_CONTROL", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    monkeypatch.setattr(runtime_dirs, "SYSTEM_RUNTIME_DIR", str(tmp_path / "run"))
    own = tmp_path / "xdg" / "savepoint" / "control.sock"
    system = tmp_path / "run" / "control.sock"
    assert runtime_dirs.find_control_path() == str(own)  # nothing runs: the error names our own
    system.parent.mkdir()
    system.touch()
    assert runtime_dirs.find_control_path() == str(system)
    own.parent.mkdir(parents=True)
    own.touch()
    assert runtime_dirs.find_control_path() == str(own)  # `savepoint serve` of this user wins
    monkeypatch.setenv("SAVEPOINT_CONTROL", str(tmp_path / "mine.sock"))
    assert runtime_dirs.find_control_path() == str(tmp_path / "mine.sock")


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"serial": {"enabled": True, "queue": 0}}, "[serial] queue: 0 must be at least 1"),
        ({"serial": {"enabled": True, "source": "cli"}}, "[serial] source: 'cli' must be \"host\""),
        (
            {"serial": {"enabled": True, "output_buffer": 100}},
            "[serial] output_buffer: 100 must be",
        ),
        ({"control": {"max_clients": 0}}, "[control] max_clients: must be more than 0"),
        ({"control": {"idle_timeout": -1}}, "[control] idle_timeout: must be more than 0"),
        ({"control": {"max_clients": 4, "max_watchers": 5}}, "max_watchers: cannot be more than"),
    ],
)
def test_channel_bounds_are_checked(raw, message):
    with pytest.raises(ConfigError) as e:
        validate(raw)
    assert message in str(e.value)


def test_every_key_has_a_toml_type_and_a_meaning() -> None:
    """The settings dataclasses are the schema: a key without a doc or with a type TOML cannot
    give would reach docs/config.md (or the loader) broken."""
    from dataclasses import fields

    from appliance.settings import accepted_types, doc_of

    sections = {**CORE_SECTIONS, **{p: part_settings(p) or NoSettings for p in PARTS}}
    for name, cls in sections.items():
        kinds = accepted_types(cls)
        for f in fields(cls):
            assert doc_of(f), (name, f.name)
            assert set(kinds[f.name]) <= {str, int, float, bool, list, dict}, (name, f.name)


def test_a_part_gets_its_own_copy_of_list_defaults() -> None:
    a = validate({"mqtt": {"enabled": True}})["parts"]["mqtt"]
    b = validate({"mqtt": {"enabled": True}})["parts"]["mqtt"]
    a["groups"].append("changed")
    assert b["groups"] == []


def test_a_part_receives_its_section_as_its_settings_instance() -> None:
    from appliance.config import part_config
    from appliance.parts import load_spec
    from appliance.usb.host_serial import SerialSettings

    table = validate({"serial": {"enabled": True, "queue": 4}})["parts"]["serial"]
    table.pop("enabled")
    settings = part_config(load_spec("serial"), table)
    assert settings == SerialSettings(queue=4) and settings.device == "/dev/ttyGS0"
    with pytest.raises(ConfigError, match=r"\[serial\] queue: expected an integer"):
        part_config(load_spec("serial"), {"queue": "4"})

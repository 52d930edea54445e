"""The daemon's configuration: TOML read with tomllib, validated before anything starts.

Every section is a dataclass whose fields carry a type, a default and a one-line doc (the
core sections below, and each part's `config_type` in its PartSpec, appliance/parts.py; how
to declare one: appliance/settings.py); one loader (`_build`) checks every section against its
fields, and docs/config.md lists them all. Validation errors say which key, what is wrong and
what to do, and the daemon refuses to start.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from appliance.control.policy import ACTIONS, GESTURE_CLASSES, RULES, SOURCE_CLASSES, default_policy
from appliance.parts import PartSpec, all_parts, load_spec
from appliance.settings import NoSettings, Settings, accepted_types, setting

S = TypeVar("S", bound=Settings)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the fix."""


def parse_size(text: str | int) -> int:
    """'1G', '512M', '4K', '4KiB', '65536' -> bytes (appliance.sizes: the one size parser)."""
    from appliance.sizes import parse_size as parse

    return parse(text)


def parse_hostport(text: str) -> tuple[str, int]:
    """'127.0.0.1:10809', 'localhost:10809', '[::1]:10809' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:10809")
    return host, int(port)


def _hhmm(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ValueError(f'time {text!r} is not HH:MM in 24-hour local time, e.g. "03:00"')
    return int(m.group(1)), int(m.group(2))


MIN_MAP_CACHE = 64 << 10  # 16 map pages: a request spanning a few never thrashes

RESTORE_POLICIES = ("never", "on_boot", "on_host_disconnect", "schedule")


# The sections the daemon itself owns. Part sections come from the parts' specs.
@dataclass(frozen=True)
class StoreSettings(Settings):
    path: str = setting("", "backing file or block device holding the store (required)")
    create: bool = setting(False, "create the store at start-up when `path` holds none")
    size: str | int = setting("", 'disk size for `create`, e.g. "8G" (files only)')
    unit: str | int = setting("4K", "unit size for `create`: a power of two, 4K to 1M")
    allow_overcommit: bool = setting(
        False,
        "let `create` make a store file that can outgrow "
        "the free space of its file system (it is sparse)",
    )
    background: bool = setting(True, "run the map normaliser while the disk is idle")
    map_cache: str | int = setting(
        "32M",
        "RAM for the unit map, whatever the disk size (at "
        "least 64K): map pages beyond it are dropped, least recently "
        "used first, changed ones parked (docs/config.md: how to choose)",
    )


@dataclass(frozen=True)
class NbdSettings(Settings):
    socket: str = setting("", "NBD Unix socket; empty = <runtime dir>/nbd.sock")
    tcp: str = setting("", "also listen on HOST:PORT (loopback unless allow_remote)")
    allow_remote: bool = setting(False, "allow a non-loopback TCP address (no TLS: no auth)")
    group: str = setting(
        "",
        "socket mode 0660 for this group (raw access to the whole disk: "
        "keep it empty, root only, on the appliance); empty = 0600",
    )
    export_name: str = setting("savepoint", "NBD export name")
    max_connections: int = setting(
        8, "NBD connections at once; more are closed at once (the kernel client uses 1, nbdcopy 4)"
    )


@dataclass(frozen=True)
class ControlSettings(Settings):
    socket: str = setting("", "control socket; empty = <runtime dir>/control.sock")
    group: str = setting(
        "savepoint",
        "socket mode 0660 for this group when it exists, else "
        "0600; members may only read (status, history, watch)",
    )
    admin_group: str = setting(
        "savepoint-admin",
        "members may also SAVE, RESTORE, UNLOCK, "
        "LOCK, PAIR and manage fobs (as root and the daemon's own user "
        "always may)",
    )
    max_clients: int = setting(
        32,
        "connected clients at most (a non-admin user: half of "
        "them); when full the longest-idle client of the busiest user "
        "is closed, else the new one refused",
    )
    max_watchers: int = setting(8, "`watch` clients at most (counted in max_clients)")
    idle_timeout: float = setting(60, "seconds a client may wait before sending a request")
    watch_stall: float = setting(
        10, "seconds a `watch` client may leave its events unread before it is dropped"
    )


@dataclass(frozen=True)
class LockSettings(Settings):
    enabled: bool = setting(True, "start LOCKED and re-lock when idle; false: always UNLOCKED")
    relock_after: float = setting(
        300,
        "seconds an UNLOCK lasts, from the gesture; no command "
        "extends it; 0 = until LOCK or a SAVE",
    )
    single_use: bool = setting(True, "a SAVE re-locks: every SAVE needs its own UNLOCK gesture")


@dataclass(frozen=True)
class SaveSettings(Settings):
    settle: float = setting(
        2,
        "seconds the host must have written nothing before a SAVE "
        "commits; 0 = commit at once (docs/controls.md)",
    )
    max_wait: float = setting(
        60,
        "seconds a SAVE waits at most for a quiet host; then it "
        "commits anyway and its history record says the host was busy "
        "(at most 600)",
    )


@dataclass(frozen=True)
class RestoreSettings(Settings):
    policy: str | list[str] = setting(
        "never", "never, on_boot, on_host_disconnect, schedule, or a list"
    )
    at: str = setting("03:00", "local time of day for the `schedule` policy, HH:MM")


@dataclass(frozen=True)
class LogSettings(Settings):
    level: str = setting("info", "debug, info, warning or error")


CORE_SECTIONS: dict[str, type[Settings]] = {
    "store": StoreSettings,
    "nbd": NbdSettings,
    "control": ControlSettings,
    "lock": LockSettings,
    "save": SaveSettings,
    "restore": RestoreSettings,
    "log": LogSettings,
}

# Optional parts: each declares its section in its PartSpec (appliance/parts.py).
PARTS = all_parts()
PART_ENABLED_DOC = "start this part"


def part_settings(section: str) -> type[Settings] | None:
    """The part's settings class, or None when its module is not installed/importable."""
    spec = _spec_of(section)
    return spec.config_type if spec is not None else None


def _spec_of(section: str) -> PartSpec[Any] | None:
    try:
        return load_spec(section)
    except Exception:  # a broken or missing part must not stop the daemon; start reports it
        return None


def _check_type(where: str, value: Any, types: tuple[type, ...]) -> None:
    if float in types and int not in types:
        i = types.index(float)
        types = (*types[:i], int, *types[i:])  # a float takes an int: "an integer or a number"
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = object in types or isinstance(value, types)
    if not ok:
        names = " or ".join(type_name(t) for t in types)
        raise ConfigError(f"{where}: expected {names}, got {type_name(type(value))} {value!r}")


def type_name(t: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true/false",
        list: "a list",
        dict: "a table",
    }.get(t, t.__name__)


def _build(section: str, given: Any, cls: type[S], extra: tuple[str, ...] = ()) -> S:
    """The one loader: a section's table checked against its settings class (unknown keys,
    types), the defaults filled in by the dataclass itself."""
    if not isinstance(given, dict):
        raise ConfigError(f"[{section}] must be a table, got {given!r}")
    kinds = accepted_types(cls)
    body: dict[str, Any] = {}
    for key, value in given.items():
        if key in extra:
            continue
        if key not in kinds:
            known = ", ".join(sorted([*kinds, *extra]))
            raise ConfigError(f"[{section}] unknown key {key!r} (known keys: {known})")
        _check_type(f"[{section}] {key}", value, kinds[key])
        body[key] = value
    return cls(**body)


def part_config(spec: PartSpec[S], table: dict[str, Any]) -> S:
    """A part's validated section (a table, without `enabled`) as its settings instance."""
    return _build(spec.name, table, spec.config_type)


def _check_store(store: dict[str, Any]) -> None:
    for key in ("size", "unit"):
        if store[key] == "":
            continue
        try:
            store[key] = parse_size(store[key])
        except ValueError as e:
            raise ConfigError(f"[store] {key}: {e}") from None
    try:
        store["map_cache"] = parse_size(store["map_cache"])
    except ValueError as e:
        raise ConfigError(f"[store] map_cache: {e}") from None
    if store["map_cache"] < MIN_MAP_CACHE:
        raise ConfigError(
            f"[store] map_cache: {store['map_cache']} bytes is too small for "
            'the map to work in; give at least "64K" ("32M" suits any '
            "Raspberry Pi)"
        )
    unit = store["unit"]
    if unit & (unit - 1) or not 4096 <= unit <= 1 << 20:
        raise ConfigError(
            f'[store] unit: {unit} is not a power of two between 4K and 1M (e.g. "4K", "64K")'
        )


def _check_restore(restore: dict[str, Any]) -> None:
    policies = restore["policy"]
    policies = [policies] if isinstance(policies, str) else policies
    for p in policies:
        if p not in RESTORE_POLICIES:
            raise ConfigError(
                f"[restore] policy: unknown policy {p!r} "
                f"(choose from {', '.join(RESTORE_POLICIES)})"
            )
    if "never" in policies and len(policies) > 1:
        raise ConfigError('[restore] policy: "never" cannot be combined with other policies')
    restore["policy"] = list(policies)
    try:
        _hhmm(restore["at"])
    except ValueError as e:
        raise ConfigError(f"[restore] at: {e}") from None


def _check_policy(given: Any) -> dict[str, dict[str, str]]:
    table = default_policy()
    if given is None:
        return table
    if not isinstance(given, dict):
        raise ConfigError("[policy] must be a table of source classes")
    for cls, rules in given.items():
        if cls not in SOURCE_CLASSES:
            raise ConfigError(
                f"[policy] unknown source class {cls!r} (known: {', '.join(SOURCE_CLASSES)})"
            )
        if not isinstance(rules, dict):
            raise ConfigError(f"[policy.{cls}] must be a table of action = rule")
        for action, rule in rules.items():
            if action not in ACTIONS:
                raise ConfigError(
                    f"[policy.{cls}] unknown action {action!r} (known: {', '.join(ACTIONS)})"
                )
            if rule not in RULES:
                raise ConfigError(
                    f"[policy.{cls}] {action}: rule {rule!r} is not one of {', '.join(RULES)}"
                )
            if action == "unlock" and rule != "never" and cls not in GESTURE_CLASSES:
                raise ConfigError(
                    f"[policy.{cls}] unlock: only a person's gesture may unlock "
                    f'({", ".join(GESTURE_CLASSES)}); {cls} stays "never"'
                )
            table[cls][action] = rule
    return table


def validate(
    raw: dict[str, Any], settings_for: Callable[[str], type[Settings] | None] = part_settings
) -> dict[str, Any]:
    """Check a parsed TOML document and return it with every default filled in: each
    section a plain table (`Settings.as_dict()`), the parts' under "parts"."""
    known = [*CORE_SECTIONS, *PARTS, "policy"]
    for section in raw:
        if section not in known:
            raise ConfigError(f"unknown section [{section}] (known: {', '.join(known)})")
    cfg: dict[str, Any] = {}
    for section, cls in CORE_SECTIONS.items():
        cfg[section] = _build(section, raw.get(section, {}), cls).as_dict()
    _check_store(cfg["store"])
    _check_restore(cfg["restore"])
    if cfg["log"]["level"] not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"[log] level: {cfg['log']['level']!r} is not one of debug, info, warning, error"
        )
    for key in ("relock_after",):
        if cfg["lock"][key] < 0:
            raise ConfigError(f"[lock] {key}: must be 0 (never) or a number of seconds")
    for key in ("settle", "max_wait"):
        if not 0 <= cfg["save"][key] <= 600:
            raise ConfigError(
                f"[save] {key}: {cfg['save'][key]} is not a number of seconds from 0 to 600"
            )
    if cfg["nbd"]["max_connections"] < 1:
        raise ConfigError(
            f"[nbd] max_connections: {cfg['nbd']['max_connections']} is less than "
            "1: give how many NBD clients may connect at once, e.g. 8"
        )
    for key in ("max_clients", "max_watchers", "idle_timeout", "watch_stall"):
        if cfg["control"][key] <= 0:
            raise ConfigError(f"[control] {key}: must be more than 0")
    if cfg["control"]["max_watchers"] > cfg["control"]["max_clients"]:
        raise ConfigError("[control] max_watchers: cannot be more than max_clients")
    if cfg["nbd"]["tcp"]:
        try:
            parse_hostport(cfg["nbd"]["tcp"])
        except ValueError as e:
            raise ConfigError(f"[nbd] tcp: {e}") from None
    cfg["policy"] = _check_policy(raw.get("policy"))
    cfg["parts"] = {}
    for section in PARTS:
        cfg["parts"][section] = _part_section(section, raw.get(section, {}), settings_for)
    return cfg


def _part_section(
    section: str, given: Any, settings_for: Callable[[str], type[Settings] | None]
) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise ConfigError(f"[{section}] must be a table, got {given!r}")
    enabled = given.get("enabled", False)
    _check_type(f"[{section}] enabled", enabled, (bool,))
    if not given:
        return {"enabled": False}
    cls = settings_for(section)
    if cls is None:  # module missing: keep the keys; starting the part reports why
        body = {k: v for k, v in given.items() if k != "enabled"}
    else:
        body = _build(section, given, cls, extra=("enabled",)).as_dict()
        for key, value in body.items():
            if key.endswith("_pin") or key.endswith("_pins"):
                _check_pins(section, key, value)
        spec = _spec_of(section)
        validator = spec.validate if spec is not None else None
        if validator is not None:  # e.g. gpio checks pin numbers ("bad pin")
            try:
                validator(body)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"[{section}] {e}") from None
    body["enabled"] = enabled
    return body


def _check_pins(section: str, key: str, value: Any) -> None:
    """Pins are BCM numbers 0-53 or gpiozero names ("GPIO17"); "" means not wired."""
    for pin in value if isinstance(value, list) else [value]:
        if pin == "" or (
            isinstance(pin, str)
            and re.fullmatch(r"(GPIO|BCM|BOARD|WPI)\d{1,2}|J8:\d{1,2}", pin, re.IGNORECASE)
        ):
            continue
        if isinstance(pin, int) and not isinstance(pin, bool) and 0 <= pin <= 53:
            continue
        raise ConfigError(
            f"[{section}] {key}: bad pin {pin!r}: use a BCM number such as 17 "
            'or a name such as "GPIO17"'
        )


def load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (write one from docs/config.md)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    try:
        return validate(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


SYSTEM_RUNTIME_DIR = "/run/savepoint"  # the installed daemon's (systemd RuntimeDirectory)


def runtime_dir() -> str:
    """Where sockets live: /run/savepoint for root, $XDG_RUNTIME_DIR/savepoint otherwise."""
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/savepoint-{os.geteuid()}"
    return os.path.join(base, "savepoint") if "XDG_RUNTIME_DIR" in os.environ else base


def default_control_path() -> str:
    return os.environ.get("SAVEPOINT_CONTROL") or os.path.join(runtime_dir(), "control.sock")


def find_control_path() -> str:
    """The control socket a CLI command talks to: SAVEPOINT_CONTROL, else this user's own
    daemon, else the system daemon's (/run/savepoint, open to the `savepoint` group)."""
    own = default_control_path()
    if "SAVEPOINT_CONTROL" in os.environ or os.path.exists(own):
        return own
    system = os.path.join(SYSTEM_RUNTIME_DIR, "control.sock")
    return system if os.path.exists(system) else own


def default_nbd_path() -> str:
    return os.path.join(runtime_dir(), "nbd.sock")


def serve_config(
    target: str,
    size: int | None,
    unit: int,
    socket: str | None,
    tcp: str | None,
    allow_remote: bool,
    control: str | None,
    max_connections: int | None = None,
    allow_overcommit: bool = False,
    map_cache: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config `savepoint serve` runs: store + NBD + control socket, and whatever else
    `extra` (a parsed `serve --config` file: parts, [lock], [policy]...) adds; the command
    line wins over it, and the store always comes from the command line."""
    raw: dict[str, Any] = {
        k: dict(v) if isinstance(v, dict) else v for k, v in (extra or {}).items()
    }
    if "store" in raw:
        raise ConfigError(
            "[store] comes from the command line in `savepoint serve`: remove "
            "it (or run `savepoint daemon --config`)"
        )
    for section in ("nbd", "control", "lock"):
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"[{section}] must be a table")
    raw["store"] = {
        "path": target,
        "create": True,
        "unit": unit,
        "allow_overcommit": allow_overcommit,
    }
    if map_cache is not None:
        raw["store"]["map_cache"] = map_cache
    given = {
        ("nbd", "socket"): socket,
        ("nbd", "tcp"): tcp,
        ("nbd", "allow_remote"): allow_remote or None,
        ("control", "socket"): control,
        ("nbd", "max_connections"): max_connections,
    }
    for (section, key), value in given.items():
        if value is not None:
            raw[section][key] = value
    raw["lock"].setdefault("enabled", False)  # a developer's own disk: SAVE needs no gesture
    if size is not None:
        raw["store"]["size"] = size
    parts = set(extra or {}) & set(PARTS)  # import only the parts the file names
    return validate(raw, settings_for=lambda s: part_settings(s) if s in parts else NoSettings)


if __name__ == "__main__":
    from appliance.config_docs import main

    main()

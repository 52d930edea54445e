"""The daemon's configuration: TOML read with tomllib, validated before anything starts.

Every section is a dataclass whose fields carry a type, a default and a one-line doc (the
core sections in appliance/config_sections.py, and each part's `config_type` in its PartSpec,
appliance/parts.py; how to declare one: appliance/settings.py); one loader (`_build`) checks
every section against its fields, and docs/config.md lists them all. Validation errors say
which key, what is wrong and what to do, and the daemon refuses to start.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from typing import Any, TypeVar

from appliance.config_sections import CORE_SECTIONS, ConfigError, check_core, check_policy
from appliance.parts import PartSpec, all_parts, load_spec
from appliance.settings import NoSettings, Settings, accepted_types

S = TypeVar("S", bound=Settings)


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
    check_core(cfg)
    cfg["policy"] = check_policy(raw.get("policy"))
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

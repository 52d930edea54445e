"""The daemon's own config sections ([store], [nbd], [control], [lock], [save], [restore],
[log], [policy]): their settings dataclasses and the checks their field types cannot express.
A part's section is declared by its spec instead (appliance/parts.py); appliance/config.py
loads both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from appliance.control.policy import ACTIONS, GESTURE_CLASSES, RULES, SOURCE_CLASSES, default_policy
from appliance.settings import Settings, setting


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

    def policies(self) -> list[str]:
        """The policy as a list (the config may give one name)."""
        return [self.policy] if isinstance(self.policy, str) else list(self.policy)


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


@dataclass(frozen=True)
class CoreConfig:
    """The daemon's own sections, typed: what `validate()` returns as checked tables, as their
    dataclasses (the daemon reads attributes, and mypy checks them)."""

    store: StoreSettings
    nbd: NbdSettings
    control: ControlSettings
    lock: LockSettings
    save: SaveSettings
    restore: RestoreSettings
    log: LogSettings

    @classmethod
    def of(cls, cfg: dict[str, Any]) -> CoreConfig:
        """From a config `validate()` returned (its core sections are complete and checked)."""
        return cls(
            store=StoreSettings(**cfg["store"]),
            nbd=NbdSettings(**cfg["nbd"]),
            control=ControlSettings(**cfg["control"]),
            lock=LockSettings(**cfg["lock"]),
            save=SaveSettings(**cfg["save"]),
            restore=RestoreSettings(**cfg["restore"]),
            log=LogSettings(**cfg["log"]),
        )


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


def check_policy(given: Any) -> dict[str, dict[str, str]]:
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


def check_core(cfg: dict[str, Any]) -> None:
    """The checks across a core section's keys that its field types cannot express; sizes and
    the restore policy are normalised in place (a size string becomes bytes)."""
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

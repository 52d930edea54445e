"""The `[mqtt]` section: its settings dataclass, its checks, the secrets file and the TLS context.

The broker is `mqtts://HOST[:PORT]` (TLS, port 8883 by default); plain `mqtt://` is only
accepted for a loopback broker, since the password and every command would cross the
network in clear. The username and password live in a separate TOML file that must be
mode 0600 and belong to the daemon's user: a secrets file others can read is refused.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import stat
import tomllib
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from appliance.settings import Settings, setting


@dataclass(frozen=True)
class MqttSettings(Settings):
    """The [mqtt] section: the broker, its credentials, topics and limits."""

    broker: str = setting("", "mqtts://HOST[:PORT] (TLS); mqtt:// only for a loopback broker")
    ca_file: str = setting(
        "", "CA certificate(s) the broker's certificate must chain to; empty = the system's CAs"
    )
    client_cert: str = setting("", "client certificate (PEM) for brokers that want one")
    client_key: str = setting("", "its private key (PEM); empty = in client_cert")
    secrets: str = setting(
        "",
        "TOML file with username and password (mode 0600, owned by the "
        "daemon's user); empty = no password",
    )
    node_id: str = setting("", "this appliance's name in topics, [A-Za-z0-9_-]; empty = hostname")
    name: str = setting("", "the name Home Assistant shows; empty = node_id")
    groups: list[Any] = setting(
        [], 'group names whose command topic this appliance obeys too, e.g. ["room-101"]'
    )
    topic_prefix: str = setting("savepoint", "first level of every topic")
    discovery: bool = setting(
        True, "publish Home Assistant discovery; false clears what an earlier run published"
    )
    discovery_prefix: str = setting("homeassistant", "Home Assistant's discovery prefix")
    status_interval: float = setting(
        1.0, "least seconds between two status messages (changes in between go out together)"
    )
    poll_interval: float = setting(
        5.0, "seconds between checks for changes no event announces (unsaved data growing)"
    )
    max_payload: int = setting(4096, "bytes a command may have; longer ones get an error reply")
    rate: float = setting(2.0, "commands per second accepted on average")
    burst: int = setting(10, "commands accepted at once before `rate` applies")
    keepalive: int = setting(30, "seconds between MQTT keepalive pings")
    reconnect_max: float = setting(
        60.0, "longest wait between reconnection attempts (the wait doubles from 1 s)"
    )


NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,32}(/[A-Za-z0-9_-]{1,32}){0,3}")


@dataclass(frozen=True)
class Broker:
    host: str
    port: int
    tls: bool


def validate_config(cfg: MqttSettings | dict[str, Any]) -> None:
    """The checks the config loader and start-up share; ValueError names the key."""
    c = MqttSettings.of(cfg)
    if c.broker:
        parse_broker(c.broker)
    if c.node_id and (not NAME_RE.fullmatch(c.node_id) or c.node_id == "group"):
        raise ValueError(
            f"node_id {c.node_id!r}: use 1-32 of A-Z a-z 0-9 _ - "
            '(not "group": group topics use that level)'
        )
    for group in c.groups:
        if not isinstance(group, str) or not NAME_RE.fullmatch(group):
            raise ValueError(f"groups: {group!r} is not a name of 1-32 of A-Z a-z 0-9 _ -")
    for key, prefix in (("topic_prefix", c.topic_prefix), ("discovery_prefix", c.discovery_prefix)):
        if not PREFIX_RE.fullmatch(prefix):
            raise ValueError(
                f"{key} {prefix!r}: use up to 4 levels of A-Z a-z 0-9 _ - "
                "(no wildcards, no leading or trailing /)"
            )
    if not 64 <= c.max_payload <= 65536:
        raise ValueError("max_payload must be between 64 and 65536 bytes")
    for key in ("status_interval", "poll_interval", "rate", "reconnect_max"):
        if getattr(c, key) <= 0:
            raise ValueError(f"{key} must be more than 0")
    if c.burst < 1 or not 5 <= c.keepalive <= 3600:
        raise ValueError("burst must be at least 1 and keepalive 5 to 3600 seconds")


def parse_broker(url: str) -> Broker:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtts", "mqtt") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(
            f"broker {url!r} is not mqtts://HOST[:PORT], e.g. mqtts://broker.example.org:8883"
        )
    if parts.username or parts.password:
        raise ValueError(
            "broker: put the username and password in the `secrets` file, not "
            "in the URL (the config is readable by the savepoint group)"
        )
    tls = parts.scheme == "mqtts"
    if not tls and not _loopback(parts.hostname):
        raise ValueError(
            f"broker {url!r}: plain mqtt:// sends the password and every command "
            "in clear; use mqtts:// (mqtt:// is only for a broker on loopback)"
        )
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker {url!r}: bad port") from None
    return Broker(parts.hostname, port, tls)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_id(cfg: MqttSettings) -> str:
    """The appliance's name in topics: node_id, or the host's name made fit."""
    if cfg.node_id:
        return cfg.node_id
    name = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:32]
    return name if name and name != "group" else "savepoint"


class SecretsError(ValueError):
    """The secrets file is unsafe or unreadable; the message says what to do."""


def read_secrets(path: str) -> tuple[str | None, str | None]:
    """(username, password) from a private TOML file; (None, None) when no file is set."""
    if not path:
        return None, None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SecretsError(
            f'secrets file {path} does not exist: write username = "..." '
            'and password = "..." into it, mode 0600'
        ) from None
    except OSError as e:
        raise SecretsError(f"secrets file {path}: {e.strerror} (a symlink is refused)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_mode & 0o077:
            raise SecretsError(
                f"secrets file {path} is mode {stat.S_IMODE(st.st_mode):04o}: "
                f"others can read the broker password; run chmod 600 {path} "
                "(and change the password if others may have read it)"
            )
        if st.st_uid != os.geteuid():
            raise SecretsError(
                f"secrets file {path} belongs to uid {st.st_uid}, not to the "
                f"daemon's user ({os.geteuid()}): chown it"
            )
        if st.st_size > 4096:
            raise SecretsError(
                f"secrets file {path} is over 4 KiB: it should hold only username and password"
            )
        try:
            data = tomllib.loads(f.read().decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SecretsError(f"secrets file {path} is not valid TOML: {e}") from None
    unknown = set(data) - {"username", "password"}
    if unknown or not all(isinstance(v, str) for v in data.values()):
        raise SecretsError(
            f"secrets file {path}: only username and password strings "
            f"(found {', '.join(sorted(data))})"
        )
    return data.get("username"), data.get("password")


def tls_context(cfg: MqttSettings) -> ssl.SSLContext:
    """Verify the broker's certificate and name, always; a client certificate if given."""
    ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.client_cert:
        ctx.load_cert_chain(cfg.client_cert, cfg.client_key or None)
    return ctx

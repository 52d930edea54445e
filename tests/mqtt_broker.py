"""A real mosquitto on loopback for the MQTT tests: TLS with certificates made here, password
auth (mosquitto_passwd) and the ACL docs/fleet.md gives; plus a small paho client (no tests)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import queue
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ADMIN = ("admin", "admin-secret")
MISSING = "mosquitto is not installed (apt-get install mosquitto mosquitto-clients)"


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
    )


def mosquitto_installed() -> bool:
    """The broker and mosquitto_passwd (Broker writes its password file with it) are here."""
    return mosquitto_binary() is not None and shutil.which("mosquitto_passwd") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: Any,
    issuer: x509.Name | None,
    issuer_key: Any,
    ca: bool = False,
    names: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(d: Path) -> dict[str, str]:
    """ca.pem, server.pem/key (127.0.0.1, localhost), client.pem/key, and a stranger CA."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("savepoint test CA", ca_key, None, ca_key, ca=True)
    out: dict[str, str] = {}

    def write(name: str, data: bytes) -> None:
        path = d / name
        path.write_bytes(data)
        path.chmod(0o600)
        out[name] = str(path)

    write("ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    for who, names in (
        ("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", None),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(who, key, ca.subject, ca_key, names=names)
        write(f"{who}.pem", cert.public_bytes(serialization.Encoding.PEM))
        write(f"{who}.key", _key_pem(key))
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _cert("some other CA", other_key, None, other_key, ca=True)
    write("other-ca.pem", other.public_bytes(serialization.Encoding.PEM))
    return out


# The ACL from docs/fleet.md: appliances (username = node_id) publish only their own state
# and read only commands; only the admin publishes commands.
ACL = """\
user admin
topic readwrite savepoint/#
topic readwrite homeassistant/#

pattern read savepoint/%u/cmd
# (mosquitto warns that the next pattern has no %u: expected, every appliance may read it)
pattern read savepoint/group/+/cmd
pattern write savepoint/%u/availability
pattern write savepoint/%u/status
pattern write savepoint/%u/event
pattern write savepoint/%u/reply
pattern write homeassistant/+/savepoint_%u/+/config
"""


class Broker:
    """mosquitto with TLS on a free loopback port; restartable on the same port."""

    def __init__(self, d: Path, users: dict[str, str]) -> None:
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        self.pki = make_pki(d)
        self.port = free_port()
        passwd = d / "passwd"
        passwd.touch(mode=0o600)
        passwd.write_text("".join(f"{u}:{p}\n" for u, p in {**dict([ADMIN]), **users}.items()))
        subprocess.run(
            ["mosquitto_passwd", "-U", str(passwd)],
            check=True,  # hash in place
            capture_output=True,
            timeout=60,
        )
        (d / "acl").write_text(ACL)
        (d / "acl").chmod(0o600)
        self.conf = d / "mosquitto.conf"
        self.conf.write_text(f"""\
user {_user()}
per_listener_settings false
allow_anonymous false
password_file {passwd}
acl_file {d / "acl"}
persistence false
log_dest file {d / "mosquitto.log"}
log_type error
log_type warning
log_type notice
log_type information
listener {self.port} 127.0.0.1
cafile {self.pki["ca.pem"]}
certfile {self.pki["server.pem"]}
keyfile {self.pki["server.key"]}
require_certificate false
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = mosquitto_binary()
        assert exe, "mosquitto is not installed"
        self.proc = subprocess.Popen(
            [exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"mosquitto exited: {self.proc.stderr.read().decode()}{self.log()}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"mosquitto did not listen on {self.port}: {self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def log(self) -> str:
        path = self.dir / "mosquitto.log"
        return path.read_text() if path.exists() else ""


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def write_secrets(path: Path, user: str, password: str, mode: int = 0o600) -> str:
    path.write_text(f'username = "{user}"\npassword = "{password}"\n')
    path.chmod(mode)
    return str(path)


class Client:
    """A paho client in its own thread that keeps every message it gets, for assertions."""

    def __init__(
        self,
        broker: Broker,
        user: tuple[str, str] = ADMIN,
        subscribe: tuple[str, ...] = ("savepoint/#", "homeassistant/#"),
    ) -> None:
        import paho.mqtt.client as paho

        self.messages: queue.Queue[tuple[str, bytes, bool, float]] = queue.Queue()
        self.seen: list[tuple[str, bytes, bool, float]] = []
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.c.username_pw_set(*user)
        ctx = ssl.create_default_context(cafile=broker.pki["ca.pem"])
        self.c.tls_set_context(ctx)
        self.c.on_message = lambda _c, _u, m: self.messages.put(
            (m.topic, bytes(m.payload), bool(m.retain), time.monotonic())
        )
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        for topic in subscribe:
            self.c.subscribe(topic, qos=1)
        time.sleep(0.2)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)

    def request(self, node: str, req: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        self.publish(f"savepoint/{node}/cmd", json.dumps(req))
        return self.wait_reply(node, req.get("id"), timeout)

    def wait_reply(self, node: str, rid: Any, timeout: float = 30) -> dict[str, Any]:
        return self.wait_json(f"savepoint/{node}/reply", lambda d: d.get("id") == rid, timeout)

    def wait(
        self, topic: str, pred: Any = lambda _p: True, timeout: float = 30
    ) -> tuple[str, bytes, bool, float]:
        for m in self.seen:
            if m[0] == topic and pred(m[1]):
                self.seen.remove(m)
                return m
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                m = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if m[0] == topic and pred(m[1]):
                return m
            self.seen.append(m)
        raise AssertionError(
            f"no message on {topic} within {timeout}s; seen: "
            f"{[(t, p[:120]) for t, p, _r, _w in self.seen[-10:]]}"
        )

    def wait_json(
        self, topic: str, pred: Any = lambda _d: True, timeout: float = 30
    ) -> dict[str, Any]:
        def ok(payload: bytes) -> bool:
            try:
                return bool(pred(json.loads(payload)))
            except ValueError:
                return False

        return json.loads(self.wait(topic, ok, timeout)[1])

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()

"""The part contract (appliance/parts.py): every part is one spec, the daemon never names one,
and a part it has never heard of plugs in by its spec alone."""

from __future__ import annotations

import ast
import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance import parts
from appliance.config import part_settings, serve_config
from appliance.daemon import Daemon
from appliance.parts import PartContext, PartSpec, load_spec
from appliance.settings import NoSettings, Settings, setting
from tests.test_daemon_support import short_dir

TOP = Path(__file__).resolve().parent.parent


def test_every_part_is_one_spec_whose_settings_the_config_documents():
    for name in parts.PARTS:
        spec = load_spec(name)
        assert spec.name == name
        assert part_settings(name) is spec.config_type


def test_the_daemon_never_names_a_part():
    strings = {
        node.value
        for node in ast.walk(ast.parse((TOP / "appliance/daemon.py").read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    assert not strings & set(parts.PARTS), "the daemon names a part: declare it in its spec"


class DemoPart:
    """A part the daemon was never told about: it records what the contract gave it."""

    name = "demo"
    made: list[DemoPart] = []

    def __init__(self, cfg: DemoSettings, ctx: PartContext) -> None:
        self.cfg, self.ctx, self.events = cfg, ctx, []
        DemoPart.made.append(self)

    async def start(self) -> None:
        self.events.append("start")

    async def stop(self) -> None:
        self.events.append("stop")

    async def before_save(self) -> bool:
        return True

    async def around_restore(self, restore):
        return await restore()


@dataclass(frozen=True)
class DemoSettings(Settings):
    colour: str = setting("blue", "what the demo shows")


DEMO = PartSpec("demo", DemoSettings, DemoPart, store_hooks=True)
BROKEN = PartSpec("broken", NoSettings, lambda cfg, ctx: 1 / 0)


def test_a_new_part_plugs_in_by_its_spec_alone(monkeypatch):
    monkeypatch.setitem(parts.PARTS, "demo", "tests.test_parts:DEMO")
    monkeypatch.setitem(parts.PARTS, "broken", "tests.test_parts:BROKEN")
    d = short_dir()
    cfg = serve_config(f"{d}/disk.img", 16 << 20, 4096, f"{d}/nbd.sock", None, False, f"{d}/c.sock")
    cfg["parts"]["demo"] = {"enabled": True, "colour": "red"}
    cfg["parts"]["broken"] = {"enabled": True}
    DemoPart.made.clear()

    async def scenario() -> tuple[Any, Any, dict]:
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            assert daemon.bus is not None
            return daemon.bus.hooks, daemon.bus, dict(daemon.bus.parts)
        finally:
            await daemon.shutdown()

    hooks, bus, rows = asyncio.run(scenario())
    (demo,) = DemoPart.made
    assert demo.cfg == DemoSettings(colour="red"), "a part receives its typed settings"
    assert demo.ctx.nbd_socket == f"{d}/nbd.sock"
    assert demo.ctx.bus is bus and hooks is demo, "a store_hooks part is the bus's hooks"
    assert demo.events == ["start", "stop"] and bus.hooks is None
    assert rows["demo"]["state"] == "up"
    assert rows["broken"]["state"] == "failed" and "division by zero" in rows["broken"]["reason"]


def test_a_parts_tasks_are_kept_until_done():
    from appliance.parts import TaskSet

    async def scenario() -> None:
        tasks, gate = TaskSet(), asyncio.Event()
        waiting = tasks.spawn(gate.wait(), "waiting")
        tasks.spawn(asyncio.sleep(0))
        await asyncio.sleep(0.01)
        assert list(tasks) == [waiting] and waiting.get_name() == "waiting"
        gate.set()
        await asyncio.sleep(0.01)
        assert len(tasks) == 0

    asyncio.run(scenario())


HEAVY = ("bleak", "dbus_fast", "bthome_ble", "paho", "aiomqtt", "gpiozero")
PROBE = """
import json, sys
from appliance.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(HEAVY)))
specs = sorted(m for m in sys.modules if m.endswith(".spec"))
print(json.dumps({"code": code, "heavy": heavy, "specs": specs}))
"""


def _cli_imports(*argv: str) -> dict[str, Any]:
    import json
    import os
    import subprocess
    import sys

    probe = PROBE.replace("json.loads(HEAVY)", repr(list(HEAVY)))
    env = {**os.environ, "SAVEPOINT_CONTROL": f"{short_dir()}/none.sock"}
    done = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=env, timeout=60
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_cli_loads_every_spec_but_no_bluetooth_mqtt_or_gpio_library():
    """`savepoint --help` and `status` build every part's commands from its spec; on a Pi
    importing bleak, dbus-fast, bthome-ble or gpiozero costs seconds, so no spec may."""
    for argv in (["--help"], ["status"], ["fobs", "--help"]):
        seen = _cli_imports(*argv)
        assert seen["heavy"] == [], f"savepoint {' '.join(argv)} imported {seen['heavy']}"
    status = _cli_imports("status")
    assert status["code"] == 1  # no daemon there: it says so and fails
    assert status["specs"] == [], "a core command needs no part's spec: it stays fast"
    assert "ble.spec" in _cli_imports("--help")["specs"]


def test_part_commands_come_from_their_specs_into_help_man_page_and_completion():
    from appliance.cli import build_parser
    from appliance.manpages import completion, manpage

    specs = {spec.name for spec in parts.cli_specs()}
    assert specs == {"ble", "bthome"}
    parser = build_parser()
    helps = parser.format_help()
    assert "fobs" in helps and "buttons" in helps
    fobs = parser.parse_args(["fobs", "rename", "3", "keyring"])
    assert (fobs.op, fobs.id, fobs.name) == ("rename", 3, "keyring")
    buttons = parser.parse_args(["buttons", "add", "AA:BB", "--key", "00" * 16])
    assert (buttons.op, buttons.address) == ("add", "AA:BB")
    page = manpage(parser)
    assert "list, rename or revoke paired BLE fobs" in page
    assert "list, add, rename or remove BTHome buttons" in page
    assert {"fobs", "buttons"} <= set(completion(parser, "bash").split())


def test_a_part_that_cannot_load_leaves_the_rest_of_the_cli_working(monkeypatch):
    monkeypatch.setitem(parts.PARTS, "gone", "no_such_module:SPEC")
    monkeypatch.setitem(parts.PARTS, "demo", "tests.test_parts:WITH_CLI")
    from appliance.cli import build_parser

    args = build_parser().parse_args(["demo-hello"])
    assert args.func(args) == 7


def _add_demo_command(sub: Any) -> None:
    p = sub.add_parser("demo-hello", help="a part's own command")
    p.set_defaults(func=lambda args: 7)


WITH_CLI = PartSpec("demo", DemoSettings, DemoPart, cli=_add_demo_command)

"""What a part is and how it plugs in: one `PartSpec` per part, found by name.

A part is what the daemon starts after the store, the NBD server and the control socket, and
stops before them: the USB gadget, the host serial channel, the enclosure button and LED, the
BLE fob, BTHome buttons, MQTT. Each declares itself once, as `SPEC = PartSpec(...)` in its own
module, and is listed in `PARTS` below (or, from another package, under the entry point group
"savepoint.parts"). The config takes a `[name]` section validated by the spec's settings
dataclass (appliance/settings.py; plus `enabled`); the daemon calls `spec.make(section,
context)`, then `start()`, and at the end `stop()`. It never names a part: whatever a part
needs comes from its `PartContext`. A spec may also bring `savepoint` subcommands (`cli`):
the CLI adds those of every spec, so a spec's module imports only light things (its settings,
its CLI) and its `make` imports the part itself (ble/spec.py is the example).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from appliance.control.commands import CommandSink, Part
from appliance.settings import Settings

if TYPE_CHECKING:
    import argparse

    Subcommands = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subcommands = Any

S = TypeVar("S", bound=Settings)

# name (config section, status row) -> "module:attribute" of its spec, in start order
# A spec's module stays light (no bleak, dbus-fast, gpiozero, MQTT client): the CLI imports
# every spec for its commands; `make` imports the heavy part module when the part starts.
PARTS: dict[str, str] = {
    "gadget": "appliance.usb.gadget:SPEC",
    "serial": "appliance.usb.host_serial:SPEC",
    "gpio": "gpio.spec:SPEC",
    "ble": "ble.spec:BLE",
    "bthome": "ble.spec:BTHOME",
    "mqtt": "mqtt.spec:SPEC",
}
ENTRY_POINT_GROUP = "savepoint.parts"


@dataclass(frozen=True)
class PartContext:
    """What the daemon hands a part: the command bus (the part's only way to the store) and
    the NBD socket its kernel device attaches to."""

    bus: CommandSink
    nbd_socket: str


@dataclass(frozen=True)
class PartSpec(Generic[S]):
    """A part, declared: its config section's settings class, how to make it, what it adds."""

    name: str
    # the [name] section: a Settings dataclass; docs/config.md is generated from its fields
    config_type: type[S]
    # gets the validated section as a config_type instance (a part that still works on a
    # table converts at this boundary: `lambda s, ctx: Part(s.as_dict(), ...)`)
    make: Callable[[S, PartContext], Part]
    validate: Callable[[dict[str, Any]], Any] | None = None  # raises ValueError: bad section
    # True: while the part is up, the bus calls its before_save/around_restore (StoreHooks)
    store_hooks: bool = False
    # adds the part's `savepoint` subcommands (e.g. `fobs`) to the CLI's subparsers
    cli: Callable[[Subcommands], None] | None = None
    # events of the part's own state for `savepoint history` (fob pairings, say): dicts with
    # time, action, source, detail; read from its files, so they show while the part is down
    history: Callable[[S], list[dict[str, Any]]] | None = None


def all_parts() -> dict[str, str]:
    """Every known part name -> where its spec is: the built-in ones, then installed ones."""
    found = dict(PARTS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def cli_specs() -> list[PartSpec[Any]]:
    """The specs of every installed part that adds CLI subcommands (a part whose module cannot
    be imported adds none: the rest of the CLI still works)."""
    found = []
    for name in all_parts():
        try:
            spec = load_spec(name)
        except Exception:  # noqa: BLE001 - a broken part must not break `savepoint --help`
            continue
        if spec.cli is not None:
            found.append(spec)
    return found


def load_spec(name: str) -> PartSpec[Any]:
    """Import the part's module and return its spec; ImportError/AttributeError when the part
    is not installed or its module is broken (the caller reports it, nothing else stops)."""
    module, _, attr = all_parts()[name].partition(":")
    spec = getattr(importlib.import_module(module), attr or "SPEC")
    if not isinstance(spec, PartSpec) or spec.name != name:
        raise AttributeError(f"{module}:{attr} is not the PartSpec of part {name!r}")
    return spec


class TaskSet:
    """A part's background tasks, spawned in one way: each stays referenced until it is done
    (the event loop keeps only weak references) and stop() cancels them together."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)

    def clear(self) -> None:
        self._tasks.clear()

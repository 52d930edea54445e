"""How a config section is declared: a dataclass whose fields carry their documentation.

    @dataclass(frozen=True)
    class SerialSettings(Settings):
        device: str = setting("/dev/ttyGS0", "gadget-side tty of the CDC-ACM function")

The field's annotation is the type the TOML value must have (`float` also takes an integer;
`int | str` takes either), its default is the default, and `doc` is the line docs/config.md
shows. appliance/config.py validates every section from these fields; the defaults live only
in them (the loader gets them by making the dataclass, a table-reading part through
`Settings.merged`). This module imports nothing heavy: every part imports it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

S = TypeVar("S", bound="Settings")


def setting(default: Any, doc: str) -> Any:
    """A documented field; a list or table default is copied for every instance."""
    meta = {"doc": doc}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: default.copy(), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def doc_of(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("doc", ""))


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def accepted_types(cls: type[Any]) -> dict[str, tuple[type, ...]]:
    """Field name -> the Python types its TOML value may have, read from the annotations."""
    hints = typing.get_type_hints(cls)
    return {f.name: _runtime_types(hints[f.name]) for f in dataclasses.fields(cls)}


def _runtime_types(hint: Any) -> tuple[type, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for arg in typing.get_args(hint) for t in _runtime_types(arg))
    origin = typing.get_origin(hint)
    if origin is not None:  # list[str] -> list, dict[str, str] -> dict
        return (origin,)
    if hint is Any:
        return (object,)
    return (hint,)


@dataclasses.dataclass(frozen=True)
class Settings:
    """A config section. Subclasses are frozen dataclasses of `setting(...)` fields."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: default_of(f) for f in dataclasses.fields(cls)}

    @classmethod
    def merged(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The fields' defaults overridden by the given keys, as a table (unknown keys dropped)."""
        return {k: given.get(k, v) for k, v in cls.defaults().items()}

    @classmethod
    def of(cls: type[S], given: S | dict[str, Any]) -> S:
        """The instance itself, or one made from a table already checked (a test's, say):
        the config loader is what validates a user's file."""
        return cls(**cls.merged(given)) if isinstance(given, dict) else given

    def as_dict(self) -> dict[str, Any]:
        """The section as a plain table (shallow: lists and tables are the instance's own)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class NoSettings(Settings):
    """A section with no keys."""

"""The layout docs/architecture.md promises: one package per box, imports one way only."""

import ast
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function or TYPE_CHECKING block."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_the_nbd_session_never_imports_the_server():
    """server -> session only: a session knows its server as the SessionHost protocol."""
    assert "appliance.nbd.session" in imported_modules(TOP / "appliance/nbd/server.py")
    assert "appliance.nbd.server" not in imported_modules(TOP / "appliance/nbd/session.py")


def test_the_store_is_one_package_with_its_names_at_the_front():
    import appliance.store as store

    assert {"Store", "create_store", "StoreError", "InitError"} <= set(store.__all__)
    assert not list((TOP / "appliance").glob("store_*.py"))
    assert not list((TOP / "appliance").glob("nbd_*.py"))


def test_the_nbd_control_and_mqtt_modules_stay_under_400_lines():
    """Split along a seam when one grows past it (docs/architecture.md names the modules)."""
    long = {
        str(path.relative_to(TOP)): n
        for folder in ("appliance/nbd", "appliance/control", "mqtt")
        for path in (TOP / folder).glob("*.py")
        if (n := len(path.read_text().splitlines())) > 400
    }
    assert not long, long

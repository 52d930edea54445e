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


MAX_LINES = 400
# The store core is one on purpose: its ordering proofs read top to bottom.
LONG_ALLOWED = {"appliance/store/core.py"}


def test_no_module_outgrows_a_sitting():
    """A module a reader cannot hold in mind at once is split along a real seam."""
    long = {
        str(path.relative_to(TOP)): len(path.read_text().splitlines())
        for package in ("appliance", "ble", "gpio", "mqtt")
        for path in (TOP / package).rglob("*.py")
    }
    over = {p: n for p, n in long.items() if n > MAX_LINES and p not in LONG_ALLOWED}
    assert not over, f"over {MAX_LINES} lines, split them: {over}"
    assert LONG_ALLOWED <= set(long), "an allowed module is gone: drop it from LONG_ALLOWED"

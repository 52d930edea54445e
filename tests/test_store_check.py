"""`savepoint inspect --check`: every checksum and invariant it can verify, and nothing changed.

The map is checked 2048 sectors (1 MiB) at a time, so the store here is large enough (sparse)
for written map sectors to lie beyond the first chunk.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.store import Store, create_store
from appliance.store.check import check_store
from appliance.store.format import RECS_PER_SECTOR, SB_OFFSETS, SECTOR, Geometry

U = 4096
SECTORS = 2300  # past the first 2048-sector chunk
FAR_UNIT = 2100 * RECS_PER_SECTOR  # a unit whose map sector is in the second chunk
GEOMETRY: dict[Path, Geometry] = {}


def digest(path: Path) -> str:
    """Hash of the metadata and of every unit the fixture wrote, in both slots (hashing the
    whole sparse file would read gigabytes of holes)."""
    g = GEOMETRY[path]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(g.slot_off[0]))
        for slot in g.slot_off:
            for unit in (0, FAR_UNIT, FAR_UNIT + 1):
                f.seek(slot + unit * U)
                h.update(f.read(U))
    return h.hexdigest()


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "big.img"
    create_store(str(path), SECTORS * RECS_PER_SECTOR * U, unit=U)
    with Store.open(str(path)) as s:
        s.write(0, b"near" * 1024)
        s.write(FAR_UNIT * U, b"far!" * 1024)
        s.save("cli")
        s.write(FAR_UNIT * U + U, b"work" * 1024)  # written since the SAVE, flushed on close
        GEOMETRY[path] = s.geo
    return path


def test_a_healthy_store_passes_and_is_not_changed(store_path: Path, capsys) -> None:
    before = digest(store_path)
    assert main(["inspect", str(store_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "check: OK" in out and "PROBLEM" not in out
    assert "1 units written since the last command are durable" in out
    assert digest(store_path) == before


def test_a_damaged_map_sector_beyond_the_first_chunk_is_named(store_path: Path, capsys) -> None:
    meta_off = GEOMETRY[store_path].meta_off
    sector = FAR_UNIT // RECS_PER_SECTOR
    poke(store_path, meta_off + sector * SECTOR + 100, b"\xde\xad\xbe\xef")
    before = digest(store_path)
    report = check_store(str(store_path))
    assert not report.ok
    assert report.problems == [
        f"1 map sectors fail their checksum (first: [{sector}]); "
        "the units they describe cannot be read"
    ]
    assert main(["inspect", str(store_path), "--check"]) == 2
    assert f"[{sector}]" in capsys.readouterr().out
    assert digest(store_path) == before


def test_one_damaged_superblock_copy_is_a_note_both_are_a_problem(store_path: Path, capsys) -> None:
    poke(store_path, SB_OFFSETS[0] + 40, b"\xff\xff\xff\xff")
    report = check_store(str(store_path))
    assert report.ok, report.problems
    assert any(n.startswith("superblock A: not valid") for n in report.notes)
    poke(store_path, SB_OFFSETS[1] + 40, b"\xff\xff\xff\xff")
    before = digest(store_path)
    assert main(["inspect", str(store_path), "--check"]) == 2
    captured = capsys.readouterr()
    assert "both superblock copies are damaged" in captured.out + captured.err
    assert digest(store_path) == before

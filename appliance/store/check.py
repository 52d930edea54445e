"""`savepoint inspect --check`: verify every checksum and invariant of a store, change nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.store.backing import FileBacking
from appliance.store.format import (
    PAGE,
    RECS_PER_SECTOR,
    SB_SIZE,
    SECTORS_PER_PAGE,
    WEPOCH_MASK,
    FormatError,
    sector_ok,
    superblock_copies,
)

if TYPE_CHECKING:
    from appliance.store.core import Store

CHUNK_PAGES = 256  # read the map 1 MiB at a time


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_store(path: str, progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Read-only verification of superblocks, history ring and every map sector."""
    from appliance.store import Store, StoreError

    report = CheckReport()
    backing = FileBacking(path, readonly=True)
    try:
        head = bytearray(2 * SB_SIZE)
        backing.pread_into(memoryview(head), 0)
        for i, sb in enumerate(superblock_copies(bytes(head))):
            name = "AB"[i]
            if isinstance(sb, FormatError) and not any(head[i * SB_SIZE : (i + 1) * SB_SIZE]):
                report.notes.append(
                    f"superblock {name}: not written yet (all zeros; the first "
                    "SAVE or RESTORE writes it), which is fine"
                )
            elif isinstance(sb, FormatError):
                report.notes.append(f"superblock {name}: not valid ({sb})")
            else:
                report.notes.append(f"superblock {name}: valid, seq {sb.seq}, epoch {sb.epoch}")
    finally:
        backing.close()
    try:
        store = Store.open(path, readonly=True)
    except StoreError as e:
        report.problems.append(str(e))
        return report
    try:
        _check_history(store, report)
        _check_map(store, report, progress)
    finally:
        store.close()
    return report


def _check_history(store: Store, report: CheckReport) -> None:
    first = max(1, store.epoch - store.geo.hist_cap)
    present = {r.epoch for r in store.ring.records(first, store.epoch)}
    missing = [e for e in range(first, store.epoch) if e not in present]
    needed = [e for e in missing if e >= store.sb.resolved_below]
    if needed:
        report.problems.append(
            f"history records missing or damaged for epochs still in use: "
            f"{needed[:10]}{' ...' if len(needed) > 10 else ''}"
        )
    elif missing:
        report.notes.append(
            f"{len(missing)} old history records are unreadable (no unit depends on them)"
        )


def _check_map(
    store: Store, report: CheckReport, progress: Callable[[int, int], None] | None = None
) -> None:
    g, epoch = store.geo, store.epoch
    bad, future, stale, ddm = [], 0, 0, 0
    pages = g.meta_len // PAGE
    for first in range(0, pages, CHUNK_PAGES):
        n = min(CHUNK_PAGES, pages - first)
        if progress:
            progress(first * PAGE, pages * PAGE)
        chunk = bytearray(n * PAGE)
        store._b.pread_into(memoryview(chunk), g.meta_off + first * PAGE)
        words = memoryview(chunk).cast("I")
        for local in range(n * SECTORS_PER_PAGE):
            sector = first * SECTORS_PER_PAGE + local
            if not sector_ok(chunk, local, sector):
                bad.append(sector)
                continue
            units = min(RECS_PER_SECTOR, g.unit_count - sector * RECS_PER_SECTOR)
            for i in range(max(units, 0)):
                w = words[local * 128 + 2 + i] & WEPOCH_MASK
                if w > epoch:
                    future += 1
                elif w == epoch:
                    ddm += 1
                elif 0 < w < store.sb.resolved_below:
                    stale += 1
    if bad:
        report.problems.append(
            f"{len(bad)} map sectors fail their checksum (first: {bad[:5]}); "
            "the units they describe cannot be read"
        )
    if future:
        report.problems.append(f"{future} unit records name an epoch that has not happened yet")
    if stale:
        report.problems.append(
            f"{stale} unit records depend on epochs the history may have "
            "forgotten (resolved_below is wrong)"
        )
    report.notes.append(
        f"map: {g.meta_sectors} sectors checked, {ddm} units written since the "
        f"last command are durable on disk"
    )

"""On-disk format of a Savepoint store: geometry, superblock, history records, map sectors.

Layout (docs/format.md is the reference; keep the two in step):

    0        superblock copy A (4 KiB)        written alternately, highest valid seq wins
    4 KiB    superblock copy B (4 KiB)
    1 MiB    history ring: hist_cap records of 64 bytes, record of epoch e at e % hist_cap
    ...      unit map: 512-byte sectors, each [crc32c][sector index][126 unit records]
    ...      slot 0 of every unit, then slot 1 of every unit (each region 1 MiB aligned)
"""

from __future__ import annotations

import builtins
import mmap
import struct
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import crc32c

MAGIC = b"SAVEPNT\x00"
FORMAT_VERSION = 1
SB_SIZE = 4096
SB_OFFSETS = (0, SB_SIZE)
MiB = 1 << 20
HIST_REC = 64
DEFAULT_HIST_CAP = 65536
SECTOR = 512
RECS_PER_SECTOR = 126  # 8 header bytes + 126 * 4 = 512
WORDS_PER_SECTOR = SECTOR // 4
PAGE = 4096  # the map is loaded from disk lazily, one page (8 sectors) at a time
SECTORS_PER_PAGE = PAGE // SECTOR
UNITS_PER_PAGE = RECS_PER_SECTOR * SECTORS_PER_PAGE
MIN_UNIT, MAX_UNIT = 4096, MiB

# A unit record is one little-endian u32:
VSM_BIT = 1 << 31  # which slot holds the saved (primary) copy, as of the record's epoch
HAS1_BIT = 1 << 30  # slot 1 holds data; clear means slot 1 reads as zeros
HAS0_BIT = 1 << 29  # slot 0 holds data
WEPOCH_MASK = (1 << 29) - 1  # epoch of the last write to the secondary slot; 0 = none pending
MAX_EPOCH = WEPOCH_MASK

SAVE, RESTORE = 1, 2
ACTIONS = {SAVE: "save", RESTORE: "restore"}
FLAG_HOST_SYNCED = 1  # the host had sent SYNCHRONIZE CACHE (or ejected) since its last write
FLAG_QUIET_KNOWN = 2  # the record carries `quiet` and the FORCED/BUSY bits (older ones do not)
FLAG_FORCED = 4  # a second press or --now cut the wait for a quiet host short
FLAG_BUSY = 8  # the host was still writing when the maximum wait ran out
QUIET_MAX = 0xFFFF  # deciseconds; the cap reads as "at least 6553.5 s"

assert sys.byteorder == "little", "the in-memory map mirrors the little-endian disk format"

_SB = struct.Struct("<8sIIQQQQQQQIQQQQQqq16sqQ64s")
_HIST = struct.Struct("<QqQQBBH24s")  # + crc32c u32 = 64 bytes; H: quiet, deciseconds
_ZERO_SECTOR = bytes(SECTOR)


class FormatError(Exception):
    """The bytes on disk are not a valid Savepoint structure."""


def align_up(value: int, align: int) -> int:
    return -(-value // align) * align


@dataclass(frozen=True)
class Geometry:
    unit_size: int
    unit_count: int
    logical_size: int
    hist_cap: int
    hist_off: int
    meta_off: int
    meta_len: int
    slot_off: tuple[int, int]

    @property
    def total_size(self) -> int:
        return self.slot_off[1] + self.unit_count * self.unit_size

    @property
    def meta_sectors(self) -> int:
        return self.meta_len // SECTOR


def check_unit_size(unit: int) -> None:
    if unit < MIN_UNIT or unit > MAX_UNIT or unit & (unit - 1):
        raise ValueError(f"unit size {unit} must be a power of two from 4 KiB to 1 MiB")


def plan_geometry(logical_size: int, unit: int, hist_cap: int = DEFAULT_HIST_CAP) -> Geometry:
    """Place every region for a disk of logical_size bytes."""
    check_unit_size(unit)
    if logical_size <= 0 or logical_size % SECTOR:
        raise ValueError(f"disk size {logical_size} must be a positive multiple of 512 bytes")
    count = -(-logical_size // unit)
    align = max(MiB, unit)
    hist_off = MiB
    meta_off = align_up(hist_off + hist_cap * HIST_REC, align)
    meta_len = align_up(-(-count // RECS_PER_SECTOR) * SECTOR, PAGE)
    slot0 = align_up(meta_off + meta_len, align)
    slot1 = slot0 + align_up(count * unit, align)
    return Geometry(
        unit, count, logical_size, hist_cap, hist_off, meta_off, meta_len, (slot0, slot1)
    )


def geometry_for_capacity(capacity: int, unit: int, hist_cap: int = DEFAULT_HIST_CAP) -> Geometry:
    """The largest disk whose store fits in capacity bytes (a block device)."""
    check_unit_size(unit)
    lo, hi = 0, max(capacity // (2 * unit), 0)  # in units; a disk of lo units always fits
    while lo < hi:  # total_size grows with the disk size: bisect
        mid = (lo + hi + 1) // 2
        if plan_geometry(mid * unit, unit, hist_cap).total_size <= capacity:
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        need = plan_geometry(unit, unit, hist_cap).total_size
        raise ValueError(
            f"{capacity} bytes are too small for a store with {unit}-byte units "
            f"(the smallest needs {need})"
        )
    return plan_geometry(lo * unit, unit, hist_cap)


@dataclass(frozen=True)
class Superblock:
    geometry: Geometry
    uuid: bytes
    created_ns: int
    seq: int = 0
    epoch: int = 1
    resolved_below: int = 1  # every map record with 0 < wepoch < this is already normalised
    dirty_units: int = 0
    dirty_bytes: int = 0
    last_save_ns: int = 0
    last_restore_ns: int = 0
    pending_units: int = 0  # records still waiting for the background pass
    last_record: bytes = bytes(HIST_REC)  # the history record of epoch-1, for ring repair

    def pack(self) -> bytes:
        g = self.geometry
        body = _SB.pack(
            MAGIC,
            FORMAT_VERSION,
            g.unit_size,
            g.unit_count,
            g.logical_size,
            g.hist_off,
            g.meta_off,
            g.meta_len,
            g.slot_off[0],
            g.slot_off[1],
            g.hist_cap,
            self.seq,
            self.epoch,
            self.resolved_below,
            self.dirty_units,
            self.dirty_bytes,
            self.last_save_ns,
            self.last_restore_ns,
            self.uuid,
            self.created_ns,
            self.pending_units,
            self.last_record,
        )
        body += struct.pack("<I", crc32c.crc32c(body))
        return body + bytes(SB_SIZE - len(body))

    def next(self, **changes: Any) -> Superblock:
        return replace(self, seq=self.seq + 1, **changes)


def unpack_superblock(raw: bytes) -> Superblock:
    """Parse one superblock copy; FormatError says precisely what is wrong with it."""
    if raw[:8] != MAGIC:
        raise FormatError("no Savepoint magic")
    version = struct.unpack_from("<I", raw, 8)[0]
    if version > FORMAT_VERSION:
        raise FormatError(
            f"format version {version} is newer than this software (version {FORMAT_VERSION})"
        )
    end = _SB.size
    if struct.unpack_from("<I", raw, end)[0] != crc32c.crc32c(raw[:end]):
        raise FormatError("superblock checksum mismatch")
    f = _SB.unpack_from(raw)
    geo = Geometry(
        unit_size=f[2],
        unit_count=f[3],
        logical_size=f[4],
        hist_off=f[5],
        meta_off=f[6],
        meta_len=f[7],
        slot_off=(f[8], f[9]),
        hist_cap=f[10],
    )
    return Superblock(
        geometry=geo,
        seq=f[11],
        epoch=f[12],
        resolved_below=f[13],
        dirty_units=f[14],
        dirty_bytes=f[15],
        last_save_ns=f[16],
        last_restore_ns=f[17],
        uuid=f[18],
        created_ns=f[19],
        pending_units=f[20],
        last_record=f[21],
    )


def superblock_copies(head: bytes) -> list[Superblock | FormatError]:
    """Both superblock copies from the store's first 2 * SB_SIZE bytes: each parsed, or the
    FormatError saying what is wrong with it."""
    copies: list[Superblock | FormatError] = []
    for off in SB_OFFSETS:
        try:
            copies.append(unpack_superblock(head[off : off + SB_SIZE]))
        except FormatError as e:
            copies.append(e)
    return copies


@dataclass(frozen=True)
class HistoryRecord:
    epoch: int  # the epoch this command ended
    action: int  # SAVE or RESTORE
    time_ns: int
    units: int  # units written during the epoch
    bytes: int  # bytes written during the epoch
    source: str
    flags: int = 0
    quiet_ds: int = 0  # how long the host had been quiet, deciseconds (FLAG_QUIET_KNOWN)

    def pack(self) -> builtins.bytes:  # `bytes` in this class is the field
        body = _HIST.pack(
            self.epoch,
            self.time_ns,
            self.units,
            self.bytes,
            self.action,
            self.flags,
            min(self.quiet_ds, QUIET_MAX),
            self.source.encode()[:24],
        )
        return body + struct.pack("<I", crc32c.crc32c(body))

    def as_dict(self) -> dict[str, object]:
        return {
            "epoch": self.epoch,
            "action": ACTIONS.get(self.action, "?"),
            "time": self.time_ns / 1e9,
            "time_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.time_ns / 1e9)),
            "source": self.source,
            "units": self.units,
            "bytes": self.bytes,
            "host_synced": bool(self.flags & FLAG_HOST_SYNCED),
            **self.settle_info(),
        }

    def settle_info(self) -> dict[str, object]:
        """What a SAVE knew of the host; None (unknown) in records from before it was kept."""
        if self.action != SAVE or not self.flags & FLAG_QUIET_KNOWN:
            return {"quiet": None, "forced": None, "host_busy": None}
        return {
            "quiet": self.quiet_ds / 10,
            "forced": bool(self.flags & FLAG_FORCED),
            "host_busy": bool(self.flags & FLAG_BUSY),
        }


def unpack_history(raw: bytes | memoryview) -> HistoryRecord | None:
    """A valid record, or None for an empty or damaged slot."""
    body = bytes(raw[: _HIST.size])
    if struct.unpack_from("<I", raw, _HIST.size)[0] != crc32c.crc32c(body):
        return None
    e, t, units, nbytes, action, flags, quiet, source = _HIST.unpack(body)
    if action not in ACTIONS or e == 0:
        return None
    return HistoryRecord(
        e, action, t, units, nbytes, source.rstrip(b"\0").decode(errors="replace"), flags, quiet
    )


def seal_sector(meta: bytearray | mmap.mmap, sector: int) -> None:
    """Stamp a map sector's index and checksum in place before it goes to disk."""
    base = sector * SECTOR
    struct.pack_into("<I", meta, base + 4, sector)
    struct.pack_into("<I", meta, base, crc32c.crc32c(memoryview(meta)[base + 4 : base + SECTOR]))


def sector_ok(
    meta: bytes | bytearray | memoryview | mmap.mmap, sector: int, number: int | None = None
) -> bool:
    """A never-written (all zero) sector is valid and empty; any other needs a good checksum.
    `sector` indexes `meta`; `number` is the sector's number in the whole map (the index its
    header must carry) when `meta` holds only part of the map."""
    raw = memoryview(meta)[sector * SECTOR : (sector + 1) * SECTOR]
    crc, index = struct.unpack_from("<II", raw)
    if crc == 0 and index == 0 and raw.tobytes() == _ZERO_SECTOR:  # memcmp, not per item
        return True
    return index == (sector if number is None else number) and crc == crc32c.crc32c(raw[4:])

"""Scenario 5 (claim 46): vendor-specific and unsupported SCSI commands are refused with
CHECK CONDITION / ILLEGAL REQUEST, and neither the disk nor the store changes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.lab.inside.appliance_vm import MIB, Appliance, digest, read_direct, write_direct

# Standard commands f_mass_storage does not implement; several would write if it did.
# (Not SECURITY PROTOCOL IN/OUT: sg_raw hands those to its NVMe translation, not the disk.)
UNSUPPORTED = {
    0x04: "FORMAT UNIT", 0x16: "RESERVE(6)", 0x1D: "SEND DIAGNOSTIC", 0x3B: "WRITE BUFFER",
    0x41: "WRITE SAME(10)", 0x42: "UNMAP", 0x93: "WRITE SAME(16)", 0x07: "REASSIGN BLOCKS",
    0x3F: "WRITE LONG(10)",
}  # fmt: skip


def sg_raw(dev: str, opcode: int, data_out: Path | None = None) -> subprocess.CompletedProcess[str]:
    length = 6 if opcode < 0x20 else 16 if 0x80 <= opcode < 0xA0 else 10
    cdb = [f"{opcode:02x}"] + ["00"] * (length - 1)
    cmd = ["sg_raw", "-t", "20"]
    if data_out is not None:
        cmd += ["-s", str(data_out.stat().st_size), "-i", str(data_out)]
    return subprocess.run([*cmd, dev, *cdb], capture_output=True, text=True, timeout=60)


def refused(done: subprocess.CompletedProcess[str]) -> bool:
    out = done.stdout + done.stderr
    return done.returncode != 0 and "Illegal Request" in out


def test_vendor_and_unsupported_scsi_commands_refused(appliance: Appliance, tmp_path: Path) -> None:
    dev = appliance.start(lock=False)
    write_direct(dev, 0, os.urandom(4 * MIB))
    assert appliance.request("save")["ok"]
    write_direct(dev, 4 * MIB, os.urandom(1 * MIB))  # some unsaved data too
    image = digest(read_direct(dev))
    before = appliance.status()

    accepted = []
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"\xff" * 512)  # what a vendor "write" would put on the disk
    for opcode in [*range(0xC0, 0x100), *UNSUPPORTED]:
        for data in (None, payload):
            done = sg_raw(dev, opcode, data)
            if not refused(done):
                what = "with 512 bytes out" if data else "no data"
                accepted.append(
                    f"{opcode:#04x} ({what}): rc {done.returncode} "
                    f"{(done.stdout + done.stderr).strip()[-200:]}"
                )
    assert not accepted, "commands not refused:\n" + "\n".join(accepted)

    assert digest(read_direct(dev)) == image, "a refused command changed the disk"
    after = appliance.status()
    for key in ("epoch", "dirty_units", "dirty_bytes", "size"):
        assert after[key] == before[key], f"store {key}: {before[key]} -> {after[key]}"
    history = appliance.request("history")["data"]["history"]
    assert [r["action"] for r in history].count("save") == 1

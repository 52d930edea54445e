"""A card made with `install.sh --root` comes up as a working appliance on its first boot,
under systemd in the lab VM (tests/lab/firstboot.py builds and boots it; docs/lab.md).

A boot of its own (systemd as PID 1), apart from the scenarios in inside/:
`.venv/bin/python -m pytest -m lab -k first_boot`.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.lab import firstboot
from tests.lab.vm import RunResult, results_dir, run

pytestmark = pytest.mark.lab
TIMEOUT = 2700  # a wedged boot ends here; good ones took 14-27 min at load 15-23 (docs/lab.md)


def boot() -> tuple[RunResult, dict]:
    job = firstboot.job(firstboot.pi_os_debs(), *firstboot.pi_site_packages())
    timeout = float(os.environ.get("SAVEPOINT_LAB_TIMEOUT", TIMEOUT))
    result = run(job, results_dir(), timeout=timeout)
    print(result.log("job.log"))
    print(f"lab VM: {result.seconds:.1f} s under {result.accel}; logs in {result.results}")
    text = result.log("firstboot.json")
    if not text:
        tail = "\n".join(result.log("console.log").splitlines()[-60:])
        pytest.fail(
            f"the first boot produced no report (job exit {result.returncode}); job log:\n"
            f"{result.log('job.log')[-3000:]}\nconsole:\n{tail}"
        )
    return result, json.loads(text)


def test_first_boot_of_a_card_made_with_root_gives_a_working_appliance() -> None:
    chosen = os.environ.get("SAVEPOINT_LAB_ARGS", "")
    if chosen and "first_boot" not in chosen:  # one inner scenario asked for: not this boot
        pytest.skip(f"SAVEPOINT_LAB_ARGS={chosen!r} chooses inner scenarios, not first_boot")
    result, facts = boot()
    print(json.dumps(facts, indent=1))
    journal = result.log("firstboot-journal.log")[-4000:]
    first = facts["firstboot"]
    assert (first["Result"], first["ExecMainStatus"]) == ("success", "0"), journal
    assert "savepoint-firstboot.service is now disabled" in result.log("firstboot-journal.log")
    assert not facts["firstboot_wants_link"] and first["UnitFileState"] == "disabled"
    assert facts["venv_savepoint"].startswith("savepoint "), facts["venv_savepoint"]
    assert facts["man_page"], "no man page under /usr/local/share/man"
    assert facts["store_bytes"] > 0, "no store at /var/lib/savepoint/store.img"
    daemon = facts["daemon"]
    assert daemon["ActiveState"] == "active", journal
    assert daemon["UnitFileState"] == "enabled"
    status = facts["status"]
    assert status is not None, f"savepoint status --json said: {facts['status_text']}"
    data = status["data"]
    assert (data["mode"], data["epoch"], data["host_connected"]) == ("locked", 1, True), data
    assert data["parts"]["gadget"]["state"] == "up", data["parts"]
    assert any("Savepoint disk" in disk for disk in facts["usb_disks"]), facts["usb_disks"]
    assert facts["failed_units"] == "", f"failed units: {facts['failed_units']}"
    stopped = facts["daemon_after_stop"]
    assert (stopped["ActiveState"], stopped["Result"]) == ("inactive", "success"), journal
    assert facts["usb_disks_after_stop"] == [], "the USB disk stayed after the daemon stopped"

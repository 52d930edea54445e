"""Ladder step 1: the fob protocol without any radio — frames, MAC, counters, challenges."""

from __future__ import annotations

import asyncio
import json
import os
import stat

import pytest

from appliance.control.commands import Action, Event
from ble import frames
from ble.frames import Cmd, FrameError, FrameState, Result, Status
from ble.keys import FobPairing, FobRegistry
from ble.protocol import MAX_OUTCOMES, MAX_QUERIES, FobProtocol
from tests.ble_helpers import frame_for, pair_directly
from tests.support import FakeClock, RecordingBus, run


@pytest.fixture
def env(tmp_path):
    clock = FakeClock()
    sink = RecordingBus()
    proto = FobProtocol(FobRegistry(tmp_path / "fobs.json"), sink, clock=clock)
    proto.set_pairing(True)
    creds = pair_directly(proto)
    proto.set_pairing(False)
    return proto, sink, creds, clock


def fresh(proto: FobProtocol, creds, cmd: Cmd) -> bytes:
    """The fob's next frame with a fresh challenge (protocol 2 binds one into every frame)."""
    return frame_for(creds, cmd, proto.read_challenge())


def test_frame_is_20_bytes_and_round_trips():
    key, app, nonce = bytes(range(32)), bytes(16), bytes(range(16))
    data = frames.build_frame(key, app, Cmd.SAVE, 7, 42, nonce)
    assert len(data) == 20
    frame = frames.parse_frame(data)
    assert (frame.cmd, frame.fob_id, frame.counter) == (Cmd.SAVE, 7, 42)
    assert frames.tag_matches(frame, key, app, nonce)
    assert not frames.tag_matches(frame, key, bytes([1]) + bytes(15), nonce)  # other appliance
    with pytest.raises(ValueError, match="challenge"):  # protocol 2: no frame without one
        frames.build_frame(key, app, Cmd.SAVE, 7, 42)


def test_known_answer_vector():
    """Pins the byte layout documented in docs/fob-protocol.md (tag checked with openssl)."""
    key, app = bytes(range(32)), bytes(range(16))
    nonce = bytes(range(16, 32))
    data = frames.build_frame(key, app, Cmd.RESTORE, 0x0102, 0x03040506, nonce)
    assert data[:8].hex() == "0202010203040506"
    assert data[8:].hex() == "870076d3ad0b1f970a5e2a13"
    assert data.hex() == "0202010203040506" + frames.compute_tag(key, app, data[:8], nonce).hex()


@pytest.mark.parametrize(
    ("data", "result"),
    [(b"\x02\x01", Result.BAD_FRAME),
     (bytes([2, 0x7F]) + bytes(18), Result.UNKNOWN_COMMAND),
     (bytes([3, 1]) + bytes(18), Result.BAD_FRAME),
     (bytes([1, 1]) + bytes(18), Result.OLD_PROTOCOL)],
)  # fmt: skip
def test_malformed_frames_get_a_code(data, result):
    with pytest.raises(FrameError) as err:
        frames.parse_frame(data)
    assert err.value.result == result


def test_status_round_trip_fits_a_notification():
    s = Status(unlocked=True, host_connected=True, epoch=9, dirty_units=3, dirty_bytes=12288,
               last_cmd=Cmd.SAVE, last_result=Result.REPLAY, last_fob=4)  # fmt: skip
    assert len(s.encode()) == 20
    assert Status.decode(s.encode()) == s


def test_save_goes_through_the_bus_as_the_fob(env):
    proto, sink, creds, _ = env
    assert run(proto.handle_command(fresh(proto, creds, Cmd.SAVE))) == Result.OK
    cmd = sink.commands[-1]
    assert (cmd.action, cmd.source, cmd.authenticated) == (Action.SAVE, "fob:1", True)
    status = Status.decode(proto.status_value())
    assert (status.last_cmd, status.last_result, status.last_fob) == (Cmd.SAVE, Result.OK, 1)


def test_replayed_frame_is_refused_and_changes_nothing(env):
    proto, sink, creds, _ = env
    data = fresh(proto, creds, Cmd.SAVE)
    assert run(proto.handle_command(data)) == Result.OK
    assert run(proto.handle_command(data)) == Result.STALE_CHALLENGE  # its nonce is used up
    creds.counter -= 1  # a fresh challenge with a used counter: only a broken fob sends that
    assert run(proto.handle_command(fresh(proto, creds, Cmd.SAVE))) == Result.REPLAY
    assert len(sink.commands) == 1
    assert Status.decode(proto.status_value()).last_result == Result.REPLAY


def test_counter_is_persisted_before_the_command_runs(env, tmp_path):
    proto, sink, creds, _ = env
    seen = []
    original = sink.submit

    async def submit(command):
        seen.append(json.loads((tmp_path / "fobs.json").read_text())["fobs"]["1"]["counter"])
        return await original(command)

    sink.submit = submit
    data = fresh(proto, creds, Cmd.SAVE)
    run(proto.handle_command(data))
    assert seen == [creds.counter]
    # A restart (new registry from the file) still refuses the recorded frame.
    again = FobProtocol(FobRegistry(tmp_path / "fobs.json"), RecordingBus())
    assert run(again.handle_command(data)) == Result.BAD_MAC  # no such challenge any more
    creds.counter -= 1
    assert (
        run(again.handle_command(frame_for(creds, Cmd.SAVE, again.read_challenge())))
        == Result.REPLAY
    )


def test_restore_needs_a_fresh_single_use_challenge(env):
    proto, sink, creds, clock = env
    assert run(proto.handle_command(frame_for(creds, Cmd.RESTORE, bytes(16)))) == Result.BAD_MAC
    nonce = proto.read_challenge()
    data = frame_for(creds, Cmd.RESTORE, nonce)
    assert run(proto.handle_command(data)) == Result.OK
    # the same nonce again, with a higher counter: reused challenge
    reused = frame_for(creds, Cmd.RESTORE, nonce)
    assert run(proto.handle_command(reused)) == Result.STALE_CHALLENGE
    # a nonce older than 10 s: stale
    old = proto.read_challenge()
    clock.advance(10.5)
    assert run(proto.handle_command(frame_for(creds, Cmd.UNLOCK, old))) == Result.STALE_CHALLENGE
    assert [c.action for c in sink.commands] == [Action.RESTORE]


def test_wrong_key_unknown_and_revoked_fobs(env, tmp_path):
    proto, sink, creds, _ = env
    forged = frames.build_frame(bytes(32), bytes.fromhex(creds.appliance_id), Cmd.SAVE, 1, 99,
                                proto.read_challenge())  # fmt: skip
    assert run(proto.handle_command(forged)) == Result.BAD_MAC
    unknown = frames.build_frame(bytes(32), bytes(16), Cmd.SAVE, 77, 1, bytes(16))
    assert run(proto.handle_command(unknown)) == Result.UNKNOWN_FOB
    run(proto.fobs_handler({"op": "revoke", "id": 1}))
    assert run(proto.handle_command(fresh(proto, creds, Cmd.SAVE))) == Result.REVOKED
    assert sink.commands == []
    assert "key" not in json.dumps(run(proto.fobs_handler({"op": "list"})))
    assert json.loads((tmp_path / "fobs.json").read_text())["fobs"]["1"]["key"] == ""


def test_bus_refusal_is_reported(env):
    proto, sink, creds, _ = env
    sink.refuse = {"save"}
    assert run(proto.handle_command(fresh(proto, creds, Cmd.SAVE))) == Result.REFUSED


def test_pairing_only_inside_the_window(tmp_path):
    proto = FobProtocol(FobRegistry(tmp_path / "f.json"), RecordingBus())
    fob = FobPairing()
    with pytest.raises(FrameError) as err:
        proto.pair_write("dev", fob.pub_writes()[0])
    assert err.value.result == Result.PAIRING_CLOSED
    assert proto.registry.list() == []


def test_wrong_setup_code_pairs_nothing(tmp_path):
    proto = FobProtocol(FobRegistry(tmp_path / "f.json"), RecordingBus(), setup_code="1234")
    proto.set_pairing(True)
    with pytest.raises(ValueError, match="setup code"):
        pair_directly(proto, setup_code="9999")
    creds = pair_directly(proto, setup_code="1234")
    assert [f["fob_id"] for f in proto.registry.list()] == [creds.fob_id]


def test_registry_file_is_private_and_rename_persists(env, tmp_path):
    proto, *_ = env
    path = tmp_path / "fobs.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    run(proto.fobs_handler({"op": "rename", "id": 1, "name": "keyring"}))
    assert FobRegistry(path).list()[0]["name"] == "keyring"
    with pytest.raises(ValueError, match="no fob with id 5"):
        run(proto.fobs_handler({"op": "revoke", "id": 5}))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fobs.json")]


def test_bus_events_reach_the_status_value(env):
    proto, *_ = env
    sent = []
    proto.on_status = sent.append
    proto.on_event(Event("state", {"mode": "unlocked", "epoch": 5, "dirty_units": 2,
                                   "dirty_bytes": 8192, "host_connected": True}))  # fmt: skip
    proto.on_event(Event("pairing", {"open": True, "until": 0}))
    status = Status.decode(sent[-1])
    assert (status.unlocked, status.epoch, status.dirty_units, status.dirty_bytes) == (
        True, 5, 2, 8192)  # fmt: skip
    assert status.host_connected and status.pairing


def test_registry_remembers_the_peer_and_loads_older_files(tmp_path):
    proto = FobProtocol(FobRegistry(tmp_path / "fobs.json"), RecordingBus())
    proto.set_pairing(True)
    pair_directly(proto, peer="/org/bluez/hci0/dev_F0_F0_F0_F0_F0_01")
    [fob] = FobRegistry(tmp_path / "fobs.json").list()
    assert (fob["device"], fob["address"]) == (
        "/org/bluez/hci0/dev_F0_F0_F0_F0_F0_01",
        "F0:F0:F0:F0:F0:01",
    )

    # a registry written before addresses were recorded still loads; revoke still stands
    doc = json.loads((tmp_path / "fobs.json").read_text())
    for record in doc["fobs"].values():
        del record["device"], record["address"]
    (tmp_path / "old.json").write_text(json.dumps(doc))
    old = FobProtocol(FobRegistry(tmp_path / "old.json"), RecordingBus())
    old.forget_bond = None
    answer = run(old.fobs_handler({"op": "revoke", "id": 1}))["fob"]
    assert answer["revoked"] and answer["address"] == ""


def outcome(proto: FobProtocol, fob_id: int, counter: int, peer: str = "dev"):
    proto.outcome_write(peer, frames.outcome_query(fob_id, counter))
    return frames.FrameOutcome.decode(proto.outcome_read(peer))


def test_outcome_tells_a_frame_that_ran_from_one_that_never_did(env, tmp_path):
    proto, sink, creds, _ = env
    assert outcome(proto, creds.fob_id, 1).state == FrameState.NOT_RUN  # nothing sent yet
    sink.refuse = {"save"}
    assert run(proto.handle_command(fresh(proto, creds, Cmd.SAVE))) == Result.REFUSED
    refused = outcome(proto, creds.fob_id, creds.counter)
    assert (refused.state, refused.cmd, refused.result) == (FrameState.DONE, Cmd.SAVE,
                                                            Result.REFUSED)  # fmt: skip
    bad = bytearray(fresh(proto, creds, Cmd.SAVE))
    bad[-1] ^= 1  # a frame refused before its counter was accepted never ran
    assert run(proto.handle_command(bytes(bad))) == Result.BAD_MAC
    assert outcome(proto, creds.fob_id, creds.counter).state == FrameState.NOT_RUN
    assert outcome(proto, 77, 1).state == FrameState.NOT_RUN  # unknown fob
    # a restarted appliance keeps the counter but not the outcome: it says so
    again = FobProtocol(FobRegistry(tmp_path / "fobs.json"), sink)
    assert outcome(again, creds.fob_id, creds.counter - 1).state == FrameState.UNKNOWN
    assert len(sink.commands) == 1


def test_outcome_is_running_until_the_bus_answers(env):
    proto, sink, creds, _ = env

    async def body() -> None:
        gate = asyncio.Event()
        submit = sink.submit

        async def slow(command):
            await gate.wait()
            return await submit(command)

        sink.submit = slow  # type: ignore[method-assign]
        task = asyncio.ensure_future(proto.handle_command(fresh(proto, creds, Cmd.SAVE)))
        await asyncio.sleep(0.01)
        assert outcome(proto, creds.fob_id, creds.counter).state == FrameState.RUNNING
        gate.set()
        assert await task == Result.OK
        done = outcome(proto, creds.fob_id, creds.counter)
        assert (done.state, done.result) == (FrameState.DONE, Result.OK)

    run(body())


def test_outcome_queries_are_per_peer_and_bounded(env):
    proto, _sink, creds, _ = env
    assert frames.FrameOutcome.decode(proto.outcome_read("new")).state == FrameState.NO_QUERY
    outcome(proto, creds.fob_id, 5, peer="a")
    assert frames.FrameOutcome.decode(proto.outcome_read("b")).state == FrameState.NO_QUERY
    for n in range(MAX_QUERIES + 5):
        outcome(proto, creds.fob_id, 5, peer=f"p{n}")
    assert len(proto._queries) == MAX_QUERIES
    for _ in range(MAX_OUTCOMES + 5):
        assert run(proto.handle_command(fresh(proto, creds, Cmd.STATUS))) == Result.OK
    assert len(proto._outcomes) == MAX_OUTCOMES
    assert outcome(proto, creds.fob_id, 1).state == FrameState.UNKNOWN  # forgotten, not "never"
    with pytest.raises(FrameError):
        proto.outcome_write("a", b"\x09" + bytes(6))  # wrong version

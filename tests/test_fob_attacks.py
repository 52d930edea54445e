"""An attacker in radio range, one test per finding of the fob protocol review (issue: v2).

Each test plays the attacker's transcript against the appliance side (ble/protocol.py) with no
radio: the attacker may pair during a window, record, withhold and replay frames, and read the
Challenge as often as it likes from its own bonded device.
"""

from __future__ import annotations

import hmac

import pytest
from spake2 import SPAKE2_A

from ble import frames
from ble.frames import Cmd, Result
from ble.keys import FobPairing, FobRegistry, derive_fob_key, spake_ids
from ble.protocol import MAX_COUNTER_JUMP, MAX_PAIR_FAILURES, FobProtocol
from tests.ble_helpers import frame_for, pair_directly
from tests.support import FakeClock, RecordingBus, run

CODE = "482913"


@pytest.fixture
def world(tmp_path):
    clock = FakeClock()
    proto = FobProtocol(FobRegistry(tmp_path / "fobs.json"), RecordingBus(), setup_code=CODE,
                        clock=clock)  # fmt: skip
    return proto, clock


def _attacker_exchange(proto: FobProtocol, peer: str, guess: str) -> tuple[SPAKE2_A, bytes]:
    """The attacker starts pairing with its guess and reads the appliance's answer."""
    fob = FobPairing(guess)
    for write in fob.pub_writes():
        proto.pair_write(peer, write)
    return fob, proto.pair_read(peer)


def test_pair_reply_gives_nothing_to_test_guesses_against(world):
    """Finding 1: v1 sent confirm_A before the fob proved the code; an offline search found it."""
    proto, _ = world
    proto.set_pairing(True)
    _fob, reply_bytes = _attacker_exchange(proto, "attacker", "000000")
    reply = frames.PairReply.decode(reply_bytes)
    assert reply.confirm == bytes(frames.CONFIRM_LEN)  # nothing derived from the key yet
    # The attacker's best offline move: for every candidate code, run the exchange as a fob that
    # knew that code and look for any of its key's confirmations in what the appliance sent.
    hits = []
    for candidate in ("000000", "111111", CODE, "999999"):
        guesser = SPAKE2_A(candidate.encode(), idA=spake_ids()[0], idB=spake_ids()[1])
        guesser.start()
        try:
            shared = guesser.finish(reply.appliance_msg)
        except ValueError:
            continue
        key = derive_fob_key(shared, reply.appliance_id, reply.fob_id)
        for label in (b"savepoint-confirm-appliance", b"savepoint-confirm-fob"):
            tag = hmac.new(key, label, "sha256").digest()[:16]
            if tag in reply_bytes:
                hits.append(candidate)
    assert hits == []


def test_wrong_code_three_times_closes_the_window(world):
    """Finding 1/2: failed confirmations were unlimited, each burning an id and an fsync."""
    proto, _ = world
    closed: list[str] = []
    proto.on_window_closed = closed.append
    proto.set_pairing(True)
    next_id = proto.registry.next_id
    for attempt in range(MAX_PAIR_FAILURES):
        fob, reply = _attacker_exchange(proto, f"attacker{attempt}", f"00000{attempt}")
        with pytest.raises(ValueError):  # the fob sees no appliance confirmation to check
            creds, confirm = fob.finish(reply)
            proto.pair_write(f"attacker{attempt}", confirm)
            fob.check_appliance(proto.pair_read(f"attacker{attempt}"))
    assert not proto.pairing_open
    assert closed and "setup code" in closed[0]
    assert proto.registry.next_id == next_id and proto.registry.list() == []
    with pytest.raises(frames.FrameError) as e:  # the right code is too late now
        pair_directly(proto, "owner", CODE)
    assert e.value.result == Result.PAIRING_CLOSED


def test_one_gesture_one_fob(world):
    """Finding 2: the window stayed open after a pairing; a second device joined."""
    proto, _ = world
    closed: list[str] = []
    proto.on_window_closed = closed.append
    proto.set_pairing(True)
    pair_directly(proto, "owner", CODE)
    assert not proto.pairing_open and closed == ["fob 1 paired"]
    with pytest.raises(frames.FrameError) as e:
        pair_directly(proto, "second", CODE)
    assert e.value.result == Result.PAIRING_CLOSED
    assert [f["fob_id"] for f in proto.registry.list()] == [1]


def test_no_device_can_starve_another_of_its_challenge(world):
    """Finding 3: one shared pool of 8 nonces; an attacker read 8 and the fob's RESTORE failed."""
    proto, _ = world
    proto.set_pairing(True)
    creds = pair_directly(proto, "owner", CODE)
    nonce = proto.read_challenge("owner")
    for _ in range(100):
        proto.read_challenge("attacker")
    data = frame_for(creds, Cmd.RESTORE, nonce)
    assert run(proto.handle_command(data, "owner")) == Result.OK


def test_a_nonce_is_good_only_on_the_link_it_was_read_on(world):
    proto, _ = world
    proto.set_pairing(True)
    creds = pair_directly(proto, "owner", CODE)
    nonce = proto.read_challenge("attacker")
    assert (
        run(proto.handle_command(frame_for(creds, Cmd.SAVE, nonce), "owner"))
        == Result.STALE_CHALLENGE
    )


@pytest.mark.parametrize("cmd", [Cmd.SAVE, Cmd.LOCK, Cmd.STATUS])
def test_withheld_frame_is_refused_after_the_challenge_lifetime(world, cmd):
    """Finding 4: SAVE, LOCK and STATUS carried no challenge, so a withheld frame never expired."""
    proto, clock = world
    proto.set_pairing(True)
    creds = pair_directly(proto, "owner", CODE)
    withheld = frame_for(creds, cmd, proto.read_challenge("owner"))  # the attacker jams it
    clock.advance(proto.challenge_ttl + 1)
    assert run(proto.handle_command(withheld, "owner")) == Result.STALE_CHALLENGE
    assert proto.bus.commands == []


def test_frame_without_a_challenge_is_refused(world):
    proto, _ = world
    proto.set_pairing(True)
    creds = pair_directly(proto, "owner", CODE)
    creds.counter += 1
    bare = frames.header_only_frame(bytes.fromhex(creds.key), bytes.fromhex(creds.appliance_id),
                                    Cmd.SAVE, creds.fob_id, creds.counter)  # fmt: skip
    assert run(proto.handle_command(bare, "owner")) == Result.STALE_CHALLENGE


def test_counter_jump_is_refused_and_does_not_burn_the_fob(world):
    """Finding: one frame with counter 2^32-1 used to be accepted and end the fob for good."""
    proto, _ = world
    proto.set_pairing(True)
    creds = pair_directly(proto, "owner", CODE)
    creds.counter = 2**32 - 2  # frame_for adds one: 2^32-1
    jump = frame_for(creds, Cmd.SAVE, proto.read_challenge("owner"))
    assert run(proto.handle_command(jump, "owner")) == Result.COUNTER_JUMP
    assert proto.registry.get(creds.fob_id).counter == 0
    creds.counter = MAX_COUNTER_JUMP - 1  # the largest step still taken
    ok = frame_for(creds, Cmd.SAVE, proto.read_challenge("owner"))
    assert run(proto.handle_command(ok, "owner")) == Result.OK


def test_status_read_by_the_fob_carries_a_mac_with_its_key(world):
    """Finding 5: the fob could not tell the appliance it paired with from an impostor."""
    proto, _ = world
    proto.set_pairing(True)
    creds = pair_directly(proto, "owner", CODE)
    nonce = proto.read_challenge("owner")
    assert run(proto.handle_command(frame_for(creds, Cmd.STATUS, nonce), "owner")) == Result.OK
    value = proto.status_read("owner")
    status = frames.verify_status(value, bytes.fromhex(creds.key),
                                  bytes.fromhex(creds.appliance_id), nonce)  # fmt: skip
    assert (status.last_cmd, status.last_result, status.last_fob) == (Cmd.STATUS, Result.OK, 1)
    forged = value[:17] + bytes([Result.REFUSED]) + value[18:]
    with pytest.raises(frames.FrameError):
        frames.verify_status(forged, bytes.fromhex(creds.key), bytes.fromhex(creds.appliance_id),
                             nonce)  # fmt: skip


def test_constant_time_compares_only(world):
    """Finding 5: confirm values were compared with `!=`; every secret compare is compare_digest."""
    import inspect

    import ble.frames
    import ble.keys
    import ble.protocol

    for module in (ble.frames, ble.keys, ble.protocol):
        source = inspect.getsource(module)
        for needle in ("tag !=", "tag ==", "confirm !=", "confirm ==", "!= confirm", "== confirm"):
            assert needle not in source, f"{module.__name__} compares secrets with {needle!r}"


def test_protocol_1_fobs_are_told_to_pair_again(world, tmp_path):
    """Entries written by protocol 1 (no `protocol` field) and v1 messages: OLD_PROTOCOL."""
    import json

    proto, _ = world
    proto.set_pairing(True)
    creds = pair_directly(proto, "owner", CODE)
    doc = json.loads(proto.registry.path.read_text())
    del doc["fobs"]["1"]["protocol"]  # what a protocol 1 appliance wrote
    proto.registry.path.write_text(json.dumps(doc))
    old = FobProtocol(FobRegistry(proto.registry.path), RecordingBus(), setup_code=CODE)
    assert old.registry.list()[0]["protocol"] == 1
    frame = frame_for(creds, Cmd.SAVE, old.read_challenge("owner"))
    assert run(old.handle_command(frame, "owner")) == Result.OLD_PROTOCOL
    v1_frame = bytes([1]) + frame[1:]
    assert run(old.handle_command(v1_frame, "owner")) == Result.OLD_PROTOCOL
    old.set_pairing(True)
    with pytest.raises(frames.FrameError) as e:
        old.pair_write("owner", bytes([1, 0x10]) + bytes(16))
    assert e.value.result == Result.OLD_PROTOCOL
    assert old.bus.commands == []

"""The test vectors in docs/fob-protocol.md are what the code computes from the same inputs.

A firmware author checks a fob against the doc's vectors; this test keeps the doc honest.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from spake2 import SPAKE2_A, SPAKE2_B
from spake2.ed25519_group import Ed25519Group
from spake2.parameters.ed25519 import ParamsEd25519

from ble import frames
from ble.frames import Cmd, Result, Status
from ble.keys import (
    CONFIRM_APPLIANCE,
    CONFIRM_FOB,
    ID_APPLIANCE,
    ID_FOB,
    confirm_tag,
    derive_fob_key,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "fob-protocol.md"
CODE = "482913"
APPLIANCE_ID = bytes(range(16))
FOB_ID = 1
NONCE = bytes(range(16, 32))
FOB_ENTROPY = bytes([0x11]) * 64
APPLIANCE_ENTROPY = bytes([0x22]) * 64


def _fixed(data: bytes):
    return lambda n: data[:n]


def vectors() -> dict[str, str]:
    group = Ed25519Group
    params = ParamsEd25519
    fob = SPAKE2_A(CODE.encode(), idA=ID_FOB, idB=ID_APPLIANCE, entropy_f=_fixed(FOB_ENTROPY))
    app = SPAKE2_B(CODE.encode(), idA=ID_FOB, idB=ID_APPLIANCE,
                   entropy_f=_fixed(APPLIANCE_ENTROPY))  # fmt: skip
    fob_msg, app_msg = fob.start(), app.start()
    shared = fob.finish(app_msg)
    assert shared == app.finish(fob_msg)
    x_elem = group.Base.scalarmult(fob.xy_scalar)
    k_bytes = (
        group.bytes_to_element(app_msg[1:])
        .add(params.N.scalarmult(-fob.pw_scalar))
        .scalarmult(fob.xy_scalar)
        .to_bytes()
    )
    assert (
        shared
        == hashlib.sha256(
            hashlib.sha256(CODE.encode()).digest()
            + hashlib.sha256(ID_FOB).digest()
            + hashlib.sha256(ID_APPLIANCE).digest()
            + fob_msg[1:]
            + app_msg[1:]
            + k_bytes
        ).digest()
    )
    key = derive_fob_key(shared, APPLIANCE_ID, FOB_ID)
    writes = frames.pair_msg_writes(fob_msg)
    c_fob, c_app = confirm_tag(key, CONFIRM_FOB), confirm_tag(key, CONFIRM_APPLIANCE)
    frame = frames.build_frame(key, APPLIANCE_ID, Cmd.SAVE, FOB_ID, 1, NONCE)
    status = Status(epoch=7, last_cmd=Cmd.SAVE, last_result=Result.OK, last_fob=FOB_ID).encode()
    return {
        "M": params.M.to_bytes().hex(),
        "N": params.N.to_bytes().hex(),
        "pw_scalar": group.scalar_to_bytes(fob.pw_scalar).hex(),
        "x": group.scalar_to_bytes(fob.xy_scalar).hex(),
        "X": x_elem.to_bytes().hex(),
        "fob_msg": fob_msg.hex(),
        "y": group.scalar_to_bytes(app.xy_scalar).hex(),
        "appliance_msg": app_msg.hex(),
        "K": k_bytes.hex(),
        "spake2_key": shared.hex(),
        "fob_key": key.hex(),
        "pair_write_1": writes[0].hex(),
        "pair_write_2": writes[1].hex(),
        "pair_reply": frames.PairReply(Result.OK, FOB_ID, APPLIANCE_ID, app_msg).encode().hex(),
        "confirm_write": frames.pair_confirm_write(FOB_ID, c_fob).hex(),
        "confirm_appliance": c_app.hex(),
        "save_frame": frame.hex(),
        "status": status.hex(),
        "status_tag": frames.status_tag(key, APPLIANCE_ID, NONCE, status).hex(),
    }


def doc_vectors() -> dict[str, str]:
    block = DOC.read_text().split("```vectors", 1)[1].split("```", 1)[0]
    return {m[1]: m[2].replace(" ", "") for m in re.finditer(r"^(\w+)\s*=\s*([0-9a-f ]+)$",
                                                              block, re.M)}  # fmt: skip


def test_doc_vectors_match_the_code():
    assert doc_vectors() == vectors()


if __name__ == "__main__":  # prints the block for the doc
    for name, value in vectors().items():
        print(f"{name:<18}= {value}")

"""Third-party NBD clients against the real server and store: nbdinfo, qemu-io, qemu-img, fio,
nbdcopy."""

from __future__ import annotations

import json
import os

import pytest

from tests.nbd_helpers import MiB, run, serve, wait_for


@pytest.fixture
def served(tmp_path):
    with serve(tmp_path, size=64 * MiB) as s:
        yield s


def test_nbdinfo_json_reports_size_flags_block_sizes_and_contexts(served):
    info = json.loads(run("nbdinfo", "--json", served.uri).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    (ex,) = info["exports"]
    assert ex["export-name"] == "savepoint"
    assert ex["export-size"] == 64 * MiB
    assert ex["contexts"] == ["base:allocation"]
    for flag in (
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
        "can_cache",
        "can_df",
    ):
        assert ex[flag] is True, flag
    assert ex["is_read_only"] is False
    assert (ex["block_size_minimum"], ex["block_size_preferred"], ex["block_size_maximum"]) == (
        1,
        4096,
        32 * MiB,
    )


def test_nbdinfo_list_and_preferred_block_is_the_unit(tmp_path):
    with serve(tmp_path, size=32 * MiB, unit=65536) as s:
        listing = run("nbdinfo", "--list", "--json", s.uri).stdout
        (ex,) = json.loads(listing)["exports"]
        assert ex["export-name"] == "savepoint" and ex["block_size_preferred"] == 65536
        assert "Savepoint" in ex["description"]


def test_nbdinfo_map_shows_holes_and_data(served):
    served.store.write(1 * MiB, b"\1" * (2 * MiB))
    out = run("nbdinfo", "--map", "--json", served.uri).stdout
    extents = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
    assert extents == [(0, 1 * MiB, 3), (1 * MiB, 2 * MiB, 0), (3 * MiB, 61 * MiB, 3)]


def test_qemu_io_patterns(served):
    cmds = [
        "write -P 0xab 0 1M",
        "read -P 0xab 0 1M",
        "write -f -P 0xcd 1M 64k",
        "read -P 0xcd 1M 64k",
        "flush",
        "write -P 0x11 2M 12k",
        "write -z 2M 8k",
        "read -P 0 2M 8k",
        "read -P 0x11 2105344 4k",
        "discard 0 64k",
        "read -P 0 0 64k",
        "read -P 0xab 64k 960k",
        "write -P 0x5a 4097 3",
        "read -P 0x5a 4097 3",
    ]
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    out = run(*argv, served.uri).stdout
    assert "Pattern verification failed" not in out and "error" not in out.lower(), out
    st = served.store
    assert st.read(0, 64 * 1024) == bytes(4097) + b"\x5a" * 3 + bytes(65536 - 4100)
    assert st.read(1 * MiB, 64 * 1024) == b"\xcd" * 65536
    assert st.read(2 * MiB, 12 * 1024) == bytes(8192) + b"\x11" * 4096
    assert st.read(64 * 1024, 960 * 1024) == b"\xab" * (960 * 1024)


def test_fio_random_sizes_verify_crc32c_qd16(served):
    out = run(
        "fio",
        "--name=verify",
        "--ioengine=nbd",
        f"--uri={served.uri}",
        "--rw=randwrite",
        "--bsrange=4k-1m",
        "--iodepth=16",
        "--size=16m",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--randseed=7",
        "--output-format=json",
        timeout=300,
    ).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 16 * MiB and job["read"]["io_bytes"] >= 16 * MiB


def test_qemu_img_compare_after_convert(served, tmp_path):
    ref = tmp_path / "ref.img"
    with open(ref, "wb") as f:
        f.truncate(64 * MiB)
        for i in range(0, 64, 5):  # scattered data with holes between
            f.seek(i * MiB + 777)
            f.write(os.urandom(300 * 1024))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(ref), served.uri)
    assert (
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), served.uri).returncode == 0
    )
    served.store.write(7 * MiB, b"x")
    assert (
        run(
            "qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), served.uri, check=False
        ).returncode
        == 1
    )


def test_nbdcopy_four_connections_both_ways(served, tmp_path):
    src, back = tmp_path / "src.img", tmp_path / "back.img"
    data = os.urandom(40 * MiB)
    with open(src, "wb") as f:
        f.write(data)
        f.truncate(64 * MiB)
    run("nbdcopy", "--connections=4", "--requests=16", str(src), served.uri)
    assert wait_for(lambda: served.server.active_connections == 0)
    run("nbdcopy", "--connections=4", served.uri, str(back))
    assert back.read_bytes() == data + bytes(24 * MiB)
    assert served.store.read(0, 40 * MiB) == data


def test_tcp_loopback_serves_the_same_disk(tmp_path):
    with serve(tmp_path, size=8 * MiB, tcp=("127.0.0.1", 0)) as s:
        tcp_uri = s.server.uris[1]
        assert tcp_uri.startswith("nbd://127.0.0.1:")
        run("qemu-io", "-f", "raw", "-c", "write -P 0x42 0 64k", tcp_uri)
        assert s.store.read(0, 65536) == b"\x42" * 65536
        run("qemu-io", "-f", "raw", "-c", "read -P 0x42 0 64k", s.uri)

"""The deterministic tar writer, read back by Python's tarfile, GNU tar and our reader."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile

import pytest

from lamina.layer.tarstream import TarReader
from lamina.layer.tarwrite import Header, write_tar

LONG = "usr/" + "d" * 120 + "/" + "f" * 130
MEMBERS = [
    (Header("etc/", "dir", 0o755, mtime_ns=1_000_000_000_000), b""),
    (Header("etc/passwd", "file", 0o4755, uid=3, gid=4, mtime_ns=5), b"root:x:0:0\n"),
    (Header(LONG, "file", 0o600, uid=1 << 22, gid=1 << 30,
            mtime_ns=1_500_000_000_123_456_789), b"long"),
    (Header("ünï cødé", "file", xattrs={"user.bin": b"\x00\xff", "security.capability":
                                        b"\x01\x00\x00\x02"}), b""),
    (Header("link", "symlink", 0o777, linkname="/" + "t" * 150), b""),
    (Header("hard", "hardlink", linkname="etc/passwd"), b""),
    (Header("dev/null", "char", 0o666, devmajor=1, devminor=3), b""),
    (Header("fifo", "fifo", 0o600), b""),
]


def test_python_tarfile_reads_it() -> None:
    data = write_tar(MEMBERS)
    assert len(data) % 512 == 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        got = {m.name: m for m in tf.getmembers()}
        assert got["etc/passwd"].mode == 0o4755
        assert tf.extractfile("etc/passwd").read() == b"root:x:0:0\n"  # type: ignore[union-attr]
        assert got[LONG].uid == 1 << 22 and got[LONG].gid == 1 << 30
        assert got["link"].linkname == "/" + "t" * 150
        assert got["dev/null"].devmajor == 1 and got["dev/null"].devminor == 3
        assert got["ünï cødé"].pax_headers["SCHILY.xattr.user.bin"]


def test_our_reader_round_trip() -> None:
    data = write_tar(MEMBERS)
    src = io.BytesIO(data)
    r = TarReader(src.read)
    seen = {}
    for e in r:
        seen[e.name] = (e.kind, e.mode, e.uid, e.gid, e.mtime_ns, e.linkname, r.read_data(),
                        e.xattrs)
    assert seen["etc/"][0] == "dir"
    assert seen[LONG][4] == 1_500_000_000_123_456_789
    assert seen["ünï cødé"][7] == {"user.bin": b"\x00\xff",
                                     "security.capability": b"\x01\x00\x00\x02"}
    assert seen["hard"][:1] == ("hardlink",) and seen["hard"][5] == "etc/passwd"
    assert write_tar(MEMBERS) == data  # deterministic


def test_gnu_tar_lists_it() -> None:
    if shutil.which("tar") is None:
        pytest.skip("no tar")
    out = subprocess.run(["tar", "-tvf", "-"], input=write_tar(MEMBERS), capture_output=True,
                         check=True).stdout.decode()
    assert LONG in out and "ünï cødé" in out and "link -> /ttt" in out

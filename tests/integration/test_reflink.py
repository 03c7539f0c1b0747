"""FICLONE on a real reflink filesystem: a loop-mounted btrfs (or xfs) made by the test.

The consumer must share extents with the source (FIEMAP's shared flag, as
``filefrag -v`` prints it) and a layer rebuilt from cloned objects must match
its diff_id.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopfs import loop_fs, shared_extents

from lamina.layer.tarstream import TarEntry
from lamina.stream.splitdirfdstream import (
    DataReader,
    StreamWriter,
    from_tar,
    import_file,
    read_chunks,
    write_tar,
)
from lamina.testing.layers import TarBuilder

pytestmark = pytest.mark.root


@pytest.fixture(params=["btrfs", "xfs"])
def reflink_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    with loop_fs(str(request.param), tmp_path, 320 << 20) as mnt:
        yield mnt


def test_import_file_reflinks_and_layer_matches(reflink_fs: Path) -> None:
    src_objs = reflink_fs / "src"
    dst_objs = reflink_fs / "dst"
    src_objs.mkdir()
    dst_objs.mkdir()
    t = TarBuilder()
    payloads = [os.urandom(1 << 20), os.urandom(3 << 20), b"small"]
    for i, p in enumerate(payloads):
        t.add_file(f"f{i}", p)
    tar = t.build()

    def place(entry: TarEntry, read: DataReader) -> tuple[int, str]:
        data = b""
        while b := read():
            data += b
        name = hashlib.sha256(data).hexdigest()
        (src_objs / name).write_bytes(data)
        return 0, name

    stream = io.BytesIO()
    did = from_tar(io.BytesIO(tar), StreamWriter(stream), place)
    os.sync()       # extents are allocated, so FIEMAP reports them

    # consumer: import every referenced object into its own directory
    sfd = os.open(src_objs, os.O_RDONLY | os.O_DIRECTORY)
    dfd = os.open(dst_objs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        cloned = []
        for c in read_chunks(io.BytesIO(stream.getvalue())):
            if c.name is None:
                continue
            fd = os.open(c.name, os.O_RDONLY, dir_fd=sfd)
            try:
                cloned.append(import_file(fd, dfd, c.name.decode()))
            finally:
                os.close(fd)
        assert cloned == [True, True, True]
        os.sync()
        for p in payloads[:2]:
            assert shared_extents(dst_objs / hashlib.sha256(p).hexdigest())
        out = io.BytesIO()
        assert write_tar(read_chunks(io.BytesIO(stream.getvalue())), [dfd], out) == did
        assert out.getvalue() == tar
    finally:
        os.close(sfd)
        os.close(dfd)

"""FICLONE on a real reflink filesystem: a loop-mounted btrfs (or xfs) made by the test.

The consumer must share extents with the source (FIEMAP's shared flag, as
``filefrag -v`` prints it) and a layer rebuilt from cloned objects must match
its diff_id.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need_tool
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


def _mkfs(kind: str, image: Path) -> list[str]:
    if kind == "btrfs":
        return [need_tool("mkfs.btrfs"), "-q", "-f", str(image)]
    return [need_tool("mkfs.xfs"), "-q", "-f", "-m", "reflink=1", str(image)]


@pytest.fixture(params=["btrfs", "xfs"])
def reflink_fs(request: pytest.FixtureRequest, tmp_path: Path,
               require_root: None) -> Iterator[Path]:
    kind = str(request.param)
    image = tmp_path / f"{kind}.img"
    with open(image, "wb") as f:
        f.truncate(320 << 20)       # xfs wants >= 300 MiB; sparse, so cheap
    subprocess.run(_mkfs(kind, image), check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot loop-mount {kind}: {r.stderr}")
        pytest.skip(f"cannot loop-mount {kind}: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        # umount -d also detaches the loop device mount set up
        subprocess.run(["umount", "-d", str(mnt)], check=False, capture_output=True)


def _shared(path: Path) -> bool:
    out = subprocess.run([need_tool("filefrag"), "-v", str(path)], check=True,
                         capture_output=True, text=True).stdout
    extents = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit() and ":" in ln]
    return bool(extents) and all("shared" in ln for ln in extents)


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
            assert _shared(dst_objs / hashlib.sha256(p).hexdigest())
        out = io.BytesIO()
        assert write_tar(read_chunks(io.BytesIO(stream.getvalue())), [dfd], out) == did
        assert out.getvalue() == tar
    finally:
        os.close(sfd)
        os.close(dfd)

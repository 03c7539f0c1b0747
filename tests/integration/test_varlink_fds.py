"""Descriptor-heavy io.lamina.Store calls on a real socket, in process.

A stub backend hands out one directory per file (300 of them), so GetLayer
must spread its descriptors over several ``continues`` replies; PutLayer
into a layout reassembles file-backed chunks from client-passed directories.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from lamina.errors import NotFoundError, UnsafeLayerError
from lamina.ipc.backend import LayerRecord, LayoutBackend, Release
from lamina.ipc.client import StoreClient
from lamina.ipc.protocol import VarlinkError
from lamina.ipc.service import ServerOptions, VarlinkServer
from lamina.ipc.store import StoreService
from lamina.layer.tarstream import TarEntry
from lamina.oci.layout import OCILayout
from lamina.oci.model import Descriptor, Platform
from lamina.stream.splitdirfdstream import DataReader, StreamWriter, from_tar
from lamina.testing.images import diff_id
from lamina.testing.layers import TarBuilder

N_FILES = 300


class _ManyDirs:
    def __init__(self, root: Path, tar: bytes) -> None:
        self.tar = tar
        self.dirfds: list[int] = []
        self.root = root

        def place(entry: TarEntry, read: DataReader) -> tuple[int, str]:
            d = root / f"d{len(self.dirfds)}"
            d.mkdir()
            data = b""
            while b := read():
                data += b
            (d / "f").write_bytes(data)
            self.dirfds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY))
            return len(self.dirfds) - 1, "f"

        self.stream = io.BytesIO()
        self.diff_id = from_tar(io.BytesIO(tar), StreamWriter(self.stream), place)

    def write_to(self, out: BinaryIO) -> str:
        out.write(self.stream.getvalue())
        return self.diff_id

    def close(self) -> None:
        pass    # the test owns the fds


class _StubBackend:
    def __init__(self, layer: _ManyDirs) -> None:
        self.layer = layer

    def list_images(self) -> list[dict[str, Any]]:
        return []

    def inspect(self, tag: str, platform: Platform | None) -> dict[str, Any]:
        raise NotFoundError(tag)

    def has_layer(self, diff_id: str) -> bool:
        return diff_id == self.layer.diff_id

    def open_layer(self, diff_id: str) -> _ManyDirs:
        if diff_id != self.layer.diff_id:
            raise NotFoundError(diff_id)
        return self.layer

    def put_layer(self, stream: BinaryIO, dirfds: Sequence[int], *, diff_id: str | None,
                  compression: str) -> LayerRecord:
        raise NotImplementedError

    def finalize_image(self, tag: str, config: dict[str, Any], layers: list[LayerRecord],
                       annotations: dict[str, str]) -> Descriptor:
        raise NotImplementedError

    def unpack(self, tag: str, bundle: str, platform: Platform | None,
               rootless: bool) -> dict[str, Any]:
        raise NotImplementedError

    def gc(self, dry_run: bool) -> dict[str, Any]:
        raise NotImplementedError

    def hold(self) -> Release:
        return lambda: None


def _tar() -> bytes:
    t = TarBuilder()
    for i in range(N_FILES):
        t.add_file(f"f{i:03d}", f"content {i}\n".encode() * (i + 1))
    return t.build()


async def _with_server(tmp: Path, backend: Any, body: Any) -> None:
    service = StoreService(backend)
    server = VarlinkServer(ServerOptions(str(tmp / "s.sock")), [service.interface()])
    await server.start()
    try:
        async with await StoreClient.connect(str(tmp / "s.sock")) as c:
            await body(c)
    finally:
        await server.close()
        await service.close()


def test_get_layer_splits_descriptors_over_replies(tmp_path: Path) -> None:
    tar = _tar()
    src = tmp_path / "objs"
    src.mkdir()
    layer = _ManyDirs(src, tar)
    assert len(layer.dirfds) == N_FILES
    fds_before = len(os.listdir("/proc/self/fd"))

    async def body(c: StoreClient) -> None:
        replies = []
        async for r in c.stream("io.lamina.Store.GetLayer", {"diff_id": layer.diff_id},
                                more=True):
            replies.append((len(r.fds), r.continues, r.parameters.get("diff_id")))
            if "stream" in r.parameters:    # drain it (the writer is a server thread)
                got = b""
                while b := os.read(r.fds[r.parameters["stream"]], 1 << 16):
                    got += b
                assert got == layer.stream.getvalue()
            for fd in r.fds:
                os.close(fd)
        # 1 stream + 239 dirs, the other 61 dirs, then the verdict once it was written
        assert replies == [(240, True, None), (61, True, None), (0, False, layer.diff_id)]

        out = io.BytesIO()
        assert await c.fetch_layer(layer.diff_id, out) == diff_id(tar)
        assert out.getvalue() == tar

        # without 'more' the call cannot carry 300 directories
        with pytest.raises(VarlinkError) as ei:
            await c.call("io.lamina.Store.GetLayer", {"diff_id": layer.diff_id})
        assert ei.value.name == "org.varlink.service.ExpectedMore"

    try:
        asyncio.run(_with_server(tmp_path, _StubBackend(layer), body))
    finally:
        for fd in layer.dirfds:
            os.close(fd)
    assert len(os.listdir("/proc/self/fd")) <= fds_before - N_FILES


def test_put_layer_with_file_references_into_a_layout(tmp_path: Path) -> None:
    tar = _tar()
    objs = tmp_path / "objects"
    objs.mkdir()

    def place(entry: TarEntry, read: DataReader) -> tuple[int, str]:
        data = b""
        while b := read():
            data += b
        h = hashlib.sha256(data).hexdigest()
        (objs / h[:2]).mkdir(exist_ok=True)
        (objs / h[:2] / h[2:]).write_bytes(data)
        return 0, f"{h[:2]}/{h[2:]}"

    stream = io.BytesIO()
    did = from_tar(io.BytesIO(tar), StreamWriter(stream), place)
    layout = tmp_path / "layout"
    OCILayout.init(str(layout))
    dfd = os.open(objs, os.O_RDONLY | os.O_DIRECTORY)

    async def body(c: StoreClient) -> None:
        def write(sw: StreamWriter) -> None:
            sw._put(stream.getvalue())      # already encoded: pass through

        rec = await c.put_layer(write, [dfd], diff_id=did, compression="none")
        assert rec.diff_id == did == diff_id(tar)
        assert (layout / "blobs" / "sha256" / did[7:]).read_bytes() == tar

        # a symlink planted where a referenced object should be is refused
        victim = objs / "ev"
        victim.mkdir()
        (victim / "il").symlink_to("/etc/hostname")
        with pytest.raises(UnsafeLayerError):
            await c.put_layer(lambda sw: sw.file_ref(os.path.getsize("/etc/hostname"), 0,
                                                     "ev/il"), [dfd])

    try:
        asyncio.run(_with_server(tmp_path, LayoutBackend(str(layout)), body))
    finally:
        os.close(dfd)

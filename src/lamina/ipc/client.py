"""Clients of ``io.lamina.Store``: :class:`StoreClient` (asyncio), :class:`SyncStoreClient`.

Calls on one connection are serialised (varlink answers in order); open
several clients for parallel transfers.  Error replies of the store come back
as the matching :class:`~lamina.errors.LaminaError` subclass, other varlink
errors as :class:`~lamina.ipc.protocol.VarlinkError`.

Descriptors received from the server belong to the caller, who closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from lamina import errors
from lamina.errors import DigestMismatchError, EnvironmentError_, LaminaError
from lamina.ipc.backend import LayerRecord
from lamina.ipc.protocol import Channel, ProtocolError, VarlinkError, close_all
from lamina.ipc.store import FDS_PER_REPLY, NAME, make_pipe
from lamina.oci.model import Descriptor
from lamina.store.receive import BlobInput
from lamina.stream.splitdirfdstream import StreamWriter, from_tar, read_chunks, write_tar

_BY_CODE: dict[int, type[LaminaError]] = {
    c.code: c for c in (errors.UsageError, errors.NotFoundError, errors.ImageFormatError,
                        errors.DigestMismatchError, errors.CorruptLayerError,
                        errors.UnsafeLayerError, errors.BundleError, errors.UnsupportedError,
                        errors.EnvironmentError_)}


class StoreBusyError(EnvironmentError_):
    kind = "busy"


def _raise_error(body: dict[str, Any]) -> None:
    name = str(body.get("error"))
    params = body.get("parameters")
    params = params if isinstance(params, dict) else {}
    if name.startswith(NAME + ".") and isinstance(params.get("message"), str):
        hint = params.get("hint") if isinstance(params.get("hint"), str) else None
        if name == f"{NAME}.Busy":
            raise StoreBusyError(params["message"], hint=hint)
        cls = _BY_CODE.get(params.get("code", 1), LaminaError)
        raise cls(params["message"], hint=hint)
    raise VarlinkError(name, params)


@dataclass
class Reply:
    parameters: dict[str, Any]
    fds: list[int] = field(default_factory=list)
    continues: bool = False


@dataclass
class RemoteLayer:
    """A layer being received: the stream's read end and the directories it names."""

    stream: int
    dirfds: list[int]
    blob: BlobInput | None = None   # the compressed blob, when the server sent it
    _final: asyncio.Future[dict[str, Any]] | None = None

    async def finished(self) -> dict[str, Any]:
        """The server's last word on the stream (diff_id, tar_size); raises on its failure."""
        if self._final is None:
            return {}
        return await self._final

    def close(self) -> None:
        close_all([self.stream, *self.dirfds, self.blob.fd if self.blob else -1])
        self.stream = -1
        self.dirfds = []
        self.blob = None


T = TypeVar("T")


class StoreClient:
    def __init__(self, channel: Channel) -> None:
        self._ch = channel
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str) -> StoreClient:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(s, path)
        except OSError as e:
            s.close()
            raise EnvironmentError_(f"cannot connect to {path}: {e.strerror}",
                                    hint="is 'lamina serve --socket PATH' running?") from None
        return cls(Channel(s))

    async def close(self) -> None:
        self._ch.close()

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- raw calls -------------------------------------------------------------
    async def _next(self) -> Reply:
        msg = await self._ch.recv()
        if msg is None:
            raise ProtocolError("the server closed the connection")
        if "error" in msg.body:
            msg.close_fds()
            _raise_error(msg.body)
        params = msg.body.get("parameters")
        return Reply(params if isinstance(params, dict) else {}, msg.fds,
                     msg.body.get("continues") is True)

    async def stream(self, method: str, parameters: dict[str, Any] | None = None,
                     fds: Sequence[int] = (), *, more: bool = False
                     ) -> AsyncGenerator[Reply, None]:
        """Send one call; yield its replies (several with *more*).  *fds* stay the caller's."""
        async with self._lock:
            body: dict[str, Any] = {"method": method, "parameters": parameters or {}}
            if more:
                body["more"] = True
            await self._ch.send(body, list(fds))
            while True:
                r = await self._next()
                yield r
                if not r.continues:
                    return

    async def call(self, method: str, parameters: dict[str, Any] | None = None,
                   fds: Sequence[int] = ()) -> Reply:
        out: Reply | None = None
        async for r in self.stream(method, parameters, fds):
            out = r
        assert out is not None
        return out

    async def _params(self, method: str, parameters: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
        r = await self.call(f"{NAME}.{method}", parameters)
        close_all(r.fds)
        return r.parameters

    # -- the service -----------------------------------------------------------
    async def get_info(self) -> dict[str, Any]:
        r = await self.call("org.varlink.service.GetInfo")
        return r.parameters

    async def list_images(self) -> list[dict[str, Any]]:
        return list((await self._params("ListImages"))["images"])

    async def inspect(self, tag: str, platform: str | None = None) -> dict[str, Any]:
        p: dict[str, Any] = {"tag": tag}
        if platform:
            p["platform"] = platform
        return await self._params("Inspect", p)

    async def has_layer(self, diff_id: str) -> bool:
        return bool((await self._params("HasLayer", {"diff_id": diff_id}))["present"])

    @contextlib.asynccontextmanager
    async def get_layer(self, diff_id: str) -> AsyncIterator[RemoteLayer]:
        """Receive a layer's stream and directories; on exit the server's verdict is checked.

        Read (or forward) ``layer.stream`` inside the ``async with``; the fds are
        closed on exit.
        """
        gen = self.stream(f"{NAME}.GetLayer", {"diff_id": diff_id}, more=True)
        layer = RemoteLayer(-1, [])
        try:
            rep = await anext(gen)
            layer.stream = _fd_at(rep, rep.parameters.get("stream"))
            if rep.parameters.get("blob") is not None:
                desc = Descriptor.from_json(rep.parameters.get("descriptor"), "descriptor")
                layer.blob = BlobInput(_fd_at(rep, rep.parameters["blob"]), desc)
            total = rep.parameters.get("dirfd_count", 0)
            while True:
                layer.dirfds += [_fd_at(rep, i) for i in rep.parameters.get("dirfds", [])]
                close_all(rep.fds)      # _fd_at duplicated what we keep
                if not rep.continues or len(layer.dirfds) >= total:
                    break
                rep = await anext(gen)
            last = rep

            async def verdict() -> dict[str, Any]:
                r = last
                while r.continues:      # comes once the server wrote the whole stream
                    r = await anext(gen)
                    close_all(r.fds)
                return r.parameters

            layer._final = asyncio.ensure_future(verdict())
            yield layer
            await layer.finished()
        finally:
            layer.close()
            if layer._final is not None and not layer._final.done():
                layer._final.cancel()   # the connection is now out of step: drop it
                with contextlib.suppress(BaseException):
                    await layer._final
                self._ch.close()
            with contextlib.suppress(BaseException):
                await gen.aclose()

    async def fetch_layer(self, diff_id: str, out: BinaryIO) -> str:
        """Write the layer's uncompressed tar to *out*; return its verified diff_id."""
        async with self.get_layer(diff_id) as layer:
            fd = os.dup(layer.stream)

            def consume() -> str:
                with os.fdopen(fd, "rb") as f:
                    return write_tar(read_chunks(f), layer.dirfds, out)

            digest = await asyncio.to_thread(consume)
        if digest != diff_id:
            raise DigestMismatchError(f"received layer is {digest}, expected {diff_id}")
        return digest

    async def put_layer(self, write: Callable[[StreamWriter], None],
                        dirfds: Sequence[int] = (), *, diff_id: str | None = None,
                        compression: str = "gzip") -> LayerRecord:
        """Store a layer whose splitdirfdstream *write* produces (in a worker thread)."""
        r, w = make_pipe()

        def produce() -> None:
            with os.fdopen(w, "wb") as f:
                sw = StreamWriter(f)
                write(sw)
                sw.flush()

        try:
            task = asyncio.ensure_future(asyncio.to_thread(produce))
        except BaseException:
            close_all([r, w])
            raise
        try:
            rec = await self.put_layer_fds(r, dirfds, diff_id=diff_id, compression=compression)
        finally:
            os.close(r)
        await task      # a producer error surfaces here if the server did not notice it
        return rec

    async def put_layer_fds(self, stream: int, dirfds: Sequence[int] = (), *,
                            diff_id: str | None = None, compression: str = "gzip",
                            blob: BlobInput | None = None) -> LayerRecord:
        """Store a layer from an existing stream fd (e.g. one received from another server);
        with *blob* the server keeps that compressed blob instead of compressing again."""
        if len(dirfds) > FDS_PER_REPLY - (blob is not None):
            raise errors.UsageError(f"{len(dirfds)} directory fds; PutLayer takes at most "
                                    f"{FDS_PER_REPLY} (one less with a blob)")
        p: dict[str, Any] = {"stream": 0, "dirfds": list(range(1, len(dirfds) + 1)),
                             "compression": compression}
        fds = [stream, *dirfds]
        if blob is not None:
            p["blob"] = len(fds)
            p["descriptor"] = blob.desc.to_json()
            fds.append(blob.fd)
        if diff_id is not None:
            p["diff_id"] = diff_id
        rep = await self.call(f"{NAME}.PutLayer", p, fds)
        close_all(rep.fds)
        return LayerRecord.from_json(rep.parameters.get("layer"))

    async def put_tar(self, tar: BinaryIO, *, diff_id: str | None = None,
                      compression: str = "gzip") -> LayerRecord:
        def write(sw: StreamWriter) -> None:
            from_tar(tar, sw)
        return await self.put_layer(write, diff_id=diff_id, compression=compression)

    async def copy_layer_to(self, dest: StoreClient, diff_id: str, *,
                            compression: str | None = None) -> LayerRecord:
        """Forward a layer from this server to *dest* without touching its bytes here.

        The compressed blob is forwarded too and kept, unless *compression* asks
        *dest* to compress the layer again (gzip, zstd or none)."""
        async with self.get_layer(diff_id) as layer:
            return await dest.put_layer_fds(
                layer.stream, layer.dirfds, diff_id=diff_id, compression=compression or "gzip",
                blob=layer.blob if compression is None else None)

    async def finalize_image(self, tag: str, config: dict[str, Any],
                             layers: Sequence[LayerRecord],
                             annotations: dict[str, str] | None = None) -> Descriptor:
        p: dict[str, Any] = {"tag": tag, "config": config,
                             "layers": [rec.to_json() for rec in layers]}
        if annotations:
            p["annotations"] = annotations
        return Descriptor.from_json((await self._params("FinalizeImage", p))["manifest"])

    async def unpack(self, tag: str, bundle: str, *, platform: str | None = None,
                     rootless: bool = False) -> dict[str, Any]:
        p: dict[str, Any] = {"tag": tag, "bundle": os.path.abspath(bundle),
                             "rootless": rootless}
        if platform:
            p["platform"] = platform
        return dict((await self._params("Unpack", p))["result"])

    async def gc(self, dry_run: bool = False) -> dict[str, Any]:
        return dict((await self._params("GC", {"dry_run": dry_run}))["result"])

    async def hold(self) -> int:
        """Hold the store's shared lock; returns the fd to close to let go of it."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            await self.call(f"{NAME}.Hold", {"lifetime": 0}, [r])
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        return w


def _fd_at(rep: Reply, index: object) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(rep.fds):
        close_all(rep.fds)
        raise ProtocolError(f"reply refers to descriptor {index!r} but carries {len(rep.fds)}")
    return os.dup(rep.fds[index])


class SyncStoreClient:
    """The same calls, blocking; runs a private event loop (not usable inside one)."""

    def __init__(self, path: str) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._c = self._loop.run_until_complete(StoreClient.connect(path))
        except BaseException:
            self._loop.close()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        self._run(self._c.close())
        self._loop.close()

    def __enter__(self) -> SyncStoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_info(self) -> dict[str, Any]:
        return self._run(self._c.get_info())

    def list_images(self) -> list[dict[str, Any]]:
        return self._run(self._c.list_images())

    def inspect(self, tag: str, platform: str | None = None) -> dict[str, Any]:
        return self._run(self._c.inspect(tag, platform))

    def has_layer(self, diff_id: str) -> bool:
        return self._run(self._c.has_layer(diff_id))

    def fetch_layer(self, diff_id: str, out: BinaryIO) -> str:
        return self._run(self._c.fetch_layer(diff_id, out))

    def put_tar(self, tar: BinaryIO, *, diff_id: str | None = None,
                compression: str = "gzip") -> LayerRecord:
        return self._run(self._c.put_tar(tar, diff_id=diff_id, compression=compression))

    def finalize_image(self, tag: str, config: dict[str, Any], layers: Sequence[LayerRecord],
                       annotations: dict[str, str] | None = None) -> Descriptor:
        return self._run(self._c.finalize_image(tag, config, layers, annotations))

    def unpack(self, tag: str, bundle: str, *, platform: str | None = None,
               rootless: bool = False) -> dict[str, Any]:
        return self._run(self._c.unpack(tag, bundle, platform=platform, rootless=rootless))

    def gc(self, dry_run: bool = False) -> dict[str, Any]:
        return self._run(self._c.gc(dry_run))

    def hold(self) -> int:
        return self._run(self._c.hold())

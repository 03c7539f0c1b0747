"""The ``io.lamina.Store`` varlink interface over a :class:`StoreBackend`.

Layer data never travels inside JSON: GetLayer answers with the read end of
a pipe carrying a splitdirfdstream plus the directory fds its file chunks
name, PutLayer takes the same from the client.  Blocking work (streaming,
compressing, hashing) runs in threads; a stalled peer is given up on after
``STREAM_IDLE`` seconds without progress.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from lamina.errors import CorruptLayerError, LaminaError
from lamina.ipc.backend import Busy, LayerRecord, Release, StoreBackend
from lamina.ipc.protocol import VarlinkError, close_all
from lamina.ipc.service import Call, Interface, invalid
from lamina.oci.model import Descriptor, Platform
from lamina.store.receive import BlobInput

log = logging.getLogger("lamina.ipc")

NAME = "io.lamina.Store"
STREAM_IDLE = 120.0         # seconds a pipe may make no progress before we give up
PIPE_SIZE = 1 << 20
MAX_HOLDS = 1024
FDS_PER_REPLY = 239         # + the stream fd = 240, under the kernel's 253 (238 with a blob)

IDL = """\
# A lamina image store: images, layers and their unpacking.
#
# Layers travel as splitdirfdstream (see docs/splitdirfdstream.md): the
# stream is a pipe whose end is passed as a file descriptor, next to the
# directory fds its file chunks refer to.  Descriptors ride on the message
# as SCM_RIGHTS; an int documented as an fd is an index into the
# descriptors of the message that carries it.
interface io.lamina.Store

type Descriptor (
  mediaType: string,
  digest: string,
  size: int,
  annotations: ?[string]string
)

# A stored layer: its blob and the sha256 of its uncompressed tar.
type Layer (
  descriptor: Descriptor,
  diff_id: string
)

type Image (
  tag: string,
  digest: string,
  mediaType: string,
  size: int
)

# All tagged images.
method ListImages() -> (images: []Image)

# An image's manifest, config and layers (platform: os/arch[/variant]).
method Inspect(tag: string, platform: ?string) -> (
  manifest: object,
  manifest_digest: string,
  config: object,
  layers: []Layer
)

# Whether a layer with this diff_id is stored.
method HasLayer(diff_id: string) -> (present: bool)

# Read a layer. stream (fd) is the read end of a pipe carrying the
# splitdirfdstream; dirfds (fds) are the directories its file chunks name,
# in order (dirfd_count in all). Over 239 (238 with a blob) directories
# need 'more': they are
# spread over several replies, stream only in the first. blob (fd), when
# the server has it, is the compressed blob described by descriptor, opened
# read-only (first reply only). Called with 'more', a last reply without fds
# confirms the diff_id once the whole stream was written, or is an error if
# producing it failed.
method GetLayer(diff_id: string) -> (
  stream: ?int,
  dirfds: []int,
  dirfd_count: ?int,
  blob: ?int,
  descriptor: ?Descriptor,
  diff_id: ?string,
  tar_size: ?int
)

# Store a layer read from the pipe stream (fd) and the directories dirfds
# (fds, at most 239, 238 with a blob). The reassembled tar must match diff_id when given.
# With blob (fd of a regular file) and its descriptor, that blob is kept
# (cloned where the filesystem allows, its digest checked); otherwise the
# layer is compressed again: compression gzip (default), zstd or none.
method PutLayer(stream: int, dirfds: []int, diff_id: ?string, compression: ?string,
                blob: ?int, descriptor: ?Descriptor) -> (
  layer: Layer
)

# Write config (its rootfs is set from layers) and manifest, and tag them.
method FinalizeImage(
  tag: string,
  config: object,
  layers: []Layer,
  annotations: ?[string]string
) -> (manifest: Descriptor)

# Unpack a tagged image into a runtime bundle (an absolute path on the server).
method Unpack(tag: string, bundle: string, platform: ?string, rootless: ?bool) -> (
  result: object
)

# Remove what no tag reaches. Fails with Busy while clients hold the store.
method GC(dry_run: ?bool) -> (result: object)

# Keep the store's shared lock (gc waits) until the pipe whose read end is
# lifetime (fd) reaches end of file, i.e. the client closed the write end.
method Hold(lifetime: int) -> ()

# Errors carry lamina's error kind, message, hint and stable exit code.
error NotFound (kind: string, message: string, hint: ?string, code: int)
error Usage (kind: string, message: string, hint: ?string, code: int)
error ImageFormat (kind: string, message: string, hint: ?string, code: int)
error DigestMismatch (kind: string, message: string, hint: ?string, code: int)
error CorruptLayer (kind: string, message: string, hint: ?string, code: int)
error UnsafeLayer (kind: string, message: string, hint: ?string, code: int)
error Bundle (kind: string, message: string, hint: ?string, code: int)
error Unsupported (kind: string, message: string, hint: ?string, code: int)
error Environment (kind: string, message: string, hint: ?string, code: int)
error Busy (kind: string, message: string, hint: ?string, code: int)
error Internal (kind: string, message: string, hint: ?string, code: int)
"""

ERROR_NAMES = {
    "not-found": "NotFound", "usage": "Usage", "image-format": "ImageFormat",
    "digest-mismatch": "DigestMismatch", "corrupt-layer": "CorruptLayer",
    "unsafe-layer": "UnsafeLayer", "bundle": "Bundle", "unsupported": "Unsupported",
    "environment": "Environment", "busy": "Busy",
}


def error_for(e: BaseException) -> VarlinkError:
    if isinstance(e, VarlinkError):
        return e
    if isinstance(e, LaminaError):
        name = ERROR_NAMES.get(e.kind, "Internal")
        return VarlinkError(f"{NAME}.{name}", {"kind": e.kind, "message": e.message,
                                               "hint": e.hint, "code": e.code})
    return VarlinkError(f"{NAME}.Internal", {"kind": "internal",
                                             "message": f"{type(e).__name__}: {e}",
                                             "hint": "this is a bug in lamina", "code": 1})


# -- pipes that give up on a stalled or vanished peer -------------------------------------------

class StreamStalled(LaminaError):
    code = 6
    kind = "corrupt-layer"


class PipeWriter:
    """Blocking-style writes to a non-blocking pipe, with an idle timeout and a cancel flag."""

    def __init__(self, fd: int, cancel: threading.Event, idle: float = STREAM_IDLE) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.cancel = cancel
        self.idle = idle
        self.written = 0

    def write(self, data: bytes) -> int:
        mv = memoryview(data)
        while mv:
            try:
                n = os.write(self.fd, mv)
            except BlockingIOError:
                self._wait(select.POLLOUT)
                continue
            mv = mv[n:]
            self.written += n
        return len(data)

    def _wait(self, event: int) -> None:
        p = select.poll()
        p.register(self.fd, event)
        waited = 0.0
        while not p.poll(500):
            waited += 0.5
            if self.cancel.is_set():
                raise StreamStalled("stream cancelled: the server is shutting down")
            if waited >= self.idle:
                raise StreamStalled(f"peer made no progress on the stream for {self.idle:.0f}s",
                                    hint="the client stopped reading or writing the pipe")

    def flush(self) -> None:
        pass


class PipeReader(PipeWriter):
    def read(self, n: int = 1 << 20) -> bytes:
        while True:
            try:
                return os.read(self.fd, n)
            except BlockingIOError:
                self._wait(select.POLLIN)
            except OSError as e:
                raise CorruptLayerError(f"cannot read the layer stream: {e.strerror}",
                                        hint="pass the read end of a pipe as 'stream'") from None


def make_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass    # over /proc/sys/fs/pipe-max-size for this user: keep the default
    return r, w


# -- the service --------------------------------------------------------------------------------

T = TypeVar("T")


def _str(call: Call, name: str, optional: bool = False) -> str | None:
    v = call.parameters.get(name)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v:
        raise invalid(name)
    return v


def _platform(call: Call) -> Platform | None:
    text = _str(call, "platform", optional=True)
    return Platform.parse(text) if text else None


class StoreService:
    """Handlers of ``io.lamina.Store``; ``interface()`` gives what the server registers."""

    def __init__(self, backend: StoreBackend) -> None:
        self.backend = backend
        self.cancel = threading.Event()
        self._holds: dict[int, Release] = {}      # lifetime fd -> release
        self._streams: set[threading.Thread] = set()

    def interface(self) -> Interface:
        return Interface(NAME, IDL, {
            "ListImages": self.list_images, "Inspect": self.inspect,
            "HasLayer": self.has_layer, "GetLayer": self.get_layer,
            "PutLayer": self.put_layer, "FinalizeImage": self.finalize_image,
            "Unpack": self.unpack, "GC": self.gc, "Hold": self.hold,
        }, privileged=frozenset({"Unpack", "GC"}), error_for=error_for)

    async def _run(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kw)

    async def close(self) -> None:
        self.cancel.set()
        loop = asyncio.get_running_loop()
        for fd, release in list(self._holds.items()):
            loop.remove_reader(fd)
            os.close(fd)
            release()
        self._holds.clear()
        for t in list(self._streams):
            await asyncio.to_thread(t.join, 5)

    # -- simple methods --------------------------------------------------------
    async def list_images(self, call: Call) -> dict[str, Any]:
        return {"images": await self._run(self.backend.list_images)}

    async def inspect(self, call: Call) -> dict[str, Any]:
        tag = _str(call, "tag")
        assert tag is not None
        return await self._run(self.backend.inspect, tag, _platform(call))

    async def has_layer(self, call: Call) -> dict[str, Any]:
        diff_id = _str(call, "diff_id")
        return {"present": await self._run(self.backend.has_layer, diff_id)}

    async def finalize_image(self, call: Call) -> dict[str, Any]:
        tag = _str(call, "tag")
        config = call.parameters.get("config")
        if not isinstance(config, dict):
            raise invalid("config")
        raw_layers = call.parameters.get("layers")
        if not isinstance(raw_layers, list):
            raise invalid("layers")
        try:
            layers = [LayerRecord.from_json(x, f"layers[{i}]") for i, x in enumerate(raw_layers)]
        except LaminaError:
            raise invalid("layers") from None
        ann = call.parameters.get("annotations") or {}
        if not isinstance(ann, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
            raise invalid("annotations")
        desc = await self._run(self.backend.finalize_image, tag, config, layers, ann)
        return {"manifest": desc.to_json()}

    async def unpack(self, call: Call) -> dict[str, Any]:
        tag = _str(call, "tag")
        bundle = _str(call, "bundle")
        rootless = call.parameters.get("rootless") is True
        res = await self._run(self.backend.unpack, tag, bundle, _platform(call), rootless)
        return {"result": res}

    async def gc(self, call: Call) -> dict[str, Any]:
        dry = call.parameters.get("dry_run") is True
        return {"result": await self._run(self.backend.gc, dry)}

    # -- lifetime ---------------------------------------------------------------
    async def hold(self, call: Call) -> dict[str, Any]:
        if len(self._holds) >= MAX_HOLDS:
            raise Busy(f"{MAX_HOLDS} holds are active", hint="release some holds first")
        fd = call.take_fd("lifetime", call.parameters.get("lifetime"))
        try:
            release = await self._run(self.backend.hold)
        except BaseException:
            os.close(fd)
            raise
        loop = asyncio.get_running_loop()
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                if os.read(fd, 4096):
                    return      # the client wrote something; only EOF ends the hold
            except BlockingIOError:
                return
            except OSError:
                pass
            loop.remove_reader(fd)
            self._holds.pop(fd, None)
            os.close(fd)
            release()

        self._holds[fd] = release
        loop.add_reader(fd, readable)
        return {}

    # -- layers -----------------------------------------------------------------
    def _thread(self, target: Callable[[], None]) -> threading.Thread:
        t = threading.Thread(target=target, name="lamina-stream", daemon=True)
        self._streams.add(t)
        return t

    async def get_layer(self, call: Call) -> dict[str, Any] | None:
        diff_id = _str(call, "diff_id")
        assert diff_id is not None
        src = await self._run(self.backend.open_layer, diff_id)
        r = w = -1
        blob: list[int] = []
        try:
            dirfds = [os.dup(fd) for fd in src.dirfds]
            src_blob: BlobInput | None = getattr(src, "blob", None)     # optional for sources
            if src_blob is not None:
                blob.append(os.dup(src_blob.fd))
                blob_desc = src_blob.desc.to_json()
        except BaseException:
            close_all(blob)
            src.close()
            raise
        try:
            if len(dirfds) > FDS_PER_REPLY - len(blob) and not call.more:
                raise VarlinkError("org.varlink.service.ExpectedMore")
            r, w = make_pipe()
        except BaseException:
            close_all([*dirfds, *blob])
            src.close()
            raise
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        writer = PipeWriter(w, self.cancel)

        def produce() -> None:
            try:
                try:
                    digest = src.write_to(writer)   # type: ignore[arg-type]
                except BrokenPipeError:
                    raise CorruptLayerError("layer stream aborted: the reader closed the pipe",
                                            hint="read the stream to its end") from None
            except BaseException as e:
                if not isinstance(e, (LaminaError, OSError)):
                    log.exception("GetLayer %s failed", diff_id)
                loop.call_soon_threadsafe(_settle, done, None, e)
            else:
                loop.call_soon_threadsafe(_settle, done, digest, None)
            finally:
                os.close(w)
                src.close()
                self._streams.discard(threading.current_thread())

        cut = FDS_PER_REPLY - len(blob)
        first, rest = dirfds[:cut], dirfds[cut:]
        try:
            t = self._thread(produce)
            t.start()
        except BaseException:
            close_all([r, w, *dirfds, *blob])
            src.close()
            raise
        try:
            params: dict[str, Any] = {"stream": 0, "dirfds": list(range(1, len(first) + 1)),
                                      "dirfd_count": len(dirfds)}
            if blob:
                params["blob"] = len(first) + 1
                params["descriptor"] = blob_desc
            if not call.more:
                # nobody awaits the outcome; the client sees a short stream on failure
                done.add_done_callback(lambda f: f.cancelled() or f.exception())
                await call.reply(params, fds=[r, *first, *blob])
                return None
            await call.reply(params, fds=[r, *first, *blob], continues=True)
            while rest:
                part, rest = rest[:FDS_PER_REPLY + 1], rest[FDS_PER_REPLY + 1:]
                await call.reply({"dirfds": list(range(len(part)))}, fds=part,
                                 continues=True)
        finally:
            close_all(rest)
        digest = await done
        return {"dirfds": [], "diff_id": digest, "tar_size": writer.written}

    async def put_layer(self, call: Call) -> dict[str, Any]:
        diff_id = _str(call, "diff_id", optional=True)
        compression = _str(call, "compression", optional=True) or "gzip"
        idx = call.parameters.get("dirfds", [])
        has_blob = call.parameters.get("blob") is not None
        if not isinstance(idx, list) or len(idx) > FDS_PER_REPLY - has_blob or len(set(
                i for i in idx if isinstance(i, int))) != len(idx):
            raise invalid("dirfds")
        blob: BlobInput | None = None
        if call.parameters.get("blob") is not None:
            try:
                desc = Descriptor.from_json(call.parameters.get("descriptor"), "descriptor")
            except LaminaError:
                raise invalid("descriptor") from None
            blob = BlobInput(call.take_fd("blob", call.parameters.get("blob")), desc)
        stream = -1
        dirfds: list[int] = []
        try:
            stream = call.take_fd("stream", call.parameters.get("stream"))
            for i in idx:
                dirfds.append(call.take_fd("dirfds", i))
            reader = PipeReader(stream, self.cancel)
            extra = {"blob": blob} if blob is not None else {}  # older backends lack it
            rec = await self._run(self.backend.put_layer, reader, dirfds,
                                  diff_id=diff_id, compression=compression, **extra)
        finally:
            close_all([stream, *dirfds, blob.fd if blob else -1])
        return {"layer": rec.to_json()}


def _settle(fut: asyncio.Future[str], value: str | None, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        assert value is not None
        fut.set_result(value)


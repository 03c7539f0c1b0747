"""``lamina copy``: move an image between stores, layouts and io.lamina.Store servers.

Every layer travels as a splitdirfdstream: the source writes it into a pipe
(its file chunks naming files beneath directory fds it hands over, plus the
compressed blob as an open file), the destination reads it.  In-process the
producer and consumer are the very ones ``lamina serve`` runs (the
:class:`~lamina.ipc.backend.StoreBackend` implementations), connected by a
pipe; across a socket the same fds are passed with SCM_RIGHTS.  Between two
stores on one reflink filesystem the destination clones objects and blob
(FICLONE), so no file data is written.

Endpoints (:func:`parse_endpoint`):

- ``store:PATH[:NAME[:TAG]]`` a local store (NAME is required for a source; a
  destination defaults to the source's name and tag);
- ``oci:LAYOUT[:TAG]`` or a plain ``LAYOUT[:TAG]``: an OCI image layout;
- ``varlink:SOCKET[:NAME[:TAG]]``: a ``lamina serve`` socket.

Verification: a destination store reassembles every layer and checks its
diff_id and blob digest, except when both ends are local stores opened by
this process, whose content was verified when it was ingested and is
content-addressed (``trust_source``, see :mod:`lamina.store.receive`);
``verify=True`` forces the full check there too.  A server always verifies
what a client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Protocol

from lamina.errors import DigestMismatchError, NotFoundError, UsageError
from lamina.ipc.backend import LayerRecord, LayoutBackend
from lamina.ipc.client import StoreClient
from lamina.ipc.store import make_pipe
from lamina.ipc.store_backend import LocalStoreBackend, StoreLayer
from lamina.oci import mediatypes as mt
from lamina.oci.model import Descriptor
from lamina.store import Store
from lamina.store.ids import parse_ref
from lamina.store.receive import BlobInput, ReceiveStats, SourceIndex
from lamina.stream.stored import stored_reader


@dataclass(frozen=True)
class Endpoint:
    kind: str                   # "store", "oci" or "varlink"
    path: str
    name: str | None            # store/varlink: NAME[:TAG]; oci: TAG

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}" + (f":{self.name}" if self.name else "")


_LAYERS_AT_ONCE = 3      # between local sides


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``store:PATH[:NAME[:TAG]]``, ``oci:LAYOUT[:TAG]``, ``varlink:SOCKET[:NAME]``
    or ``LAYOUT[:TAG]``."""
    kind, sep, rest = text.partition(":")
    if sep and kind in ("store", "varlink"):
        path, _, name = rest.partition(":")
        if not path:
            raise UsageError(f"{text!r}: no path", hint=f"use {kind}:PATH[:NAME[:TAG]]")
        return Endpoint(kind, path, parse_ref(name) if name else None)
    if sep and kind == "oci":
        text = rest
    if not text:
        raise UsageError("empty image reference", hint="use oci:LAYOUT:TAG")
    from lamina.oci.layout import ImageRef  # layouts load only when one is named

    has_tag = ":" in text and "/" not in text.rpartition(":")[2]
    ref = ImageRef.parse(text)
    return Endpoint("oci", ref.layout, ref.tag if has_tag else None)


@dataclass(frozen=True)
class CopyOptions:
    source: str
    destination: str
    verify: bool = False        # also verify a copy between two local stores
    compression: str = "gzip"   # when a blob must be made again (source without blobs)


@dataclass
class LayerCopy:
    diff_id: str
    blob: str
    action: str                 # "copied" or "skipped" (already there)
    linked_bytes: int | None = None
    reflinked_bytes: int | None = None
    copied_bytes: int | None = None
    present_bytes: int | None = None
    blob_transfer: str | None = None
    split_cloned: bool | None = None


@dataclass
class CopyResult:
    source: str
    destination: str
    manifest: str
    verified: bool
    layers: list[LayerCopy] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)

        def total(k: str) -> int | None:
            vals = [getattr(x, k) for x in self.layers if x.action == "copied"]
            return None if any(v is None for v in vals) else sum(vals)

        d["layers_copied"] = sum(1 for x in self.layers if x.action == "copied")
        d["layers_skipped"] = sum(1 for x in self.layers if x.action == "skipped")
        d["linked_bytes"] = total("linked_bytes")
        d["reflinked_bytes"] = total("reflinked_bytes")
        d["copied_bytes"] = total("copied_bytes")
        d["present_bytes"] = total("present_bytes")
        return d


@dataclass
class _Image:
    manifest: bytes | None      # the documents byte for byte, when the source has them
    config: bytes | None
    manifest_obj: dict[str, Any]
    config_obj: dict[str, Any]
    layers: list[LayerRecord]


@dataclass
class _Opened:
    stream: int
    dirfds: Sequence[int]
    blob: BlobInput | None
    local_store: bool = False   # the files are a store's objects this process opened
    source_index: SourceIndex | None = None     # that store's rows for the layer


class _Side(Protocol):
    endpoint: Endpoint

    async def image(self, name: str) -> _Image: ...
    def open_layer(self, diff_id: str) -> contextlib.AbstractAsyncContextManager[_Opened]: ...
    async def has_layer(self, rec: LayerRecord) -> bool: ...
    async def put_layer(self, src: _Opened, diff_id: str, compression: str,
                        trust: bool) -> tuple[LayerRecord, ReceiveStats | None]: ...
    async def finish(self, name: str, img: _Image, layers: list[LayerRecord]) -> str: ...
    async def close(self) -> None: ...


# -- local ends: the backends, connected by a pipe ---------------------------------------------

class _Local:
    endpoint: Endpoint
    backend: LocalStoreBackend | LayoutBackend

    @contextlib.asynccontextmanager
    async def open_layer(self, diff_id: str) -> AsyncIterator[_Opened]:
        src = await asyncio.to_thread(self.backend.open_layer, diff_id)
        if isinstance(src, StoreLayer):
            # a stored tar-split already is the stream: no producer thread needed
            try:
                fd = src.open_stream()
                try:
                    yield _Opened(fd, src.dirfds, src.blob, local_store=True,
                                  source_index=await asyncio.to_thread(src.source_index))
                finally:
                    os.close(fd)
            finally:
                src.close()
            return
        try:
            r, w = make_pipe()
        except BaseException:
            src.close()
            raise

        def produce() -> str:
            with os.fdopen(w, "wb", buffering=1 << 20) as f:
                return src.write_to(f)

        task = asyncio.ensure_future(asyncio.to_thread(produce))
        failed = False
        try:
            yield _Opened(r, src.dirfds, src.blob)
        except BaseException:
            failed = True
            raise
        finally:
            os.close(r)     # a producer still writing gets EPIPE
            try:
                await task
            except (BrokenPipeError, OSError):
                if not failed:
                    raise
            finally:
                src.close()

    async def put_layer(self, src: _Opened, diff_id: str, compression: str,
                        trust: bool) -> tuple[LayerRecord, ReceiveStats | None]:
        stream: BinaryIO = os.fdopen(os.dup(src.stream), "rb", buffering=1 << 20)
        try:
            if src.local_store and not (trust and isinstance(self.backend, LocalStoreBackend)):
                stream = stored_reader(stream)  # a stored tar-split; a trusting store clones it
            if isinstance(self.backend, LocalStoreBackend):
                desc, digest, stats = await asyncio.to_thread(
                    self.backend.store.receive_layer, stream, src.dirfds, diff_id=diff_id,
                    blob=src.blob, compression=compression, trust_source=trust,
                    local_source=src.local_store,
                    source_index=src.source_index if trust else None)
                return LayerRecord(desc, digest), stats
            rec = await asyncio.to_thread(self.backend.put_layer, stream, src.dirfds,
                                          diff_id=diff_id, compression=compression,
                                          blob=src.blob)
            return rec, None
        finally:
            stream.close()

    async def finish(self, name: str, img: _Image, layers: list[LayerRecord]) -> str:
        src_layers = [(x.descriptor.digest, x.diff_id) for x in img.layers]
        if img.manifest is not None and img.config is not None and src_layers == [
                (x.descriptor.digest, x.diff_id) for x in layers]:
            return await asyncio.to_thread(self.backend.put_image, name, img.manifest,
                                           img.config)
        desc = await asyncio.to_thread(self.backend.finalize_image, name, img.config_obj,
                                       layers, _annotations(img))
        return desc.digest

    async def close(self) -> None:
        pass


def _annotations(img: _Image) -> dict[str, str]:
    ann = img.manifest_obj.get("annotations")
    return {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {}


class _StoreSide(_Local):
    def __init__(self, ep: Endpoint, create: bool) -> None:
        self.endpoint = ep
        self.store = Store.open(ep.path, create=create)
        self.backend = LocalStoreBackend(self.store)
        self._release = self.store.hold()       # gc waits until the copy is done

    async def image(self, name: str) -> _Image:
        img = self.store.image(name)
        return _Image(self.store.read_blob(img.manifest.digest),
                      self.store.read_blob(img.manifest.config.digest),
                      img.manifest.raw, img.config.raw,
                      [LayerRecord(x.desc, x.diff_id) for x in img.layers])

    async def has_layer(self, rec: LayerRecord) -> bool:
        info = self.store.layer(rec.diff_id)
        return (info is not None and info.state == "ready"
                and self.store.has_blob(rec.descriptor.digest))

    async def close(self) -> None:
        self._release()
        self.store.close()


class _LayoutSide(_Local):
    def __init__(self, ep: Endpoint, create: bool) -> None:
        self.endpoint = ep
        if create and not os.path.exists(os.path.join(ep.path, "oci-layout")):
            if os.path.isdir(ep.path) and os.listdir(ep.path):
                raise UsageError(f"{ep.path} is not an OCI layout and not empty",
                                 hint="copy into a new directory or an existing layout")
            from lamina.oci.layout import OCILayout
            OCILayout.init(ep.path)
        self.layout_backend = LayoutBackend(ep.path)
        self.backend = self.layout_backend
        self._release = self.backend.hold()

    async def image(self, name: str) -> _Image:
        lay = self.layout_backend.layout
        m = lay.resolve(name)
        try:
            size = os.stat(lay.blob_path(m.digest)).st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {m.digest} is missing from {lay.path}",
                                hint="the layout is incomplete") from None
        mbytes = lay.read_blob(Descriptor(mt.MANIFEST, m.digest, size))
        cfg = lay.config_for(m)
        cbytes = lay.read_blob(m.config)
        return _Image(mbytes, cbytes, m.raw, cfg.raw,
                      [LayerRecord(d, i) for d, i in zip(m.layers, cfg.diff_ids, strict=True)])

    async def has_layer(self, rec: LayerRecord) -> bool:
        return self.layout_backend.layout.has_blob(rec.descriptor.digest)

    async def close(self) -> None:
        self._release()


# -- a server --------------------------------------------------------------------------------

class _VarlinkSide:
    def __init__(self, ep: Endpoint, client: StoreClient, hold: int) -> None:
        self.endpoint = ep
        self.client = client
        self._hold = hold

    @classmethod
    async def connect(cls, ep: Endpoint) -> _VarlinkSide:
        client = await StoreClient.connect(ep.path)
        try:
            hold = await client.hold()
        except BaseException:
            await client.close()
            raise
        return cls(ep, client, hold)

    async def image(self, name: str) -> _Image:
        d = await self.client.inspect(name)
        layers = [LayerRecord.from_json(x, f"layers[{i}]") for i, x in enumerate(d["layers"])]
        return _Image(None, None, dict(d["manifest"]), dict(d["config"]), layers)

    @contextlib.asynccontextmanager
    async def open_layer(self, diff_id: str) -> AsyncIterator[_Opened]:
        async with self.client.get_layer(diff_id) as layer:
            yield _Opened(layer.stream, layer.dirfds, layer.blob)

    async def has_layer(self, rec: LayerRecord) -> bool:
        return await self.client.has_layer(rec.diff_id)

    async def put_layer(self, src: _Opened, diff_id: str, compression: str,
                        trust: bool) -> tuple[LayerRecord, ReceiveStats | None]:
        rec = await self.client.put_layer_fds(src.stream, src.dirfds, diff_id=diff_id,
                                              compression=compression, blob=src.blob)
        return rec, None

    async def finish(self, name: str, img: _Image, layers: list[LayerRecord]) -> str:
        desc = await self.client.finalize_image(name, img.config_obj, layers, _annotations(img))
        return desc.digest

    async def close(self) -> None:
        os.close(self._hold)
        await self.client.close()


async def _open_side(ep: Endpoint, dest: bool) -> _Side:
    if ep.kind == "store":
        return await asyncio.to_thread(_StoreSide, ep, dest)
    if ep.kind == "oci":
        return await asyncio.to_thread(_LayoutSide, ep, dest)
    return await _VarlinkSide.connect(ep)


def _names(src: Endpoint, dst: Endpoint) -> tuple[str, str]:
    if src.name is None and src.kind == "oci":
        src = Endpoint(src.kind, src.path, "latest")
    if src.name is None:
        raise UsageError(f"source {src} names no image",
                         hint="use store:PATH:NAME[:TAG], oci:LAYOUT:TAG or varlink:SOCKET:NAME")
    if dst.name is not None:
        return src.name, dst.name
    if dst.kind == "oci":      # a layout tag: the source's tag
        return src.name, src.name.rpartition(":")[2] if src.kind != "oci" else src.name
    # a store name: the source's name and tag, or the layout's directory name
    if src.kind == "oci":
        return src.name, parse_ref(
            f"{os.path.basename(src.path.rstrip('/')) or 'image'}:{src.name}")
    return src.name, src.name


async def _copy_layer(src: _Side, dst: _Side, rec: LayerRecord, compression: str,
                      trust: bool) -> tuple[LayerCopy, LayerRecord]:
    if await dst.has_layer(rec):
        return LayerCopy(rec.diff_id, rec.descriptor.digest, "skipped"), rec
    async with src.open_layer(rec.diff_id) as opened:
        got, stats = await dst.put_layer(opened, rec.diff_id, compression, trust)
    if got.diff_id != rec.diff_id:
        raise DigestMismatchError(f"layer {rec.diff_id} arrived as {got.diff_id}")
    lc = LayerCopy(rec.diff_id, got.descriptor.digest, "copied")
    if stats is not None:
        lc.linked_bytes = stats.linked_bytes
        lc.reflinked_bytes = stats.reflinked_bytes
        lc.copied_bytes = stats.copied_bytes
        lc.present_bytes = stats.present_bytes
        lc.blob_transfer = stats.blob
        lc.split_cloned = stats.split_cloned
    return lc, got


async def copy_async(opts: CopyOptions) -> CopyResult:
    t0 = time.monotonic()
    src_ep, dst_ep = parse_endpoint(opts.source), parse_endpoint(opts.destination)
    if opts.compression not in mt.COMPRESSION_LAYER_TYPE:
        raise UsageError(f"unknown compression {opts.compression!r}", hint="gzip, zstd or none")
    src_name, dst_name = _names(src_ep, dst_ep)
    trust = not opts.verify and src_ep.kind == "store" and dst_ep.kind == "store"
    if trust and os.path.realpath(src_ep.path) == os.path.realpath(dst_ep.path):
        trust = False       # one store twice: nothing to gain, and keep it simple
    src = await _open_side(src_ep, dest=False)
    try:
        img = await src.image(src_name)     # before the destination is created
        dst = await _open_side(dst_ep, dest=True)
        try:
            res = CopyResult(str(src_ep), str(dst_ep), "", verified=not trust)
            # local layers go side by side: one's links (system calls on threads) overlap
            # another's index rows and syncfs; a server connection takes one at a time
            local = isinstance(src, _Local) and isinstance(dst, _Local)
            sem = asyncio.Semaphore(_LAYERS_AT_ONCE if local else 1)
            jobs: dict[str, asyncio.Task[tuple[LayerCopy, LayerRecord]]] = {}

            async def bounded(rec: LayerRecord) -> tuple[LayerCopy, LayerRecord]:
                async with sem:
                    return await _copy_layer(src, dst, rec, opts.compression, trust)

            for rec in img.layers:      # an image may list one layer twice: copied once
                if rec.diff_id not in jobs:
                    jobs[rec.diff_id] = asyncio.ensure_future(bounded(rec))
            # every layer finishes (or fails) before the sides close: their threads use
            # the sides' descriptors
            done = await asyncio.gather(*jobs.values(), return_exceptions=True)
            for r in done:
                if isinstance(r, BaseException):
                    raise r
            out: list[LayerRecord] = []
            seen: set[str] = set()
            for rec in img.layers:
                lc, got = jobs[rec.diff_id].result()
                if rec.diff_id in seen:
                    lc = LayerCopy(rec.diff_id, got.descriptor.digest, "skipped")
                seen.add(rec.diff_id)
                res.layers.append(lc)
                out.append(got)
            res.manifest = await dst.finish(dst_name, img, out)
        finally:
            await dst.close()
    finally:
        await src.close()
    res.seconds = round(time.monotonic() - t0, 3)
    return res


def copy_image(opts: CopyOptions) -> CopyResult:
    """Copy one image; see the module docstring."""
    return asyncio.run(copy_async(opts))


def summary_line(res: CopyResult) -> str:
    d = res.to_json()

    def mb(v: int | None) -> str:
        return "?" if v is None else f"{v / 1e6:.1f} MB"
    return (f"copied {res.source} -> {res.destination} ({res.manifest[:19]}): "
            f"{d['layers_copied']} layers copied, {d['layers_skipped']} skipped; "
            f"{mb(d['linked_bytes'])} hardlinked, {mb(d['reflinked_bytes'])} reflinked, "
            f"{mb(d['copied_bytes'])} copied, "
            f"{mb(d['present_bytes'])} already present; {res.seconds:.2f}s"
            + ("" if res.verified else " (trusted source store)"))


__all__ = ["CopyOptions", "CopyResult", "Endpoint", "LayerCopy", "copy_async", "copy_image",
           "parse_endpoint", "summary_line"]

"""What the ``io.lamina.Store`` service needs from a store, and an OCI layout backend.

A backend is synchronous; the service calls it from worker threads.  Layers
cross the boundary as splitdirfdstream: :meth:`StoreBackend.open_layer`
returns a source that writes the stream (plus the directory fds its file
chunks name) and :meth:`StoreBackend.put_layer` consumes one.  The layout
backend has no file objects to share, so its streams are metadata and inline
data only; the content-addressed store backend hands out its ``objects/``
directory instead and moves no file data.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast

from lamina.errors import (
    DigestMismatchError,
    EnvironmentError_,
    ImageFormatError,
    NotFoundError,
    UsageError,
)
from lamina.oci import mediatypes as mt
from lamina.oci.model import Descriptor, Platform
from lamina.store.receive import BlobInput
from lamina.stream.splitdirfdstream import (
    StreamWriter,
    from_tar,
    import_file,
    read_chunks,
    write_tar,
)

if TYPE_CHECKING:
    # layouts, compression and the bundle producer load only when a command uses
    # them: a store-to-store copy needs none of them
    from lamina.oci.layout import OCILayout

Release = Callable[[], None]


@dataclass
class LayerRecord:
    """A stored layer: its blob descriptor and the digest of its uncompressed tar."""

    descriptor: Descriptor
    diff_id: str

    def to_json(self) -> dict[str, Any]:
        return {"descriptor": self.descriptor.to_json(), "diff_id": self.diff_id}

    @classmethod
    def from_json(cls, obj: object, what: str = "layer") -> LayerRecord:
        if not isinstance(obj, dict) or not isinstance(obj.get("diff_id"), str):
            raise ImageFormatError(f"{what}: expected {{descriptor, diff_id}}")
        return cls(Descriptor.from_json(obj.get("descriptor"), f"{what} descriptor"),
                   obj["diff_id"])


class LayerStreamSource(Protocol):
    """One layer about to be sent: the directories its stream refers to, and the stream."""

    dirfds: list[int]               # owned by the source; valid until close()
    blob: BlobInput | None          # the compressed blob, open (owned by the source), if any

    def write_to(self, out: BinaryIO) -> str:
        """Write the splitdirfdstream to *out*; return the verified diff_id."""
        ...

    def close(self) -> None: ...


class StoreBackend(Protocol):
    def list_images(self) -> list[dict[str, Any]]: ...
    def inspect(self, tag: str, platform: Platform | None) -> dict[str, Any]: ...
    def has_layer(self, diff_id: str) -> bool: ...
    def open_layer(self, diff_id: str) -> LayerStreamSource: ...
    def put_layer(self, stream: BinaryIO, dirfds: Sequence[int], *, diff_id: str | None,
                  compression: str, blob: BlobInput | None = None) -> LayerRecord: ...
    def finalize_image(self, tag: str, config: dict[str, Any], layers: list[LayerRecord],
                       annotations: dict[str, str]) -> Descriptor: ...
    def unpack(self, tag: str, bundle: str, platform: Platform | None,
               rootless: bool) -> dict[str, Any]: ...
    def gc(self, dry_run: bool) -> dict[str, Any]: ...
    def hold(self) -> Release:
        """Take the store's shared lock (blocks gc); the returned function releases it."""
        ...


def _clone_blob(layout: OCILayout, blob: BlobInput) -> None:
    """Reflink (or copy) a blob into the layout; it appears only once its digest matched."""
    st = os.fstat(blob.fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size != blob.desc.size:
        raise DigestMismatchError(f"blob {blob.desc.digest}: not a regular file of "
                                  f"{blob.desc.size} bytes", hint="the sender's blob is damaged")
    tmp = f".tmp-{os.getpid()}-{os.urandom(6).hex()}"
    dfd = os.open(layout.blob_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        import_file(blob.fd, dfd, tmp)
        try:
            h = hashlib.sha256()
            with open(os.open(tmp, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd), "rb",
                      buffering=0) as f:
                while b := f.read(1 << 20):
                    h.update(b)
            if "sha256:" + h.hexdigest() != blob.desc.digest:
                raise DigestMismatchError(f"blob {blob.desc.digest} does not match its digest",
                                          hint="the sender's blob is damaged")
            os.rename(tmp, os.path.basename(layout.blob_path(blob.desc.digest)),
                      src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)


class _Discard:
    def write(self, b: bytes) -> int:
        return len(b)


class Busy(EnvironmentError_):
    """The store is held by clients; an exclusive operation cannot run now."""

    kind = "busy"


# -- OCI image layout --------------------------------------------------------------------------

HOLD_LOCK = "lamina.lock"       # shared by holders, exclusive for gc


class _LayoutLayer:
    def __init__(self, layout: OCILayout, desc: Descriptor, diff_id: str) -> None:
        self.layout = layout
        self.desc = desc
        self.diff_id = diff_id
        self.dirfds: list[int] = []
        self.blob: BlobInput | None = None
        try:
            fd = os.open(layout.blob_path(desc.digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"layer blob {desc.digest} is missing",
                                hint="the layout is incomplete") from None
        self.blob = BlobInput(fd, desc)

    def write_to(self, out: BinaryIO) -> str:
        path = self.layout.blob_path(self.desc.digest)

        def open_blob() -> Any:
            try:
                return open(path, "rb", buffering=0)
            except FileNotFoundError:
                raise NotFoundError(f"layer blob {self.desc.digest} is missing",
                                    hint="the layout is incomplete") from None

        from lamina.layer.compression import LayerPipeline, LayerSource

        # the pipeline verifies blob digest and diff_id before its last chunk is read
        with LayerPipeline([LayerSource(self.desc, self.diff_id, open_blob)]) as pipe:
            stream = pipe.stream(0)
            digest = from_tar(stream, StreamWriter(out))  # type: ignore[arg-type]
            stream.finish()
        if digest != self.diff_id:
            raise DigestMismatchError(f"layer {self.desc.digest}: tar is {digest}, "
                                      f"config says {self.diff_id}")
        return digest

    def close(self) -> None:
        if self.blob is not None:
            os.close(self.blob.fd)
            self.blob = None


class LayoutBackend:
    """Serve one OCI image layout."""

    def __init__(self, path: str) -> None:
        from lamina.oci.layout import OCILayout
        self.layout = OCILayout.open(path)

    # -- reading ---------------------------------------------------------------
    def list_images(self) -> list[dict[str, Any]]:
        return [{"tag": tag, "digest": d.digest, "mediaType": d.media_type, "size": d.size}
                for tag, d in sorted(self.layout.refs().items())]

    def inspect(self, tag: str, platform: Platform | None) -> dict[str, Any]:
        m = self.layout.resolve(tag, platform)
        cfg = self.layout.config_for(m)
        return {"manifest": m.raw, "manifest_digest": m.digest, "config": cfg.raw,
                "layers": [LayerRecord(d, i).to_json()
                           for d, i in zip(m.layers, cfg.diff_ids, strict=True)]}

    def _manifests(self, desc: Descriptor, depth: int = 0) -> list[Any]:
        if depth > 4:
            return []
        if desc.media_type in mt.INDEX_TYPES:
            doc = self.layout.read_json(desc)
            out: list[Any] = []
            for i, sub in enumerate(doc.get("manifests", []) if isinstance(doc, dict) else []):
                out += self._manifests(Descriptor.from_json(sub, f"index manifests[{i}]"),
                                       depth + 1)
            return out
        if desc.media_type in mt.MANIFEST_TYPES:
            return [self.layout.manifest_for(desc, Platform.host())]
        return []

    def _layers(self) -> dict[str, Descriptor]:
        """diff_id -> a blob holding it, over every tagged manifest."""
        out: dict[str, Descriptor] = {}
        for desc in self.layout.refs().values():
            for m in self._manifests(desc):
                try:
                    cfg = self.layout.config_for(m)
                except (NotFoundError, ImageFormatError):
                    continue
                for d, i in zip(m.layers, cfg.diff_ids, strict=True):
                    if i not in out and self.layout.has_blob(d.digest):
                        out[i] = d
        return out

    def has_layer(self, diff_id: str) -> bool:
        return diff_id in self._layers()

    def open_layer(self, diff_id: str) -> LayerStreamSource:
        desc = self._layers().get(diff_id)
        if desc is None:
            raise NotFoundError(f"no layer with diff_id {diff_id} in {self.layout.path}",
                                hint="list the image's layers with Inspect")
        return _LayoutLayer(self.layout, desc, diff_id)

    # -- writing ---------------------------------------------------------------
    def put_layer(self, stream: BinaryIO, dirfds: Sequence[int], *, diff_id: str | None,
                  compression: str = "gzip", blob: BlobInput | None = None) -> LayerRecord:
        if blob is not None:
            return self._put_with_blob(stream, dirfds, diff_id, blob)
        media_type = mt.COMPRESSION_LAYER_TYPE.get(compression)
        if media_type is None:
            raise UsageError(f"unknown compression {compression!r}", hint="gzip, zstd or none")
        from lamina.layer.generate import _compressor, _Sink
        with self.layout.blob_writer() as out:
            comp = _compressor(compression, _Sink(out.write))
            digest = write_tar(read_chunks(stream), dirfds, comp)
            if compression != "none":
                comp.close()
            if diff_id is not None and digest != diff_id:
                raise DigestMismatchError(
                    f"layer stream reassembles to {digest}, expected diff_id {diff_id}",
                    hint="the stream or the files it references do not match the layer")
            desc = out.commit(media_type)
        return LayerRecord(desc, digest)

    def _put_with_blob(self, stream: BinaryIO, dirfds: Sequence[int], diff_id: str | None,
                       blob: BlobInput) -> LayerRecord:
        """Keep the sender's compressed blob (its digest is checked while it is copied);
        the stream is still reassembled and must match *diff_id*."""
        digest = write_tar(read_chunks(stream), dirfds, cast(BinaryIO, _Discard()))
        if diff_id is not None and digest != diff_id:
            raise DigestMismatchError(
                f"layer stream reassembles to {digest}, expected diff_id {diff_id}",
                hint="the stream or the files it references do not match the layer")
        if not self.layout.has_blob(blob.desc.digest):
            _clone_blob(self.layout, blob)
        return LayerRecord(blob.desc, digest)

    def finalize_image(self, tag: str, config: dict[str, Any], layers: list[LayerRecord],
                       annotations: dict[str, str]) -> Descriptor:
        from lamina.oci.edit import check_tag

        check_tag(tag)
        for rec in layers:
            if not self.layout.has_blob(rec.descriptor.digest):
                raise NotFoundError(f"layer blob {rec.descriptor.digest} is not in the layout",
                                    hint="send it with PutLayer first")
        cfg = dict(config)
        cfg["rootfs"] = {"type": "layers", "diff_ids": [r.diff_id for r in layers]}
        cdesc = self.layout.put_json(cfg, mt.CONFIG)
        manifest: dict[str, Any] = {
            "schemaVersion": 2, "mediaType": mt.MANIFEST, "config": cdesc.to_json(),
            "layers": [r.descriptor.to_json() for r in layers]}
        if annotations:
            manifest["annotations"] = dict(annotations)
        mdesc = self.layout.put_json(manifest, mt.MANIFEST)
        self.layout.set_ref(tag, mdesc)
        return mdesc

    def put_image(self, tag: str, manifest: bytes, config: bytes) -> str:
        """Tag an image from its documents kept byte for byte (its layers are here)."""
        from lamina.oci.edit import check_tag

        check_tag(tag)
        m = json.loads(manifest)
        for d in m.get("layers", []):
            if not self.layout.has_blob(str(d.get("digest"))):
                raise NotFoundError(f"layer blob {d.get('digest')} is not in the layout",
                                    hint="send it with PutLayer first")
        self.layout.put_blob(config, str(m["config"]["mediaType"]))
        mtype = str(m.get("mediaType") or mt.MANIFEST)
        mdesc = self.layout.put_blob(manifest, mtype)
        self.layout.set_ref(tag, mdesc)
        return mdesc.digest

    def unpack(self, tag: str, bundle: str, platform: Platform | None,
               rootless: bool) -> dict[str, Any]:
        from lamina.bundle import UnpackOptions, unpack
        from lamina.oci.layout import ImageRef

        if not os.path.isabs(bundle):
            raise UsageError(f"bundle path {bundle!r} must be absolute",
                             hint="the server does not share the client's working directory")
        res = unpack(UnpackOptions(ImageRef(self.layout.path, tag), bundle, platform,
                                   rootless=rootless))
        return res.to_json()

    def _lock_fd(self) -> int:
        return os.open(os.path.join(self.layout.path, HOLD_LOCK),
                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def gc(self, dry_run: bool) -> dict[str, Any]:
        from lamina.oci.gc import gc

        fd = self._lock_fd()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy("clients hold the layout (a put or copy is in progress)",
                           hint="retry when they are done") from None
            return gc(self.layout.path, dry_run=dry_run).to_json()
        finally:
            os.close(fd)

    def hold(self) -> Release:
        fd = self._lock_fd()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise

        def release() -> None:
            os.close(fd)    # closing the only fd of the open file drops the flock
        return release

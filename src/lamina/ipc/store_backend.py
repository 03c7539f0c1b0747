"""The ``io.lamina.Store`` backend over a local content-addressed store.

GetLayer sends the layer's stored tar-split as it is: its file chunks already
name objects beneath ``objects/``, which goes out as dirfd 0, plus the
compressed blob as an open file.  A receiver on the same reflink filesystem
clones both and moves no file data.  PutLayer hands the stream to
:meth:`lamina.store.Store.receive_layer` (always verified: a peer is not
trusted), keeping the sender's blob when one comes with it and otherwise
compressing the layer again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, BinaryIO

from lamina.errors import CorruptLayerError, NotFoundError, UsageError
from lamina.ipc.backend import Busy, LayerRecord, Release
from lamina.oci import mediatypes as mt
from lamina.oci.model import Descriptor, Platform
from lamina.store import Store
from lamina.store.receive import BlobInput, SourceIndex
from lamina.stream.stored import open_stored

_IO = 1 << 20


class StoreLayer:
    """One stored layer being sent; holds the store (gc waits) until closed."""

    def __init__(self, store: Store, diff_id: str) -> None:
        self.diff_id = diff_id
        self.dirfds: list[int] = []
        self.blob: BlobInput | None = None
        self._split = -1
        self._release = store.hold()
        try:
            info = store.layer(diff_id)
            if info is None or info.state != "ready":
                raise NotFoundError(f"no layer with diff_id {diff_id} in the store {store.path}",
                                    hint="list the image's layers with Inspect")
            self.tar_size = info.tar_size
            self._store = store
            self._files = info.files
            try:
                self._split = os.open(store.tar_split_path(diff_id), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise CorruptLayerError(f"the tar-split of layer {diff_id} is missing",
                                        hint="run 'lamina fsck --repair'") from None
            desc = Descriptor(info.media_type, info.blob, info.blob_size)
            try:
                bfd = os.open(store.blob_path(info.blob), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise CorruptLayerError(f"blob {info.blob} of layer {diff_id} is missing",
                                        hint="run 'lamina fsck'") from None
            self.blob = BlobInput(bfd, desc)
            self.dirfds.append(os.dup(store.objects_fd))
        except BaseException:
            self.close()
            raise

    def open_stream(self) -> int:
        """The tar-split file itself, opened afresh (in-process copies read it directly, and
        a trusting receiver on the same filesystem clones it): maybe zstd-compressed, see
        :mod:`lamina.stream.stored`."""
        return os.open(f"/proc/self/fd/{self._split}", os.O_RDONLY | os.O_CLOEXEC)

    def source_index(self) -> SourceIndex:
        """The index rows of this layer, for a trusting receiver in this process."""
        store, diff_id = self._store, self.diff_id
        return SourceIndex(store.db.path, self.tar_size, self._files,
                           lambda: store.layer_object_sizes(diff_id))

    def write_to(self, out: BinaryIO) -> str:
        """Send the tar-split's plain stream (stored compressed); the receiver reassembles
        it and checks the diff_id."""
        with open_stored(f"/proc/self/fd/{self._split}") as f:
            while b := f.read(_IO):
                out.write(b)
        return self.diff_id

    def close(self) -> None:
        for fd in [self._split, *self.dirfds, self.blob.fd if self.blob else -1]:
            if fd >= 0:
                os.close(fd)
        self._split = -1
        self.dirfds = []
        self.blob = None
        self._release()


class LocalStoreBackend:
    """Serve a :class:`~lamina.store.Store` (the process keeps it open)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def list_images(self) -> list[dict[str, Any]]:
        out = []
        for r in self.store.images():
            rows = self.store.db.query("SELECT media_type, size FROM manifests WHERE digest = ?",
                                       (r.manifest,))
            mtype, size = (str(rows[0][0]), int(str(rows[0][1]))) if rows else (mt.MANIFEST, 0)
            out.append({"tag": r.name, "digest": r.manifest, "mediaType": mtype, "size": size})
        return out

    def inspect(self, tag: str, platform: Platform | None) -> dict[str, Any]:
        img = self.store.image(tag)
        return {"manifest": img.manifest.raw, "manifest_digest": img.manifest.digest,
                "config": img.config.raw,
                "layers": [LayerRecord(x.desc, x.diff_id).to_json() for x in img.layers]}

    def has_layer(self, diff_id: str) -> bool:
        info = self.store.layer(diff_id)
        return info is not None and info.state == "ready" and self.store.has_blob(info.blob)

    def open_layer(self, diff_id: str) -> StoreLayer:
        return StoreLayer(self.store, diff_id)

    def put_layer(self, stream: BinaryIO, dirfds: Sequence[int], *, diff_id: str | None,
                  compression: str = "gzip", blob: BlobInput | None = None) -> LayerRecord:
        desc, digest, _stats = self.store.receive_layer(
            stream, dirfds, diff_id=diff_id, blob=blob, compression=compression)
        return LayerRecord(desc, digest)

    def finalize_image(self, tag: str, config: dict[str, Any], layers: list[LayerRecord],
                       annotations: dict[str, str]) -> Descriptor:
        layers = [self._stored_as(r) for r in layers]
        cfg = dict(config)
        cfg["rootfs"] = {"type": "layers", "diff_ids": [r.diff_id for r in layers]}
        cbytes = json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()
        cdesc = Descriptor(mt.CONFIG, "sha256:" + hashlib.sha256(cbytes).hexdigest(),
                           len(cbytes))
        manifest: dict[str, Any] = {
            "schemaVersion": 2, "mediaType": mt.MANIFEST, "config": cdesc.to_json(),
            "layers": [r.descriptor.to_json() for r in layers]}
        if annotations:
            manifest["annotations"] = dict(annotations)
        mbytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        digest = self.store.put_image(tag, mbytes, cbytes)
        return Descriptor(mt.MANIFEST, digest, len(mbytes))

    def _stored_as(self, rec: LayerRecord) -> LayerRecord:
        """A layer the client skipped (HasLayer) may be stored under another blob
        (another compression): name the one this store has."""
        if self.store.has_blob(rec.descriptor.digest):
            return rec
        info = self.store.layer(rec.diff_id)
        if info is None or info.state != "ready" or not self.store.has_blob(info.blob):
            return rec      # put_image reports it missing
        return LayerRecord(Descriptor(info.media_type, info.blob, info.blob_size), rec.diff_id)

    def put_image(self, tag: str, manifest: bytes, config: bytes) -> str:
        return self.store.put_image(tag, manifest, config)

    def unpack(self, tag: str, bundle: str, platform: Platform | None,
               rootless: bool) -> dict[str, Any]:
        from lamina.drivers.unpack import DriverUnpackOptions, is_layout, unpack_with_driver

        if not os.path.isabs(bundle):
            raise UsageError(f"bundle path {bundle!r} must be absolute",
                             hint="the server does not share the client's working directory")
        if is_layout(tag):      # a path on the server is not the client's to name
            raise UsageError(f"{tag!r} is not an image name of this store")
        res = unpack_with_driver(DriverUnpackOptions(tag, bundle, store=self.store.path,
                                                     platform=platform, rootless=rootless))
        return res.to_json()

    def gc(self, dry_run: bool) -> dict[str, Any]:
        if self.store.lock._shared:
            raise Busy("clients hold the store (a put or copy is in progress)",
                       hint="retry when they are done")
        try:
            return self.store.gc(dry_run=dry_run, wait=False).to_json()
        except UsageError as e:
            raise Busy(e.message, hint="retry when the other lamina command is done") from None

    def hold(self) -> Release:
        return self.store.hold()

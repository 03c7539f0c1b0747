"""An OCI image layout directory (image-spec ``image-layout.md``)::

    LAYOUT/
    ├── oci-layout              {"imageLayoutVersion": "1.0.0"}
    ├── index.json              image index; tags are org.opencontainers.image.ref.name
    └── blobs/sha256/<hex>      content-addressed blobs (manifests, configs, layers)

Reads verify every blob against its digest and size while streaming.  Writes
are atomic: blobs go to a temporary file in ``blobs/sha256`` and are renamed
into place; ``index.json`` is replaced with rename under an exclusive
``flock`` on the layout's ``index.json.lock``, so concurrent writers never lose
each other's tags and readers never see a half-written index.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

from lamina.errors import (
    DigestMismatchError,
    ImageFormatError,
    NotFoundError,
    UsageError,
)
from lamina.oci import mediatypes as mt
from lamina.oci import schema
from lamina.oci.model import Descriptor, ImageConfig, Manifest, Platform

MAX_JSON_BLOB = 16 << 20  # manifests/configs larger than this are hostile


@dataclass(frozen=True)
class ImageRef:
    layout: str
    tag: str

    @classmethod
    def parse(cls, text: str, default_tag: str = "latest") -> ImageRef:
        """``LAYOUT[:TAG]``; the tag is what follows the last ':' after the last '/'."""
        head, sep, tail = text.rpartition(":")
        if sep and "/" not in tail and head:
            if not tail:
                raise UsageError(f"empty tag in {text!r}")
            return cls(head, tail)
        return cls(text, default_tag)

    def __str__(self) -> str:
        return f"{self.layout}:{self.tag}"


class VerifyingReader:
    """A read-only stream over a blob that checks size and sha256 at EOF."""

    def __init__(self, f: BinaryIO, desc: Descriptor) -> None:
        self._f = f
        self._desc = desc
        self._h = hashlib.sha256()
        self._n = 0
        self._done = False

    def read(self, n: int = -1) -> bytes:
        want = self._desc.size - self._n + 1 if n < 0 else n
        data = self._f.read(want)
        self._h.update(data)
        self._n += len(data)
        if self._n > self._desc.size:
            raise DigestMismatchError(
                f"blob {self._desc.digest} is larger than its descriptor's {self._desc.size} "
                "bytes", hint="the layout is corrupt or was modified; re-pull the image")
        if not data and not self._done:
            self._done = True
            self.verify()
        return data

    def verify(self) -> None:
        if self._n != self._desc.size:
            raise DigestMismatchError(
                f"blob {self._desc.digest} has {self._n} bytes, descriptor says "
                f"{self._desc.size}", hint="the layout is corrupt or truncated; re-pull the image")
        got = "sha256:" + self._h.hexdigest()
        if got != self._desc.digest:
            raise DigestMismatchError(
                f"blob digest mismatch: expected {self._desc.digest}, got {got}",
                hint="the layout is corrupt or was modified; re-pull the image")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> VerifyingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OCILayout:
    """Read and write access to an OCI image layout on disk."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.blob_dir = os.path.join(self.path, "blobs", "sha256")

    # -- opening / creating -------------------------------------------------
    @classmethod
    def open(cls, path: str) -> OCILayout:
        lay = cls(path)
        marker = os.path.join(lay.path, "oci-layout")
        try:
            with open(marker, "rb") as f:
                doc = json.loads(f.read(4096))
        except FileNotFoundError:
            raise NotFoundError(
                f"{path}: not an OCI image layout (no oci-layout file)",
                hint="create one with 'umoci init' or 'skopeo copy ... oci:'") from None
        except (OSError, ValueError) as e:
            raise ImageFormatError(f"{path}/oci-layout: {e}") from None
        if not isinstance(doc, dict) or doc.get("imageLayoutVersion") != mt.OCI_LAYOUT_VERSION:
            raise ImageFormatError(f"{path}: unsupported imageLayoutVersion in oci-layout")
        return lay

    @classmethod
    def init(cls, path: str) -> OCILayout:
        """Create an empty layout (idempotent on an existing empty layout)."""
        lay = cls(path)
        os.makedirs(lay.blob_dir, exist_ok=True)
        marker = os.path.join(lay.path, "oci-layout")
        if not os.path.exists(marker):
            doc = {"imageLayoutVersion": mt.OCI_LAYOUT_VERSION}
            _atomic_write(marker, json.dumps(doc).encode())
        if not os.path.exists(os.path.join(lay.path, "index.json")):
            lay._write_index({"schemaVersion": 2, "mediaType": mt.INDEX, "manifests": []})
        return lay

    # -- blobs ---------------------------------------------------------------
    def blob_path(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        return os.path.join(self.path, "blobs", algo, hexd)

    def has_blob(self, digest: str) -> bool:
        return os.path.exists(self.blob_path(digest))

    def open_blob(self, desc: Descriptor) -> VerifyingReader:
        try:
            f = open(self.blob_path(desc.digest), "rb")  # noqa: SIM115 - owned by the reader
        except FileNotFoundError:
            raise NotFoundError(
                f"blob {desc.digest} ({desc.media_type}) is missing from {self.path}",
                hint="the layout is incomplete; re-pull the image") from None
        return VerifyingReader(f, desc)

    def read_blob(self, desc: Descriptor, limit: int = MAX_JSON_BLOB) -> bytes:
        if desc.size > limit:
            raise ImageFormatError(f"blob {desc.digest}: {desc.size} bytes is over the "
                                   f"{limit}-byte limit for a JSON document")
        with self.open_blob(desc) as r:
            data = r.read(desc.size)
            r.read(1)  # reach EOF so the digest is verified
        return data

    def read_json(self, desc: Descriptor) -> Any:
        data = self.read_blob(desc)
        try:
            return json.loads(data)
        except ValueError as e:
            raise ImageFormatError(f"blob {desc.digest}: invalid JSON: {e}") from None

    def put_blob(self, data: bytes, media_type: str,
                 annotations: dict[str, str] | None = None) -> Descriptor:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        dest = self.blob_path(digest)
        if not os.path.exists(dest):
            _atomic_write(dest, data)
        return Descriptor(media_type, digest, len(data), dict(annotations or {}))

    @contextlib.contextmanager
    def blob_writer(self) -> Iterator[_BlobWriter]:
        """Stream a blob of unknown digest; it becomes visible only when committed."""
        os.makedirs(self.blob_dir, exist_ok=True)
        w = _BlobWriter(self)
        try:
            yield w
        finally:
            w.abort()

    def put_json(self, obj: Any, media_type: str, *,
                 validate: bool | None = None) -> Descriptor:
        """Store *obj* as canonical JSON.

        ``validate=True``: check it against its image-spec schema first (documents
        carrying what a user typed: the editing commands); ``None``: only when
        ``LAMINA_VALIDATE=1`` (documents lamina derives from verified ones; see
        :func:`lamina.oci.schema.check_derived`); ``False``: never (tests writing
        hostile documents on purpose).
        """
        if validate or (validate is None and schema.check_derived()):
            schema.validate(obj, media_type)
        return self.put_blob(canonical_json(obj), media_type)

    # -- index and refs ------------------------------------------------------
    def read_index(self) -> dict[str, Any]:
        p = os.path.join(self.path, "index.json")
        try:
            with open(p, "rb") as f:
                data = f.read(MAX_JSON_BLOB + 1)
        except FileNotFoundError:
            raise ImageFormatError(f"{self.path}: index.json is missing") from None
        try:
            idx = json.loads(data)
        except ValueError as e:
            raise ImageFormatError(f"{p}: invalid JSON: {e}") from None
        if not isinstance(idx, dict) or not isinstance(idx.get("manifests"), list):
            raise ImageFormatError(f"{p}: not an image index")
        return idx

    def refs(self) -> dict[str, Descriptor]:
        out: dict[str, Descriptor] = {}
        for i, m in enumerate(self.read_index()["manifests"]):
            d = Descriptor.from_json(m, f"index.json manifests[{i}]")
            name = d.annotations.get(mt.REF_NAME)
            if name is not None:
                out[name] = d
        return out

    def set_ref(self, tag: str, desc: Descriptor) -> None:
        """Point *tag* at *desc* (replacing any previous descriptor with that tag)."""
        ann = dict(desc.annotations)
        ann[mt.REF_NAME] = tag
        new = Descriptor(desc.media_type, desc.digest, desc.size, ann, desc.platform, desc.raw)
        with self.index_lock():
            idx = self.read_index()
            idx["manifests"] = [m for m in idx["manifests"] if not (
                isinstance(m, dict) and (m.get("annotations") or {}).get(mt.REF_NAME) == tag)]
            idx["manifests"].append(new.to_json())
            self._write_index(idx)

    def remove_ref(self, tag: str) -> None:
        with self.index_lock():
            idx = self.read_index()
            before = len(idx["manifests"])
            idx["manifests"] = [m for m in idx["manifests"] if not (
                isinstance(m, dict) and (m.get("annotations") or {}).get(mt.REF_NAME) == tag)]
            if len(idx["manifests"]) == before:
                raise NotFoundError(f"tag {tag!r} not found in {self.path}")
            self._write_index(idx)

    @contextlib.contextmanager
    def index_lock(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.path, "index.json.lock"),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write_index(self, idx: dict[str, Any]) -> None:
        if schema.check_derived():
            schema.validate(idx, mt.INDEX)
        _atomic_write(os.path.join(self.path, "index.json"), canonical_json(idx))

    # -- resolution ----------------------------------------------------------
    def resolve(self, tag: str, platform: Platform | None = None) -> Manifest:
        """Resolve *tag* to an image manifest, descending into indexes by platform."""
        refs = self.refs()
        if tag not in refs:
            known = ", ".join(sorted(refs)) or "none"
            raise NotFoundError(f"tag {tag!r} not found in {self.path}", hint=f"tags: {known}")
        return self.manifest_for(refs[tag], platform or Platform.host())

    def manifest_for(self, desc: Descriptor, platform: Platform, depth: int = 0) -> Manifest:
        if depth > 4:
            raise ImageFormatError("image indexes nested more than 4 deep")
        if desc.media_type in mt.INDEX_TYPES:
            doc = self.read_json(desc)
            if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
                raise ImageFormatError(f"index {desc.digest}: 'manifests' must be a list")
            subs = [Descriptor.from_json(m, f"index {desc.digest} manifests[{i}]")
                    for i, m in enumerate(doc["manifests"])]
            for sub in subs:
                if sub.platform is not None and platform.matches(sub.platform):
                    return self.manifest_for(sub, platform, depth + 1)
            # an index without platforms (e.g. one image) is unambiguous
            plain = [s for s in subs if s.platform is None]
            if len(plain) == 1:
                return self.manifest_for(plain[0], platform, depth + 1)
            offered = ", ".join(str(s.platform) for s in subs if s.platform) or "none"
            raise NotFoundError(f"no manifest for platform {platform} in index {desc.digest}",
                                hint=f"platforms offered: {offered}; use --platform")
        if desc.media_type not in mt.MANIFEST_TYPES:
            raise ImageFormatError(f"{desc.digest}: unsupported manifest media type "
                                   f"{desc.media_type!r}")
        return Manifest.from_json(desc.digest, self.read_json(desc))

    def config_for(self, manifest: Manifest) -> ImageConfig:
        cfg = ImageConfig.from_json(manifest.config.digest, self.read_json(manifest.config))
        if len(cfg.diff_ids) != len(manifest.layers):
            raise ImageFormatError(
                f"manifest {manifest.digest} has {len(manifest.layers)} layers but its config "
                f"lists {len(cfg.diff_ids)} diff_ids")
        return cfg


class _BlobWriter:
    def __init__(self, layout: OCILayout) -> None:
        self._layout = layout
        fd, self._tmp = tempfile.mkstemp(prefix=".tmp-", dir=layout.blob_dir)
        self.file: IO[bytes] = os.fdopen(fd, "wb")
        self._h = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, data: bytes) -> None:
        self._h.update(data)
        self.file.write(data)
        self.size += len(data)

    def commit(self, media_type: str) -> Descriptor:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        digest = "sha256:" + self._h.hexdigest()
        os.chmod(self._tmp, 0o644)
        os.rename(self._tmp, self._layout.blob_path(digest))
        self._done = True
        return Descriptor(media_type, digest, self.size)

    def abort(self) -> None:
        if not self._done:
            self.file.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)
            self._done = True


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

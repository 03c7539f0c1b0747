"""The lazy index of an image as an OCI artifact in its registry (the SOCI approach).

A gzip layer has no table of contents, so mounting an image straight from a
registry needs the index ``lamina lazy-index`` builds (:mod:`lamina.lazy.index`).
It is published next to the image as an artifact whose ``subject`` is the
image manifest, and found again from that manifest's digest.

The artifact is an image manifest::

    mediaType     application/vnd.oci.image.manifest.v1+json
    artifactType  application/vnd.lamina.lazy-index.v1
    config        the empty descriptor (application/vnd.oci.empty.v1+json: "{}")
    layers        one blob per image layer, bottom first, each LAYER_MEDIA_TYPE and
                  annotated lamina.lazy.layer.digest = the image layer's digest
    subject       the image manifest's descriptor

Each layer blob is gzip (mtime 0: the same index always gives the same digest)
of one line of JSON, ``{"version", "blob", "diff_id", "compression", "seek",
"seek_size", "members"}`` (``members`` as in the local index), a newline, and
``seek_size`` bytes of seek index: the indexed_gzip export (``seek: "gzidx"``)
for gzip layers, the frame table (``"zframes"``) for multi-frame zstd.

Referrers: a registry with the OCI 1.1 referrers API answers the manifest
``PUT`` with an ``OCI-Subject`` header and lists the artifact at
``/v2/NAME/referrers/DIGEST``.  Others (distribution 2.8 answers 404 there)
get the referrers tag schema: the tag ``sha256-HEX`` (HEX: the subject's
digest) names an image index listing the referrers, which a publish reads,
extends and writes back.  That is a read-modify-write without a lock: two
publishers racing on one image can drop each other's entry.

Trust: from the artifact manifest down everything is content-addressed, and
the index is checked against the image (subject, layer digests, diff_ids,
compression); a mount verifies every file it reads against the index's
sha256.  But whoever may push to the repository may publish an index that
lies about the files: pin a known artifact with its digest, or pull the image
to verify it whole.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina.errors import (
    DigestMismatchError,
    ImageFormatError,
    NotFoundError,
    RegistryError,
    UsageError,
)
from lamina.lazy.index import (
    LayerIndex,
    Member,
    atomic_write,
    check_index_dir,
    compression_of,
    ensure_index,
    index_paths,
)
from lamina.oci import mediatypes as mt
from lamina.oci.layout import ImageRef, OCILayout
from lamina.oci.model import Descriptor, Manifest, Platform
from lamina.registry.reference import RegistryRef

if TYPE_CHECKING:
    from lamina.registry.client import RegistryClient, RegistryOptions
    from lamina.registry.progress import TransferProgress

ARTIFACT_TYPE = "application/vnd.lamina.lazy-index.v1"
LAYER_MEDIA_TYPE = "application/vnd.lamina.lazy-index.layer.v1+gzip"
LAYER_ANNOTATION = "lamina.lazy.layer.digest"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_DATA = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_DATA).hexdigest()
FORMAT_VERSION = 1
MAX_BLOB = 256 << 20        # compressed index blob: a few MB for a GB image
MAX_DATA = 1 << 30          # ... decompressed (a gzip bomb stops here)
_KINDS = frozenset({"file", "dir", "symlink", "hardlink", "char", "block", "fifo", "skip"})
_HEX = frozenset("0123456789abcdef")


def referrers_tag(digest: str) -> str:
    """The referrers tag schema's tag for *digest* (``sha256-HEX``)."""
    return digest.replace(":", "-", 1)


# -- the layer blob -----------------------------------------------------------------------


def encode_layer(layout: OCILayout, desc: Descriptor, diff_id: str) -> bytes:
    """The artifact blob of a layer whose local index exists (see the module doc)."""
    jpath, spath = index_paths(layout, desc)
    with open(jpath, "rb") as f:
        doc = json.load(f)
    comp = compression_of(desc)
    seek, kind = b"", ""
    if comp == "gzip" or (comp == "zstd" and os.path.exists(spath)):
        with open(spath, "rb") as f:
            seek = f.read()
        kind = "gzidx" if comp == "gzip" else "zframes"
    head = {"version": FORMAT_VERSION, "blob": desc.digest, "diff_id": diff_id,
            "compression": comp, "seek": kind, "seek_size": len(seek),
            "members": doc["members"]}
    raw = json.dumps(head, separators=(",", ":")).encode() + b"\n" + seek
    return gzip.compress(raw, compresslevel=6, mtime=0)


@dataclass
class DecodedLayer:
    compression: str
    members: list[Member]
    seek_kind: str          # "gzidx", "zframes" or ""
    seek: bytes


def _gunzip(data: bytes, what: str) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, MAX_DATA)
    except zlib.error as e:
        raise ImageFormatError(f"{what}: not gzip data: {e}") from None
    if d.unconsumed_tail:
        raise ImageFormatError(f"{what}: more than {MAX_DATA >> 20} MiB uncompressed",
                               hint="the lazy index artifact is hostile or broken")
    if not d.eof or d.unused_data:
        raise ImageFormatError(f"{what}: truncated gzip data or trailing garbage")
    return out


def _member(r: object, what: str) -> Member:
    ok = isinstance(r, list) and len(r) == 13
    if ok:
        assert isinstance(r, list)
        ints = (r[2], r[3], r[4], r[5], r[6], r[8], r[9], r[11])
        ok = (isinstance(r[0], str) and r[1] in _KINDS and isinstance(r[7], str)
              and all(isinstance(x, int) and not isinstance(x, bool) for x in ints)
              and r[5] >= 0 and r[11] >= 0 and isinstance(r[12], str)
              and isinstance(r[10], dict)
              and all(isinstance(k, str) and isinstance(v, str) for k, v in r[10].items()))
        if ok and r[1] == "file":
            ok = len(r[12]) == 64 and set(r[12]) <= _HEX
    if not ok:
        raise ImageFormatError(f"{what}: malformed member {str(r)[:200]}",
                               hint="the lazy index artifact is broken; publish it again")
    assert isinstance(r, list)
    try:
        return Member.from_json(r)
    except ValueError as e:     # bad base64 in an xattr
        raise ImageFormatError(f"{what}: malformed member {r[0]!r}: {e}") from None


def decode_layer(data: bytes, desc: Descriptor, diff_id: str, what: str) -> DecodedLayer:
    """Parse and check an artifact blob against the image layer it must describe."""
    raw = _gunzip(data, what)
    nl = raw.find(b"\n")
    try:
        head = json.loads(raw[:nl] if nl >= 0 else raw)
    except ValueError as e:
        raise ImageFormatError(f"{what}: invalid JSON: {e}") from None
    if not isinstance(head, dict) or head.get("version") != FORMAT_VERSION:
        raise ImageFormatError(f"{what}: not a version {FORMAT_VERSION} lamina lazy index",
                               hint="publish the index again with this lamina")
    comp = compression_of(desc)
    if head.get("blob") != desc.digest or head.get("diff_id") != diff_id \
            or head.get("compression") != comp:
        raise DigestMismatchError(
            f"{what}: describes layer {head.get('blob')} (diff_id {head.get('diff_id')}, "
            f"{head.get('compression')}), not {desc.digest} ({diff_id}, {comp})",
            hint="the artifact belongs to another image; publish the index again")
    kind = head.get("seek")
    want = {"gzip": ("gzidx",), "zstd": ("zframes", ""), "none": ("",)}[comp]
    seek = raw[nl + 1:] if nl >= 0 else b""
    if kind not in want or head.get("seek_size") != len(seek) or (not kind and seek):
        raise ImageFormatError(f"{what}: bad seek index ({kind!r}, {len(seek)} bytes)")
    if kind == "zframes":
        try:
            frames = json.loads(seek)
            good = isinstance(frames, list) and all(
                isinstance(p, list) and len(p) == 2 and all(
                    isinstance(x, int) and x >= 0 for x in p) for p in frames)
        except ValueError:
            good = False
        if not good:
            raise ImageFormatError(f"{what}: malformed zstd frame table")
    rows = head.get("members")
    if not isinstance(rows, list):
        raise ImageFormatError(f"{what}: 'members' must be a list")
    return DecodedLayer(comp, [_member(r, what) for r in rows], str(kind), seek)


# -- registry plumbing ---------------------------------------------------------------------


def get_blob(client: RegistryClient, repo: str, desc: Descriptor, limit: int) -> bytes:
    """A whole (small) blob, size and digest verified."""
    import httpx

    from lamina.registry.client import transport_error
    what = f"blob {client.ref.registry}/{repo}@{desc.digest}"
    if desc.size > limit:
        raise ImageFormatError(f"{what}: {desc.size} bytes, more than {limit}",
                               hint="the descriptor is hostile or broken")
    buf = bytearray()
    try:
        with client.open_blob(repo, desc.digest) as resp:
            for chunk in resp.iter_raw():
                buf += chunk
                if len(buf) > desc.size:
                    break
    except httpx.HTTPError as e:
        raise transport_error(e, client.ref.registry, what) from None
    if len(buf) != desc.size or "sha256:" + hashlib.sha256(buf).hexdigest() != desc.digest:
        raise DigestMismatchError(f"{what}: the registry sent {len(buf)} bytes that do not "
                                  "match the digest",
                                  hint="the registry's copy is damaged; publish it again")
    return bytes(buf)


def _upload(client: RegistryClient, repo: str, digest: str, data: bytes) -> int:
    """Upload a small blob unless the repository has it; returns the bytes sent."""
    if client.blob_size(repo, digest) is not None:
        return 0
    loc = client.start_upload(repo)
    assert loc is not None      # no mount was asked for
    client.upload_monolithic(loc, digest, len(data), lambda: iter([data]))
    return len(data)


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def artifact_manifest(subject: Descriptor, blobs: list[tuple[str, bytes]]) -> bytes:
    """The artifact manifest for *blobs*: (image layer digest, encoded index) pairs."""
    return _dumps({
        "schemaVersion": 2, "mediaType": mt.MANIFEST, "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": EMPTY_DIGEST,
                   "size": len(EMPTY_DATA)},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE,
                    "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
                    "size": len(data), "annotations": {LAYER_ANNOTATION: layer}}
                   for layer, data in blobs],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest,
                    "size": subject.size},
    })


@dataclass
class Published:
    subject: str
    digest: str
    size: int
    index_bytes: int            # the layer blobs, compressed
    uploaded: int               # bytes sent now (blobs the repository had are skipped)
    referrers: str              # "api", or "tag sha256-HEX"

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def put_artifact(client: RegistryClient, repo: str, subject: Descriptor,
                 blobs: list[tuple[str, bytes]]) -> Published:
    """Upload the blobs and the artifact manifest; record it as a referrer of *subject*."""
    sent = _upload(client, repo, EMPTY_DIGEST, EMPTY_DATA)
    for _layer, data in blobs:
        sent += _upload(client, repo, "sha256:" + hashlib.sha256(data).hexdigest(), data)
    man = artifact_manifest(subject, blobs)
    digest = "sha256:" + hashlib.sha256(man).hexdigest()
    what = f"upload of the lazy index {client.ref.registry}/{repo}@{digest}"
    resp = client.request("PUT", client.url(repo, "manifests", digest), what=what,
                          headers={"Content-Type": mt.MANIFEST}, content=lambda: man)
    with contextlib.closing(resp):
        client.check(resp, what, ok=(200, 201, 202))
    if resp.headers.get("OCI-Subject"):
        how = "api"             # the registry indexes referrers itself
    else:
        _add_referrer(client, repo, subject.digest, digest, len(man))
        how = "tag " + referrers_tag(subject.digest)
    return Published(subject.digest, digest, len(man), sum(len(d) for _l, d in blobs),
                     sent + len(man), how)


def _add_referrer(client: RegistryClient, repo: str, subject: str, digest: str,
                  size: int) -> None:
    tag = referrers_tag(subject)
    try:
        fm = client.get_manifest(repo, tag)
    except NotFoundError:
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.INDEX, "manifests": []}
    else:
        if fm.media_type != mt.INDEX or not isinstance(fm.doc.get("manifests"), list):
            raise RegistryError(
                f"{client.ref.registry}/{repo}:{tag} is not an OCI image index, so the "
                "referrers tag cannot list the lazy index",
                hint=f"the tag {tag} is reserved for referrers (OCI 1.1); remove it")
        doc = dict(fm.doc)
    entries = [m for m in doc["manifests"] if not (isinstance(m, dict)
                                                   and m.get("digest") == digest)]
    if len(entries) != len(doc["manifests"]):
        return      # already listed: the same index was published before
    entries.append({"mediaType": mt.MANIFEST, "digest": digest, "size": size,
                    "artifactType": ARTIFACT_TYPE})
    doc["manifests"] = entries
    client.put_manifest(repo, tag, _dumps(doc), mt.INDEX)


def find_artifacts(client: RegistryClient, repo: str, subject: str) -> list[Descriptor]:
    """The lazy index artifacts referring to *subject*, most recently listed last."""
    from lamina.registry.client import MAX_MANIFEST, read_limited
    what = f"referrers of {client.ref.registry}/{repo}@{subject}"
    url = (client.url(repo, "referrers", subject) + "?artifactType="
           + urllib.parse.quote(ARTIFACT_TYPE, safe=""))
    entries: object = None
    resp = client.request("GET", url, what=what, headers={"Accept": mt.INDEX}, stream=True)
    try:
        if resp.status_code == 200:
            data = read_limited(resp, MAX_MANIFEST, what, client.ref.registry)
            try:
                entries = json.loads(data).get("manifests")
            except (ValueError, AttributeError):
                raise ImageFormatError(f"{what}: not an image index") from None
        elif resp.status_code != 404:   # 404: no referrers API (distribution 2.8)
            client.check(resp, what)
    finally:
        resp.close()
    if entries is None:
        try:
            entries = client.get_manifest(repo, referrers_tag(subject)).doc.get("manifests")
        except NotFoundError:
            return []
    out = []
    for i, m in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(m, dict) and m.get("artifactType") == ARTIFACT_TYPE:
            d = Descriptor.from_json(m, f"{what}: manifests[{i}]")
            if d.media_type == mt.MANIFEST:
                out.append(d)
    return out


def fetch_layers(client: RegistryClient, repo: str, artifact: str, manifest: Manifest,
                 diff_ids: tuple[str, ...], dest: str, jobs: int = 4) -> list[LayerIndex]:
    """Download and check the artifact *artifact* of *manifest*; the seek indexes are
    written to *dest*, the member lists returned (blob_path "": read remotely)."""
    from lamina.registry.workers import run_all
    fm = client.get_manifest(repo, artifact)
    what = f"lazy index {client.ref.registry}/{repo}@{artifact}"
    doc = fm.doc
    subject = doc.get("subject")
    if fm.media_type != mt.MANIFEST or doc.get("artifactType") != ARTIFACT_TYPE:
        raise ImageFormatError(f"{what}: not a lamina lazy index (artifactType "
                               f"{doc.get('artifactType')!r})")
    if not isinstance(subject, dict) or subject.get("digest") != manifest.digest:
        raise DigestMismatchError(f"{what}: refers to {subject and subject.get('digest')}, "
                                  f"not to the image {manifest.digest}",
                                  hint="pin the index of this image, or publish it again")
    raw = doc.get("layers")
    if not isinstance(raw, list) or len(raw) != len(manifest.layers):
        raise ImageFormatError(f"{what}: {len(raw) if isinstance(raw, list) else 'no'} "
                               f"layer indexes for {len(manifest.layers)} layers")
    blobs = [Descriptor.from_json(x, f"{what} layers[{i}]") for i, x in enumerate(raw)]
    for b, layer in zip(blobs, manifest.layers, strict=True):
        if b.media_type != LAYER_MEDIA_TYPE or b.annotations.get(LAYER_ANNOTATION) \
                != layer.digest:
            raise ImageFormatError(f"{what}: blob {b.digest} is not the index of layer "
                                   f"{layer.digest}")
    os.makedirs(dest, 0o755, exist_ok=True)

    def one(i: int, stop: threading.Event) -> LayerIndex:
        layer, diff_id = manifest.layers[i], diff_ids[i]
        dec = decode_layer(get_blob(client, repo, blobs[i], MAX_BLOB), layer, diff_id,
                           f"{what} layer {i}")
        seek_path = ""
        if dec.seek_kind:
            seek_path = os.path.join(dest, f"{layer.hex}.{dec.seek_kind}")
            atomic_write(seek_path, dec.seek)
        return LayerIndex(layer.digest, diff_id, dec.compression, dec.members, "", seek_path)

    return run_all(one, list(range(len(blobs))), jobs)


# -- publishing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PublishOptions:
    image: ImageRef                     # layout holding the image and its blobs
    ref: RegistryRef                    # repository holding the image (tag ignored)
    platform: Platform | None = None    # None: every image under the tag
    registry: RegistryOptions | None = None


@dataclass
class PublishResult:
    ref: str
    artifacts: list[Published] = field(default_factory=list)
    indexes_built: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "artifacts": [a.to_json() for a in self.artifacts],
                "indexes_built": self.indexes_built, "seconds": round(self.seconds, 3)}


def publish(opts: PublishOptions) -> PublishResult:
    """Build the lazy indexes of a layout's image (where missing) and publish them as
    artifacts referring to the image's manifests, which the registry must have."""
    from lamina.registry.client import RegistryClient, RegistryOptions
    from lamina.registry.push import _collect
    t0 = time.monotonic()
    layout = OCILayout.open(opts.image.layout)
    check_index_dir(layout)
    refs = layout.refs()
    if opts.image.tag not in refs:
        raise NotFoundError(f"tag {opts.image.tag!r} not found in {layout.path}",
                            hint=f"tags: {', '.join(sorted(refs)) or 'none'}")
    docs, images = _collect(layout, refs[opts.image.tag])
    if opts.platform is not None:
        picked = layout.resolve(opts.image.tag, opts.platform).digest
        images = [m for m in images if m.digest == picked]
    subjects = {d.desc.digest: d.desc for d in docs}
    repo = opts.ref.repository
    result = PublishResult(f"{opts.ref.registry}/{repo}")
    with RegistryClient(opts.ref, opts.registry or RegistryOptions(),
                        [f"repository:{repo}:pull,push"]) as client:
        for m in images:
            config = layout.config_for(m)
            if len(config.diff_ids) != len(m.layers):
                raise ImageFormatError(f"{m.digest}: the config lists {len(config.diff_ids)} "
                                       f"diff_ids for {len(m.layers)} layers")
            try:
                client.get_manifest(repo, m.digest)
            except NotFoundError:
                raise NotFoundError(
                    f"{opts.ref.registry}/{repo} does not have the image {m.digest}",
                    hint="push the image first: 'lamina push --lazy-index' pushes both"
                ) from None
            blobs = []
            for d, diff_id in zip(m.layers, config.diff_ids, strict=True):
                _idx, built = ensure_index(layout, d, diff_id)
                result.indexes_built += built
                blobs.append((d.digest, encode_layer(layout, d, diff_id)))
            s = subjects[m.digest]
            subject = Descriptor(s.media_type, s.digest, s.size)
            result.artifacts.append(put_artifact(client, repo, subject, blobs))
    result.seconds = time.monotonic() - t0
    return result


@dataclass(frozen=True)
class RemotePublishOptions:
    ref: RegistryRef                    # an image in a registry
    platform: Platform | None = None    # from an image index (default: this machine)
    registry: RegistryOptions | None = None
    workdir: str = "/var/tmp"           # the blobs are downloaded below it, then removed


def publish_remote(opts: RemotePublishOptions,
                   progress: TransferProgress | None = None) -> PublishResult:
    """Index an image that is only in a registry: download it once into a temporary
    layout, build its indexes there and publish them (see :func:`publish`)."""
    from lamina.registry.client import RegistryOptions
    from lamina.registry.pull import PullOptions, pull
    from lamina.registry.sink import LayoutSink
    if not os.path.isdir(opts.workdir):
        raise UsageError(f"work directory {opts.workdir} does not exist")
    registry = opts.registry or RegistryOptions()
    tmp = tempfile.mkdtemp(prefix="lamina-lazy-index-", dir=opts.workdir)
    try:
        t0 = time.monotonic()
        pull(PullOptions(opts.ref, tag="image", platform=opts.platform, registry=registry),
             LayoutSink.init(tmp), progress)
        res = publish(PublishOptions(ImageRef(tmp, "image"), opts.ref, registry=registry))
        res.seconds = time.monotonic() - t0
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

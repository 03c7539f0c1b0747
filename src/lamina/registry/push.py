"""Push an image from an OCI layout to a registry.

Blobs first (config and layers, concurrently): a ``HEAD`` skips those the
repository already has; then a cross-repository mount
(``POST .../blobs/uploads/?mount=DIGEST&from=REPO``) from each source
repository given, or the one the image was pulled from when it is on the same
registry; otherwise an upload session: one streamed ``PUT`` (monolithic) or
``PATCH`` chunks with ``Content-Range`` and a closing ``PUT`` (chunked).  Then
the manifests, children before their index, each with its own media type as
``Content-Type``; the tagged document last, so the tag never points at
something incomplete.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import ImageFormatError, NotFoundError, UsageError
from lamina.oci import mediatypes as mt
from lamina.oci.layout import ImageRef, OCILayout
from lamina.oci.model import Descriptor, Manifest
from lamina.registry.client import RegistryClient, RegistryOptions
from lamina.registry.progress import TransferProgress
from lamina.registry.pull import SOURCE_ANNOTATION
from lamina.registry.reference import RegistryRef
from lamina.registry.workers import Cancelled, run_all

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class PushOptions:
    image: ImageRef                   # layout and tag to push
    ref: RegistryRef                  # destination; no tag: the layout's tag
    from_repos: tuple[str, ...] = ()  # same-registry repositories to mount blobs from
    jobs: int = 4                     # concurrent blob uploads
    chunk_size: int | None = None     # None: one PUT per blob; else PATCH chunks this big
    registry: RegistryOptions = field(default_factory=RegistryOptions)


@dataclass
class PushResult:
    ref: str
    digest: str
    media_type: str
    manifests: list[str] = field(default_factory=list)
    blobs: int = 0
    uploaded: int = 0
    skipped: int = 0         # the repository had them already
    mounted: int = 0         # mounted from another repository of the registry
    bytes_uploaded: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class _Doc:
    desc: Descriptor
    data: bytes


def push(opts: PushOptions, progress: TransferProgress | None = None) -> PushResult:
    prog = progress or TransferProgress()
    t0 = time.monotonic()
    if opts.chunk_size is not None and opts.chunk_size < 1:
        raise UsageError("--chunk-size must be positive")
    layout = OCILayout.open(opts.image.layout)
    refs = layout.refs()
    if opts.image.tag not in refs:
        known = ", ".join(sorted(refs)) or "none"
        raise NotFoundError(f"tag {opts.image.tag!r} not found in {layout.path}",
                            hint=f"tags: {known}")
    top = refs[opts.image.tag]
    ref = opts.ref
    target = ref.tag or (None if ref.digest else opts.image.tag)
    docs, images = _collect(layout, top)
    if ref.digest and ref.digest != top.digest:
        raise UsageError(f"{ref} names digest {ref.digest} but {opts.image} is {top.digest}",
                         hint="push by tag, or give the digest of the image being pushed")
    from_repos = [r for r in opts.from_repos if r != ref.repository]
    source = top.annotations.get(SOURCE_ANNOTATION, "")
    src_registry, _, src_repo = source.partition("/")
    if src_registry == ref.registry and src_repo and src_repo != ref.repository \
            and src_repo not in from_repos:
        from_repos.append(src_repo)
    blobs: dict[str, Descriptor] = {}
    for m in images:
        for d in (m.config, *m.layers):
            blobs.setdefault(d.digest, d)
    for d in blobs.values():
        if not layout.has_blob(d.digest):
            raise NotFoundError(f"blob {d.digest} ({d.media_type}) is missing from "
                                f"{layout.path}",
                                hint="the layout is incomplete; pull or rebuild the image")
    repo = ref.repository
    scopes = [f"repository:{repo}:pull,push", *(f"repository:{r}:pull" for r in from_repos)]
    result = PushResult(str(ref.with_repository(repo)), top.digest, top.media_type,
                        [d.desc.digest for d in docs], len(blobs))
    lock = threading.Lock()
    with RegistryClient(ref, opts.registry, scopes) as client:
        todo = sorted(blobs.values(), key=lambda d: -d.size)
        prog.start(sum(d.size for d in todo), len(todo))

        def send(desc: Descriptor, stop: threading.Event) -> None:
            if stop.is_set():
                raise Cancelled
            how = _push_blob(client, layout, repo, desc, from_repos, opts.chunk_size, prog,
                             stop)
            with lock:
                if how == "skipped":
                    result.skipped += 1
                elif how == "mounted":
                    result.mounted += 1
                else:
                    result.uploaded += 1
                    result.bytes_uploaded += desc.size
            prog.blob_done(desc.digest)

        try:
            run_all(send, todo, opts.jobs)
        finally:
            prog.finish()
        for doc in docs[:-1]:
            client.put_manifest(repo, doc.desc.digest, doc.data, doc.desc.media_type)
        last = docs[-1]
        client.put_manifest(repo, target or last.desc.digest, last.data, last.desc.media_type)
    result.ref = str(RegistryRef(ref.registry, repo, target, None if target else top.digest))
    result.seconds = round(time.monotonic() - t0, 3)
    return result


def _collect(layout: OCILayout, top: Descriptor) -> tuple[list[_Doc], list[Manifest]]:
    """Manifest documents to put (children first) and the image manifests among them."""
    docs: list[_Doc] = []
    images: list[Manifest] = []

    def visit(desc: Descriptor, depth: int) -> None:
        if depth > 4:
            raise ImageFormatError("image indexes nested more than 4 deep")
        if desc.media_type not in mt.INDEX_TYPES and desc.media_type not in mt.MANIFEST_TYPES:
            raise ImageFormatError(f"{desc.digest}: cannot push a {desc.media_type!r} as a "
                                   "manifest")
        try:
            data = layout.read_blob(desc)
        except NotFoundError as e:
            raise NotFoundError(e.message, hint="the layout lacks a platform's manifest; "
                                "pull with --all-platforms, or push one platform's tag") from None
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise ImageFormatError(f"blob {desc.digest}: invalid JSON: {e}") from None
        if desc.media_type in mt.INDEX_TYPES:
            raw = doc.get("manifests") if isinstance(doc, dict) else None
            if not isinstance(raw, list):
                raise ImageFormatError(f"index {desc.digest}: 'manifests' must be a list")
            for i, m in enumerate(raw):
                visit(Descriptor.from_json(m, f"index {desc.digest} manifests[{i}]"),
                      depth + 1)
        else:
            images.append(Manifest.from_json(desc.digest, doc))
        if all(d.desc.digest != desc.digest for d in docs):
            docs.append(_Doc(desc, data))

    visit(top, 0)
    return docs, images


def _push_blob(client: RegistryClient, layout: OCILayout, repo: str, desc: Descriptor,
               from_repos: list[str], chunk_size: int | None, prog: TransferProgress,
               stop: threading.Event) -> str:
    if client.blob_size(repo, desc.digest) is not None:
        prog.advance(desc.digest, desc.size)
        return "skipped"
    location: str | None = None
    for src in from_repos:
        location = client.start_upload(repo, desc.digest, src)
        if location is None:
            prog.advance(desc.digest, desc.size)
            return "mounted"
        # the registry opened an ordinary upload session instead: the last one is used
    if location is None:
        location = client.start_upload(repo)
    if location is None:
        raise AssertionError("a plain upload session always has a location")
    prog.blob_start(desc.digest, desc.size)

    def pieces(size: int) -> Iterator[bytes]:
        with layout.open_blob(desc) as r:  # verifies size and digest while reading
            while True:
                if stop.is_set():
                    raise Cancelled
                chunk = r.read(size)
                if not chunk:
                    break
                prog.advance(desc.digest, len(chunk))
                yield chunk

    if chunk_size is None or desc.size <= chunk_size:
        client.upload_monolithic(location, desc.digest, desc.size, lambda: pieces(READ_CHUNK))
    else:
        client.upload_chunked(location, desc.digest, desc.size, lambda: pieces(chunk_size))
    return "uploaded"


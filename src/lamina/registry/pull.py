"""Pull an image from a registry into a :class:`~lamina.registry.sink.BlobSink`.

Order of work, so that a pull stopped at any point leaves nothing that looks
complete but is not:

1. resolve the tag to a manifest or an image index; from an index pick this
   machine's platform (or keep every platform with ``all_platforms``);
2. download the config and layer blobs the sink does not have yet, on a bounded
   thread pool, verifying size and sha256 while streaming; each blob becomes
   visible only when verified (partial downloads are kept aside and resumed
   with an HTTP range request next time, then verified whole);
3. store the manifests (children before their index);
4. set the tag.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from lamina.errors import (
    DigestMismatchError,
    EnvironmentError_,
    ImageFormatError,
    NotFoundError,
    RegistryError,
    UnsupportedError,
)
from lamina.oci import mediatypes as mt
from lamina.oci.model import Descriptor, Manifest, Platform
from lamina.registry.client import (
    CONTENT_RANGE,
    FetchedManifest,
    RegistryClient,
    RegistryOptions,
    transport_error,
)
from lamina.registry.progress import TransferProgress
from lamina.registry.reference import RegistryRef
from lamina.registry.sink import BlobSink, PartialBlob
from lamina.registry.workers import Cancelled, run_all

#: annotation on the tag's descriptor in index.json: where the image came from,
#: so that a later push to the same registry can mount its blobs from there
SOURCE_ANNOTATION = "lamina.registry.source"


@dataclass(frozen=True)
class PullOptions:
    ref: RegistryRef
    tag: str                          # tag to set in the sink
    platform: Platform | None = None  # default: this machine
    all_platforms: bool = False       # keep the whole index and every platform's image
    jobs: int = 4                     # concurrent blob downloads
    registry: RegistryOptions = field(default_factory=RegistryOptions)


@dataclass
class PullResult:
    ref: str
    tag: str
    digest: str                 # what the tag points at (manifest, or index)
    media_type: str
    manifests: list[str] = field(default_factory=list)
    blobs: int = 0              # config and layer blobs the image needs
    downloaded: int = 0         # ... fetched now
    skipped: int = 0            # ... already in the sink
    resumed: int = 0            # ... continued from a partial download
    bytes_downloaded: int = 0   # over the network now
    bytes_resumed: int = 0      # kept from earlier partial downloads
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def pull(opts: PullOptions, sink: BlobSink,
         progress: TransferProgress | None = None) -> PullResult:
    prog = progress or TransferProgress()
    t0 = time.monotonic()
    ref = opts.ref
    repo = ref.repository
    with RegistryClient(ref, opts.registry, scopes=[f"repository:{repo}:pull"]) as client:
        top = client.get_manifest(repo, ref.reference)
        images, keep = _resolve(client, repo, top, opts)
        tagged = keep[-1]
        result = PullResult(str(ref), opts.tag, tagged.digest, tagged.media_type,
                            [m.digest for m in keep])
        blobs: dict[str, Descriptor] = {}
        for fm in images:
            man = Manifest.from_json(fm.digest, fm.doc)
            for d in (man.config, *man.layers):
                blobs.setdefault(d.digest, d)
        result.blobs = len(blobs)
        todo = [d for d in blobs.values() if not sink.has_blob(d.digest)]
        result.skipped = len(blobs) - len(todo)
        todo.sort(key=lambda d: -d.size)  # biggest first: the pool ends together
        prog.start(sum(d.size for d in todo), len(todo))
        lock = threading.Lock()

        def fetch(desc: Descriptor, stop: threading.Event) -> None:
            got, resumed = _download(client, repo, desc, sink, prog, stop,
                                     opts.registry.retries)
            with lock:
                result.downloaded += 1
                result.bytes_downloaded += got
                if resumed:
                    result.resumed += 1
                    result.bytes_resumed += resumed

        try:
            run_all(fetch, todo, opts.jobs)
        finally:
            prog.finish()
        for fm in keep:  # children first, the tagged document last
            sink.put_blob(fm.digest, fm.data)
        desc = Descriptor(tagged.media_type, tagged.digest, len(tagged.data),
                          {SOURCE_ANNOTATION: f"{ref.registry}/{repo}"},
                          _platform_of(top, tagged))
        sink.set_tag(opts.tag, desc)
    result.seconds = round(time.monotonic() - t0, 3)
    return result


def _platform_of(top: FetchedManifest, picked: FetchedManifest) -> Platform | None:
    if top is picked or top.media_type not in mt.INDEX_TYPES:
        return None
    for i, m in enumerate(top.doc.get("manifests") or []):
        d = Descriptor.from_json(m, f"index {top.digest} manifests[{i}]")
        if d.digest == picked.digest:
            return d.platform
    return None


def _index_entries(fm: FetchedManifest) -> list[Descriptor]:
    raw = fm.doc.get("manifests")
    if not isinstance(raw, list):
        raise ImageFormatError(f"index {fm.digest}: 'manifests' must be a list")
    return [Descriptor.from_json(m, f"index {fm.digest} manifests[{i}]")
            for i, m in enumerate(raw)]


def _resolve(client: RegistryClient, repo: str, top: FetchedManifest,
             opts: PullOptions) -> tuple[list[FetchedManifest], list[FetchedManifest]]:
    """(image manifests whose blobs to fetch, documents to store: the tagged one last)."""
    if top.media_type in mt.MANIFEST_TYPES:
        return [top], [top]
    if opts.all_platforms:
        images: list[FetchedManifest] = []
        for d in _index_entries(top):
            if d.media_type not in mt.MANIFEST_TYPES:
                raise UnsupportedError(
                    f"index {top.digest} holds a {d.media_type} ({d.digest}); "
                    "--all-platforms copies image manifests only",
                    hint="pull one platform without --all-platforms")
            images.append(_child(client, repo, d))
        return images, [*images, top]
    platform = opts.platform or Platform.host()
    cur = top
    for _ in range(4):
        entries = _index_entries(cur)
        pick = next((d for d in entries if d.platform is not None
                     and platform.matches(d.platform)), None)
        if pick is None:
            plain = [d for d in entries if d.platform is None]
            if len(plain) == 1:
                pick = plain[0]
        if pick is None:
            offered = ", ".join(str(d.platform) for d in entries if d.platform) or "none"
            raise NotFoundError(
                f"{client.ref}: no image for platform {platform} in index {cur.digest}",
                hint=f"platforms offered: {offered}; use --platform or --all-platforms")
        cur = _child(client, repo, pick)
        if cur.media_type in mt.MANIFEST_TYPES:
            return [cur], [cur]
    raise ImageFormatError(f"{client.ref}: image indexes nested more than 4 deep")


def _child(client: RegistryClient, repo: str, d: Descriptor) -> FetchedManifest:
    fm = client.get_manifest(repo, d.digest)
    if len(fm.data) != d.size:
        raise DigestMismatchError(f"manifest {d.digest} has {len(fm.data)} bytes, its "
                                  f"descriptor says {d.size}",
                                  hint="the index and the manifest do not agree")
    return fm


def _download(client: RegistryClient, repo: str, desc: Descriptor, sink: BlobSink,
              prog: TransferProgress, stop: threading.Event,
              retries: int) -> tuple[int, int]:
    """Fetch one blob into the sink; returns (bytes downloaded now, bytes resumed)."""
    try:
        return _download_into(client, repo, desc, sink, prog, stop, retries)
    except OSError as e:  # the sink's disk: full, read-only, permissions
        raise EnvironmentError_(
            f"cannot store blob {desc.digest}: {e.strerror or e}",
            hint="check free space and permissions where the image is written; "
                 "the next pull resumes what was stored") from None


def _download_into(client: RegistryClient, repo: str, desc: Descriptor, sink: BlobSink,
                   prog: TransferProgress, stop: threading.Event,
                   retries: int) -> tuple[int, int]:
    part = sink.open_partial(desc.digest)
    try:
        if stop.is_set():
            raise Cancelled
        prog.blob_start(desc.digest, desc.size)
        h = hashlib.sha256()
        if part.offset > desc.size:
            part.truncate()
        resumed = part.offset
        if resumed:
            for chunk in part.read_back():
                h.update(chunk)
            prog.advance(desc.digest, resumed)
        got = 0
        while True:
            got, h, restarted = _fill(client, repo, desc, part, h, prog, stop, retries, got)
            if restarted:
                resumed = 0
            if resumed and "sha256:" + h.hexdigest() != desc.digest:
                # the kept partial was bad (an earlier pull from a lying server, a disk
                # error): start this blob again from nothing, once
                part.truncate()
                h, resumed = hashlib.sha256(), 0
                continue
            break
        if part.offset != desc.size or "sha256:" + h.hexdigest() != desc.digest:
            n = part.offset
            part.truncate()  # bad bytes must not be resumed
            if n != desc.size:
                raise DigestMismatchError(
                    f"blob {desc.digest} from {client.ref.registry}/{repo} has {n} bytes, "
                    f"the manifest says {desc.size}",
                    hint="the registry's copy is corrupt or a proxy changed it; nothing was "
                         "stored, the pull can be retried")
            raise DigestMismatchError(
                f"blob {desc.digest} from {client.ref.registry}/{repo} does not match its "
                f"digest (got sha256:{h.hexdigest()})",
                hint="the registry's copy is corrupt or a proxy changed it; nothing was "
                     "stored, the pull can be retried")
        part.commit()
        prog.blob_done(desc.digest)
        return got, resumed
    finally:
        part.close()


def _fill(client: RegistryClient, repo: str, desc: Descriptor, part: PartialBlob, h: Any,
          prog: TransferProgress, stop: threading.Event, retries: int,
          got: int) -> tuple[int, Any, bool]:
    """Stream the rest of the blob into *part*, resuming after dropped connections;
    returns (bytes downloaded, hash of everything in *part*, whether it restarted)."""
    failures = 0
    restarted = False
    while part.offset < desc.size or (desc.size == 0 and failures == 0):
        try:
            got += _stream(client, repo, desc, part, h, prog, stop)
            break
        except _Dropped as e:
            got += e.nbytes
            failures += 1
            if failures > retries:
                raise transport_error(e.cause, client.ref.registry,
                                      f"download of blob {desc.digest}") from None
            time.sleep(0.5 * failures)
        except _Restart:
            h = hashlib.sha256()
            restarted = True
    return got, h, restarted


class _Dropped(Exception):
    """The connection failed while streaming; *nbytes* were stored before it did."""

    def __init__(self, cause: httpx.HTTPError, nbytes: int) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.nbytes = nbytes


class _Restart(Exception):
    """The server ignored the range: the partial blob was dropped, start again."""


def _stream(client: RegistryClient, repo: str, desc: Descriptor, part: PartialBlob,
            h: Any, prog: TransferProgress, stop: threading.Event) -> int:
    start = part.offset
    n = 0
    try:
        with client.open_blob(repo, desc.digest, start=start) as resp:
            if start and resp.status_code == 200:
                part.truncate()
                raise _Restart
            if resp.status_code == 206:
                m = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != start:
                    raise RegistryError(
                        f"blob {desc.digest}: the registry answered range {start}- with "
                        f"{resp.headers.get('Content-Range')!r}",
                        hint="retry; if it persists, remove the partial download with "
                             "'lamina gc'")
            limit = desc.size
            for chunk in resp.iter_raw():
                if stop.is_set():
                    raise Cancelled
                if part.offset + len(chunk) > limit:
                    part.truncate()
                    raise DigestMismatchError(
                        f"blob {desc.digest} from {client.ref.registry}/{repo} is larger "
                        f"than the {limit} bytes its descriptor says",
                        hint="the registry's copy is corrupt; nothing was stored")
                h.update(chunk)
                part.write(chunk)
                n += len(chunk)
                prog.advance(desc.digest, len(chunk))
    except httpx.TransportError as e:
        raise _Dropped(e, n) from None
    return n

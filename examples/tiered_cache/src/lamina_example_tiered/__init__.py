"""Example lamina driver: layer blobs fetched from a slower tier on first use, then cached.

See this package's README.md.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lamina.drivers.base import Capabilities, ClaimRequest, Driver, check_capabilities
from lamina.errors import DigestMismatchError, EnvironmentError_, NotFoundError, UsageError
from lamina.oci.layout import OCILayout

if TYPE_CHECKING:
    from lamina.bundle import Progress, UnpackResult
    from lamina.store import Store

NAME = "tiered"
SLOW_ANNOTATION = "io.lamina.example.tiered.slow"
DEFAULT_CACHE = "/var/cache/lamina-tiered"


def cache_dir() -> str:
    return os.path.abspath(os.environ.get("LAMINA_TIERED_CACHE") or DEFAULT_CACHE)


class TieredLayout(OCILayout):
    """A layout whose missing blobs come from the cache, or from the slow tier."""

    def __init__(self, path: str, slow: str, cache: str) -> None:
        super().__init__(path)
        self.slow = slow
        self.cache = cache
        self.fetched = 0
        self.cached = 0

    def blob_path(self, digest: str) -> str:
        local = super().blob_path(digest)
        if os.path.exists(local):
            return local
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64 or not all(c in "0123456789abcdef"
                                                           for c in hexd):
            return local
        cached = os.path.join(self.cache, "blobs", algo, hexd)
        if os.path.exists(cached):
            self.cached += 1
            return cached
        src = os.path.join(self.slow, "blobs", algo, hexd)
        if not os.path.exists(src):
            raise NotFoundError(f"blob {digest} is neither in {self.path}, the cache "
                                f"{self.cache} nor the slow tier {self.slow}",
                                hint="check the image's slow tier annotation")
        self._fetch(src, cached, hexd)
        self.fetched += 1
        return cached

    def _fetch(self, src: str, dst: str, hexd: str) -> None:
        d = os.path.dirname(dst)
        try:
            os.makedirs(d, 0o755, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{hexd[:12]}-", dir=d)
        except OSError as e:
            raise EnvironmentError_(f"cannot write the blob cache {self.cache}: {e.strerror}",
                                    hint="set LAMINA_TIERED_CACHE to a writable directory"
                                    ) from None
        try:
            h = hashlib.sha256()
            with open(src, "rb") as f, os.fdopen(fd, "wb") as out:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != hexd:
                raise DigestMismatchError(
                    f"blob sha256:{hexd} in the slow tier {self.slow} has sha256 "
                    f"{h.hexdigest()}", hint="the slow tier's copy is damaged; nothing was "
                                             "cached")
            os.chmod(tmp, 0o444)
            os.rename(tmp, dst)  # complete and verified, or not there at all
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


class TieredDriver(Driver):
    name = NAME

    def __init__(self, req: ClaimRequest | None = None, *,
                 meta: Mapping[str, Any] | None = None, store: Store | None = None) -> None:
        super().__init__(req, meta=meta, store=store)

    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        from lamina.bundle import UnpackOptions, unpack_resolved
        from lamina.oci.layout import ImageRef
        r = self.req
        assert r.layout is not None
        lay = TieredLayout(r.layout.path, r.annotations[SLOW_ANNOTATION], cache_dir())
        opts = UnpackOptions(image=ImageRef(lay.path, r.tag), bundle=r.bundle,
                             rootless=r.rootless, uid_map=r.uid_map, gid_map=r.gid_map,
                             keep_dirlinks=r.keep_dirlinks, hooks=r.hooks,
                             annotations=tuple(r.annotations.items()))
        res = unpack_resolved(lay, r.manifest, r.config, opts, progress,
                              meta_extra={"driver": NAME, NAME: {"slow": lay.slow}})
        res.driver = NAME
        res.reused = lay.cached
        return res


class TieredFactory:
    name = NAME
    description = "example: layer blobs fetched from a slower tier on first use, then cached"

    def __init__(self) -> None:
        # the cache is where it writes besides the bundle: declared, so that
        # 'lamina drivers' shows it and the conformance kit holds the driver to it
        self.capabilities = Capabilities(needs_root=False, rootless_ok=True,
                                         writes=("bundle", cache_dir()))

    def check_here(self, store_path: str | None) -> str | None:
        return check_capabilities(self.capabilities, store_path)

    def claim(self, req: ClaimRequest) -> Driver | None:
        slow = req.annotations.get(SLOW_ANNOTATION)
        if not slow or req.layout is None:
            if req.forced:
                raise UsageError(
                    f"the tiered driver needs the annotation {SLOW_ANNOTATION}=PATH" if not slow
                    else "the tiered driver unpacks from an OCI layout, not a store",
                    hint=f"unpack LAYOUT:TAG with --annotation {SLOW_ANNOTATION}=PATH")
            return None
        if not os.path.isdir(os.path.join(slow, "blobs")):
            raise UsageError(f"{SLOW_ANNOTATION}={slow}: no blobs/ directory there",
                             hint="point it at an OCI layout or a lamina store")
        return TieredDriver(req)

    def open(self, bundle: str, meta: Mapping[str, Any], store: Store | None) -> Driver:
        return TieredDriver(meta=meta, store=store)


factory = TieredFactory()

"""The ``copy`` driver: every layer applied into a plain rootfs directory.

This is lamina's original unpack (:func:`lamina.bundle.unpack`): it works on
any filesystem, as root or rootless, with or without a store, and each bundle
is an independent copy.  Repack walks the rootfs against its snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lamina.drivers.base import Capabilities, ClaimRequest, Driver, check_capabilities
from lamina.oci.layout import ImageRef, OCILayout

if TYPE_CHECKING:
    from lamina.bundle import Progress, UnpackResult
    from lamina.store import Store


class CopyDriver(Driver):
    name = "copy"

    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        from lamina.bundle import UnpackOptions, unpack_resolved
        r = self.req
        if r.layout is not None:
            layout, ref = r.layout, ImageRef(r.layout.path, r.tag)
            extra: dict[str, Any] = {"driver": self.name}
        else:
            assert r.store is not None, "a claim request has a layout or a store"
            # the store keeps blobs as an OCI layout does: its blob paths work
            layout, ref = OCILayout(r.store.path), ImageRef(r.store.path, r.tag)
            extra = {"driver": self.name, "store": r.store.path, "image": r.image}
        opts = UnpackOptions(image=ref, bundle=r.bundle, rootless=r.rootless,
                             uid_map=r.uid_map, gid_map=r.gid_map,
                             keep_dirlinks=r.keep_dirlinks, hooks=r.hooks,
                             annotations=tuple(r.annotations.items()))
        return unpack_resolved(layout, r.manifest, r.config, opts, progress, meta_extra=extra)


class CopyFactory:
    name = "copy"
    description = "each bundle a full copy of the image's files; works anywhere, rootless"
    capabilities = Capabilities(rootless_ok=True)

    def check_here(self, store_path: str | None) -> str | None:
        return check_capabilities(self.capabilities, store_path)

    def claim(self, req: ClaimRequest) -> Driver | None:
        return CopyDriver(req)  # the stock driver serves everything

    def open(self, bundle: str, meta: Mapping[str, Any], store: Store | None) -> Driver:
        return CopyDriver(meta=meta, store=store)


factory = CopyFactory()

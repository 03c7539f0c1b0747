"""Unpack through a driver: resolve the image (layout or store), choose the
driver (:func:`lamina.drivers.registry.select`), let it prepare the bundle.

Without a store and without a driver that needs one, an image is read from
its OCI layout exactly as :func:`lamina.bundle.unpack` always did.  With a
store (``--store``, or a driver that needs one), an image named by a layout is
imported into the store first, then served from there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lamina.drivers.base import ChainLayer, ClaimRequest
from lamina.drivers.guard import prepare_checked
from lamina.drivers.registry import Registry, default_registry, select
from lamina.layer.idmap import IdMapping
from lamina.oci.layout import ImageRef, OCILayout
from lamina.oci.model import ImageConfig, Manifest, Platform

if TYPE_CHECKING:
    from lamina.bundle import Progress, UnpackResult
    from lamina.hooks import HookOptions
    from lamina.store import Store


@dataclass(frozen=True)
class DriverUnpackOptions:
    image: str                          # "LAYOUT[:TAG]" or, with a store, "NAME[:TAG]"
    bundle: str
    driver: str | None = None           # None: the first driver that claims
    store: str | None = None            # None: no store unless the driver needs one
    annotations: tuple[tuple[str, str], ...] = ()
    read_only: bool = False
    platform: Platform | None = None
    rootless: bool = False
    uid_map: tuple[IdMapping, ...] = ()
    gid_map: tuple[IdMapping, ...] = ()
    keep_dirlinks: bool = False
    hooks: HookOptions | None = None


def is_layout(image: str) -> bool:
    return os.path.isfile(os.path.join(ImageRef.parse(image).layout, "oci-layout"))


def unpack_with_driver(opts: DriverUnpackOptions, progress: Progress | None = None,
                       registry: Registry | None = None) -> UnpackResult:
    reg = registry or default_registry()
    need_store = opts.store is not None or (
        opts.driver is not None and reg.get(opts.driver).capabilities.needs_store)
    if not need_store:
        from lamina.store.ids import chain_ids
        ref = ImageRef.parse(opts.image)
        from lamina.bundle import resolve_image
        from lamina.hooks import HookRunner
        # an image missing from the layout may be found by a 'lookup' hook
        hooks = HookRunner.load(opts.hooks) if opts.hooks is not None else HookRunner([])
        layout, manifest = resolve_image(ref, opts.platform, hooks)
        cfg = layout.config_for(manifest)
        chains = chain_ids(cfg.diff_ids)
        req = _request(opts, manifest, cfg,
                       [ChainLayer(d, cfg.diff_ids[i], chains[i])
                        for i, d in enumerate(manifest.layers)],
                       layout=layout, image=str(ref), tag=ref.tag)
        sel = select(req, opts.driver, store_path=None, registry=reg)
        return prepare_checked(sel.factory, sel.driver, req, progress)
    from lamina.store import Store
    with Store.open(opts.store) as store:
        name = opts.image
        if is_layout(opts.image):
            ref = ImageRef.parse(opts.image)
            name = store.import_image(ref.layout, ref.tag, platform=opts.platform,
                                      progress=progress).name
        img = store.image(name)
        req = _request(opts, img.manifest, img.config,
                       [ChainLayer(la.desc, la.diff_id, la.chain_id) for la in img.layers],
                       store=store, image=img.name, tag=img.name.rpartition(":")[2])
        sel = select(req, opts.driver, store_path=store.path, registry=reg)
        return prepare_checked(sel.factory, sel.driver, req, progress)


def _request(opts: DriverUnpackOptions, manifest: Manifest, cfg: ImageConfig,
             chain: list[ChainLayer], *, layout: OCILayout | None = None,
             store: Store | None = None, image: str, tag: str) -> ClaimRequest:
    return ClaimRequest(
        manifest=manifest, config=cfg, chain=tuple(chain), bundle=os.path.abspath(opts.bundle),
        read_only=opts.read_only,
        annotations={**manifest.annotations, **dict(opts.annotations)},
        store=store, layout=layout, image=image, tag=tag, rootless=opts.rootless,
        uid_map=opts.uid_map, gid_map=opts.gid_map, keep_dirlinks=opts.keep_dirlinks,
        hooks=opts.hooks)

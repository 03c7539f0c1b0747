"""The local content-addressed store: blobs, file objects, tar-splits, refs.

See :mod:`lamina.store.store` for the on-disk tree and its invariants.  What
drivers use::

    with Store.open(path) as store, store.session():     # session: gc stays out
        img = store.image("app:1.0")                      # manifest, config, layers
        for layer in img.layers:                          # .desc, .diff_id, .chain_id
            split = store.tar_split_path(layer.diff_id)   # splitdirfdstream, dirfd 0 =
            fd = store.objects_fd                         #   this fd (objects/)
            with store.extraction_lock("copy", layer.chain_id):
                if store.extraction("copy", layer.chain_id) is None:
                    with store.stage_extraction("copy", layer.chain_id) as tmp:
                        ...                               # build in tmp; renamed on success
        store.set_in_use("copy", chain_id, True)          # a GC root while mounted

``import_image``/``ingest_layer``/``import_blob`` add content, ``export_layer``
rebuilds a layer tar, ``gc``/``fsck`` maintain the store.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lamina.store.fsck import Finding, FsckResult
    from lamina.store.gc import StoreGCResult
    from lamina.store.ids import chain_id, chain_ids, parse_ref
    from lamina.store.objects import object_name
    from lamina.store.paths import default_store_path
    from lamina.store.store import (
        Extraction,
        ImportResult,
        IngestResult,
        LayerImport,
        LayerInfo,
        LayerStats,
        RefInfo,
        Store,
        StoredImage,
        StoredLayer,
        StoreOptions,
    )

# name -> submodule, imported on first use (PEP 562): commands that only need
# the default path (every --store help text) skip the store, fsck and gc code.
_WHERE = {
    "Finding": "fsck", "FsckResult": "fsck", "StoreGCResult": "gc",
    "chain_id": "ids", "chain_ids": "ids", "parse_ref": "ids",
    "object_name": "objects", "default_store_path": "paths",
    **{name: "store" for name in (
        "Extraction", "ImportResult", "IngestResult", "LayerImport", "LayerInfo",
        "LayerStats", "RefInfo", "Store", "StoredImage", "StoredLayer", "StoreOptions")},
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'lamina.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lamina.store.{mod}"), name)
    globals()[name] = value
    return value


__all__ = [
    "Extraction",
    "Finding",
    "FsckResult",
    "ImportResult",
    "IngestResult",
    "LayerImport",
    "LayerInfo",
    "LayerStats",
    "RefInfo",
    "Store",
    "StoreGCResult",
    "StoreOptions",
    "StoredImage",
    "StoredLayer",
    "chain_id",
    "chain_ids",
    "default_store_path",
    "object_name",
    "parse_ref",
]

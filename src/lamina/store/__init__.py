"""The local content-addressed store: blobs, file objects, tar-splits, refs.

See :mod:`lamina.store.store` for the on-disk tree and its invariants.
"""

from lamina.store.fsck import Finding, FsckResult
from lamina.store.gc import StoreGCResult
from lamina.store.ids import chain_id, chain_ids, parse_ref
from lamina.store.objects import object_name
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
    default_store_path,
)

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

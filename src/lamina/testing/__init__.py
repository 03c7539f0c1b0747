"""Test helpers: build layer tars and OCI layouts, and compare directory trees.

These helpers are used by lamina's own test-suite; they are deliberately
independent from lamina's readers (they write tar headers by hand) so that a
bug in lamina's tar parsing cannot hide itself in a round trip.
"""

from __future__ import annotations

from lamina.testing.images import build_image, build_index_image, compress
from lamina.testing.layers import RawEntry, TarBuilder
from lamina.testing.tree import diff_manifests, tree_manifest

__all__ = [
    "RawEntry",
    "TarBuilder",
    "build_image",
    "build_index_image",
    "compress",
    "diff_manifests",
    "tree_manifest",
]

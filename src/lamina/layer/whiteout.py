"""OCI whiteout names (image-spec layer.md, inherited from AUFS)."""

from __future__ import annotations

PREFIX = ".wh."
META_PREFIX = ".wh..wh."
OPAQUE = ".wh..wh..opq"


class LayerPaths:
    """What the layer being applied has produced so far, for whiteout semantics.

    A whiteout (``.wh.NAME``) or opaque marker hides only *lower* layers, wherever
    it stands in its layer: before removing an entry, a writer asks :meth:`keeps`,
    which is true for paths this layer wrote and for their ancestors (a directory
    the layer wrote into).  Shared by the disk writer and the lazy tree model.
    """

    __slots__ = ("ancestors", "paths")

    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.ancestors: set[str] = set()

    def mark(self, real: str) -> None:
        """*real* (a rootfs-relative path without symlinks) belongs to this layer."""
        self.paths.add(real)
        self.mark_parent(real.rpartition("/")[0])

    def mark_parent(self, parent: str) -> None:
        """*parent* and its ancestors contain something of this layer."""
        anc = self.ancestors
        while parent and parent not in anc:
            anc.add(parent)
            parent = parent.rpartition("/")[0]
        anc.add("")

    def keeps(self, real: str) -> bool:
        return real in self.paths or real in self.ancestors

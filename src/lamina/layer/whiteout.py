"""OCI whiteout names (image-spec layer.md, inherited from AUFS)."""

from __future__ import annotations

from lamina.errors import UnsafeLayerError

PREFIX = ".wh."
META_PREFIX = ".wh..wh."
OPAQUE = ".wh..wh..opq"


def is_marker(name: str, comps: tuple[str, ...]) -> bool:
    """Whether the member *name* (split into *comps*) is a whiteout marker.

    A member beneath a whiteout name (``a/.wh.b/c``) is refused: markers are not
    directories.
    """
    if PREFIX not in name:
        return False
    if comps and comps[-1].startswith(PREFIX):
        return True
    for c in comps[:-1]:
        if c.startswith(PREFIX):
            raise UnsafeLayerError(f"entry {name!r} lies beneath a whiteout name {c!r}",
                                   hint="whiteout markers cannot be directories")
    return False


def hidden_name(base: str, raw: str) -> str | None:
    """The name the marker *base* (not :data:`OPAQUE`) hides; None for other AUFS
    metadata (``.wh..wh.plnk``, ``.wh..wh.aufs``), which hides nothing."""
    if base.startswith(META_PREFIX):
        return None
    target = base[len(PREFIX):]
    if target in ("", ".", "..") or "/" in target:
        raise UnsafeLayerError(f"invalid whiteout {raw!r}",
                               hint="a whiteout must name one file or directory")
    return target


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

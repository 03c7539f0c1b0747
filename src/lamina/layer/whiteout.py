"""OCI whiteout names (image-spec layer.md, inherited from AUFS)."""

from __future__ import annotations

PREFIX = ".wh."
META_PREFIX = ".wh..wh."
OPAQUE = ".wh..wh..opq"

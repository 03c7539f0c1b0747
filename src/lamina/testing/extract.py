"""Apply layer tars to a directory in-process (unit tests of layer semantics)."""

from __future__ import annotations

import io
from pathlib import Path

from lamina.layer.extract import ExtractOptions, LayerStats, RootfsWriter
from lamina.layer.tarstream import TarReader


def apply_layers(root: Path, *layers: bytes, rootless: bool = True,
                 keep_dirlinks: bool = False) -> RootfsWriter:
    """Create *root* if needed and apply *layers* (uncompressed tars) in order."""
    root.mkdir(exist_ok=True)
    w = RootfsWriter(str(root), ExtractOptions(rootless=rootless, keep_dirlinks=keep_dirlinks))
    try:
        for data in layers:
            w.apply(TarReader(io.BytesIO(data).read), LayerStats())
        w.finish()
    finally:
        w.close()
    return w

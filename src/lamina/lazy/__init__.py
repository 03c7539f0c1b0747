"""Lazy image mounts: the merged tree over FUSE, file contents fetched on first read.

- :mod:`lamina.lazy.index`: per-layer metadata + seek index, built in one pass;
- :mod:`lamina.lazy.model`: the merged tree in memory (layer semantics applied);
- :mod:`lamina.lazy.fetch`: on-demand, verified, cached content; lookup plugins;
- :mod:`lamina.lazy.fuse`: the read-only pyfuse3 adapter;
- :mod:`lamina.lazy.mount`: ``mount``/``unmount`` (background daemon, overlayfs on top);
- :mod:`lamina.lazy.share`: stored layers prepared as read-only lowers for other users;
- :mod:`lamina.lazy.artifact`: the indexes published to a registry as an OCI artifact;
- :mod:`lamina.lazy.remote`: mounts from a registry (layer data by HTTP range requests).

Heavy modules (pyfuse3, indexed_gzip) are imported only where used; pyfuse3 runs on
asyncio (:func:`load_pyfuse3`), so trio is not imported at all.
"""

from __future__ import annotations

import sys
import types


def load_pyfuse3() -> types.ModuleType:
    """Import pyfuse3 and switch it to its asyncio mode (``pyfuse3.asyncio.enable()``).

    pyfuse3 imports trio at the top but uses it only while serving, through the module
    global that ``enable()`` replaces.  Importing trio took about 0.1 s, most of what a
    mount waits for, so that one import sees a placeholder; a pyfuse3 that needs trio at
    import time (AttributeError on the placeholder) is imported again with the real one.
    """
    if "pyfuse3" not in sys.modules and "trio" not in sys.modules:
        sys.modules["trio"] = types.ModuleType("trio")
        try:
            import pyfuse3
        except AttributeError:
            sys.modules.pop("pyfuse3", None)
        finally:
            del sys.modules["trio"]
    import pyfuse3
    import pyfuse3.asyncio

    pyfuse3.asyncio.enable()
    return pyfuse3

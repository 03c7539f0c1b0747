"""Lazy image mounts: the merged tree over FUSE, file contents fetched on first read.

- :mod:`lamina.lazy.index`: per-layer metadata + seek index, built in one pass;
- :mod:`lamina.lazy.model`: the merged tree in memory (layer semantics applied);
- :mod:`lamina.lazy.fetch`: on-demand, verified, cached content; lookup plugins;
- :mod:`lamina.lazy.fuse`: the read-only pyfuse3 adapter;
- :mod:`lamina.lazy.mount`: ``mount``/``unmount`` (background daemon, overlayfs on top);
- :mod:`lamina.lazy.share`: stored layers prepared as read-only lowers for other users;
- :mod:`lamina.lazy.artifact`: the indexes published to a registry as an OCI artifact;
- :mod:`lamina.lazy.remote`: mounts from a registry (layer data by HTTP range requests).

Heavy modules (pyfuse3, trio, indexed_gzip) are imported only where used.
"""

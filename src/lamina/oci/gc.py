"""Garbage-collect an OCI layout: remove the blobs no tag can reach.

Reachable blobs are found from ``index.json``: every descriptor there, and,
walking down, the manifests of image indexes and the config, layers and
``subject`` of image manifests.  Everything else in ``blobs/sha256`` is
removed, together with ``.tmp-*`` files (interrupted writes) older than an
hour.  The walk refuses to go on when an index or manifest it must read is
missing or corrupt: deleting on a partial picture of the layout could lose
blobs that are in use.

``index.json`` is locked for the whole collection, so no tag changes under
it; a writer that has stored blobs but not yet tagged them (a ``repack`` in
progress) is not protected: do not run ``gc`` at the same time as writers.
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from lamina.errors import NotFoundError
from lamina.oci import mediatypes as mt
from lamina.oci.layout import OCILayout
from lamina.oci.model import Descriptor

TMP_MAX_AGE = 3600.0  # seconds: a .tmp-* file this old belongs to no live writer
_BLOB_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class GCResult:
    layout: str
    removed: list[tuple[str, int]] = field(default_factory=list)   # (digest, size)
    removed_tmp: list[str] = field(default_factory=list)           # layout-relative
    kept: int = 0
    freed: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"layout": self.layout, "dry_run": self.dry_run, "kept": self.kept,
                "freed": self.freed,
                "removed": [{"digest": d, "size": n} for d, n in self.removed],
                "removed_tmp": self.removed_tmp}


def reachable(layout: OCILayout) -> set[str]:
    """Digests of every blob reachable from ``index.json``."""
    seen: set[str] = set()
    stack: list[tuple[Descriptor, str]] = [
        (Descriptor.from_json(m, f"index.json manifests[{i}]"), "index.json")
        for i, m in enumerate(layout.read_index()["manifests"])]
    while stack:
        desc, parent = stack.pop()
        if desc.digest in seen:
            continue
        seen.add(desc.digest)
        walk = desc.media_type in mt.INDEX_TYPES or desc.media_type in mt.MANIFEST_TYPES
        if not walk:
            continue
        if not layout.has_blob(desc.digest):
            raise NotFoundError(
                f"{desc.media_type} {desc.digest} (referenced by {parent}) is missing",
                hint="the layout is incomplete; gc will not delete anything until it is "
                     "repaired (re-pull the image or remove the tag that needs it)")
        doc = layout.read_json(desc)
        if not isinstance(doc, dict):
            continue
        what = f"{desc.media_type} {desc.digest}"
        children: list[tuple[object, str]] = []
        if isinstance(doc.get("manifests"), list):
            children += [(m, f"{what} manifests[{i}]") for i, m in enumerate(doc["manifests"])]
        if "config" in doc:
            children.append((doc["config"], f"{what} config"))
        if isinstance(doc.get("layers"), list):
            children += [(m, f"{what} layers[{i}]") for i, m in enumerate(doc["layers"])]
        for obj, where in children:
            stack.append((Descriptor.from_json(obj, where), desc.digest))
        subject = doc.get("subject")
        if subject is not None:
            sd = Descriptor.from_json(subject, f"{what} subject")
            if layout.has_blob(sd.digest):  # a referrer's subject may live elsewhere
                stack.append((sd, desc.digest))
    return seen


def gc(layout_path: str, *, dry_run: bool = False, tmp_max_age: float = TMP_MAX_AGE,
       now: float | None = None) -> GCResult:
    """Remove unreachable blobs and stale temporary files from a layout."""
    layout = OCILayout.open(layout_path)
    res = GCResult(layout.path, dry_run=dry_run)
    t = time.time() if now is None else now
    with layout.index_lock():
        keep = reachable(layout)
        try:
            names = sorted(os.listdir(layout.blob_dir))
        except FileNotFoundError:
            names = []
        for name in names:
            p = os.path.join(layout.blob_dir, name)
            if _BLOB_RE.match(name):
                if "sha256:" + name in keep:
                    res.kept += 1
                    continue
                try:
                    size = os.lstat(p).st_size
                    if not dry_run:
                        os.unlink(p)
                except FileNotFoundError:
                    continue
                res.removed.append(("sha256:" + name, size))
                res.freed += size
            elif name.startswith(".tmp-"):
                _remove_stale(p, f"blobs/sha256/{name}", t, tmp_max_age, dry_run, res)
        # interrupted index.json / oci-layout writes land beside them
        for name in sorted(os.listdir(layout.path)):
            if name.startswith(".tmp-"):
                _remove_stale(os.path.join(layout.path, name), name, t, tmp_max_age,
                              dry_run, res)
    return res


def _remove_stale(path: str, name: str, now: float, max_age: float, dry_run: bool,
                  res: GCResult) -> None:
    try:
        st = os.lstat(path)
        if now - st.st_mtime < max_age or not stat.S_ISREG(st.st_mode):
            return
        if not dry_run:
            os.unlink(path)
    except FileNotFoundError:
        return
    res.removed_tmp.append(name)
    res.freed += st.st_size

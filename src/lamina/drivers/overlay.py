"""The ``overlay`` driver: each layer extracted once into the store, bundles
mounted with overlayfs.

Store side, per ChainID: ``STORE/extract/overlay/<chain id>/diff`` holds that
one layer in overlayfs's own format (a whiteout is a 0:0 character device, an
opaque directory carries the ``trusted.overlay.opaque`` xattr).  A layer is
built by applying its tar through an overlay mount whose lower directories
are the layers below it and whose upper directory is the new ``diff``
(containerd's overlay snapshotter does the same): every OCI rule (whiteouts
hiding only lower layers, hardlinks to lower files, symlinked parents,
implicit directories) is then the kernel's exact overlay behaviour, and the
upper directory receives exactly the layer's changes.  The mount is a detached
one (see :mod:`lamina.drivers.mounts`), so a killed unpack leaves no mount.

Bundle side::

    BUNDLE/
    ├── rootfs/         overlay mount: lowerdir = the chain (top first),
    │                   upperdir = BUNDLE/upper, workdir = BUNDLE/work
    ├── upper/          everything written in the bundle (its changes)
    ├── work/
    ├── config.json
    └── lamina.json     "driver": "overlay", the chain ids and the mount

``lamina umount BUNDLE`` removes the mount (upper stays); ``lamina repack``
reads the upper directory, so its cost grows with the change, not the image.
Unprivileged users get fuse-overlayfs for the same mounts.

Images whose lower layers are already extracted cost only their new layers.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from lamina.drivers import mounts
from lamina.drivers.base import (
    Capabilities,
    ChainLayer,
    ClaimRequest,
    Driver,
    Mount,
    check_capabilities,
    fs_type,
    have_tool,
    is_root,
    unsupported,
)
from lamina.errors import (
    BundleError,
    CorruptLayerError,
    DigestMismatchError,
    NotFoundError,
    UnsafeLayerError,
)
from lamina.layer import whiteout as wh

if TYPE_CHECKING:
    from lamina.bundle import Progress, UnpackResult
    from lamina.layer.diff import Change
    from lamina.layer.extract import LayerStats
    from lamina.store import Store

NAME = "overlay"
# LAMINA_OVERLAY_FUSE=1: fuse-overlayfs even as root (to exercise the rootless path)
FUSE_ENV = "LAMINA_OVERLAY_FUSE"


def use_fuse() -> bool:
    """Whether overlays are mounted with fuse-overlayfs instead of the kernel's."""
    return not is_root() or os.environ.get(FUSE_ENV, "") not in ("", "0")


# xattrs overlayfs keeps for itself: never part of a layer
_OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.", "user.fuseoverlayfs.")
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque")


class OverlayDriver(Driver):
    name = NAME

    def __init__(self, req: ClaimRequest | None = None, *,
                 meta: Mapping[str, Any] | None = None, store: Store | None = None) -> None:
        super().__init__(req, meta=meta, store=store)
        self.stats: list[LayerStats] = []
        self.reused = 0
        self.warnings: list[str] = []

    # -- store extractions ----------------------------------------------------------------
    def _store(self) -> Store:
        if self.store is None:
            raise unsupported(NAME, "images outside a store", hint="pass --store")
        return self.store

    def layer_dir(self, chain_id: str) -> str:
        return os.path.join(self._store().extraction_dir(NAME, chain_id), "diff")

    def try_skip(self, layer: ChainLayer) -> bool:
        ex = self._store().extraction(NAME, layer.chain_id)
        return ex is not None and ex.state == "ready" and os.path.isdir(
            os.path.join(ex.path, "diff"))

    def extract(self, layer: ChainLayer, index: int) -> None:
        store = self._store()
        below = [self.layer_dir(c.chain_id) for c in reversed(self.req.chain[:index])]
        with store.extraction_lock(NAME, layer.chain_id):
            if self.try_skip(layer):  # another process built it while we waited
                self.reused += 1
                return
            with store.stage_extraction(NAME, layer.chain_id) as tmp:
                diff = os.path.join(tmp, "diff")
                os.mkdir(diff, 0o755)
                if below:
                    _copy_root_meta(below[0], diff)
                    work = os.path.join(tmp, "work")
                    os.mkdir(work, 0o700)
                    with self._mounted(below, diff, work, tmp) as root:
                        self._apply(layer, index, root)
                        _relink_copied_up(diff, below, root)
                    _rmtree(work)
                else:
                    self._apply(layer, index, diff)

    @contextlib.contextmanager
    def _mounted(self, lowers: list[str], upper: str, work: str, tmp: str) -> Iterator[str]:
        if not use_fuse():
            with mounts.detached_overlay(lowers, upper, work) as root:
                yield root
            return
        target = os.path.join(tmp, "merged")
        os.mkdir(target, 0o700)
        mounts.fuse_overlay(lowers, upper, work, target)
        try:
            yield target
        finally:
            mounts.unmount(target)

    def _apply(self, layer: ChainLayer, index: int, root: str) -> None:
        from lamina.layer.compression import LayerPipeline, LayerSource
        from lamina.layer.extract import ExtractOptions, LayerStats, RootfsWriter
        from lamina.layer.tarstream import TarReader
        r = self.req
        path = self._store().blob_path(layer.desc.digest)

        def opener() -> Any:
            try:
                return open(path, "rb", buffering=0)
            except FileNotFoundError:
                raise NotFoundError(f"layer blob {layer.desc.digest} is missing from the "
                                    f"store {self._store().path}",
                                    hint="run 'lamina fsck --repair' and import the image "
                                         "again") from None

        writer = RootfsWriter(root, ExtractOptions(r.rootless, r.uid_map, r.gid_map,
                                                   r.keep_dirlinks), self.warnings.append)
        stats = LayerStats()
        try:
            with LayerPipeline([LayerSource(layer.desc, layer.diff_id, opener)]) as pipe:
                stream = pipe.stream(0)
                reader = TarReader(stream.read)
                try:
                    writer.apply(reader, stats)
                    reader.drain()
                    stream.finish()
                except (CorruptLayerError, UnsafeLayerError):
                    try:
                        stream.finish()
                    except DigestMismatchError as d:
                        raise d from None
                    except CorruptLayerError:
                        pass
                    raise
            writer.finish()
        finally:
            writer.close()
        self.stats.append(stats)

    # -- the bundle -------------------------------------------------------------------------
    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        from lamina import __version__
        from lamina.bundle import (
            METADATA,
            UnpackResult,
            _rmtree_quiet,
            claim_target,
            write_json,
        )
        from lamina.oci import runtime
        r, store = self.req, self._store()
        t0 = time.monotonic()
        bundle = os.path.abspath(r.bundle)
        parent = claim_target(bundle, _unmount_stale_stages)
        if progress is not None:
            progress.start(sum(c.desc.size for c in r.chain), len(r.chain))
        with store.session():
            for i, layer in enumerate(r.chain):
                if self.try_skip(layer):
                    self.reused += 1
                else:
                    self.extract(layer, i)
                if progress is not None:
                    progress.advance(layer.desc.size)
                    progress.layer_done(i)
            lowers = [self.layer_dir(c.chain_id) for c in reversed(r.chain)]
            stage = tempfile.mkdtemp(prefix=f".{os.path.basename(bundle)}.lamina-{os.getpid()}-",
                                     dir=parent)
            try:
                os.chmod(stage, 0o700)
                for d in ("rootfs", "upper", "work"):
                    os.mkdir(os.path.join(stage, d), 0o755 if d == "rootfs" else 0o700)
                if lowers:
                    _copy_root_meta(lowers[0], os.path.join(stage, "upper"))
                spec = self._config(lowers, runtime)
                write_json(os.path.join(stage, "config.json"), spec)
                mount = self._mount_record(bundle, lowers)
                meta = {
                    "lamina": __version__, "driver": NAME, "store": store.path,
                    "image": r.image, "layout": r.layout.path if r.layout else None,
                    "tag": r.tag, "manifest": r.manifest.digest, "config": r.config.digest,
                    "diff_ids": [c.diff_id for c in r.chain],
                    "chain_ids": [c.chain_id for c in r.chain],
                    "layers": [c.desc.to_json() for c in r.chain],
                    "mounts": [mount.to_json()],
                    "options": {"rootless": r.rootless, "keep_dirlinks": r.keep_dirlinks,
                                "read_only": r.read_only,
                                "uid_map": [str(m) for m in r.uid_map],
                                "gid_map": [str(m) for m in r.gid_map]},
                }
                write_json(os.path.join(stage, METADATA), meta)
                os.chmod(stage, 0o700 if r.rootless else 0o711)
                # pinned before anything mounts them (a kill later leaks a pin, never
                # a mount of collected layers); mounted in staging, so the bundle
                # appears complete and mounted in one rename
                for c in r.chain:
                    store.set_in_use(NAME, c.chain_id, True)
                self._mount(stage, lowers)
                if os.path.isdir(bundle):
                    os.rmdir(bundle)
                os.rename(stage, bundle)
            except BaseException:
                with contextlib.suppress(Exception):
                    mounts.unmount(os.path.join(stage, "rootfs"))
                _rmtree_quiet(stage)
                raise
        res = UnpackResult(bundle, r.manifest.digest, r.config.digest, len(r.chain))
        for s in self.stats:
            res.entries += s.entries
            res.files += s.files
            res.bytes += s.bytes
            res.whiteouts += s.whiteouts
        res.driver = NAME
        res.reused = self.reused
        res.warnings = self.warnings
        res.seconds = round(time.monotonic() - t0, 3)
        return res

    def _config(self, lowers: list[str], runtime: Any) -> dict[str, Any]:
        # config.json looks the image's user up in /etc/passwd and /etc/group: read
        # them from a read-only view of the image
        if len(lowers) == 1:
            return self._generate(lowers[0], runtime)
        if len(lowers) > 1 and not use_fuse():
            mfd = mounts.overlay_fd(lowers)
            try:
                return self._generate(mounts.fd_path(mfd), runtime)
            finally:
                os.close(mfd)
        with tempfile.TemporaryDirectory() as tmp:
            os.mkdir(os.path.join(tmp, "etc"))
            for n in ("passwd", "group"):
                src = _lookup(lowers, f"etc/{n}")
                if src and os.path.isfile(src):
                    with open(src, "rb") as f, open(os.path.join(tmp, "etc", n), "wb") as o:
                        o.write(f.read(1 << 20))
            return self._generate(tmp, runtime)

    def _generate(self, root: str, runtime: Any) -> dict[str, Any]:
        r = self.req
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            spec: dict[str, Any] = runtime.generate(
                r.config, fd, rootless=r.rootless, uid_map=r.uid_map, gid_map=r.gid_map,
                image_annotations=r.manifest.annotations)
            return spec
        finally:
            os.close(fd)

    @staticmethod
    def _mount_record(bundle: str, lowers: list[str]) -> Mount:
        return Mount("fuse.fuse-overlayfs" if use_fuse() else "overlay", "overlay",
                     os.path.join(bundle, "rootfs"),
                     (f"lowerdir={':'.join(lowers)}",
                      f"upperdir={os.path.join(bundle, 'upper')}",
                      f"workdir={os.path.join(bundle, 'work')}",
                      *(f"{k}={v}" for k, v in mounts.OVERLAY_OPTIONS)))

    def _read_only(self) -> bool:
        if self._req is not None:
            return self._req.read_only
        return bool(self.meta.get("options", {}).get("read_only"))

    def _mount(self, bundle: str, lowers: list[str]) -> None:
        upper, work = os.path.join(bundle, "upper"), os.path.join(bundle, "work")
        target = os.path.join(bundle, "rootfs")
        if not lowers:
            # an image without layers: overlay needs a lower directory
            lowers = [os.path.join(bundle, "work", "empty")]
            os.makedirs(lowers[0], exist_ok=True)
            work = os.path.join(bundle, "work", "w")
            os.makedirs(work, exist_ok=True)
        if not use_fuse():
            mfd = mounts.overlay_fd(lowers, upper, work, read_only=self._read_only())
            try:
                mounts.attach(mfd, target)
            finally:
                os.close(mfd)
        else:
            mounts.fuse_overlay(lowers, upper, work, target, read_only=self._read_only())

    def mounts(self) -> list[Mount]:
        return [Mount.from_json(m) for m in self.meta.get("mounts", [])]

    # -- repack ---------------------------------------------------------------------------
    def delta_list(self, bundle: str) -> list[Change] | None:
        o = self.meta.get("options", {})
        from lamina.layer.idmap import IdMapping
        fuse = any(m.type.startswith("fuse") for m in self.mounts())
        return upper_changes(os.path.join(bundle, "upper"), rootless=bool(o.get("rootless")),
                             fuse_format=fuse,
                             uid_map=tuple(IdMapping.parse(m) for m in o.get("uid_map", [])),
                             gid_map=tuple(IdMapping.parse(m) for m in o.get("gid_map", [])))

    def delta_root(self, bundle: str) -> str:
        return os.path.join(bundle, "upper")

    def refresh(self, bundle: str) -> None:
        """The repacked changes become a bundle-private lower layer (the snapshotter's
        commit): the upper directory moves to ``BUNDLE/layers/N`` and a fresh one
        starts, so the next repack again costs only its own changes."""
        from lamina.bundle import METADATA, write_json
        meta = dict(self.meta)
        own = [str(x) for x in meta.get("bundle_lowers", [])]
        upper, work = os.path.join(bundle, "upper"), os.path.join(bundle, "work")
        layers = os.path.join(bundle, "layers")
        os.makedirs(layers, 0o700, exist_ok=True)
        new_lower = os.path.join(layers, str(len(own)))
        target = os.path.join(bundle, "rootfs")
        was_mounted = mounts.is_mountpoint(target)
        mounts.unmount(target)
        os.rename(upper, new_lower)
        os.mkdir(upper, 0o700)
        _copy_root_meta(new_lower, upper)
        _rmtree(work)
        os.mkdir(work, 0o700)
        own.insert(0, new_lower)
        lowers = own + [self.layer_dir(str(c)) for c in reversed(meta.get("chain_ids", []))]
        meta["bundle_lowers"] = own
        meta["mounts"] = [self._mount_record(bundle, lowers).to_json()]
        write_json(os.path.join(bundle, METADATA + ".tmp"), meta)
        os.rename(os.path.join(bundle, METADATA + ".tmp"), os.path.join(bundle, METADATA))
        self.meta = meta
        if was_mounted:
            self._mount(bundle, lowers)

    # -- teardown -------------------------------------------------------------------------
    def release(self, bundle: str) -> None:
        mounts.unmount(os.path.join(bundle, "rootfs"))
        store = self.store
        if store is None:
            return
        # the chain stays a GC root while any other mount still uses one of its layers
        busy = _mounted_lowers()
        for cid in self.meta.get("chain_ids", []):
            if self.layer_dir(cid) in busy:
                continue
            with contextlib.suppress(Exception):
                store.set_in_use(NAME, cid, False)

    def remove(self, bundle: str) -> None:
        from lamina.bundle import _rmtree_quiet
        self.release(bundle)
        _rmtree_quiet(bundle)


def _unmount_stale_stages(parent: str, name: str) -> None:
    """An unpack killed between mounting its staging rootfs and renaming it left a
    mount there: detach it before the stale staging directory is removed."""
    prefix = f".{name}.lamina-"
    with contextlib.suppress(OSError):
        for e in os.listdir(parent):
            pid = e[len(prefix):].partition("-")[0] if e.startswith(prefix) else ""
            if not pid.isdigit():
                continue
            try:
                os.kill(int(pid), 0)
                continue            # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            with contextlib.suppress(Exception):
                mounts.unmount(os.path.join(parent, e, "rootfs"), lazy=True)


def _lookup(lowers: list[str], rel: str) -> str:
    """*rel* in the top-most layer directory that has it ("" when absent or whited out)."""
    for d in lowers:
        p = os.path.join(d, rel)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        return "" if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 else p
    return ""


def _relink_copied_up(upper: str, lowers: list[str], merged: str) -> None:
    """Keep lower hardlink groups whole.  A layer that links a new name to a lower
    file makes overlayfs copy that file up (index=off: one name only), which
    would split the lower file's other names off the group; give them the
    copied-up inode too, as applying the layer to a plain directory would."""
    from lamina.layer.snapshot import walk
    names_by_layer: dict[str, dict[int, list[str]]] = {}
    for path, st in walk(upper):
        if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
            continue
        for d in lowers:
            try:
                lst = os.lstat(os.path.join(d, path))
            except FileNotFoundError:
                continue
            break
        else:
            continue
        if not stat.S_ISREG(lst.st_mode) or lst.st_nlink < 2:
            continue
        if d not in names_by_layer:
            groups: dict[int, list[str]] = {}
            for p, s in walk(d):
                if stat.S_ISREG(s.st_mode) and s.st_nlink > 1:
                    groups.setdefault(s.st_ino, []).append(p)
            names_by_layer[d] = groups
        for other in names_by_layer[d].get(lst.st_ino, []):
            if other == path or os.path.lexists(os.path.join(upper, other)):
                continue
            try:
                if os.lstat(os.path.join(merged, other)).st_ino != lst.st_ino:
                    continue  # shadowed by a layer in between
            except FileNotFoundError:
                continue
            os.unlink(os.path.join(merged, other))
            os.link(os.path.join(merged, path), os.path.join(merged, other))


def _mounted_lowers() -> set[str]:
    out: set[str] = set()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                _, _, rest = line.partition(" - ")
                for opt in rest.split(" ", 2)[-1].split(","):
                    if opt.startswith("lowerdir=") or opt.startswith("lowerdir+="):
                        out.update(opt.split("=", 1)[1].split(":"))
    except OSError:
        pass
    return out


def upper_changes(upper: str, *, rootless: bool = False, fuse_format: bool = False,
                  uid_map: tuple[Any, ...] = (), gid_map: tuple[Any, ...] = ()) -> list[Change]:
    """The changes an overlay upper directory records, as layer entries: a 0:0
    character device is a whiteout, an opaque directory is the directory plus
    an opaque marker, anything else is a full entry.  Cost: the size of upper."""
    from lamina.layer.diff import Change, kind_of, read_xattrs, sort_key, unmap_id
    from lamina.layer.idmap import ROOTLESS_XATTR, decode_rootless
    from lamina.layer.snapshot import walk
    out: list[Change] = []
    opaque_dirs: set[str] = set()
    for path, st in walk(upper):
        parent, _, name = path.rpartition("/")
        if name.startswith(wh.PREFIX) and fuse_format and not stat.S_ISDIR(st.st_mode):
            # fuse-overlayfs's own markers: an opaque file, whiteout files when it
            # cannot make devices, 0:0 devices for its bookkeeping
            if name == wh.OPAQUE:
                opaque_dirs.add(parent)
                continue
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                out.append(Change(path, "whiteout"))
                continue
        if name.startswith(wh.PREFIX):
            raise BundleError(
                f"/{path}: names starting with {wh.PREFIX!r} are reserved for whiteouts and "
                "cannot be stored in a layer", hint="rename or remove the file, then repack")
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            out.append(Change(f"{parent}/{wh.PREFIX}{name}" if parent else wh.PREFIX + name,
                              "whiteout"))
            continue
        if stat.S_ISSOCK(st.st_mode):
            continue
        full = os.path.join(upper, path)
        raw = read_xattrs(full)
        opaque = any(raw.get(n) == b"y" for n in _OPAQUE_XATTRS)
        xattrs = {k: v for k, v in raw.items() if not k.startswith(_OVERLAY_XATTRS)}
        uid, gid = unmap_id(st.st_uid, uid_map), unmap_id(st.st_gid, gid_map)
        if rootless:
            rx = xattrs.pop(ROOTLESS_XATTR, None)
            uid, gid = decode_rootless(rx) if rx is not None else (0, 0)
        c = Change(path, kind_of(st.st_mode), st, uid=uid, gid=gid, xattrs=xattrs)
        if c.kind == "symlink":
            c.linkname = os.readlink(full)
        out.append(c)
        if opaque and c.kind == "dir":
            opaque_dirs.add(path)
    out += [Change(f"{d}/{wh.OPAQUE}" if d else wh.OPAQUE, "opaque") for d in opaque_dirs]
    out.sort(key=lambda c: sort_key(c.path))
    # files sharing an inode: the first name (in layer order) is the file, the others
    # hardlinks to it
    first_of_inode: dict[tuple[int, int], str] = {}
    for c in out:
        if c.kind == "file" and c.st is not None and c.st.st_nlink > 1:
            key = (c.st.st_dev, c.st.st_ino)
            if key in first_of_inode:
                c.kind, c.linkname = "hardlink", first_of_inode[key]
            else:
                first_of_inode[key] = c.path
    return out


def _copy_root_meta(src: str, dst: str) -> None:
    """Give *dst* the owner, mode, times and xattrs of *src* (an upper root
    directory otherwise shadows the image's root with mkdir's defaults)."""
    st = os.lstat(src)
    with contextlib.suppress(PermissionError):
        os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    with contextlib.suppress(OSError):
        for n in os.listxattr(src):
            if not n.startswith(_OVERLAY_XATTRS) and not n.startswith("security.selinux"):
                with contextlib.suppress(OSError):
                    os.setxattr(dst, n, os.getxattr(src, n))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _rmtree(path: str) -> None:
    from lamina.bundle import _rmtree_quiet
    _rmtree_quiet(path)


class OverlayFactory:
    name = NAME
    description = ("layers extracted once into the store, bundles mounted with overlayfs "
                   "(fuse-overlayfs when rootless); repack reads only the changes")
    capabilities = Capabilities(needs_root=False, rootless_ok=True, needs_store=True,
                                features=("overlay",), tools=(), mounts=True,
                                writes=("bundle", "store"))

    def check_here(self, store_path: str | None) -> str | None:
        reason = check_capabilities(self.capabilities, store_path)
        if reason:
            return reason
        if store_path is not None and fs_type(store_path) == "overlay":
            return f"the store {store_path} is itself on overlayfs (no upper dir there)"
        if use_fuse():
            if not have_tool("fuse-overlayfs"):
                return "rootless overlay needs the fuse-overlayfs program"
            if not os.access("/dev/fuse", os.R_OK | os.W_OK):
                return "rootless overlay needs read-write access to /dev/fuse"
            return None
        return mounts.overlay_mount_works()

    def claim(self, req: ClaimRequest) -> Driver | None:
        if req.store is None:
            if req.forced:
                raise unsupported(NAME, "images outside a store", hint="pass --store")
            return None
        return OverlayDriver(req)

    def open(self, bundle: str, meta: Mapping[str, Any], store: Store | None) -> Driver:
        return OverlayDriver(meta=meta, store=store)


factory = OverlayFactory()

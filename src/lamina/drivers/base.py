"""The storage driver interface.

A driver decides how an image's layers become a bundle's ``rootfs``: copied
(``copy``), mounted from per-layer extractions (``overlay``), linked to store
objects (``objects``) or snapshotted (``btrfs``).  The interface follows
containerd's snapshotter (prepare a view of a parent chain, mounts, usage,
diff, remove) and umoci's unpack hooks (``try_skip``, ``extract``,
``delta_list``, ``refresh``).

Lifecycle, for every ``lamina unpack``::

    factories = registry order             (--driver NAME forces one)
    for factory in factories:
        reason = factory.check_here(host)  # None: it can run on this host
        driver = factory.claim(request)    # Driver: claimed; None: declined
    driver.prepare(progress)               # builds BUNDLE, calls try_skip/extract
    ...
    driver.delta_list(bundle)              # lamina repack: what changed
    driver.refresh(bundle)                 # after repack: the view is the new base
    driver.release(bundle)                 # lamina umount: mounts gone, files kept
    driver.remove(bundle)                  # everything gone, store references dropped

A driver instance is made by its factory for one request; later commands
(repack, umount) get one from :meth:`DriverFactory.open`, which reads what
:meth:`Driver.prepare` recorded in ``BUNDLE/lamina.json``.

Built-in drivers are registered through the ``lamina.drivers`` entry-point
group exactly as a third-party package registers its own (see
:mod:`lamina.drivers.registry`).
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from lamina.errors import EnvironmentError_, UnsupportedError
from lamina.layer.idmap import IdMapping
from lamina.oci.model import Descriptor, ImageConfig, Manifest

if TYPE_CHECKING:
    from lamina.bundle import Progress, UnpackResult
    from lamina.hooks import HookOptions
    from lamina.layer.diff import Change
    from lamina.oci.layout import OCILayout
    from lamina.store import Store


@dataclass(frozen=True)
class Capabilities:
    """What a driver needs beyond the stock set (a writable bundle directory).

    ``lamina drivers`` shows these; :func:`check_capabilities` turns them into
    a reason the driver cannot run on this host.
    """

    needs_root: bool = False            # real root (mount(2), mknod, trusted.* xattrs)
    rootless_ok: bool = True            # works for an unprivileged user (perhaps via a helper)
    needs_store: bool = False           # works only on images in a lamina store
    filesystems: tuple[str, ...] = ()   # the store must be on one of these (statfs names)
    features: tuple[str, ...] = ()      # host features: "overlay", "fuse-overlayfs", "reflink"..
    tools: tuple[str, ...] = ()         # executables it runs (looked up on PATH)
    mounts: bool = False                # it mounts filesystems (bundles need `lamina umount`)
    network: bool = False               # it talks to the network
    writes: tuple[str, ...] = ("bundle",)  # where it writes: "bundle", "store", absolute paths

    def to_json(self) -> dict[str, Any]:
        return {"needs_root": self.needs_root, "rootless_ok": self.rootless_ok,
                "needs_store": self.needs_store, "filesystems": list(self.filesystems),
                "features": list(self.features), "tools": list(self.tools),
                "mounts": self.mounts, "network": self.network, "writes": list(self.writes)}


@dataclass(frozen=True)
class ChainLayer:
    """One layer of the image, bottom first: its blob, diff_id and ChainID."""

    desc: Descriptor
    diff_id: str
    chain_id: str


@dataclass(frozen=True)
class Mount:
    """A mount making up a bundle's rootfs (containerd's ``mount.Mount``)."""

    type: str                           # "overlay", "fuse.fuse-overlayfs", "bind"
    source: str
    target: str
    options: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "source": self.source, "target": self.target,
                "options": list(self.options)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Mount:
        return cls(str(d["type"]), str(d["source"]), str(d["target"]),
                   tuple(str(o) for o in d.get("options", ())))


@dataclass(frozen=True)
class Usage:
    """Disk a bundle costs beyond what it shares with the store or other bundles."""

    bytes: int
    inodes: int

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "inodes": self.inodes}


@dataclass(frozen=True)
class ClaimRequest:
    """Everything a driver needs to decide whether to serve an unpack, and to do it.

    ``store`` is None when the image comes from an OCI layout and no store was
    given (``lamina unpack --image LAYOUT:TAG BUNDLE``); ``layout``/``tag`` are
    then set.  With a store the image is already imported and every
    ``chain`` entry is present in it.
    """

    manifest: Manifest
    config: ImageConfig
    chain: tuple[ChainLayer, ...]       # bottom layer first
    bundle: str                         # absolute path of the bundle to create
    read_only: bool = False             # the rootfs will never be written
    annotations: Mapping[str, str] = field(default_factory=dict)  # image's + --annotation
    store: Store | None = None
    layout: OCILayout | None = None
    image: str = ""                     # how the user named it ("NAME:TAG" or "LAYOUT:TAG")
    tag: str = ""                       # the layout tag when ``layout`` is set
    rootless: bool = False
    uid_map: tuple[IdMapping, ...] = ()
    gid_map: tuple[IdMapping, ...] = ()
    keep_dirlinks: bool = False
    forced: bool = False                # the user named this driver (--driver)
    hooks: HookOptions | None = None    # hooks.toml files (lamina.hooks); None: no hooks


class Driver(ABC):
    """One driver serving one bundle.  Subclasses set ``name`` and implement the
    abstract hooks; the others have working defaults."""

    name: ClassVar[str]

    def __init__(self, req: ClaimRequest | None = None, *,
                 meta: Mapping[str, Any] | None = None, store: Store | None = None) -> None:
        """Made by a factory's ``claim`` (with *req*, to prepare a bundle) or
        ``open`` (with an existing bundle's ``lamina.json`` as *meta*)."""
        self._req = req
        self.meta: Mapping[str, Any] = meta or {}
        self.store = store if store is not None else (req.store if req else None)

    @property
    def req(self) -> ClaimRequest:
        if self._req is None:
            raise unsupported(self.name, "preparing a bundle it only opened")
        return self._req

    # -- unpack ---------------------------------------------------------------------------
    @abstractmethod
    def prepare(self, progress: Progress | None = None) -> UnpackResult:
        """Called once per ``lamina unpack`` after the claim.

        Must create ``req.bundle`` (``rootfs/``, ``config.json``,
        ``lamina.json`` with a ``"driver"`` key naming this driver and whatever
        :meth:`DriverFactory.open` needs) atomically: on any failure nothing
        that looks like a bundle is left, and store extractions are either
        complete and recorded or absent.  Calls :meth:`try_skip` then
        :meth:`extract` for each layer of ``req.chain``, bottom first.
        """

    def try_skip(self, layer: ChainLayer) -> bool:
        """Called before extracting *layer*; return True when its content is
        already in place (an extraction of its chain id exists), so
        :meth:`extract` is not called for it.  Default: never skip."""
        return False

    def extract(self, layer: ChainLayer, index: int) -> None:
        """Apply *layer* (``req.chain[index]``) on top of the layers below it.
        Must leave either the full layer applied or raise.  Drivers that apply
        a whole chain in one pass (``copy``: decoding overlaps writing) do it
        in :meth:`prepare` and need not implement this."""
        raise unsupported(self.name, "per-layer extraction")

    def mounts(self) -> list[Mount]:
        """The mounts that make up ``req.bundle``'s rootfs (none: a plain directory)."""
        return []

    # -- repack ---------------------------------------------------------------------------
    def delta_list(self, bundle: str) -> list[Change] | None:
        """Called by ``lamina repack``: the changes in *bundle*'s rootfs since it
        was prepared (or last refreshed), in the order a layer lists them
        (sorted, parents first), or None to let lamina walk the rootfs against
        its snapshot.  A driver returns a list only when it knows the changes
        faster than a full walk (overlay: the upper dir)."""
        return None

    def delta_root(self, bundle: str) -> str:
        """The directory the content of :meth:`delta_list`'s changes is read from
        (paths are relative to it).  Default: the rootfs."""
        return os.path.join(bundle, "rootfs")

    def refresh(self, bundle: str) -> None:
        """Called after ``lamina repack`` made a layer from *bundle*: the current
        rootfs becomes the base the next :meth:`delta_list` compares against.
        Default: nothing (lamina rewrites the snapshot)."""
        return None

    # -- teardown -------------------------------------------------------------------------
    def release(self, bundle: str) -> None:
        """Called by ``lamina umount``: remove this driver's mounts of *bundle*,
        keep its files (a later repack still works).  Idempotent.  Default:
        nothing to release."""
        return None

    def remove(self, bundle: str) -> None:
        """Release *bundle*, delete it and drop the store references it held."""
        self.release(bundle)
        shutil.rmtree(bundle, ignore_errors=True)

    def usage(self, bundle: str) -> Usage:
        """Disk used by *bundle* alone (shared extractions and objects excluded).
        Default: every file under the bundle, hardlinks counted once, mounts
        below it skipped."""
        return _du(bundle)


@runtime_checkable
class DriverFactory(Protocol):
    """What an entry point of the ``lamina.drivers`` group names (an object, or a
    class instantiated without arguments)."""

    name: str
    capabilities: Capabilities
    description: str

    def check_here(self, store_path: str | None) -> str | None:
        """Why this driver cannot run on this host with a store at *store_path*
        (None: no store), or None when it can.  Cheap: no mounts, no writes to
        the store.  :func:`check_capabilities` covers the declared needs."""
        ...

    def claim(self, req: ClaimRequest) -> Driver | None:
        """Return a :class:`Driver` to serve *req*, or None to decline (the next
        driver is asked).  ``req.forced`` is True when the user chose this
        driver: declining then is an error, so raise a LaminaError saying why
        instead.  Must not write anything."""
        ...

    def open(self, bundle: str, meta: Mapping[str, Any], store: Store | None) -> Driver:
        """A driver for an existing *bundle* this driver prepared; *meta* is its
        ``lamina.json``.  Used by repack and umount."""
        ...


# -- host checks shared by drivers --------------------------------------------------------

def is_root() -> bool:
    return os.geteuid() == 0


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


def fs_type(path: str) -> str:
    """The filesystem type of the mount holding *path* ("" if unknown), from the
    longest matching mount point in /proc/self/mounts."""
    p = os.path.realpath(path)
    while not os.path.exists(p) and p != "/":
        p = os.path.dirname(p)
    best, kind = "", ""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        return ""
    return kind


def kernel_has(fs: str) -> bool:
    """The kernel supports filesystem *fs* (listed in /proc/filesystems, or its
    module can be found)."""
    try:
        with open("/proc/filesystems", encoding="utf-8") as f:
            if any(line.split()[-1] == fs for line in f if line.strip()):
                return True
    except OSError:
        pass
    release = os.uname().release
    return any(os.path.exists(f"/lib/modules/{release}/kernel/fs/{fs}/{fs}.ko{ext}")
               for ext in ("", ".xz", ".zst", ".gz"))


def check_capabilities(caps: Capabilities, store_path: str | None) -> str | None:
    """The first declared need this host does not meet, as a reason, or None."""
    root = is_root()
    if caps.needs_root and not root:
        return "needs root"
    if not root and not caps.rootless_ok:
        return "does not support rootless use"
    if caps.needs_store and store_path is None:
        return "needs a store (--store)"
    if caps.filesystems and store_path is not None:
        kind = fs_type(store_path)
        if kind not in caps.filesystems:
            return (f"the store {store_path} is on {kind or 'an unknown filesystem'}, "
                    f"needs {' or '.join(caps.filesystems)}")
    for tool in caps.tools:
        if not have_tool(tool):
            return f"needs the {tool} program"
    return None


def cannot_run(driver: str, reason: str) -> EnvironmentError_:
    """The error for a driver that cannot run here, with a hint naming what is missing."""
    return EnvironmentError_(
        f"driver {driver} cannot run here: {reason}",
        hint="see 'lamina drivers' for what each driver needs, or choose another with "
             "--driver")


def unsupported(driver: str, what: str, hint: str | None = None) -> UnsupportedError:
    """The error for a request a driver does not handle (e.g. a read-write bundle)."""
    return UnsupportedError(f"driver {driver} does not support {what}",
                            hint=hint or "choose another driver with --driver")


def _du(path: str) -> Usage:
    seen: set[tuple[int, int]] = set()
    nbytes = inodes = 0
    for root, dirs, files in os.walk(path):
        # a mounted rootfs shows shared layers: count the bundle's own files only
        dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(root, d))]
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            inodes += 1
            nbytes += st.st_blocks * 512
    return Usage(nbytes, inodes)

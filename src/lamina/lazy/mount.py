"""Mount an image lazily: index, build the tree, serve it from a background process.

:func:`mount` returns once the mount answers requests: the FUSE file system
is served by a forked daemon (its own session, stdio on /dev/null) that
unmounts on SIGTERM/SIGINT/SIGHUP and when the mount is removed from outside
(``umount DIR``).  With ``writable`` the lazy tree is mounted at
``STATE/lower`` and kernel overlayfs at the mount point (upper and work
directories in STATE), so changes land in ``STATE/upper`` and can be repacked.

A record ``RUN/lazy/<hash of the mount point>.json`` (RUN: ``$LAMINA_RUN_DIR``,
default ``/run/lamina``) names the daemon, so :func:`unmount` can stop it.

The image is an OCI layout's (:class:`ImageRef`) or a registry's
(:class:`lamina.lazy.remote.RemoteImage`: index from its lazy index artifact,
data by HTTP range requests, see :mod:`lamina.lazy.remote`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from lamina.errors import EnvironmentError_, LaminaError, NotFoundError, UsageError
from lamina.lazy.fetch import Fetcher, LookupPlugin
from lamina.lazy.index import (
    LayerIndex,
    atomic_write,
    check_index_dir,
    ensure_index,
    index_dir,
    light_index,
    load_index,
)
from lamina.lazy.model import FrozenTree, build_tree, dump_tree
from lamina.lazy.remote import RemoteBlobs, RemoteImage, resolve
from lamina.oci.layout import ImageRef, OCILayout
from lamina.oci.model import Platform


@dataclass(frozen=True)
class LazyMountOptions:
    image: ImageRef | RemoteImage
    mountpoint: str
    platform: Platform | None = None
    cache_dir: str | None = None    # keep fetched contents here (default: private, removed)
    writable: str | None = None     # state dir for an overlayfs upper layer
    build_index: bool = True        # build missing indexes (else: NotFoundError)
    stats_file: str | None = None   # JSON fetch counters written at unmount
    plugins: tuple[LookupPlugin, ...] = ()


@dataclass
class MountResult:
    mountpoint: str
    pid: int
    layers: int
    inodes: int
    indexes_built: int
    index_seconds: float
    seconds: float
    lower: str = ""
    cache: str = ""
    manifest: str = ""
    artifact: str = ""          # the lazy index artifact (registry images)

    def to_json(self) -> dict[str, Any]:
        return {"mountpoint": self.mountpoint, "pid": self.pid, "layers": self.layers,
                "inodes": self.inodes, "indexes_built": self.indexes_built,
                "index_seconds": round(self.index_seconds, 4),
                "seconds": round(self.seconds, 4),
                "lower": self.lower, "cache": self.cache, "manifest": self.manifest,
                "artifact": self.artifact}


def run_dir() -> str:
    return os.path.join(os.environ.get("LAMINA_RUN_DIR", "/run/lamina"), "lazy")


def _record_path(mountpoint: str) -> str:
    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:32]
    return os.path.join(run_dir(), key + ".json")


def index_image(image: ImageRef, platform: Platform | None = None, *, build: bool = True,
                ) -> tuple[FrozenTree, list[LayerIndex], list[dict[str, Any]], int]:
    """The merged tree of *image* and what reading its layers needs.

    Uses the stored tree when there is one; else reads (building them when
    missing and *build*) every layer's index, applies the layers and stores
    the tree.  Returns the tree, the layer indexes bottom first (without member
    lists when the stored tree served), the layer descriptors as JSON, and how
    many layer indexes were built now.
    """
    layout = OCILayout.open(image.layout)
    manifest = layout.resolve(image.tag, platform)
    config = layout.config_for(manifest)
    if len(config.diff_ids) != len(manifest.layers):
        raise UsageError(f"{image}: the config lists {len(config.diff_ids)} diff_ids for "
                         f"{len(manifest.layers)} layers")
    pairs = list(zip(manifest.layers, config.diff_ids, strict=True))
    descs = [d.to_json() for d in manifest.layers]
    check_index_dir(layout)
    tree_path = os.path.join(index_dir(layout), "tree-" + manifest.digest.split(":", 1)[1])
    try:
        with open(tree_path, "rb") as f:
            tree = FrozenTree.load(f.read(), manifest.digest)
    except FileNotFoundError:
        tree = None
    if tree is not None:
        tree.path = tree_path
        light = [light_index(layout, d, i) for d, i in pairs]
        if all(li is not None for li in light):
            return tree, [li for li in light if li is not None], descs, 0
    out: list[LayerIndex] = []
    built = 0
    for desc, diff_id in pairs:
        if build:
            idx, made = ensure_index(layout, desc, diff_id)
            built += made
        else:
            got = load_index(layout, desc, diff_id)
            if got is None:
                raise NotFoundError(f"no lazy index for layer {desc.digest}",
                                    hint=f"run 'lamina lazy-index {image}' first")
            idx = got
        out.append(idx)
    data = dump_tree(build_tree(out), manifest.digest)
    atomic_write(tree_path, data)
    frozen = FrozenTree.load(data, manifest.digest)
    assert frozen is not None
    frozen.path = tree_path
    for li in out:
        li.members = []     # the tree has what the mount needs; free the lists
    return frozen, out, descs, built


def _mounted(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # mountinfo escapes space, tab, newline and backslash as \ooo
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mp == real:
                return True
    return False


def _umount(path: str, lazy: bool = False) -> bool:
    cmd = ["umount", *(["-l"] if lazy else []), path]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def mount(opts: LazyMountOptions) -> MountResult:
    """Mount ``opts.image`` lazily at ``opts.mountpoint`` (see the module doc)."""
    t0 = time.monotonic()
    target = os.path.abspath(opts.mountpoint)
    if not os.path.isdir(target):
        raise UsageError(f"mount point {target} is not a directory")
    if _mounted(target):
        raise UsageError(f"{target} is already a mount point",
                         hint=f"unmount it first: lamina umount {target}")
    if not os.path.exists("/dev/fuse"):
        raise EnvironmentError_("/dev/fuse is missing", hint="load the fuse module (modprobe fuse)")
    fuse_at = os.path.join(os.path.abspath(opts.writable), "lower") if opts.writable else target
    overlay = target if opts.writable else ""
    # the daemon starts first: its imports (pyfuse3, indexed_gzip: much of a mount's time) run
    # on the other CPU while this process reads the indexes; it then gets a job or EOF
    daemon = _Daemon.start(opts, fuse_at, overlay)
    cache = ""
    artifact = ""
    try:
        if isinstance(opts.image, RemoteImage):
            cache = opts.cache_dir or tempfile.mkdtemp(prefix="lamina-lazy-", dir="/var/tmp")
            os.makedirs(cache, exist_ok=True)
            got = resolve(opts.image, opts.platform, cache)
            tree, layers, descs, built = got.tree, got.layers, got.descs, 0
            artifact = got.artifact
        else:
            tree, layers, descs, built = index_image(opts.image, opts.platform,
                                                     build=opts.build_index)
            cache = opts.cache_dir or tempfile.mkdtemp(prefix="lamina-lazy-", dir="/var/tmp")
        t1 = time.monotonic()
        if opts.writable:
            for d in ("lower", "upper", "work"):
                os.makedirs(os.path.join(opts.writable, d), exist_ok=True)
        daemon.send({"tree": tree.path, "manifest": tree.manifest, "descs": descs,
                     "cache": cache, "own_cache": opts.cache_dir is None,
                     "layers": [[li.blob, li.diff_id, li.compression, li.blob_path,
                                 li.seek_path] for li in layers]})
    except BaseException:
        daemon.abort()
        if opts.cache_dir is None and cache:
            shutil.rmtree(cache, ignore_errors=True)
        raise
    pid = daemon.pid
    try:
        if overlay:
            up, wk = os.path.join(opts.writable or "", "upper"), os.path.join(
                opts.writable or "", "work")
            r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                                f"lowerdir={fuse_at},upperdir={up},workdir={wk}", target],
                               capture_output=True, text=True)
            if r.returncode:
                raise EnvironmentError_(f"cannot mount overlayfs on {target}: "
                                        f"{r.stderr.strip()}",
                                        hint="writable lazy mounts need root and overlayfs")
        os.makedirs(run_dir(), exist_ok=True)
        with open(_record_path(target), "w") as f:
            json.dump({"pid": pid, "mountpoint": target, "lower": fuse_at if overlay else "",
                       "image": str(opts.image),
                       "own_cache": cache if opts.cache_dir is None else ""}, f)
    except BaseException:
        _stop(pid, fuse_at)
        raise
    return MountResult(target, pid, len(layers), tree.count, built,
                       t1 - t0, time.monotonic() - t0, fuse_at if overlay else "", cache,
                       tree.manifest, artifact)


class _Daemon:
    """The forked FUSE server: started early, then given its job (or EOF: exit)."""

    def __init__(self, pid: int, job_w: int, ready_r: int, fuse_at: str) -> None:
        self.pid, self._job_w, self._ready_r, self._fuse_at = pid, job_w, ready_r, fuse_at
        self._reaped = False

    def _close(self) -> None:
        for fd in (self._job_w, self._ready_r):
            if fd >= 0:
                os.close(fd)
        self._job_w = self._ready_r = -1

    def _reap(self) -> None:
        if not self._reaped:
            self._reaped = True
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass

    @classmethod
    def start(cls, opts: LazyMountOptions, fuse_at: str, overlay: str) -> _Daemon:
        job_r, job_w = os.pipe()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(job_w)
            os.close(ready_r)
            _daemon_main(opts, fuse_at, overlay, job_r, ready_w)   # never returns
        os.close(job_r)
        os.close(ready_w)
        return cls(pid, job_w, ready_r, fuse_at)

    def abort(self) -> None:
        """No job after all: EOF makes the daemon exit without mounting (idempotent)."""
        self._close()
        self._reap()

    def send(self, job: dict[str, Any]) -> None:
        """Hand the job over and wait until the mount answers (or the daemon failed)."""
        data = json.dumps(job).encode()
        try:
            while data:
                data = data[os.write(self._job_w, data):]
        except BrokenPipeError:
            pass                # the daemon died: its message (if any) follows
        os.close(self._job_w)
        self._job_w = -1
        got = b""
        while not got.startswith(b"R") and (chunk := os.read(self._ready_r, 4096)):
            got += chunk
        self._close()
        if not got.startswith(b"R"):
            self._reap()
            msg = got[1:].decode(errors="replace") or "the FUSE daemon died before mounting"
            raise EnvironmentError_(f"cannot mount {self._fuse_at} with FUSE: {msg}",
                                    hint="check that /dev/fuse is usable (fuse3 installed)")


def _daemon_main(opts: LazyMountOptions, fuse_at: str, overlay: str, job_r: int,
                 ready: int) -> None:
    code = 0
    fetcher: Fetcher | None = None
    job: dict[str, Any] = {}
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        import indexed_gzip  # noqa: F401 - imported now, not on the first read

        import lamina.lazy.fuse  # noqa: F401
        remote: RemoteBlobs | None = None
        if isinstance(opts.image, RemoteImage):
            # httpx and the client now, while the parent fetches the index
            remote = RemoteBlobs(opts.image)
        data = b""
        while chunk := os.read(job_r, 1 << 16):
            data += chunk
        os.close(job_r)
        if not data:
            os._exit(0)         # the parent failed before mounting
        job = json.loads(data)
        with open(job["tree"], "rb") as f:
            tree = FrozenTree.load(f.read(), job["manifest"])
        if tree is None:
            raise EnvironmentError_(f"the stored tree {job['tree']} changed while mounting")
        layers = [LayerIndex(b, d, c, [], p, g) for b, d, c, p, g in job["layers"]]
        fetcher = Fetcher(layers, job["descs"], job["cache"], opts.plugins, remote)
        _serve(tree, fetcher, fuse_at, overlay, ready)
    except BaseException as e:
        msg = e.message if isinstance(e, LaminaError) else f"{type(e).__name__}: {e}"
        try:
            os.write(ready, b"E" + msg.encode()[:4000])
        except OSError:
            pass
        code = 1
    finally:
        if fetcher is not None:
            fetcher.close()
            if opts.stats_file:
                try:
                    with open(opts.stats_file, "w") as f:
                        json.dump(fetcher.stats.to_json(), f)
                except OSError:
                    pass
        if job.get("own_cache"):
            shutil.rmtree(job["cache"], ignore_errors=True)
        try:
            os.unlink(_record_path(overlay or fuse_at))
        except OSError:
            pass
        os._exit(code)


def _serve(tree: FrozenTree, fetcher: Fetcher, fuse_at: str, overlay: str, ready: int) -> None:
    import asyncio  # here: the mounting parent never needs it

    from lamina.lazy import load_pyfuse3
    load_pyfuse3()
    import pyfuse3

    from lamina.lazy.fuse import LazyOperations

    ops = LazyOperations(tree, fetcher)
    options = set(pyfuse3.default_options)
    options |= {"fsname=lamina-lazy", "subtype=lamina", "ro"}
    if os.geteuid() == 0:
        options.add("allow_other")   # overlayfs and other users read through it
    pyfuse3.init(ops, fuse_at, options)
    mounted = True
    try:
        os.write(ready, b"R")
        os.close(ready)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, stop.set)
            serving = asyncio.create_task(pyfuse3.main())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stopping.done():
                if overlay and _mounted(overlay):
                    # the overlay sits on the FUSE mount: it must go first
                    await asyncio.to_thread(
                        lambda: _umount(overlay) or _umount(overlay, lazy=True))
                pyfuse3.terminate()
            else:           # unmounted from outside
                stopping.cancel()
            await serving

        asyncio.run(main())
    finally:
        if mounted:
            pyfuse3.close(unmount=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno != errno.ESRCH
    # a zombie child of ours counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop(pid: int, path: str, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:
            pass
        time.sleep(0.02)
    if _mounted(path):
        _umount(path) or _umount(path, lazy=True)


def unmount(mountpoint: str) -> bool:
    """Stop the lazy mount at *mountpoint*; False when none is recorded there."""
    rec = _record_path(mountpoint)
    try:
        with open(rec) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return False
    target = doc["mountpoint"]
    lower = doc.get("lower") or ""
    _stop(int(doc["pid"]), lower or target)
    for p in (target, lower):
        if p and _mounted(p):
            _umount(p) or _umount(p, lazy=True)
    own = doc.get("own_cache") or ""
    if own and os.path.basename(own).startswith("lamina-lazy-"):
        shutil.rmtree(own, ignore_errors=True)  # a killed daemon could not remove it
    try:
        os.unlink(rec)
    except FileNotFoundError:
        pass
    return True


def is_lazy_mount(mountpoint: str) -> bool:
    return os.path.exists(_record_path(mountpoint))

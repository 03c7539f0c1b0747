"""Unpack an OCI image into a runtime bundle.

A bundle is ``BUNDLE/rootfs`` + ``BUNDLE/config.json`` (runtime-spec) plus
lamina's own records for a later repack::

    BUNDLE/
    ├── config.json             runtime-spec config generated from the image config
    ├── rootfs/                 the image's layers applied in order
    ├── lamina.json             what was unpacked: layout, tag, manifest, diff_ids, options
    └── lamina.snapshot         stat snapshot of rootfs (see lamina.layer.snapshot)

The bundle is built in a hidden sibling directory ``.BUNDLE.lamina-XXXX`` and
renamed into place only when every layer has been applied and verified, so an
interrupted or failed unpack never leaves a bundle that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina import __version__
from lamina.errors import (
    BundleError,
    CorruptLayerError,
    DigestMismatchError,
    HookError,
    NotFoundError,
    UnsafeLayerError,
)
from lamina.layer.compression import LayerPipeline, LayerSource
from lamina.layer.extract import ExtractOptions, LayerStats, RootfsWriter
from lamina.layer.idmap import IdMapping
from lamina.layer.snapshot import row as snapshot_row
from lamina.layer.snapshot import take_snapshot, write_rows
from lamina.layer.tarstream import TarReader
from lamina.oci import runtime
from lamina.oci.layout import ImageRef, OCILayout
from lamina.oci.model import ImageConfig, Manifest, Platform
from lamina.progress import Progress as Progress  # re-exported: drivers type against it

if TYPE_CHECKING:
    from lamina.hooks import HookOptions, HookRunner

METADATA = "lamina.json"
SNAPSHOT = "lamina.snapshot"


@dataclass(frozen=True)
class UnpackOptions:
    image: ImageRef
    bundle: str
    platform: Platform | None = None
    rootless: bool = False
    uid_map: tuple[IdMapping, ...] = ()
    gid_map: tuple[IdMapping, ...] = ()
    keep_dirlinks: bool = False
    hooks: HookOptions | None = None    # None: no hooks (the CLI reads the hooks.toml files)
    # --annotation KEY=VALUE: shown to hooks on top of the image's annotations
    annotations: tuple[tuple[str, str], ...] = ()


@dataclass
class UnpackResult:
    bundle: str
    manifest: str
    config: str
    layers: int
    entries: int = 0
    files: int = 0
    bytes: int = 0
    whiteouts: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    driver: str = "copy"
    reused: int = 0             # layers a driver found already extracted in the store
    skipped: int = 0            # bottom layers a layer.try-skip hook provided

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _prepare_target(bundle: str) -> None:
    try:
        st = os.lstat(bundle)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode) or os.listdir(bundle):
        raise BundleError(f"bundle {bundle} already exists and is not an empty directory",
                          hint="choose a new path or remove the old bundle")


def claim_target(bundle: str,
                 reclaim: Callable[[str, str], None] | None = None) -> str:
    """Check that *bundle* (absolute) can be made and clear what killed earlier
    unpacks of it left behind; returns its parent directory.

    *reclaim(parent, name)* runs first, for a driver whose stale staging holds
    what ``rmtree`` cannot remove (mounts, subvolumes).
    """
    _prepare_target(bundle)
    parent = os.path.dirname(bundle)
    if not os.path.isdir(parent):
        raise BundleError(f"parent directory {parent} does not exist")
    if reclaim is not None:
        reclaim(parent, os.path.basename(bundle))
    _remove_stale_stages(parent, os.path.basename(bundle))
    return parent


def unpack(opts: UnpackOptions, progress: Progress | None = None) -> UnpackResult:
    t0 = time.monotonic()
    layout, manifest = resolve_image(opts.image, opts.platform, _hook_runner(opts))
    cfg = layout.config_for(manifest)
    return unpack_resolved(layout, manifest, cfg, opts, progress, t0=t0)


def unpack_resolved(layout: OCILayout, manifest: Manifest, cfg: ImageConfig,
                    opts: UnpackOptions, progress: Progress | None = None, *,
                    meta_extra: dict[str, Any] | None = None,
                    t0: float | None = None) -> UnpackResult:
    """Unpack an image already resolved to its manifest and config; its blobs are
    read from *layout* (a store's ``blobs/`` works too).  *meta_extra* is merged
    into ``lamina.json`` (drivers record themselves there)."""
    prog = progress or Progress()
    t0 = time.monotonic() if t0 is None else t0
    bundle = os.path.abspath(opts.bundle)
    parent = claim_target(bundle)
    stage = tempfile.mkdtemp(prefix=f".{os.path.basename(bundle)}.lamina-{os.getpid()}-",
                             dir=parent)
    result = UnpackResult(bundle, manifest.digest, cfg.digest, len(manifest.layers))
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        prog.warn(msg)

    try:
        os.chmod(stage, 0o700)
        rootfs = os.path.join(stage, "rootfs")
        os.mkdir(rootfs, 0o755)
        hooks = _hook_runner(opts)
        hook_doc = _hook_doc(opts, bundle, rootfs, manifest) if hooks.hooks else {}
        # before the writer opens the rootfs: a hook may have replaced the directory
        result.skipped = _hook_try_skip(hooks, hook_doc, manifest.layers, cfg.diff_ids)
        writer = RootfsWriter(rootfs, ExtractOptions(opts.rootless, opts.uid_map, opts.gid_map,
                                                     opts.keep_dirlinks), warn)
        try:
            _apply_layers(layout, manifest.layers, cfg.diff_ids, writer, result, prog,
                          hooks=hooks, hook_doc=hook_doc, skip=result.skipped)
            # snapshot while every directory is still owner-accessible (rootless: a 0000
            # directory cannot be walked after its mode is applied), then fix up dirs
            snap = take_snapshot(rootfs, writer.hashes)
            for path, st in writer.finish().items():
                snap[path] = snapshot_row(path, "d", st, "")
            spec = runtime.generate(cfg, writer.root_fd, rootless=opts.rootless,
                                    uid_map=opts.uid_map, gid_map=opts.gid_map,
                                    image_annotations=manifest.annotations)
        finally:
            writer.close()
        write_json(os.path.join(stage, "config.json"), spec)
        with open(os.path.join(stage, SNAPSHOT), "wb") as f:
            write_rows(list(snap.values()), f)
        meta = {
            "lamina": __version__,
            "layout": layout.path,
            "tag": opts.image.tag,
            "manifest": manifest.digest,
            "config": cfg.digest,
            "diff_ids": list(cfg.diff_ids),
            "layers": [d.to_json() for d in manifest.layers],
            "options": {"rootless": opts.rootless, "keep_dirlinks": opts.keep_dirlinks,
                        "uid_map": [str(m) for m in opts.uid_map],
                        "gid_map": [str(m) for m in opts.gid_map]},
            **(meta_extra or {}),
        }
        write_json(os.path.join(stage, METADATA), meta)
        os.chmod(stage, 0o700 if opts.rootless else 0o711)
        if os.path.isdir(bundle):
            os.rmdir(bundle)  # the empty directory the caller gave us
        os.rename(stage, bundle)
    except BaseException:
        _rmtree_quiet(stage)
        raise
    result.seconds = round(time.monotonic() - t0, 3)
    result.warnings = warnings
    return result


def _apply_layers(layout: OCILayout, layers: Any, diff_ids: tuple[str, ...],
                  writer: RootfsWriter, result: UnpackResult, prog: Progress, *,
                  hooks: HookRunner | None = None, hook_doc: dict[str, Any] | None = None,
                  skip: int = 0) -> None:
    """Apply ``layers[skip:]`` (the ones below were provided by a try-skip hook)."""
    sources = [LayerSource(d, diff_ids[i], _opener(layout, d))
               for i, d in enumerate(layers) if i >= skip]
    prog.start(sum(d.size for d in layers[skip:]), len(layers))
    for i in range(skip):
        prog.layer_done(i)
    with LayerPipeline(sources, prog.advance) as pipe:
        for j, _src in enumerate(sources):
            i = j + skip
            stream = pipe.stream(j)
            stats = LayerStats()
            if hooks is not None and hook_doc is not None:
                _hook_layer(hooks, "layer.pre-extract", hook_doc, layers, diff_ids, i)
            try:
                reader = TarReader(stream.read)
                writer.apply(reader, stats)
                reader.drain()
                stream.finish()
            except (CorruptLayerError, UnsafeLayerError) as e:
                # a damaged blob is reported as what it is: check the digests first
                try:
                    stream.finish()
                except DigestMismatchError as d:
                    raise d from None
                except CorruptLayerError:
                    pass
                if isinstance(e, CorruptLayerError):
                    e.message = f"layer {i + 1} ({layers[i].digest[:19]}): {e.message}"
                    e.args = (e.message,)
                raise
            result.entries += stats.entries
            result.files += stats.files
            result.bytes += stats.bytes
            result.whiteouts += stats.whiteouts
            if hooks is not None and hook_doc is not None:
                _hook_layer(hooks, "layer.post-extract", hook_doc, layers, diff_ids, i)
            prog.layer_done(i)


# -- hooks (see lamina.hooks and docs/plugins.md) ---------------------------------------

def _hook_runner(opts: UnpackOptions) -> HookRunner:
    from lamina.hooks import HookRunner  # on use: most library callers pass no hooks
    return HookRunner.load(opts.hooks) if opts.hooks is not None else HookRunner([])


def resolve_image(ref: ImageRef, platform: Platform | None,
                  hooks: HookRunner) -> tuple[OCILayout, Manifest]:
    """The layout and manifest *ref* names; when it is not there, a ``lookup`` hook
    may answer with another ``LAYOUT[:TAG]`` holding it (first line of stdout)."""
    try:
        layout = OCILayout.open(ref.layout)
        return layout, layout.resolve(ref.tag, platform)
    except NotFoundError as missing:
        if not hooks.configured("lookup"):
            raise
        r = hooks.run("lookup", {"image": f"{ref.layout}:{ref.tag}", "layout": ref.layout,
                                 "tag": ref.tag,
                                 "platform": str(platform) if platform else None})
        if r.status != "handled":
            raise
        lines = r.stdout.decode("utf-8", "replace").strip().splitlines()
        answer = lines[0].strip() if lines else ""
        if not answer:
            raise HookError(f"lookup hook {r.hook} answered 'handled' with no image",
                            hint="print LAYOUT[:TAG] on stdout, or exit 3 to decline"
                            ) from missing
        found = ImageRef.parse(answer)
        if ":" not in answer.rpartition("/")[2]:
            found = ImageRef(found.layout, ref.tag)  # no tag in the answer: the one asked
        try:
            layout = OCILayout.open(found.layout)
            return layout, layout.resolve(found.tag, platform)
        except NotFoundError as e:
            raise HookError(f"lookup hook {r.hook} answered {answer!r}, which does not hold "
                            f"the image: {e.message}", hint="fix the lookup hook") from None


def _hook_doc(opts: UnpackOptions, bundle: str, rootfs: str,
              manifest: Manifest) -> dict[str, Any]:
    return {"bundle": bundle, "rootfs": rootfs, "manifest": manifest.digest,
            "annotations": {**(manifest.annotations or {}), **dict(opts.annotations)},
            "options": {"rootless": opts.rootless,
                        "uid_map": [str(m) for m in opts.uid_map],
                        "gid_map": [str(m) for m in opts.gid_map]}}


def _layer_doc(doc: dict[str, Any], layers: Any, diff_ids: tuple[str, ...],
               i: int) -> dict[str, Any]:
    from lamina.store.ids import chain_ids
    return dict(doc, layer=layers[i].to_json(), index=i, diff_id=diff_ids[i],
                chain_id=chain_ids(diff_ids[:i + 1])[-1])


def _hook_try_skip(hooks: HookRunner, doc: dict[str, Any], layers: Any,
                   diff_ids: tuple[str, ...]) -> int:
    """How many bottom layers a ``layer.try-skip`` hook put in the (empty) rootfs.

    Asked from the top layer down: the first hook answering ``handled`` for
    layer *i* has filled the rootfs with the image's tree up to and including
    *i* (the tree its chain id names), so only the layers above are extracted.
    Hooks are trusted configuration: lamina cannot verify a tree it did not
    extract, and reads no blob of the skipped layers.
    """
    if not hooks.configured("layer.try-skip"):
        return 0
    rootfs = doc["rootfs"]
    for i in reversed(range(len(layers))):
        r = hooks.run("layer.try-skip", dict(_layer_doc(doc, layers, diff_ids, i),
                                             scope="chain"))
        try:
            st = os.lstat(rootfs)
        except FileNotFoundError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise HookError(f"layer.try-skip hook {r.hook or ''} left {rootfs} missing or "
                            "not a directory",
                            hint="leave a directory (not a symlink) at the rootfs path")
        if r.status == "handled":
            return i + 1
        if os.listdir(rootfs):
            raise HookError(f"a layer.try-skip hook declined layer {i + 1} but left files "
                            f"in {rootfs}",
                            hint="a declining hook must leave the rootfs as it found it")
    return 0


def _hook_layer(hooks: HookRunner, event: str, doc: dict[str, Any], layers: Any,
                diff_ids: tuple[str, ...], i: int) -> None:
    if hooks.configured(event):
        hooks.run(event, _layer_doc(doc, layers, diff_ids, i))


def _opener(layout: OCILayout, desc: Any) -> Callable[[], Any]:
    path = layout.blob_path(desc.digest)

    def open_blob() -> Any:
        try:
            return open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise NotFoundError(f"layer blob {desc.digest} is missing from {layout.path}",
                                hint="the layout is incomplete; re-pull the image") from None
    return open_blob


def _remove_stale_stages(parent: str, name: str) -> None:
    """Remove staging dirs of earlier unpacks of this bundle whose process is gone.

    A killed unpack (SIGKILL, power loss) cannot clean up after itself; its
    hidden ``.NAME.lamina-PID-XXXX`` directory is reclaimed by the next unpack
    of the same bundle once PID no longer runs.
    """
    prefix = f".{name}.lamina-"
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for e in entries:
        if not e.startswith(prefix):
            continue
        pid_s = e[len(prefix):].partition("-")[0]
        if not pid_s.isdigit():
            continue
        try:
            os.kill(int(pid_s), 0)
            continue  # still running (or not ours to judge)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _rmtree_quiet(os.path.join(parent, e))


def write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _rmtree_quiet(path: str) -> None:
    # rootless: directories may have lost their owner bits; restore them top-down
    # (os.walk descends after we chmod), then remove
    for root, dirs, _files in os.walk(path):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                with contextlib.suppress(OSError):
                    os.chmod(p, 0o700)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path, ignore_errors=True)

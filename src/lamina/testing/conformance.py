"""Conformance kit for storage drivers: run it against your driver's factory.

:func:`check_driver` exercises a :class:`~lamina.drivers.base.DriverFactory`
on generated images and returns what it got wrong (an empty list: it
conforms).  It needs no pytest; :func:`assert_conformant` wraps it for a
pytest test::

    from lamina.testing.conformance import assert_conformant
    from mypkg.driver import factory

    def test_my_driver(tmp_path):
        assert_conformant(factory, tmp_path)

What is checked, for every generated image (files with modes, owners and
xattrs, symlinks, hardlinks, fifos, devices when root, whiteouts, opaque
directories, a directory replaced by a file and back, gzip/zstd/plain layers),
writable and read-only:

``declaration``
    name, description and :class:`~lamina.drivers.base.Capabilities` are
    well-formed; ``writes`` names only ``bundle``, ``store``, ``layout`` (the
    image's OCI layout) or absolute paths.
``claim``
    the driver claims the request (with :attr:`ConformanceOptions.annotations`)
    and writes nothing while deciding; with ``declines_without`` set it
    declines a request lacking those annotations, and raises a LaminaError
    (never returns None) when forced.
``tree``
    the bundle's rootfs equals what the stock ``copy`` driver makes of the
    same image (types, modes, owners, contents, link targets, devices,
    xattrs, hardlink groups; read-only bundles may share more inodes).
``bundle``
    ``rootfs/``, ``config.json`` and ``lamina.json`` naming the driver exist;
    the returned result names the bundle.
``writes``
    nothing changed outside the bundle (and the store when ``store`` is
    declared) in the directories the kit owns; no staging directory is left;
    no new mount appears unless ``mounts`` is declared.  (The kit watches its
    own directories and the mount table; it does not trace the whole host.)
``repack``
    edits in a writable rootfs repack (through lamina's repack, so the
    driver's ``delta_list``/``delta_root``/``refresh`` are used) into an image
    whose copy-unpacked tree equals the edited rootfs, twice, with
    ``--refresh-bundle`` in between; the driver :meth:`open` gives for the
    refreshed bundle must still work.
``usage`` / ``remove``
    ``usage`` gives non-negative numbers; the driver the factory's ``open`` makes
    for the bundle removes it completely, mounts included.
``errors``
    a corrupt layer blob and a non-empty target are LaminaErrors that leave
    no bundle and no staging behind (layout-served requests only: a store
    verifies blobs when they are imported).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lamina.drivers.base import Capabilities, ChainLayer, ClaimRequest, Driver, DriverFactory
from lamina.errors import LaminaError
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import Manifest, diff_manifests, tree_manifest

if TYPE_CHECKING:
    from lamina.store import Store

MTIME = 1_600_000_000


@dataclass(frozen=True)
class Failure:
    check: str          # which check (see the module docstring)
    case: str           # which image / mode
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.case}: {self.message}"


class DriverUnavailable(Exception):
    """The driver's ``check_here`` says it cannot run on this host."""


@dataclass(frozen=True)
class ConformanceOptions:
    #: added to every request the driver must claim (e.g. the key your driver claims on)
    annotations: Mapping[str, str] = field(default_factory=dict)
    #: the driver must decline requests without ``annotations`` (it is not a stock driver)
    declines_without: bool = False
    #: serve images from a store (None: when the driver declares ``needs_store``)
    store: bool | None = None
    read_only: tuple[bool, ...] = (False, True)
    #: tree fields not compared (e.g. ``{"link_group"}`` for a driver that shares inodes)
    ignore_fields: frozenset[str] = frozenset()
    #: repack twice with ``--refresh-bundle`` in between (False: once, no refresh)
    repack_refresh: bool = True
    #: requests say the user named the driver (``--driver``), for drivers that serve only then
    forced: bool = False
    #: the driver reads layer data on demand (lazy mounts): a corrupt blob may let prepare()
    #: succeed, but reading the damaged content must then fail, never return other bytes
    verifies_on_read: bool = False


# -- images -------------------------------------------------------------------------------

def _big(n: int) -> bytes:
    out = bytearray()
    seed = b"lamina"
    while len(out) < n:
        seed = hashlib.sha256(seed).digest()
        out += seed
    return bytes(out[:n])


def images(root: bool) -> dict[str, tuple[list[bytes], list[str]]]:
    """name -> (layer tars, compression per layer)."""
    b = TarBuilder(mtime=MTIME)
    b.add_dir("etc").add_file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
    b.add_file("etc/shadow", b"root:*::0:::::\n", mode=0o600)
    b.add_dir("private", mode=0o700, uid=1000, gid=1000)
    b.add_file("private/owned", b"mine\n", uid=1000, gid=1000)
    b.add_dir("tmp", mode=0o1777)
    b.add_dir("usr").add_dir("usr/bin")
    b.add_file("usr/bin/suid", b"#!/bin/sh\n", mode=0o4755)
    b.add_file("usr/bin/empty", b"", mode=0o755)
    b.add_hardlink("usr/bin/suid-link", "usr/bin/suid", mode=0o4755)
    b.add_file("usr/big.bin", _big(300_000))
    b.add_file("usr/xattr", b"x\n", xattrs={"user.lamina.test": b"value"})
    b.add_symlink("bin", "usr/bin").add_symlink("abs", "/etc/passwd")
    b.add_symlink("dangling", "does/not/exist")
    b.add_file("caf\u00e9 \u2603", b"unicode name\n")
    b.add_fifo("run.fifo")
    b.add_dir("ro", mode=0o555).add_file("ro/inside", b"in a read-only dir\n")
    if root:
        b.add_char("null", 1, 3).add_block("loopx", 7, 200)
        b.add_file("trusted", b"t\n", xattrs={"trusted.lamina.test": b"t"})
    basic = b.build()

    low = (TarBuilder(mtime=MTIME).add_dir("a").add_file("a/keep", b"keep\n")
           .add_file("a/gone", b"gone\n").add_dir("a/tree").add_file("a/tree/x", b"x\n")
           .add_dir("a/tree/sub").add_file("a/tree/sub/y", b"y\n")
           .add_dir("opq").add_file("opq/old", b"old\n").add_dir("opq/olddir")
           .add_dir("d2f").add_file("d2f/inner", b"i\n").add_file("f2d", b"file\n")
           .add_file("lowfile", b"low\n").add_dir("readd").add_file("readd/x", b"1\n")
           .add_dir("ro", mode=0o555).add_file("ro/inside", b"ro\n").build())
    mid = (TarBuilder(mtime=MTIME + 10).add_dir("a").add_whiteout("a/gone")
           .add_whiteout("a/tree").add_dir("opq").add_opaque("opq")
           .add_file("opq/new", b"new\n").add_whiteout("d2f").add_file("d2f", b"now a file\n")
           .add_whiteout("f2d").add_dir("f2d").add_file("f2d/inner", b"dir now\n")
           .add_whiteout("readd").add_dir("ro", mode=0o555)
           .add_file("ro/added", b"added below a read-only dir\n").build())
    top = (TarBuilder(mtime=MTIME + 20).add_hardlink("lowlink", "lowfile")
           .add_dir("readd").add_file("readd/y", b"2\n")
           .add_dir("a").add_file("a/keep", b"keep, replaced\n", mode=0o640).build())
    return {
        "basic": ([basic], ["gzip"]),
        "whiteouts": ([low, mid, top], ["gzip", "zstd", "none"]),
    }


# -- the kit ------------------------------------------------------------------------------

class _Run:
    def __init__(self, factory: DriverFactory, workdir: str, opts: ConformanceOptions) -> None:
        self.f = factory
        self.work = os.path.abspath(workdir)
        self.opts = opts
        self.failures: list[Failure] = []
        self.root = os.geteuid() == 0
        caps = getattr(factory, "capabilities", None)
        self.caps = caps if isinstance(caps, Capabilities) else Capabilities()
        self.use_store = self.caps.needs_store if opts.store is None else opts.store
        self.store: Store | None = None

    def fail(self, check: str, case: str, message: str) -> None:
        self.failures.append(Failure(check, case, message))

    # -- requests ---------------------------------------------------------------------------
    def request(self, layout: str, tag: str, bundle: str, *, read_only: bool,
                annotations: Mapping[str, str]) -> ClaimRequest:
        from lamina.oci.layout import OCILayout
        from lamina.store.ids import chain_ids
        if self.store is not None:
            name = self.store.import_image(layout, tag, f"conformance/{tag}").name
            img = self.store.image(name)
            manifest, config = img.manifest, img.config
            chain = tuple(ChainLayer(la.desc, la.diff_id, la.chain_id) for la in img.layers)
            lay = None
            image = name
        else:
            lay = OCILayout.open(layout)
            manifest = lay.resolve(tag)
            config = lay.config_for(manifest)
            ids = chain_ids(config.diff_ids)
            chain = tuple(ChainLayer(d, config.diff_ids[i], ids[i])
                          for i, d in enumerate(manifest.layers))
            image = f"{layout}:{tag}"
        return ClaimRequest(manifest=manifest, config=config, chain=chain, bundle=bundle,
                            read_only=read_only,
                            annotations={**manifest.annotations, **annotations},
                            store=self.store, layout=lay, image=image, tag=tag,
                            rootless=not self.root, forced=self.opts.forced)

    # -- checks -----------------------------------------------------------------------------
    def declaration(self) -> bool:
        f = self.f
        ok = True
        name = getattr(f, "name", None)
        if not isinstance(name, str) or not name or not all(
                c.isalnum() or c in "-_." for c in name):
            self.fail("declaration", "factory", f"name {name!r} is not a plain word")
            ok = False
        if not isinstance(getattr(f, "description", None), str) or not f.description:
            self.fail("declaration", "factory", "description is missing")
        if not isinstance(getattr(f, "capabilities", None), Capabilities):
            self.fail("declaration", "factory", "capabilities is not a Capabilities")
            ok = False
        for w in self.caps.writes:
            if w not in ("bundle", "store", "layout") and not os.path.isabs(w):
                self.fail("declaration", "factory", f"writes entry {w!r} is not 'bundle', "
                          "'store', 'layout' or an absolute path")
        if not isinstance(f, DriverFactory):
            self.fail("declaration", "factory",
                      "not a DriverFactory (name, capabilities, description, check_here, "
                      "claim, open)")
            ok = False
        return ok

    def run(self) -> list[Failure]:
        if not self.declaration():
            return self.failures
        store_dir = os.path.join(self.work, "store")
        reason = self.f.check_here(store_dir if self.use_store else None)
        if reason:
            raise DriverUnavailable(f"driver {self.f.name} cannot run here: {reason}")
        # later commands (repack, remove) find a bundle's driver by the name in lamina.json:
        # a factory under test that is not installed is registered for this process
        from lamina.drivers.registry import default_registry
        reg = default_registry()
        if self.f.name not in reg.names():
            reg.register(self.f.name, self.f, origin="conformance kit")
        layout = os.path.join(self.work, "layout")
        imgs = images(self.root)
        for name, (tars, comps) in imgs.items():
            build_image(layout, name, tars, compression=comps)
        if self.use_store:
            from lamina.store import Store
            self.store = Store.open(store_dir, create=True)
        try:
            if self.opts.declines_without:
                self.check_declines(layout)
            n = 0
            for name in imgs:
                for ro in self.opts.read_only:
                    n += 1
                    self.check_image(layout, name, ro, n)
            if self.store is None:
                self.check_errors(layout)
            self.check_target_exists(layout)
        finally:
            if self.store is not None:
                self.store.close()
        return self.failures

    def _claim(self, req: ClaimRequest, case: str) -> Driver | None:
        watched = self.watch_roots(req.bundle)
        before = _state(watched)
        try:
            got = self.f.claim(req)
        except LaminaError as e:
            self.fail("claim", case, f"raised {type(e).__name__}: {e.message}")
            return None
        except Exception as e:
            self.fail("claim", case, f"raised {type(e).__name__} (not a LaminaError): {e}")
            return None
        changed = _changes(before, _state(watched), ())
        if changed:
            self.fail("claim", case, "claim() wrote: " + ", ".join(changed[:5]))
        if got is not None and not isinstance(got, Driver):
            self.fail("claim", case, f"claim returned a {type(got).__name__}, not a Driver")
            return None
        return got

    def check_declines(self, layout: str) -> None:
        case = "without the driver's annotations"
        bundle = os.path.join(self.work, "declined")
        req = self.request(layout, "basic", bundle, read_only=False, annotations={})
        got = self._claim(req, case)
        if got is not None:
            self.fail("claim", case, "claimed a request it should decline")
        try:
            forced = self.f.claim(dataclasses.replace(req, forced=True))
        except LaminaError as e:
            if not e.hint:
                self.fail("claim", case + ", forced", "the error has no hint")
        except Exception as e:
            self.fail("claim", case + ", forced",
                      f"raised {type(e).__name__} (not a LaminaError): {e}")
        else:
            if forced is None:
                self.fail("claim", case + ", forced",
                          "returned None when forced: raise a LaminaError saying why")
        if os.path.lexists(bundle):
            self.fail("claim", case, "a declining driver created the bundle")

    def watch_roots(self, bundle: str) -> list[str]:
        # the kit's own directories: layout, store, the bundles' parent
        return [self.work]

    def allowed(self, bundle: str) -> tuple[str, ...]:
        ok = [bundle]
        if "store" in self.caps.writes:
            ok.append(os.path.join(self.work, "store"))
        if "layout" in self.caps.writes:  # the image's own OCI layout
            ok += [os.path.join(self.work, "layout"), os.path.join(self.work, "corrupt-layout")]
        ok += [w for w in self.caps.writes if os.path.isabs(w)]
        return tuple(ok)

    def check_image(self, layout: str, name: str, read_only: bool, n: int) -> None:
        case = f"{name} ({'read-only' if read_only else 'writable'})"
        from lamina.bundle import UnpackOptions, unpack
        from lamina.oci.layout import ImageRef
        ref = os.path.join(self.work, f"ref-{n}")
        unpack(UnpackOptions(ImageRef(layout, name), ref, rootless=not self.root))
        bundle = os.path.join(self.work, f"bundle-{n}")
        req = self.request(layout, name, bundle, read_only=read_only,
                           annotations=self.opts.annotations)
        driver = self._claim(req, case)
        if driver is None:
            if not any(f.case == case for f in self.failures):
                self.fail("claim", case, "declined a request it should serve")
            return
        watched = self.watch_roots(bundle)
        before = _state(watched)
        mounts_before = _mounts()
        try:
            res = driver.prepare(None)
        except LaminaError as e:
            self.fail("bundle", case, f"prepare raised {type(e).__name__}: {e.message}")
            return
        except Exception as e:
            self.fail("bundle", case,
                      f"prepare raised {type(e).__name__} (not a LaminaError): {e}")
            return
        try:
            self.check_bundle(case, bundle, res)
            changed = _changes(before, _state(watched), self.allowed(bundle))
            if changed:
                self.fail("writes", case, "wrote outside what it declared (writes="
                          f"{list(self.caps.writes)}): " + ", ".join(changed[:5]))
            new_mounts = sorted(m for m in set(_mounts()) - set(mounts_before)
                                if m.startswith(self.work + "/"))
            if new_mounts and not self.caps.mounts:
                self.fail("writes", case, "mounted " + ", ".join(new_mounts[:3])
                          + " without declaring mounts=True")
            rootfs = os.path.join(bundle, "rootfs")
            if os.path.isdir(rootfs):
                ignore = set(self.opts.ignore_fields)
                if read_only:
                    ignore.add("link_group")  # read-only bundles may share inodes
                self.compare(case, "tree", tree_manifest(os.path.join(ref, "rootfs")),
                             tree_manifest(rootfs), ignore)
            try:
                u = driver.usage(bundle)
                if not (isinstance(u.bytes, int) and isinstance(u.inodes, int)
                        and u.bytes >= 0 and u.inodes >= 0):
                    self.fail("usage", case, f"usage() gave {u!r}")
            except Exception as e:
                self.fail("usage", case, f"usage() raised {type(e).__name__}: {e}")
            if not read_only and os.path.isdir(rootfs):
                self.check_repack(case, layout, name, bundle, n)
        finally:
            self.check_remove(case, bundle, mounts_before)
            shutil.rmtree(ref, ignore_errors=True)

    def compare(self, case: str, check: str, want: Manifest, got: Manifest,
                ignore: set[str]) -> None:
        diff = diff_manifests(want, got, ignore_root=True, ignore_fields=ignore,
                              names=("copy", str(self.f.name)))
        if diff:
            self.fail(check, case, f"{len(diff)} difference(s): " + "; ".join(diff[:6]))

    def check_bundle(self, case: str, bundle: str, res: Any) -> None:
        for p in ("rootfs", "config.json", "lamina.json"):
            if not os.path.exists(os.path.join(bundle, p)):
                self.fail("bundle", case, f"no {p} in the bundle")
        try:
            with open(os.path.join(bundle, "lamina.json"), encoding="utf-8") as f:
                meta = json.load(f)
            if meta.get("driver") != self.f.name:
                self.fail("bundle", case,
                          f"lamina.json names driver {meta.get('driver')!r}, not {self.f.name!r}")
        except (OSError, ValueError) as e:
            self.fail("bundle", case, f"lamina.json unreadable: {e}")
        if getattr(res, "bundle", None) != bundle:
            self.fail("bundle", case, f"prepare() returned {res!r}, not a result for {bundle}")
        leftovers = _staging(bundle)
        if leftovers:
            self.fail("writes", case, "staging left behind: " + ", ".join(leftovers))

    def check_repack(self, case: str, layout: str, name: str, bundle: str, n: int) -> None:
        from lamina.bundle import UnpackOptions, unpack
        from lamina.oci.layout import ImageRef
        from lamina.repack import RepackOptions, repack
        rootfs = os.path.join(bundle, "rootfs")
        for round_ in (1, 2) if self.opts.repack_refresh else (1,):
            try:
                _edit(rootfs, round_)
                tag = f"{name}-repacked-{n}-{round_}"
                repack(RepackOptions(ImageRef(layout, tag), bundle,
                                     refresh_bundle=self.opts.repack_refresh and round_ == 1))
                again = os.path.join(self.work, f"repacked-{n}-{round_}")
                unpack(UnpackOptions(ImageRef(layout, tag), again, rootless=not self.root))
            except LaminaError as e:
                self.fail("repack", f"{case}, round {round_}",
                          f"{type(e).__name__}: {e.message}")
                return
            except Exception as e:
                self.fail("repack", f"{case}, round {round_}",
                          f"raised {type(e).__name__} (not a LaminaError): {e}")
                return
            self.compare(f"{case}, round {round_}", "repack",
                         tree_manifest(rootfs), tree_manifest(os.path.join(again, "rootfs")),
                         set(self.opts.ignore_fields))
            shutil.rmtree(again, ignore_errors=True)

    def check_remove(self, case: str, bundle: str, mounts_before: list[str]) -> None:
        if not os.path.lexists(bundle):
            return
        try:
            with open(os.path.join(bundle, "lamina.json"), encoding="utf-8") as f:
                meta = json.load(f)
            d = self.f.open(bundle, meta, self.store)
            d.remove(bundle)
        except Exception as e:
            self.fail("remove", case, f"open()/remove() raised {type(e).__name__}: {e}")
            _force_remove(bundle)
            return
        if os.path.lexists(bundle):
            self.fail("remove", case, "the bundle still exists after remove()")
            _force_remove(bundle)
        left = [m for m in _mounts() if m not in mounts_before and
                (m == bundle or m.startswith(bundle + "/"))]
        if left:
            self.fail("remove", case, "mounts left: " + ", ".join(left))

    def check_errors(self, layout: str) -> None:
        case = "corrupt layer blob"
        bad = os.path.join(self.work, "corrupt-layout")
        shutil.copytree(layout, bad, symlinks=True)
        from lamina.oci.layout import OCILayout
        lay = OCILayout.open(bad)
        desc = lay.resolve("basic").layers[0]
        path = lay.blob_path(desc.digest)
        with open(path, "rb") as f:
            data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF  # one flipped byte: a digest mismatch
        os.chmod(path, 0o644)
        with open(path, "wb") as f:
            f.write(data)
        bundle = os.path.join(self.work, "corrupt-bundle")
        req = self.request(bad, "basic", bundle, read_only=False,
                           annotations=self.opts.annotations)
        self._expect_error(case, req, bundle)

    def check_target_exists(self, layout: str) -> None:
        case = "non-empty target"
        bundle = os.path.join(self.work, "occupied")
        os.makedirs(bundle)
        with open(os.path.join(bundle, "precious"), "w") as f:
            f.write("keep me\n")
        req = self.request(layout, "basic", bundle, read_only=False,
                           annotations=self.opts.annotations)
        self._expect_error(case, req, bundle, keep=True)
        if sorted(os.listdir(bundle)) != ["precious"]:
            self.fail("errors", case, f"the target was changed: {sorted(os.listdir(bundle))}")

    def _expect_error(self, case: str, req: ClaimRequest, bundle: str,
                      keep: bool = False) -> None:
        try:
            d = self.f.claim(req)
            if d is None:
                self.fail("claim", case, "declined a request it should serve")
                return
            d.prepare(None)
        except LaminaError:
            pass
        except Exception as e:
            self.fail("errors", case, f"raised {type(e).__name__} (not a LaminaError): {e}")
        else:
            if self.opts.verifies_on_read and not keep:
                self._check_read_errors(case, d, bundle)
            else:
                self.fail("errors", case, "prepare() succeeded")
                _force_remove(bundle)
            return
        if not keep and os.path.lexists(bundle):
            self.fail("errors", case, "a bundle was left behind")
            _force_remove(bundle)
        left = _staging(bundle)
        if left:
            self.fail("errors", case, "staging left behind: " + ", ".join(left))


    def _check_read_errors(self, case: str, d: Driver, bundle: str) -> None:
        """Reading every file of a bundle over a corrupt layer: some read must fail."""
        failed = 0
        for dirpath, _dirs, files in os.walk(os.path.join(bundle, "rootfs")):
            for n in files:
                p = os.path.join(dirpath, n)
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                try:
                    with open(p, "rb") as f:
                        while f.read(1 << 20):
                            pass
                except OSError:
                    failed += 1
        if not failed:
            self.fail("errors", case, "every file of a bundle over a corrupt layer read "
                      "without an error")
        try:
            d.remove(bundle)
        except Exception as e:
            self.fail("remove", case, f"remove() raised {type(e).__name__}: {e}")
        _force_remove(bundle)


def check_driver(factory: DriverFactory, workdir: str,
                 opts: ConformanceOptions | None = None) -> list[Failure]:
    """Run the kit in *workdir* (an empty directory it may fill); return the failures.

    Raises :class:`DriverUnavailable` when the driver's ``check_here`` refuses
    this host (nothing to check).  Must run as the user the driver is meant
    for: as root, device nodes and foreign owners are included.
    """
    os.makedirs(workdir, exist_ok=True)
    if os.listdir(workdir):
        raise ValueError(f"{workdir} is not empty")
    return _Run(factory, workdir, opts or ConformanceOptions()).run()


def assert_conformant(factory: DriverFactory, workdir: Any,
                      opts: ConformanceOptions | None = None) -> None:
    """pytest helper: fail with every failure, skip when the driver cannot run here
    (fail instead when ``CI`` is set)."""
    import pytest
    try:
        failures = check_driver(factory, str(workdir), opts)
    except DriverUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    if failures:
        pytest.fail(f"{len(failures)} conformance failure(s):\n"
                    + "\n".join(f"  {f}" for f in failures), pytrace=False)


# -- helpers ------------------------------------------------------------------------------

def _edit(rootfs: str, round_: int) -> None:
    """Edits every driver must turn into a layer: modify, add, remove, chmod, new dir."""
    if round_ == 1:
        for top in sorted(os.listdir(rootfs)):
            p = os.path.join(rootfs, top)
            if os.path.isfile(p) and not os.path.islink(p) and stat.S_ISREG(os.lstat(p).st_mode):
                with open(p, "ab") as f:
                    f.write(b"appended by the conformance kit\n")
                break
        os.makedirs(os.path.join(rootfs, "conformance/new/dir"))
        with open(os.path.join(rootfs, "conformance/new/dir/file"), "w") as f:
            f.write("new\n")
        for victim in ("etc/shadow", "a/keep"):
            if os.path.lexists(os.path.join(rootfs, victim)):
                os.unlink(os.path.join(rootfs, victim))
    else:
        shutil.rmtree(os.path.join(rootfs, "conformance/new"))
        with open(os.path.join(rootfs, "conformance/second"), "w") as f:
            f.write("second round\n")
        os.chmod(os.path.join(rootfs, "conformance"), 0o700)
        for victim in ("usr/bin", "opq"):
            if os.path.isdir(os.path.join(rootfs, victim)):
                shutil.rmtree(os.path.join(rootfs, victim))


def _state(roots: list[str]) -> dict[str, tuple[int, int, int, int]]:
    out: dict[str, tuple[int, int, int, int]] = {}
    for r in roots:
        for path, st in _walk(r):
            out[path] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def _walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return
    yield root, st
    if not stat.S_ISDIR(st.st_mode) or (os.path.ismount(root) and root != "/"):
        return
    try:
        names = os.listdir(root)
    except OSError:
        return
    for n in names:
        yield from _walk(os.path.join(root, n))


def _changes(before: Mapping[str, Any], after: Mapping[str, Any],
             allowed: tuple[str, ...]) -> list[str]:
    def ok(p: str) -> bool:
        return any(p == a or p.startswith(a + "/") for a in allowed)
    out = []
    for p in sorted(set(before) | set(after)):
        if before.get(p) == after.get(p) or ok(p):
            continue
        if p in allowed_parents(allowed) and p in before and p in after:
            continue  # a directory whose entry for the bundle/store appeared
        out.append(("new " if p not in before else "removed " if p not in after
                    else "changed ") + p)
    return out


def allowed_parents(allowed: tuple[str, ...]) -> set[str]:
    return {os.path.dirname(a) for a in allowed}


def _staging(bundle: str) -> list[str]:
    parent, name = os.path.split(bundle)
    try:
        return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.lamina-"))
    except OSError:
        return []


def _mounts() -> list[str]:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return [line.split()[4].replace("\\040", " ") for line in f if line.strip()]
    except OSError:
        return []


def _force_remove(bundle: str) -> None:
    import subprocess
    for m in sorted((m for m in _mounts() if m == bundle or m.startswith(bundle + "/")),
                    key=len, reverse=True):
        subprocess.run(["umount", "-l", m], capture_output=True, check=False)
    shutil.rmtree(bundle, ignore_errors=True)


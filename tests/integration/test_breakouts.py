"""Hostile layers: the classic layer-extraction breakouts, run through the real CLI.

The cases are re-expressed (not copied) from two well-known suites, and keep
their original names in the test ids so a reader can find the source:

- ``containerd-<Name>``: containerd's ``TestBreakouts`` (pkg/archive/tar_test.go,
  formerly archive/tar_test.go);
- ``moby-<Test>[-<n>]``: moby's ``pkg/archive`` tests, now in
  github.com/moby/go-archive (archive_test.go, archive_unix_test.go,
  archive_linux_test.go, diff_test.go).  ``<n>`` is the index of the header
  list inside the original table test.

plus lamina's own cases (``lamina-...``): corrupt/truncated/forged blobs,
hostile pax headers, whiteout names, hardlinks and symlink loops.

Every test builds an OCI layout, runs ``lamina unpack --json`` as a
subprocess and checks:

(a) the outcome: either exit 7 (unsafe layer; 5/6 for forged/corrupt blobs)
    with a ``--json`` error naming the offending entry, or success with every
    write resolved *inside* the rootfs (lamina scopes path resolution to the
    rootfs like securejoin / openat2 ``RESOLVE_IN_ROOT``: absolute symlink
    targets restart at the rootfs, ``..`` stops at it);
(b) nothing outside the bundle changed: sentinel ``victim`` directories next
    to the bundle and one level up, a prefix-sharing sibling
    ``bundle-evil``, the layout itself and a few host files are compared
    byte for byte (content, mode, owner, link count) before and after, and
    no new file appeared anywhere outside the bundle;
(c) on failure nothing that looks like a bundle is left: the bundle path
    does not exist (or is still the empty directory it was) and no staging
    directory remains.

Where lamina deliberately differs from the original suite (containerd
creates ``.wh.etc/somefile`` literally; moby's os.Root refuses a relative
escape that lamina clamps) the case says so in a comment.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import resource
import secrets
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import run_lamina
from lamina.oci import mediatypes as mt
from lamina.oci.layout import OCILayout
from lamina.testing.images import build_image, compress
from lamina.testing.layers import XHDTYPE, RawEntry, TarBuilder, header_block

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("require_root")]

TAG = "hostile"
TIMEOUT = 120          # a symlink loop or a bomb must fail, not hang
EXIT_DIGEST, EXIT_CORRUPT, EXIT_UNSAFE = 5, 6, 7
UNBROKEN = b"unbroken"
INSIDE = b"inside"
INSIDE_HELLO = b"hello from the lower layer, inside the rootfs"
BUNDLE_FILES = {"config.json", "rootfs", "lamina.json", "lamina.snapshot"}

#: host paths that an escaping write would create or modify; each must be
#: exactly as it was before the run (usually: absent)
HOST_PATHS = [
    "/etc/passwd", "/etc/shadow", "/etc/group", "/etc/unbroken", "/etc/emptied",
    "/etc/localpasswd", "/etc/whitedout", "/localetc", "/localpasswd", "/victim",
    "/target", "/dne", "/run/existing", "/run/source", "/run/link", "/pwned",
    "/escape", "/file", "/hello",
]


# ---------------------------------------------------------------------------
# observation helpers
# ---------------------------------------------------------------------------

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _describe(p: Path) -> tuple[Any, ...]:
    st = p.lstat()
    kind = stat.S_IFMT(st.st_mode)
    extra: Any = None
    nlink: int | None = st.st_nlink
    size: int | None = st.st_size
    if stat.S_ISREG(st.st_mode):
        extra = _sha(p)
    elif stat.S_ISLNK(st.st_mode):
        extra = os.readlink(p)
    elif stat.S_ISDIR(st.st_mode):
        nlink = size = None  # change as subdirectories come and go
    return (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, nlink, size, st.st_ino,
            extra)


def snapshot(base: Path, exclude: Path | None = None) -> dict[str, tuple[Any, ...]]:
    """Every path below *base* (without following symlinks), except *exclude*'s subtree."""
    out = {".": _describe(base)}
    for dirpath, dirnames, filenames in os.walk(base):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n != exclude]
        for n in dirnames + filenames:
            p = d / n
            if p == exclude:
                continue
            out[str(p.relative_to(base))] = _describe(p)
    return out


def host_state() -> dict[str, tuple[Any, ...] | None]:
    out: dict[str, tuple[Any, ...] | None] = {}
    for h in HOST_PATHS:
        p = Path(h)
        try:
            out[h] = _describe(p)
        except FileNotFoundError:
            out[h] = None
    return out


def in_root(root: Path, path: str, follow_last: bool = True) -> Path:
    """*path* resolved inside *root* the way containerd's fs.RootPath does (a test oracle)."""
    todo = [c for c in path.split("/") if c not in ("", ".")]
    real: list[str] = []
    links = 0
    while todo:
        c = todo.pop(0)
        if c == "..":
            if real:
                real.pop()
            continue
        p = root.joinpath(*real, c)
        if p.is_symlink() and (todo or follow_last):
            links += 1
            assert links < 64, f"symlink loop resolving {path}"
            target = os.readlink(p)
            if target.startswith("/"):
                real = []
            todo = [x for x in target.split("/") if x not in ("", ".")] + todo
            continue
        real.append(c)
    return root.joinpath(*real)


def same_inode(a: Path, b: Path) -> bool:
    sa, sb = a.lstat(), b.lstat()
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def is_symlink_to(p: Path, target: str) -> bool:
    return p.is_symlink() and os.readlink(p) == target


def is_plain_file(p: Path, content: bytes | None = None) -> bool:
    st = p.lstat()
    return stat.S_ISREG(st.st_mode) and (content is None or p.read_bytes() == content)


def is_real_dir(p: Path) -> bool:
    return stat.S_ISDIR(p.lstat().st_mode)


def listing(root: Path) -> list[str]:
    """Relative paths below *root*, directories with a trailing '/' (moby's readDirContents)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        for n in dirnames:
            p = d / n
            rel = str(p.relative_to(root))
            out.append(rel if p.is_symlink() else rel + "/")
        out += [str((d / n).relative_to(root)) for n in filenames]
    return sorted(out)


# ---------------------------------------------------------------------------
# the arena: a layout, a bundle path and sentinels all around it
# ---------------------------------------------------------------------------

class Arena:
    """``base/`` holds::

        layout/                      the OCI layout under test
        victim/hello                 sentinel, 3 levels above the rootfs
        perm400, also-exists-outside-root   (containerd HardlinkSymlinkChmod)
        work/                        the bundle's parent (lamina stages here)
            victim/hello             sentinel, 2 levels above the rootfs
            bundle-evil/secret       prefix-sharing sibling of the bundle
            bundle                   the target (absent unless pre-created)

    During an unpack the rootfs is ``work/.bundle.lamina-XXXX/rootfs``, so
    ``../victim`` from the rootfs is inside the staging directory (later the
    bundle), ``../../victim`` is ``work/victim`` and ``../../../victim`` is
    ``base/victim``.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.layout = base / "layout"
        self.work = base / "work"
        self.bundle = self.work / "bundle"
        self.secret = b"victim-secret-" + secrets.token_hex(16).encode()
        self.victim = base / "victim"
        self.near_victim = self.work / "victim"
        self.sibling = self.work / "bundle-evil"
        self.tmp_name = f"breakout-lamina-{secrets.token_hex(8)}"
        for d in (self.victim, self.near_victim, self.sibling):
            d.mkdir(parents=True)
        for f in (self.victim / "hello", self.near_victim / "hello", self.sibling / "secret"):
            f.write_bytes(self.secret)
            f.chmod(0o644)
        self.perm400 = base / "perm400"
        self.perm400.write_bytes(b"...")
        self.perm400.chmod(0o400)
        self.outside_root = base / "also-exists-outside-root"
        self.outside_root.write_bytes(b"...")
        self.outside_root.chmod(0o640)
        self.extra_host: list[Path] = [Path("/tmp") / self.tmp_name]
        self.victim_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in (
            self.victim / "hello", self.near_victim / "hello", self.sibling / "secret",
            self.perm400, self.outside_root, Path("/etc/passwd"))}

    # -- spelling the victim directory in a layer --------------------------------
    def spell(self, how: str) -> str:
        """How a layer names the victim directory: ``../`` n times or an absolute host path."""
        if how == "abs":
            return str(self.victim)
        return "/".join([".."] * int(how[-1])) + "/victim"

    def landing(self, how: str) -> str:
        """Where :meth:`spell` resolves inside the rootfs (rootfs-relative)."""
        return str(self.victim).lstrip("/") if how == "abs" else "victim"

    # -- building ------------------------------------------------------------------
    def image(self, layers: Sequence[bytes], compression: str = "gzip", **kw: Any) -> None:
        build_image(str(self.layout), TAG, list(layers), compression=compression, **kw)

    def raw_image(self, blobs: Sequence[tuple[bytes, str, str]]) -> None:
        """An image of verbatim layer blobs: ``(blob, media type, diff_id)`` each."""
        lay = OCILayout.init(str(self.layout))
        descs = [lay.put_blob(b, media) for b, media, _ in blobs]
        cfg = {"architecture": _host_arch(), "os": "linux", "config": {},
               "rootfs": {"type": "layers", "diff_ids": [d for _, _, d in blobs]}}
        cfg_desc = lay.put_json(cfg, mt.CONFIG)
        man = {"schemaVersion": 2, "mediaType": mt.MANIFEST, "config": cfg_desc.to_json(),
               "layers": [d.to_json() for d in descs]}
        lay.set_ref(TAG, lay.put_json(man, mt.MANIFEST))

    # -- running ---------------------------------------------------------------------
    def unpack(self, *args: str, bundle: Path | None = None,
               **kw: Any) -> subprocess.CompletedProcess[str]:
        b = self.bundle if bundle is None else bundle
        return run_lamina(["unpack", "--json", "--image", f"{self.layout}:{TAG}", *args,
                           str(b)], timeout=TIMEOUT, **kw)

    def _before(self) -> tuple[dict[str, Any], dict[str, Any], dict[Path, Any]]:
        extra = {p: _lstat_or_none(p) for p in self.extra_host}
        return snapshot(self.base), host_state(), extra

    def _check_outside(self, before: tuple[dict[str, Any], dict[str, Any], dict[Path, Any]],
                       exclude: Path | None) -> None:
        snap, host, extra = before
        if exclude is not None:
            snap = {k: v for k, v in snap.items()
                    if not (k == _rel(self.base, exclude)
                            or k.startswith(_rel(self.base, exclude) + "/"))}
        after = snapshot(self.base, exclude)
        changed = sorted(k for k in set(snap) | set(after) if snap.get(k) != after.get(k))
        assert not changed, f"paths outside the bundle changed or appeared: {changed}"
        assert host_state() == host, "a host file changed"
        for p, st in extra.items():
            assert _lstat_or_none(p) == st, f"{p} was created or changed outside the rootfs"

    def expect_error(self, code: int, names: Sequence[str] = (), *args: str,
                     bundle: Path | None = None, **kw: Any) -> dict[str, Any]:
        """Run; expect exit *code*, a --json error naming one of *names*, nothing changed."""
        before = self._before()
        r = self.unpack(*args, bundle=bundle, **kw)
        assert r.returncode == code, _show(r)
        payload = _json_error(r)
        assert payload["code"] == code, payload
        if names:
            assert any(n in payload["message"] for n in names), (
                f"error message does not name any of {list(names)}: {payload['message']!r}")
        self._check_outside(before, None)
        b = self.bundle if bundle is None else bundle
        assert not b.exists() or (is_real_dir(b) and not os.listdir(b)), (
            f"a failed unpack left {b}: {os.listdir(b)}")
        return payload

    def expect_ok(self, *args: str, bundle: Path | None = None) -> Path:
        """Run; expect success, nothing outside the bundle changed; return the rootfs."""
        before = self._before()
        b = self.bundle if bundle is None else bundle
        r = self.unpack(*args, bundle=b)
        assert r.returncode == 0, _show(r)
        self._check_outside(before, b)
        assert set(os.listdir(b)) <= BUNDLE_FILES, (
            f"unexpected entries next to rootfs: {sorted(set(os.listdir(b)) - BUNDLE_FILES)}")
        rootfs = b / "rootfs"
        for dirpath, _dirs, files in os.walk(rootfs):
            for n in files:
                p = Path(dirpath) / n
                st = p.lstat()
                if not stat.S_ISREG(st.st_mode):
                    continue
                assert (st.st_dev, st.st_ino) not in self.victim_inodes, (
                    f"{p} is a hard link to a file outside the rootfs")
                assert p.read_bytes() != self.secret, f"{p} holds a victim's content"
        return rootfs

    def cleanup(self) -> None:
        for p in self.extra_host:
            if p.is_symlink() or p.is_file():
                p.unlink()


def _rel(base: Path, p: Path) -> str:
    return str(p.relative_to(base))


def _lstat_or_none(p: Path) -> tuple[Any, ...] | None:
    try:
        return _describe(p)
    except FileNotFoundError:
        return None


def _host_arch() -> str:
    from lamina.oci.model import Platform
    return Platform.host().architecture


def _show(r: subprocess.CompletedProcess[str]) -> str:
    return f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"


def _json_error(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines, f"no --json error on stdout\n{_show(r)}"
    payload = json.loads(lines[-1])
    assert isinstance(payload, dict), payload
    assert set(payload) >= {"error", "code", "message", "hint"}, payload
    return payload


@pytest.fixture
def arena(tmp_path: Path) -> Any:
    a = Arena(tmp_path)
    yield a
    a.cleanup()


def T(fmt: str = "pax") -> TarBuilder:
    return TarBuilder(fmt)


# ---------------------------------------------------------------------------
# table-driven cases
# ---------------------------------------------------------------------------

Validator = Callable[[Path, Arena], None]


@dataclass(frozen=True)
class Case:
    """*layers* builds the layer tars (bottom first).  Exactly one outcome:

    - ``code`` (non-zero): the unpack must fail with it, naming one of *names*;
    - ``ok``: the unpack must succeed and *ok(rootfs, arena)* must hold;
    - both: either outcome is acceptable (the contract leaves it open), but
      success must satisfy *ok* and failure must name the entry.
    """

    layers: Callable[[Arena], list[bytes]]
    ok: Validator | None = None
    code: int = 0
    names: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    compression: str = "gzip"
    extra: dict[str, Any] = field(default_factory=dict)


def run_case(arena: Arena, case: Case) -> None:
    arena.image(case.layers(arena), compression=case.compression, **case.extra)
    if case.code and case.ok is None:
        arena.expect_error(case.code, case.names, *case.args)
        return
    if case.code:  # either outcome
        before = arena._before()
        r = arena.unpack(*case.args)
        if r.returncode != 0:
            assert r.returncode == case.code, _show(r)
            payload = _json_error(r)
            assert any(n in payload["message"] for n in case.names), payload
            arena._check_outside(before, None)
            assert not arena.bundle.exists()
            return
        arena._check_outside(before, arena.bundle)
    else:
        arena.expect_ok(*case.args)
    assert case.ok is not None
    case.ok(arena.bundle / "rootfs", arena)


def unbroken(root: Path, _a: Arena) -> None:
    assert is_real_dir(root / "etc")
    assert is_plain_file(root / "etc/unbroken", UNBROKEN)


def same_file(f1: str, f2: str) -> Validator:
    """containerd's sameFile: both paths, resolved inside the rootfs, are one inode."""
    def check(root: Path, _a: Arena) -> None:
        p1, p2 = in_root(root, f1), in_root(root, f2)
        assert p1.exists() and p2.exists(), (p1, p2)
        assert os.path.samefile(p1, p2), f"{f1} and {f2} are different files"
    return check


def all_of(*checks: Validator) -> Validator:
    def check(root: Path, a: Arena) -> None:
        for c in checks:
            c(root, a)
    return check


def file_value(path: str, content: bytes) -> Validator:
    def check(root: Path, _a: Arena) -> None:
        assert is_plain_file(root / path, content), (path, (root / path).read_bytes())
    return check


def not_exists(path: str) -> Validator:
    def check(root: Path, _a: Arena) -> None:
        assert not (root / path).is_symlink() and not (root / path).exists(), path
    return check


def symlink_is(path: str, target: str) -> Validator:
    def check(root: Path, _a: Arena) -> None:
        assert is_symlink_to(root / path, target), (path, os.readlink(root / path))
    return check


def real_dir(path: str) -> Validator:
    def check(root: Path, _a: Arena) -> None:
        assert is_real_dir(root / path), f"{path} is not a real directory"
    return check


def one(t: TarBuilder) -> list[bytes]:
    return [t.build()]


def etc_passwd(t: TarBuilder, mode: int = 0o770) -> TarBuilder:
    return t.add_dir("etc", mode).add_file("/etc/passwd", INSIDE)


# ---------------------------------------------------------------------------
# containerd TestBreakouts
# ---------------------------------------------------------------------------
# tc.Symlink(oldname, newname) / tc.Link(oldname, newname) in the original take
# the *target* first; TarBuilder.add_symlink/add_hardlink take the entry name first.

CONTAINERD: dict[str, Case] = {
    "SymlinkAbsolute": Case(
        lambda a: one(T().add_dir("etc").add_symlink("localetc", "/etc")
                      .add_file("/localetc/unbroken", UNBROKEN)),
        ok=all_of(unbroken, symlink_is("localetc", "/etc"))),
    "SymlinkUpAndOut": Case(
        lambda a: one(T().add_dir("etc").add_dir("dummy")
                      .add_symlink("localetc", "/dummy/../etc")
                      .add_file("/localetc/unbroken", UNBROKEN)),
        ok=unbroken),
    "SymlinkMultipleAbsolute": Case(
        lambda a: one(T().add_dir("etc").add_dir("dummy").add_symlink("/dummy/etc", "/etc")
                      .add_symlink("localetc", "/dummy/etc")
                      .add_file("/dummy/etc/unbroken", UNBROKEN)),
        ok=unbroken),
    "SymlinkMultipleRelative": Case(
        lambda a: one(T().add_dir("etc").add_dir("dummy").add_symlink("/dummy/etc", "/etc")
                      .add_symlink("localetc", "./dummy/etc")
                      .add_file("/dummy/etc/unbroken", UNBROKEN)),
        ok=unbroken),
    "SymlinkEmptyFile": Case(
        lambda a: one(T().add_dir("etc").add_file("etc/emptied", b"notempty")
                      .add_symlink("localetc", "/etc").add_file("/localetc/emptied", b"")),
        ok=file_value("etc/emptied", b"")),
    "HardlinkRelative": Case(
        lambda a: one(etc_passwd(T()).add_dir("breakouts")
                      .add_symlink("breakouts/d1", "../../etc")
                      .add_hardlink("breakouts/mypasswd", "/breakouts/d1/passwd")),
        ok=all_of(same_file("/breakouts/mypasswd", "/etc/passwd"),
                  file_value("breakouts/mypasswd", INSIDE))),
    "HardlinkDownAndOut": Case(
        lambda a: one(etc_passwd(T()).add_dir("breakouts").add_dir("downandout")
                      .add_symlink("breakouts/d1", "../downandout/../../etc")
                      .add_hardlink("breakouts/mypasswd", "/breakouts/d1/passwd")),
        ok=same_file("/breakouts/mypasswd", "/etc/passwd")),
    "HardlinkAbsolute": Case(
        lambda a: one(etc_passwd(T()).add_symlink("localetc", "/etc")
                      .add_hardlink("localpasswd", "/localetc/passwd")),
        ok=same_file("localpasswd", "/etc/passwd")),
    "HardlinkRelativeLong": Case(
        lambda a: one(etc_passwd(T()).add_symlink("localetc", "../../../../../../../etc")
                      .add_hardlink("localpasswd", "/localetc/passwd")),
        ok=same_file("localpasswd", "/etc/passwd")),
    # 'upandout' does not exist: containerd resolves 'upandout/..' lexically (success),
    # openat2(RESOLVE_IN_ROOT) fails with ENOENT; either is safe, so either is accepted
    "HardlinkRelativeUpAndOut": Case(
        lambda a: one(etc_passwd(T()).add_symlink("localetc", "upandout/../../../etc")
                      .add_hardlink("localpasswd", "/localetc/passwd")),
        ok=same_file("localpasswd", "/etc/passwd"), code=EXIT_UNSAFE,
        names=("localpasswd", "/localetc/passwd")),
    # lamina refuses '..' in a hardlink target outright (containerd clamps it)
    "HardlinkDirectRelative": Case(
        lambda a: one(etc_passwd(T()).add_hardlink("localpasswd",
                                                   "../../../../../etc/passwd")),
        code=EXIT_UNSAFE, names=("localpasswd", "../../../../../etc/passwd")),
    "HardlinkDirectAbsolute": Case(
        lambda a: one(etc_passwd(T()).add_hardlink("localpasswd", "/etc/passwd")),
        ok=all_of(same_file("localpasswd", "/etc/passwd"),
                  file_value("localpasswd", INSIDE))),
    # a member named '..' (containerd skips it): lamina refuses any '..' component
    "SymlinkParentDirectory": Case(
        lambda a: one(etc_passwd(T()).add_symlink("..", "/etc/")
                      .add_hardlink("localpasswd", "/etc/passwd")),
        code=EXIT_UNSAFE, names=("'..'",)),
    # a member named '' is the root itself: a symlink cannot replace it
    "SymlinkEmptyFilename": Case(
        lambda a: one(etc_passwd(T()).add_symlink("", "/etc/")
                      .add_hardlink("localpasswd", "/etc/passwd")),
        code=EXIT_UNSAFE, names=("''",)),
    "SymlinkParentRelative": Case(
        lambda a: one(etc_passwd(T()).add_symlink("localetc/sub/..", "/etc/")
                      .add_hardlink("/localetc/localpasswd", "/etc/passwd")),
        code=EXIT_UNSAFE, names=("localetc/sub/..",)),
    "SymlinkSlashEnded": Case(
        lambda a: one(etc_passwd(T()).add_dir("localetc/", 0o770)
                      .add_hardlink("/localetc/localpasswd", "/etc/passwd")),
        ok=all_of(real_dir("localetc"), same_file("/localetc/localpasswd", "/etc/passwd"))),
    "SymlinkOverrideDirectory": Case(
        lambda a: [etc_passwd(T(), 0o755).add_dir("localetc").build(),
                   T().add_symlink("localetc", "/etc")
                   .add_hardlink("/localetc/localpasswd", "/etc/passwd").build()],
        ok=all_of(symlink_is("localetc", "/etc"),
                  same_file("/localetc/localpasswd", "/etc/passwd"),
                  same_file("/etc/localpasswd", "/etc/passwd"))),
    "SymlinkOverrideDirectoryRelative": Case(
        lambda a: [etc_passwd(T(), 0o755).add_dir("localetc").build(),
                   T().add_symlink("localetc", "../../etc")
                   .add_hardlink("/localetc/localpasswd", "/etc/passwd").build()],
        ok=all_of(symlink_is("localetc", "../../etc"),
                  same_file("/etc/localpasswd", "/etc/passwd"))),
    "DirectoryOverrideSymlink": Case(
        lambda a: [etc_passwd(T(), 0o755).add_symlink("localetc", "/etc").build(),
                   T().add_dir("/localetc/")
                   .add_hardlink("/localetc/localpasswd", "/etc/passwd").build()],
        ok=all_of(real_dir("localetc"), same_file("/localetc/localpasswd", "/etc/passwd"),
                  not_exists("etc/localpasswd"))),
    "DirectoryOverrideSymlink-keep-dirlinks": Case(
        lambda a: [etc_passwd(T(), 0o755).add_symlink("localetc", "/etc").build(),
                   T().add_dir("/localetc/")
                   .add_hardlink("/localetc/localpasswd", "/etc/passwd").build()],
        args=("--keep-dirlinks",),
        ok=all_of(symlink_is("localetc", "/etc"),
                  same_file("/etc/localpasswd", "/etc/passwd"))),
    "DirectoryOverrideSymlinkAndHardlink": Case(
        lambda a: [etc_passwd(T(), 0o755).add_symlink("localetc", "etc")
                   .add_hardlink("/localetc/localpasswd", "/etc/passwd").build(),
                   T().add_dir("/localetc/")
                   .add_file("/localetc/localpasswd", b"different").build()],
        ok=all_of(real_dir("localetc"), file_value("localetc/localpasswd", b"different"),
                  file_value("etc/passwd", INSIDE), file_value("etc/localpasswd", INSIDE))),
    # the same through a kept directory symlink: the new file replaces the lower
    # hard link etc/localpasswd and must not be written *into* etc/passwd's inode
    "DirectoryOverrideSymlinkAndHardlink-keep-dirlinks": Case(
        lambda a: [etc_passwd(T(), 0o755).add_symlink("localetc", "etc")
                   .add_hardlink("/localetc/localpasswd", "/etc/passwd").build(),
                   T().add_dir("/localetc/")
                   .add_file("/localetc/localpasswd", b"different").build()],
        args=("--keep-dirlinks",),
        ok=all_of(symlink_is("localetc", "etc"),
                  file_value("etc/localpasswd", b"different"),
                  file_value("etc/passwd", INSIDE))),
    "WhiteoutRootParent": Case(
        lambda a: [etc_passwd(T(), 0o755).build(), T().add_file(".wh...", b"").build()],
        code=EXIT_UNSAFE, names=(".wh...",)),
    "WhiteoutParent": Case(
        lambda a: [etc_passwd(T(), 0o755).build(), T().add_file("etc/.wh...", b"").build()],
        code=EXIT_UNSAFE, names=("etc/.wh...",)),
    "WhiteoutRoot": Case(
        lambda a: [etc_passwd(T(), 0o755).build(), T().add_file(".wh..", b"").build()],
        code=EXIT_UNSAFE, names=(".wh..",)),
    "WhiteoutCurrentDirectory": Case(
        lambda a: [etc_passwd(T(), 0o755).build(), T().add_file("etc/.wh..", b"").build()],
        code=EXIT_UNSAFE, names=("etc/.wh..",)),
    "WhiteoutSymlink": Case(
        lambda a: [T().add_dir("etc").add_file("etc/passwd", b"all users")
                   .add_symlink("localetc", "/etc").build(),
                   T().add_file(".wh.localetc", b"").build()],
        ok=all_of(file_value("etc/passwd", b"all users"), not_exists("localetc"))),
    "WhiteoutSymlinkPath": Case(
        lambda a: [T().add_dir("etc").add_file("etc/passwd", b"all users")
                   .add_file("etc/whitedout", b"ahhhh whiteout")
                   .add_symlink("localetc", "/etc").build(),
                   T().add_file("localetc/.wh.whitedout", b"").build()],
        ok=all_of(file_value("etc/passwd", b"all users"), not_exists("etc/whitedout"))),
    # the same through a symlink to a host path: only the rootfs copy may go
    "WhiteoutSymlinkPath-hostpath": Case(
        lambda a: [T().add_file(a.landing("abs") + "/hello", INSIDE_HELLO)
                   .add_symlink("localvictim", a.spell("abs")).build(),
                   T().add_file("localvictim/.wh.hello", b"").build()],
        ok=lambda root, a: not_exists(a.landing("abs") + "/hello")(root, a)),
    # containerd creates '.wh.etc/somefile' literally; lamina refuses a whiteout
    # name used as a directory
    "WhiteoutDirectoryName": Case(
        lambda a: [T().add_dir("etc").add_file("etc/passwd", b"all users")
                   .add_file("etc/whitedout", b"ahhhh whiteout")
                   .add_symlink("localetc", "/etc").build(),
                   T().add_file(".wh.etc/somefile", b"non-empty").build()],
        code=EXIT_UNSAFE, names=(".wh.etc/somefile",)),
    "WhiteoutDeadSymlinkParent": Case(
        lambda a: [T().add_dir("etc").add_file("etc/passwd", b"all users")
                   .add_symlink("localetc", "/dne").build(),
                   T().add_file("localetc/.wh.etc", b"").build()],
        ok=all_of(file_value("etc/passwd", b"all users"), symlink_is("localetc", "/dne"))),
    # containerd resolves 'dne/../.wh.etc' to a whiteout of /etc; lamina refuses '..'
    "WhiteoutRelativePath": Case(
        lambda a: [T().add_dir("etc").add_file("etc/passwd", b"all users")
                   .add_symlink("localetc", "/dne").build(),
                   T().add_file("dne/../.wh.etc", b"").build()],
        code=EXIT_UNSAFE, names=("dne/../.wh.etc",)),
    "SymlinkOverridePath": Case(
        lambda a: one(T().add_dir("foo").add_dir("foo/tmp")
                      .add_file(f"foo/tmp/{a.tmp_name}", bytes([0, 1, 2]))
                      .add_symlink("foo", "/")
                      .add_file(f"foo/tmp/{a.tmp_name}", bytes([3, 4, 5]))
                      .add_dir("foo").add_dir("foo/tmp")
                      .add_file(f"foo/tmp/{a.tmp_name}", bytes([6, 7, 8]))),
        ok=lambda root, a: all_of(
            file_value(f"foo/tmp/{a.tmp_name}", bytes([6, 7, 8])),
            real_dir("foo"),
            # the write through foo -> / landed in the rootfs's own /tmp
            file_value(f"tmp/{a.tmp_name}", bytes([3, 4, 5])))(root, a)),
    "HardlinkSymlinkBeforeCreateTarget": Case(
        lambda a: one(T().add_dir("etc", 0o770).add_symlink("localpasswd", "/etc/passwd")
                      .add_hardlink("localpasswd-dup", "localpasswd")
                      .add_file("/etc/passwd", b"after")),
        ok=lambda root, a: (
            symlink_is("localpasswd-dup", "/etc/passwd")(root, a),
            same_file("localpasswd-dup", "/etc/passwd")(root, a),
            file_value("etc/passwd", b"after")(root, a),
            _assert(same_inode(root / "localpasswd", root / "localpasswd-dup")))),
    "HardlinkSymlinkRelative": Case(
        lambda a: one(etc_passwd(T()).add_symlink("passwdlink", "../../../../../etc/passwd")
                      .add_hardlink("localpasswd", "/passwdlink")),
        ok=all_of(symlink_is("localpasswd", "../../../../../etc/passwd"),
                  symlink_is("passwdlink", "../../../../../etc/passwd"),
                  same_file("/localpasswd", "/etc/passwd"))),
    "HardlinkSymlinkAbsolute": Case(
        lambda a: one(etc_passwd(T()).add_symlink("passwdlink", "/etc/passwd")
                      .add_hardlink("localpasswd", "/passwdlink")),
        ok=all_of(symlink_is("localpasswd", "/etc/passwd"),
                  symlink_is("passwdlink", "/etc/passwd"),
                  same_file("/localpasswd", "/etc/passwd"))),
    # host paths on both ends: the symlink lands inside the rootfs, the hard link
    # links that symlink, and nothing chmods the host's 0400 file
    "HardlinkSymlinkChmod": Case(
        lambda a: one(T().add_symlink(str(a.outside_root), str(a.perm400))
                      .add_hardlink("sketchylink", str(a.outside_root))),
        ok=lambda root, a: (
            symlink_is("sketchylink", str(a.perm400))(root, a),
            _assert(same_inode(root / "sketchylink",
                               root / str(a.outside_root).lstrip("/"))),
            _assert(stat.S_IMODE(a.perm400.lstat().st_mode) == 0o400))),
    # lamina variant: the symlink targets a host directory by absolute path
    "SymlinkAbsolute-hostpath": Case(
        lambda a: one(T().add_symlink("localvictim", a.spell("abs"))
                      .add_file("localvictim/unbroken", UNBROKEN)),
        ok=lambda root, a: file_value(a.landing("abs") + "/unbroken", UNBROKEN)(root, a)),
}


def _assert(cond: bool) -> None:
    assert cond


@pytest.mark.parametrize("case", [pytest.param(c, id=f"containerd-{n}")
                                  for n, c in CONTAINERD.items()])
def test_containerd_breakouts(arena: Arena, case: Case) -> None:
    run_case(arena, case)


# ---------------------------------------------------------------------------
# moby: TestUntarInvalidFilenames / TestApplyLayerInvalidFilenames,
# TestUntarParentTraversalContained
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    pytest.param("../victim/dotdot", id="moby-TestUntarInvalidFilenames-0"),
    pytest.param("/../victim/slash-dotdot", id="moby-TestUntarInvalidFilenames-1"),
    pytest.param("../../victim/dotdot", id="lamina-InvalidFilenames-dotdot2"),
    pytest.param("../../../victim/dotdot", id="lamina-InvalidFilenames-dotdot3"),
    pytest.param("..", id="moby-TestUntarParentTraversalContained-bare-parent"),
    pytest.param("../pwned", id="moby-TestUntarParentTraversalContained-parent-child"),
    pytest.param("../../pwned", id="moby-TestUntarParentTraversalContained-nested-parent"),
    pytest.param("etc/../../pwned", id="lamina-InvalidFilenames-inner-dotdot"),
    pytest.param("./../pwned", id="lamina-InvalidFilenames-dot-dotdot"),
])
@pytest.mark.parametrize("lower", [False, True], ids=["untar", "applylayer"])
def test_moby_invalid_filenames(arena: Arena, name: str, lower: bool) -> None:
    layers = [T().add_file("victim/hello", INSIDE_HELLO).build()] if lower else []
    layers.append(T().add_file(name, b"bad").build())
    arena.image(layers)
    arena.expect_error(EXIT_UNSAFE, [name])


# ---------------------------------------------------------------------------
# moby: TestUntarInvalidHardlink / TestApplyLayerInvalidHardlink and
# TestUntarInvalidSymlink / TestApplyLayerInvalidSymlink
#
# The victim directory is spelt '../victim' (as in moby), '../../victim' and
# '../../../victim' (reaching the real sentinels next to and above the
# bundle) and as an absolute host path.  'applylayer' adds a lower layer with
# a 'hello' where the spelling resolves inside the rootfs.
# ---------------------------------------------------------------------------

SPELLINGS = ["dotdot1", "dotdot2", "dotdot3", "abs"]
Headers = Callable[[str], TarBuilder]

HARDLINK_CASES: list[Headers] = [
    lambda v: T().add_hardlink("dotdot", v + "/hello"),
    lambda v: T().add_hardlink("slash-dotdot", "/" + v + "/hello"),
    lambda v: T().add_hardlink("loophole-victim", v, 0o755)
                 .add_file("loophole-victim/file", b""),
    lambda v: T().add_hardlink("loophole-victim", v, 0o755)
                 .add_symlink("symlink", "loophole-victim/hello"),
    lambda v: T().add_hardlink("loophole-victim", v, 0o755)
                 .add_hardlink("hardlink", "loophole-victim/hello"),
    lambda v: T().add_hardlink("loophole-victim", v, 0o755).add_file("loophole-victim", b""),
]
HARDLINK_NAMES = [("dotdot",), ("slash-dotdot",)] + [("loophole-victim",)] * 4


def _layers(a: Arena, how: str, lower: bool, t: TarBuilder) -> None:
    layers = []
    if lower:
        layers.append(T().add_file(a.landing(how) + "/hello", INSIDE_HELLO).build())
    layers.append(t.build())
    a.image(layers)


@pytest.mark.parametrize("how", SPELLINGS)
@pytest.mark.parametrize("lower", [False, True], ids=["Untar", "ApplyLayer"])
@pytest.mark.parametrize("i", range(len(HARDLINK_CASES)))
def test_moby_invalid_hardlink(arena: Arena, i: int, lower: bool, how: str) -> None:
    """moby-Test{Untar,ApplyLayer}InvalidHardlink-<i>."""
    v = arena.spell(how)
    _layers(arena, how, lower, HARDLINK_CASES[i](v))
    names = (*HARDLINK_NAMES[i], v)
    if how != "abs" or not lower or i >= 2:
        # '..' in a hardlink target, or (absolute) a target that is missing
        # from the rootfs or is a directory: refused
        arena.expect_error(EXIT_UNSAFE, names)
        return
    # absolute host path to a file that also exists inside the rootfs: the link
    # is resolved inside the rootfs, to the lower layer's file
    root = arena.expect_ok()
    name = HARDLINK_NAMES[i][0]
    assert is_plain_file(root / name, INSIDE_HELLO)
    assert same_inode(root / name, root / arena.landing(how) / "hello")


SYMLINK_CASES: list[Headers] = [
    lambda v: T().add_symlink("dotdot", v + "/hello", 0o644),
    lambda v: T().add_symlink("slash-dotdot", "/" + v + "/hello", 0o644),
    lambda v: T().add_symlink("loophole-victim", v, 0o755)
                 .add_file("loophole-victim/file", b""),
    lambda v: T().add_symlink("loophole-victim", v, 0o755)
                 .add_symlink("symlink", "loophole-victim/hello", 0o644),
    lambda v: T().add_symlink("loophole-victim", v, 0o755)
                 .add_hardlink("hardlink", "loophole-victim/hello"),
    lambda v: T().add_symlink("loophole-victim", v, 0o755).add_file("loophole-victim", b""),
    lambda v: T().add_symlink("dir/loophole", "../" + v, 0o755)
                 .add_file("dir/loophole/newdir/newfile", b""),
]


@pytest.mark.parametrize("how", SPELLINGS)
@pytest.mark.parametrize("lower", [False, True], ids=["Untar", "ApplyLayer"])
@pytest.mark.parametrize("i", range(len(SYMLINK_CASES)))
def test_moby_invalid_symlink(arena: Arena, i: int, lower: bool, how: str) -> None:
    """moby-Test{Untar,ApplyLayer}InvalidSymlink-<i> (case 6 is Untar-only in moby).

    Symlink targets are stored verbatim; everything written *through* them
    must land inside the rootfs ('..' clamps at the rootfs root).
    """
    v = arena.spell(how)
    land = arena.landing(how)
    _layers(arena, how, lower, SYMLINK_CASES[i](v))
    if i == 4 and not lower:
        # hardlink through the loophole to a file that does not exist in the rootfs
        arena.expect_error(EXIT_UNSAFE, ("hardlink", "loophole-victim/hello"))
        return
    root = arena.expect_ok()
    if lower:
        assert is_plain_file(root / land / "hello", INSIDE_HELLO)
    if i == 0:
        assert is_symlink_to(root / "dotdot", v + "/hello")
    elif i == 1:
        assert is_symlink_to(root / "slash-dotdot", "/" + v + "/hello")
    elif i == 2:
        assert is_symlink_to(root / "loophole-victim", v)
        assert is_plain_file(root / land / "file", b"")
    elif i == 3:
        assert is_symlink_to(root / "symlink", "loophole-victim/hello")
    elif i == 4:
        assert is_plain_file(root / "hardlink", INSIDE_HELLO)
        assert same_inode(root / "hardlink", root / land / "hello")
    elif i == 5:
        assert is_plain_file(root / "loophole-victim", b"")
    else:
        assert is_symlink_to(root / "dir/loophole", "../" + v)
        assert is_plain_file(root / land / "newdir/newfile", b"")


# ---------------------------------------------------------------------------
# moby: the other single-purpose tests
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", SPELLINGS)
def test_moby_TestUntarSymlinkBreakout(arena: Arena, how: str) -> None:
    """Two hops: inner/go_up -> '..' makes inner/go_up/escape land at the root."""
    v = arena.spell(how)
    arena.image(one(T().add_dir("inner").add_symlink("inner/go_up", "..")
                    .add_symlink("inner/go_up/escape", v)
                    .add_file("inner/go_up/escape/newfile", b"")))
    root = arena.expect_ok()
    assert is_symlink_to(root / "inner/go_up", "..")
    assert is_symlink_to(root / "escape", v)
    assert is_plain_file(root / arena.landing(how) / "newfile", b"")


@pytest.mark.parametrize("target", [
    pytest.param("../bundle-evil/secret", id="moby-TestUntarSiblingPrefixContained"),
    pytest.param("../../bundle-evil/secret", id="lamina-SiblingPrefix-dotdot2"),
    pytest.param("ABS", id="lamina-SiblingPrefix-abs"),
])
def test_moby_sibling_prefix_contained(arena: Arena, target: str) -> None:
    if target == "ABS":
        target = str(arena.sibling / "secret")
    arena.image(one(T().add_hardlink("grab", target)))
    arena.expect_error(EXIT_UNSAFE, ("grab", target))


@pytest.mark.parametrize("target", [
    pytest.param("regfile", id="moby-TestUntarHardlinkToSymlink"),
    pytest.param("VICTIM", id="lamina-HardlinkToSymlink-outside"),
])
def test_moby_TestUntarHardlinkToSymlink(arena: Arena, target: str) -> None:
    if target == "VICTIM":
        target = arena.spell("abs") + "/hello"
    arena.image(one(T().add_symlink("symlink1", target, 0o644)
                    .add_hardlink("symlink2", "symlink1")
                    .add_file("regfile", b"")))
    root = arena.expect_ok()
    assert is_symlink_to(root / "symlink2", target)
    assert same_inode(root / "symlink1", root / "symlink2")
    assert is_plain_file(root / "regfile", b"")


def test_moby_TestUntarAbsoluteHardlink(arena: Arena) -> None:
    arena.image(one(T().add_file("usr/bin/perlbug", b"hello", 0o755)
                    .add_hardlink("usr/bin/perlthanks", "/usr/bin/perlbug", 0o755)))
    root = arena.expect_ok()
    assert same_inode(root / "usr/bin/perlbug", root / "usr/bin/perlthanks")
    assert is_plain_file(root / "usr/bin/perlthanks", b"hello")


def test_moby_TestTypeXGlobalHeaderDoesNotFail(arena: Arena) -> None:
    arena.image(one(T().add_pax_global({"comment": "made by git archive"})
                    .add_file("a", b"a")))
    root = arena.expect_ok()
    assert listing(root) == ["a"]


def test_moby_TestXGlobalNoParent(arena: Arena) -> None:
    arena.image(one(T().add_pax_global({"comment": "x"}, name="foo/bar")))
    root = arena.expect_ok()
    assert listing(root) == []


@pytest.mark.parametrize("existing", [True, False], ids=["existing-target", "missing-target"])
@pytest.mark.parametrize("how", ["run", "abs"])
def test_moby_TestUntarThroughAbsoluteSymlink(arena: Arena, existing: bool, how: str) -> None:
    """var/run -> /run (or a host path): later writes through it stay in the rootfs."""
    run = "/run" if how == "run" else arena.spell("abs")
    land = "run" if how == "run" else arena.landing("abs")
    lower = T().add_dir("var").add_symlink("var/run", run)
    if existing:
        lower.add_dir(land + "/existing")
    arena.image([lower.build(),
                 T().add_file("var/run/existing/non-existing/file", b"content").build()])
    root = arena.expect_ok()
    assert is_symlink_to(root / "var/run", run)
    assert is_plain_file(root / land / "existing/non-existing/file", b"content")


@pytest.mark.parametrize("how", ["target", "abs"])
def test_moby_TestUnpackRejectsRelativeEscapeBeforeAbsoluteSymlink(arena: Arena,
                                                                   how: str) -> None:
    """escape -> '..', absolute -> /target: moby (os.Root) refuses 'escape/absolute/file';
    lamina clamps '..' at the rootfs root, so the file lands in rootfs/target."""
    target = "/target" if how == "target" else arena.spell("abs")
    land = "target" if how == "target" else arena.landing("abs")
    arena.image([T().add_dir(land).add_symlink("escape", "..")
                 .add_symlink("absolute", target).build(),
                 T().add_file("escape/absolute/file", b"").build()])
    root = arena.expect_ok()
    assert is_plain_file(root / land / "file", b"")
    assert is_symlink_to(root / "escape", "..")


def test_moby_TestHardlinkSourceThroughAbsoluteSymlink(arena: Arena) -> None:
    arena.image([T().add_dir("var").add_symlink("var/run", "/run").build(),
                 T().add_file("var/run/source", b"content")
                 .add_hardlink("var/run/link", "var/run/source").build()])
    root = arena.expect_ok()
    assert is_plain_file(root / "run/link", b"content")
    assert same_inode(root / "run/source", root / "run/link")
    assert (root / "run/source").lstat().st_nlink == 2


def test_moby_TestUnpackLayerCreatesImpliedDirectoriesThroughLowerLayerSymlink(
        arena: Arena) -> None:
    arena.image([T().add_dir("usr").add_dir("usr/lib").add_symlink("lib", "usr/lib").build(),
                 T().add_file("lib/systemd/system/container.service", b"content").build()])
    root = arena.expect_ok()
    assert is_symlink_to(root / "lib", "usr/lib")
    assert is_plain_file(root / "usr/lib/systemd/system/container.service", b"content")


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh..."])
def test_moby_TestOverlayUntarInvalidWhiteoutNames(arena: Arena, name: str) -> None:
    arena.image([T().add_file("keep", b"x").build(), T().add_file(name, b"", 0o600).build()])
    arena.expect_error(EXIT_UNSAFE, [name])


_WHITEOUT_BASE = [".baz", "bar/", "bar/bax", "bar/bay/", "baz", "foo/", "foo/.abc",
                  "foo/.bcd/", "foo/.bcd/a", "foo/cde/", "foo/cde/def", "foo/cde/efg",
                  "foo/fgh", "foobar"]
_WHITEOUT_TCASES = [
    (_WHITEOUT_BASE, _WHITEOUT_BASE),
    ([".bay", ".wh.baz", "foo/", "foo/.bce", "foo/.wh..wh..opq", "foo/cde/", "foo/cde/efg"],
     [".bay", ".baz", "bar/", "bar/bax", "bar/bay/", "foo/", "foo/.bce", "foo/cde/",
      "foo/cde/efg", "foobar"]),
    ([".bay", ".wh..baz", ".wh.foobar", "foo/", "foo/.abc", "foo/.wh.cde", "bar/"],
     [".bay", "bar/", "bar/bax", "bar/bay/", "foo/", "foo/.abc", "foo/.bce"]),
    ([".abc", ".wh..wh..opq", "foobar"], [".abc", "foobar"]),
]


@pytest.mark.parametrize("n", range(1, len(_WHITEOUT_TCASES) + 1))
def test_moby_TestApplyLayerWhiteouts(arena: Arena, n: int) -> None:
    """The first *n* change sets of moby's table as layers; listing after the n-th."""
    layers = []
    for change, _ in _WHITEOUT_TCASES[:n]:
        t = T()
        for p in change:
            if p.endswith("/"):
                t.add_dir(p, 0o700)
            else:
                t.add_file(p, b"", 0o600)
        layers.append(t.build())
    arena.image(layers)
    root = arena.expect_ok()
    assert listing(root) == sorted(_WHITEOUT_TCASES[n - 1][1])


# ---------------------------------------------------------------------------
# lamina: forged and corrupt blobs (exit 5 / 6)
# ---------------------------------------------------------------------------

def _benign_tar() -> bytes:
    return (T().add_dir("etc").add_file("etc/hostname", b"box\n")
            .add_file("big", secrets.token_bytes(64 << 10)).add_file("z", b"z").build())


def _diff_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_lamina_corrupt_gzip_garbage(arena: Arena) -> None:
    tar = _benign_tar()
    gz = bytearray(gzip.compress(tar, mtime=0))
    for i in range(40, min(len(gz) - 8, 400)):
        gz[i] ^= 0x5A
    arena.raw_image([(bytes(gz), mt.LAYER_GZIP, _diff_id(tar))])
    arena.expect_error(EXIT_CORRUPT)


def test_lamina_corrupt_gzip_not_gzip(arena: Arena) -> None:
    tar = _benign_tar()
    arena.raw_image([(tar, mt.LAYER_GZIP, _diff_id(tar))])
    arena.expect_error(EXIT_CORRUPT)


def test_lamina_corrupt_gzip_truncated(arena: Arena) -> None:
    tar = _benign_tar()
    gz = gzip.compress(tar, mtime=0)
    arena.raw_image([(gz[:len(gz) // 2], mt.LAYER_GZIP, _diff_id(tar))])
    arena.expect_error(EXIT_CORRUPT)


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("where", ["mid-file", "mid-header", "after-header"])
def test_lamina_truncated_tar(arena: Arena, where: str, compression: str) -> None:
    tar = _benign_tar()
    big = tar.find(b"big\0")
    assert big > 0 and big % 512 == 0
    cut = {"mid-file": big + 512 + 30_000, "mid-header": big + 100,
           "after-header": big + 512}[where]
    t = tar[:cut]
    media = mt.COMPRESSION_LAYER_TYPE[compression]
    arena.raw_image([(compress(t, compression), media, _diff_id(t))])
    arena.expect_error(EXIT_CORRUPT)


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_lamina_blob_digest_mismatch(arena: Arena, compression: str) -> None:
    tar = _benign_tar()
    arena.image([tar], compression=compression)
    blob = Path(OCILayout(str(arena.layout)).blob_path(_diff_id(compress(tar, compression))))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF     # same size, different digest
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    arena.expect_error(EXIT_DIGEST)


def test_lamina_diff_id_mismatch(arena: Arena) -> None:
    tar = _benign_tar()
    arena.image([tar], extra_config={"rootfs": {"type": "layers",
                                                "diff_ids": ["sha256:" + "ab" * 32]}})
    arena.expect_error(EXIT_DIGEST)


def test_lamina_bad_tar_checksum(arena: Arena) -> None:
    t = T().add_file("ok", b"ok")
    t.add_raw(header_block(name="bad-checksum", size=0, checksum=12345))
    arena.image([t.build()])
    arena.expect_error(EXIT_CORRUPT)


# ---------------------------------------------------------------------------
# lamina: hostile names and headers
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["path", "linkpath"])
def test_lamina_pax_nul(arena: Arena, key: str) -> None:
    if key == "path":
        e = RawEntry("innocent", pax={"path": b"etc/pass\x00wd"})
    else:
        e = RawEntry("innocent", b"2", linkname="x", pax={"linkpath": b"/etc/pass\x00wd"})
    arena.image(one(T().add_dir("etc").add_raw(e)))
    arena.expect_error(EXIT_UNSAFE, ["pass", "innocent"])


@pytest.mark.parametrize("name", [
    pytest.param(".wh.", id="wh-alone"),
    pytest.param(".wh..", id="wh-dot"),
    pytest.param(".wh...", id="wh-dotdot"),
    pytest.param("etc/.wh.", id="nested-wh-alone"),
    pytest.param("etc/.wh...", id="nested-wh-dotdot"),
    pytest.param(".wh.x/y", id="wh-dir-component"),
    pytest.param("etc/.wh.x/y/z", id="nested-wh-dir-component"),
])
def test_lamina_hostile_whiteout_names(arena: Arena, name: str) -> None:
    arena.image([T().add_dir("etc").add_file("etc/passwd", INSIDE).add_dir("x").build(),
                 T().add_file(name, b"").build()])
    arena.expect_error(EXIT_UNSAFE, [name])


def test_lamina_aufs_metadata_ignored(arena: Arena) -> None:
    arena.image([T().add_file("keep", b"x").build(),
                 T().add_file(".wh..wh.aufs", b"").add_dir(".wh..wh.plnk")
                 .add_file("new", b"y").build()])
    root = arena.expect_ok()
    assert listing(root) == ["keep", "new"]


def _limit_memory() -> None:
    # a reader that believed the header would need gigabytes: make that fatal
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


@pytest.mark.parametrize("kind", ["pax-declared-8GiB", "pax-real-2MiB",
                                  "gnu-longname-declared-4GiB", "gnu-longlink-real-2MiB"])
def test_lamina_huge_extended_header(arena: Arena, kind: str) -> None:
    t = T().add_file("ok", b"ok")
    if kind == "pax-declared-8GiB":
        t.add_raw(header_block(name="././@PaxHeader", typeflag=XHDTYPE, size=8 << 30))
        t.add_raw(b"30 path=aaaaaaaaaaaaaaaaaaaaa\n".ljust(512, b"\0"))
    elif kind == "pax-real-2MiB":
        t.add_raw(RawEntry("f", pax={"comment": "A" * (2 << 20)}))
    elif kind == "gnu-longname-declared-4GiB":
        t.add_raw(header_block(name="././@LongLink", typeflag=b"L", size=4 << 30, gnu=True))
        t.add_raw(b"a" * 512)
    else:
        t = T("gnu").add_file("ok", b"ok").add_symlink("l", "x/" * (1 << 20))
    arena.image([t.build()])
    arena.expect_error(EXIT_CORRUPT, preexec_fn=_limit_memory)


# ---------------------------------------------------------------------------
# lamina: hardlinks
# ---------------------------------------------------------------------------

def test_lamina_hardlink_dotdot_etc_passwd(arena: Arena) -> None:
    arena.image([etc_passwd(T()).build(), T().add_hardlink("evil", "../../etc/passwd").build()])
    arena.expect_error(EXIT_UNSAFE, ("evil", "../../etc/passwd"))


def test_lamina_hardlink_abs_etc_passwd_inside(arena: Arena) -> None:
    arena.image([etc_passwd(T()).build(), T().add_hardlink("evil", "/etc/passwd").build()])
    root = arena.expect_ok()
    assert same_inode(root / "evil", root / "etc/passwd")
    assert is_plain_file(root / "evil", INSIDE)


def test_lamina_hardlink_abs_etc_passwd_missing(arena: Arena) -> None:
    arena.image([T().add_dir("etc").build(), T().add_hardlink("evil", "/etc/passwd").build()])
    arena.expect_error(EXIT_UNSAFE, ("evil", "/etc/passwd"))


def test_lamina_hardlink_abs_host_file(arena: Arena) -> None:
    target = str(arena.victim / "hello")
    arena.image(one(T().add_hardlink("evil", target)))
    arena.expect_error(EXIT_UNSAFE, ("evil", target))


@pytest.mark.parametrize("target", ["d", "/d", "d/", "/", ".", "sub/..", "dlink/../d"])
def test_lamina_hardlink_to_directory(arena: Arena, target: str) -> None:
    arena.image([T().add_dir("d").add_symlink("dlink", "d").build(),
                 T().add_hardlink("x", target).build()])
    payload = arena.expect_error(EXIT_UNSAFE)
    assert "x" in payload["message"] or target in payload["message"], payload


def test_lamina_hardlink_to_itself(arena: Arena) -> None:
    arena.image(one(T().add_hardlink("selfish", "selfish")))
    arena.expect_error(EXIT_UNSAFE, ["selfish"])


# ---------------------------------------------------------------------------
# lamina: symlink loops must fail cleanly, not hang
# ---------------------------------------------------------------------------

def _chain(t: TarBuilder, n: int) -> TarBuilder:
    for i in range(n):
        t.add_symlink(f"c{i}", f"c{i + 1}")
    return t


LOOPS: dict[str, tuple[Callable[[], TarBuilder], str]] = {
    "two-cycle": (lambda: T().add_symlink("a", "b").add_symlink("b", "a"), "a/x"),
    "self": (lambda: T().add_symlink("self", "self"), "self/x"),
    "absolute-self": (lambda: T().add_symlink("abs", "/abs"), "abs/x"),
    "growing": (lambda: T().add_symlink("g", "/g/g"), "g/x"),
    "dotdot-cycle": (lambda: T().add_dir("d").add_symlink("d/up", "../d/up"), "d/up/x"),
    "chain-of-60": (lambda: _chain(T(), 60).add_dir("c60"), "c0/x"),
}


@pytest.mark.parametrize("how", ["file", "dir", "hardlink-target", "whiteout"])
@pytest.mark.parametrize("loop", list(LOOPS))
def test_lamina_symlink_loop(arena: Arena, loop: str, how: str) -> None:
    build, path = LOOPS[loop]
    t = build()
    if how == "file":
        t.add_file(path, b"x")
        name = path
    elif how == "dir":
        t.add_dir(path)
        name = path
    elif how == "hardlink-target":
        t.add_hardlink("h", path)
        name = "h"
    else:
        # a whiteout below a loop: refusing it or treating it as a no-op are both safe
        arena.image([build().build(), T().add_whiteout(path).build()])
        before = arena._before()
        r = arena.unpack()
        assert r.returncode in (0, EXIT_UNSAFE), _show(r)
        arena._check_outside(before, arena.bundle if r.returncode == 0 else None)
        return
    arena.image(one(t))
    arena.expect_error(EXIT_UNSAFE, [name, path])


# ---------------------------------------------------------------------------
# lamina: the bundle path on failure, and the human-readable error
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("hostile", ["dotdot-name", "symlink-loop", "truncated"])
def test_lamina_failure_keeps_precreated_empty_bundle(arena: Arena, hostile: str) -> None:
    if hostile == "dotdot-name":
        arena.image([T().add_file("ok", b"ok").build(),
                     T().add_file("a", b"a").add_file("../../victim/hello", b"pwned").build()])
        code = EXIT_UNSAFE
    elif hostile == "symlink-loop":
        arena.image(one(T().add_file("ok", b"ok").add_symlink("a", "b").add_symlink("b", "a")
                        .add_file("a/x", b"x")))
        code = EXIT_UNSAFE
    else:
        t = _benign_tar()
        arena.raw_image([(t[:len(t) // 2], mt.LAYER_TAR, _diff_id(t[:len(t) // 2]))])
        code = EXIT_CORRUPT
    arena.bundle.mkdir()
    arena.expect_error(code)
    assert is_real_dir(arena.bundle) and os.listdir(arena.bundle) == []


def test_lamina_human_error_names_entry(arena: Arena) -> None:
    arena.image(one(T().add_file("../pwned", b"x")))
    r = run_lamina(["unpack", "--image", f"{arena.layout}:{TAG}", str(arena.bundle)],
                   timeout=TIMEOUT, env={"COLUMNS": "500"})
    assert r.returncode == EXIT_UNSAFE, _show(r)
    assert "../pwned" in r.stderr, r.stderr
    assert not arena.bundle.exists()

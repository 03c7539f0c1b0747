#!/usr/bin/env python3
"""Store-backed drivers (objects, btrfs): warm vs cold unpack and disk used.

    python bench/drivers_store.py [--corpus DIR] [--workdir DIR] [--out BENCHMARKS.md]

Run by ``bench/drivers.py`` (its objects/btrfs rows) or alone, which writes
the section between <!-- bench:drivers-store:begin --> and
<!-- bench:drivers-store:end -->.  Needs root: every case runs on a
filesystem made for it on a loop device (xfs with reflink=1, ext4, btrfs),
so blocks are counted on a quiet filesystem (statvfs before/after, after a
sync) and nothing else shares it.  The corpus layout stays where it is;
the store and the bundles live on the loop filesystem.

Timed, once each (``lamina unpack --driver D --store S``):

* cold: empty store, image ``app`` from the layout (its 3 layers imported,
  then unpacked);
* warm: store holding ``base`` and ``py`` (imported, and one bundle of each
  made by the driver, so its extractions exist), unpack ``app``: only its
  top layer is new;
* near: ``app-opaque`` (``app`` plus a tiny layer) after ``app``;
* hot: ``app`` already in the store (a second bundle of it);
* copy: ``lamina unpack`` from the layout without a store (the reference).

Disk: ``base``, ``py`` and ``app`` unpacked once each, with the driver into
one store, against three ``lamina unpack`` copies on the same kind of
filesystem.  The store's blobs (the compressed layers, which the layout
holds too) are shown apart.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from common import (
    REPO,
    RunResult,
    find_corpus,
    lamina_cmd,
    machine_line,
    md_table,
    remove_tree,
    replace_section,
    run_measured,
)

SECTION = "drivers-store"
MiB = 1 << 20
IMAGES = ("base", "py", "app")

# (filesystem, driver, read-only bundles, what the placement is)
CASES: tuple[tuple[str, str, bool, str], ...] = (
    ("xfs", "objects", False, "reflinks (FICLONE)"),
    ("xfs", "objects", True, "hardlinks to link farms (--read-only)"),
    ("ext4", "objects", True, "hardlinks to link farms (--read-only)"),
    ("ext4", "objects", False, "copies (no reflinks on ext4)"),
    ("btrfs", "btrfs", False, "subvolume snapshot per chain id"),
    ("btrfs", "objects", False, "reflinks (FICLONE)"),
)


class Case:
    """One filesystem + driver; filled in by :func:`run_case`."""

    def __init__(self, fs: str, driver: str, read_only: bool, how: str) -> None:
        self.fs, self.driver, self.read_only, self.how = fs, driver, read_only, how
        self.times: dict[str, RunResult] = {}
        self.disk: int | None = None        # store + 3 bundles
        self.blobs: int | None = None       # the store's blobs (part of disk)
        self.copy_disk: int | None = None   # 3 lamina unpack copies on this fs kind
        self.parts: dict[str, int] = {}     # the store's parts (du, hardlinks once)
        self.floor: dict[tuple[str, int], float | None] = {}   # (op, threads) -> us/entry
        self.near_tree: tuple[int, int] | None = None   # near's rootfs: (files, dirs)
        self.error = ""


def used(mnt: Path) -> int:
    os.sync()
    if shutil.which("btrfs"):    # fails harmlessly elsewhere
        # btrfs frees a deleted subvolume's extents later, in a cleaner thread: wait
        # for it, or space freed by the previous step is still counted as used
        for cmd in (["subvolume", "sync"], ["filesystem", "sync"]):
            subprocess.run(["btrfs", *cmd, str(mnt)], capture_output=True, check=False)
    os.sync()
    s = os.statvfs(mnt)
    return (s.f_blocks - s.f_bfree) * s.f_frsize


STORE_PARTS = (("objects", "objects"), ("tar-splits", "layers"), ("index db", "lamina.db*"),
               ("extract (farms, tree records)", "extract"))


def store_parts(store: Path) -> dict[str, int]:
    """Allocated bytes of each part of STORE, from ONE du run so that an inode linked
    from two parts (an ext4 farm inode that is an adopted object) counts once, in
    the first."""
    paths: list[tuple[str, Path]] = []
    for label, pat in STORE_PARTS:
        paths += [(label, p) for p in sorted(store.glob(pat))]
    out = subprocess.run(["du", "-sB1", *(str(p) for _, p in paths)], capture_output=True,
                         text=True, check=False).stdout.splitlines()
    sizes = {ln.split("\t", 1)[1]: int(ln.split("\t", 1)[0]) for ln in out if "\t" in ln}
    parts: dict[str, int] = {}
    for label, p in paths:
        parts[label] = parts.get(label, 0) + sizes.get(str(p), 0)
    return parts


def tree_blocks(path: Path) -> int:
    """Allocated bytes below PATH, hardlinks once (du); 0 if missing."""
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True,
                         check=False).stdout.split()
    return int(out[0]) if out else 0


@contextmanager
def loopfs(kind: str, work: Path, size_gb: int = 6) -> Iterator[Path]:
    img = work / f"{kind}.img"
    with open(img, "wb") as f:
        f.truncate(size_gb << 30)
    mkfs = {"xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
            "ext4": ["mkfs.ext4", "-q", "-F"],
            "btrfs": ["mkfs.btrfs", "-q", "-f"]}[kind]
    subprocess.run([*mkfs, str(img)], check=True, capture_output=True)
    mnt = work / f"mnt-{kind}"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-d", str(mnt)], check=False)
        img.unlink(missing_ok=True)


def unpack(lamina: list[str], image: str, bundle: Path, *, driver: str | None = None,
           store: Path | None = None, read_only: bool = False) -> RunResult:
    cmd = [*lamina, "unpack", "-q"]
    if driver:
        cmd += ["--driver", driver]
    if store is not None:
        cmd += ["--store", str(store)]
    if read_only:
        cmd.append("--read-only")
    # untimed: each unpack pays for its own writes, not for flushing the previous one's
    os.sync()
    r = run_measured([*cmd, "--image", image, str(bundle)])
    if not r.ok:
        raise RuntimeError(f"{' '.join(cmd)} {image}: {r.stderr_tail.strip()}")
    return r


def copy_baseline(lamina: list[str], layout: Path, mnt: Path) -> tuple[RunResult, int]:
    """Three copies (base, py, app) without a store: the time of app, the disk of all."""
    before = used(mnt)
    res = None
    for tag in IMAGES:
        r = unpack(lamina, f"{layout}:{tag}", mnt / f"copy-{tag}")
        if tag == "app":
            res = r
    disk = used(mnt) - before
    for tag in IMAGES:
        remove_tree(mnt / f"copy-{tag}")
    assert res is not None
    return res, disk


def run_case(c: Case, lamina: list[str], layout: Path, mnt: Path) -> None:
    ro = c.read_only
    # cold: an empty store
    cold_store = mnt / "store-cold"
    c.times["cold"] = unpack(lamina, f"{layout}:app", mnt / "b-cold", driver=c.driver,
                             store=cold_store, read_only=ro)
    remove_bundle(lamina, mnt / "b-cold", c.driver, cold_store)
    remove_tree(cold_store)
    # warm and hot, and the disk of base+py+app
    store = mnt / "store"
    before = used(mnt)
    for tag in ("base", "py"):
        unpack(lamina, f"{layout}:{tag}", mnt / f"b-{tag}", driver=c.driver, store=store,
               read_only=ro)
    c.times["warm"] = unpack(lamina, f"{layout}:app", mnt / "b-app", driver=c.driver,
                             store=store, read_only=ro)
    c.disk = used(mnt) - before
    c.blobs = tree_blocks(store / "blobs")
    c.parts = store_parts(store)
    c.times["hot"] = unpack(lamina, _stored_name(layout, "app"),
                            mnt / "b-app2", driver=c.driver, store=store, read_only=ro)
    # a second image sharing all but a tiny top layer (an opaque directory)
    c.times["near"] = unpack(lamina, f"{layout}:app-opaque", mnt / "b-near", driver=c.driver,
                             store=store, read_only=ro)
    c.near_tree = count_tree(mnt / "b-near" / "rootfs")
    if c.driver == "objects" and c.fs not in _FLOOR_DONE:
        _FLOOR_DONE.add(c.fs)
        c.floor = clone_floor(store / "objects", mnt / "floor")
        remove_tree(mnt / "floor")
    for b in ("b-base", "b-py", "b-app", "b-app2", "b-near"):
        remove_bundle(lamina, mnt / b, c.driver, store)
    remove_tree(store)


_FLOOR_DONE: set[str] = set()         # one floor per filesystem kind
FLOOR_N = 20000
FLOOR_OPS = ("create", "clone", "clone+meta", "link", "mkdir")


def clone_floor(objects: Path, dest: Path) -> dict[tuple[str, int], float | None]:
    """bench/clone_floor.c on this filesystem: the kernel's microseconds per entry for
    each operation, with 1 and 2 threads ({} without a C compiler)."""
    exe = dest.parent / "clone_floor"     # on the loop filesystem: goes with it
    r = subprocess.run(["gcc", "-O2", "-o", str(exe), str(REPO / "bench/clone_floor.c"),
                        "-lpthread"], capture_output=True, check=False)
    if r.returncode != 0:
        return {}
    out: dict[tuple[str, int], float | None] = {}
    try:
        for threads in (1, 2):
            remove_tree(dest)
            r = subprocess.run([str(exe), str(objects), str(dest), str(FLOOR_N), str(threads)],
                               capture_output=True, text=True, check=False)
            for ln in r.stdout.splitlines():
                op, t, _n, _secs, us = ln.split()
                out[(op, int(t))] = None if us == "-" else float(us)
    finally:
        exe.unlink(missing_ok=True)
    return out


def count_tree(root: Path) -> tuple[int, int]:
    files = dirs = 0
    for _dirpath, dnames, fnames in os.walk(root):
        dirs += len(dnames)
        files += len(fnames)     # (symlinks and the rest too: each is one entry made)
    return files, dirs


def _stored_name(layout: Path, tag: str) -> str:
    # lamina import's default name: the layout directory's name and the tag
    return f"{layout.name}:{tag}"


def remove_bundle(lamina: list[str], bundle: Path, driver: str, store: Path) -> None:
    if driver == "btrfs" and (bundle / "rootfs").exists():
        subprocess.run(["btrfs", "subvolume", "delete", str(bundle / "rootfs")],
                       check=False, capture_output=True)
    remove_tree(bundle)


def measure(corpus: Path, workdir: Path, lamina: list[str],
            cases: Sequence[Case]) -> dict[str, tuple[RunResult, int]]:
    layout = corpus / "oci"
    copies: dict[str, tuple[RunResult, int]] = {}
    for fs in dict.fromkeys(c.fs for c in cases):
        with loopfs(fs, workdir) as mnt:
            copies[fs] = copy_baseline(lamina, layout, mnt)
            for c in cases:
                if c.fs != fs:
                    continue
                c.copy_disk = copies[fs][1]
                try:
                    run_case(c, lamina, layout, mnt)
                except (RuntimeError, subprocess.CalledProcessError) as e:
                    c.error = str(e)[-300:]
    return copies


def _s(r: RunResult | None) -> str:
    return f"{r.seconds:.2f} s" if r is not None and r.ok else "—"


def _mb(n: int | None) -> str:
    return f"{n / MiB:,.0f} MiB" if n is not None else "—"


def render(cases: Sequence[Case], copies: dict[str, tuple[RunResult, int]],
           standalone: bool = True) -> str:
    head = ["## Store drivers (objects, btrfs): warm vs cold unpack, disk", "",
            f"Machine: {machine_line()}. **The machine was busy** (2 CPUs shared with other "
            "work while this ran): one run per cell, so read differences under ~30% as "
            "noise.", ""] if standalone else ["### objects and btrfs: warm vs cold, disk", ""]
    lines = [*head,
             "Unpack of the corpus `app` image (3 layers, 31,600 entries, 401 MB), each "
             "case on its own loop filesystem.  cold: empty store (the import of all 3 "
             "layers included); warm: `base` and `py` already stored and unpacked by the "
             "driver (only `app`'s top layer, 275 MB of its 442 MB tar, is new); near: "
             "`app-opaque` (all of `app` plus a 10 kB layer) after `app`, the case the "
             "<= 10% target is about; hot: `app` itself already stored (a second "
             "bundle).", ""]
    rows = []
    for c in cases:
        copy_t = copies.get(c.fs, (None, 0))[0]
        cold, warm, near, hot = (c.times.get(k) for k in ("cold", "warm", "near", "hot"))
        ratio = (f"{warm.seconds / cold.seconds:.2f}x" if cold and warm and cold.ok
                 else "—")
        near_ratio = (f"{near.seconds / cold.seconds:.2f}x" if cold and near and cold.ok
                      else "—")
        hot_ratio = (f"{hot.seconds / copy_t.seconds:.2f}x" if hot and copy_t and copy_t.ok
                     else "—")
        rows.append([c.fs, c.driver + (" --read-only" if c.read_only else ""), c.how,
                     _s(copy_t), _s(cold), _s(warm), ratio, _s(near), near_ratio, _s(hot),
                     hot_ratio,
                     c.error and "error: " + c.error.replace("|", "/")])
    lines.append(md_table(["fs", "driver", "files are", "copy (no store)", "cold", "warm",
                           "warm/cold", "near", "near/cold", "hot", "hot/copy", ""], rows,
                          [False, False, False, *[True] * 8, False]))
    lines += ["", "Disk used by `base` + `py` + `app` (one bundle each) against three "
              "`lamina unpack` copies on the same filesystem kind (statvfs used blocks, "
              "after sync; the target is objects <= 0.6x).  \"store + bundles\" excludes "
              "the store's blobs (the compressed layers: the layout holds them anyway, "
              "and `lamina import` hardlinks them when the layout is on the same "
              "filesystem), shown apart.", ""]
    rows = []
    for c in cases:
        if c.disk is None or c.copy_disk is None:
            continue
        net = c.disk - (c.blobs or 0)
        rows.append([c.fs, c.driver + (" --read-only" if c.read_only else ""),
                     _mb(c.copy_disk), _mb(net), f"{net / c.copy_disk:.2f}x", _mb(c.blobs),
                     f"{c.disk / c.copy_disk:.2f}x"])
    lines.append(md_table(["fs", "driver", "3 copies", "store + bundles", "ratio",
                           "store blobs", "ratio with blobs"], rows,
                          [False, False, True, True, True, True, True]))
    rows = []
    for c in cases:
        if c.disk is None or not c.parts or c.driver != "objects":
            continue
        rest = c.disk - (c.blobs or 0) - sum(c.parts.values())
        parts = [_mb(c.parts.get(label, 0)) for label, _ in STORE_PARTS]
        if rest < 0:
            # du counted extents twice: link farm inodes that are reflinks of objects
            parts[-1], rest_s = parts[-1] + " (shared)", "—"
        else:
            rest_s = _mb(rest)
        rows.append([c.fs, c.driver + (" --read-only" if c.read_only else ""),
                     *parts, rest_s, _mb(c.disk - (c.blobs or 0))])
    if rows:
        lines += ["", "Where the objects rows' \"store + bundles\" goes (du of the store's "
                  "parts in one run, so an inode linked from two parts counts once; "
                  "\"bundles and fs metadata\" is the statvfs total minus those: the "
                  "bundles' inodes, directories and own blocks, plus the filesystem's "
                  "inodes for the store's files; \"(shared)\": that part's inodes are "
                  "reflinks of the objects, whose shared extents du counts again, so the "
                  "rest is not shown).", "",
                  md_table(["fs", "driver", *(label for label, _ in STORE_PARTS),
                            "bundles and fs metadata", "total"], rows,
                           [False, False, *[True] * (len(STORE_PARTS) + 2)])]
    lines += floor_lines(cases)
    lines += ["", *targets(cases)]
    return "\n".join(lines) + "\n"


def floor_lines(cases: Sequence[Case]) -> list[str]:
    """The kernel floor (bench/clone_floor.c) and what it implies for `near`."""
    measured = [c for c in cases if c.floor]
    if not measured:
        return []

    def us(c: Case, op: str, t: int) -> str:
        v = c.floor.get((op, t))
        return f"{v:.1f}" if v is not None else "—"

    rows = [[c.fs, *(f"{us(c, op, 1)} / {us(c, op, 2)}" for op in FLOOR_OPS)]
            for c in measured]
    lines = ["", "Kernel floor, microseconds per entry with 1 / 2 threads "
             f"(`bench/clone_floor.c`: {FLOOR_N:,} store objects on the same loop "
             "filesystem, no lamina; create = empty file, clone = create + open the object + "
             "FICLONE, clone+meta = clone + fchown, fchmod, futimens as a replay does, link = "
             "linkat of the object, mkdir).", "",
             md_table(["fs", *FLOOR_OPS], rows, [False, *[True] * len(FLOOR_OPS)])]
    notes = []
    for c in cases:
        if c.driver != "objects":
            continue    # the btrfs driver snapshots a subvolume: no file per entry
        floor = next((m for m in measured if m.fs == c.fs), None)
        cold, near = c.times.get("cold"), c.times.get("near")
        if floor is None or c.near_tree is None or cold is None or near is None:
            continue
        op = "link" if c.read_only else "clone+meta"
        per_file, per_dir = floor.floor.get((op, 2)), floor.floor.get(("mkdir", 1))
        if per_file is None or per_dir is None:
            continue    # copies (ext4, writable): bounded by the data, not per file
        files, dirs = c.near_tree
        secs = (files * per_file + dirs * per_dir) / 1e6
        notes.append(f"{c.driver}{' --read-only' if c.read_only else ''} on {c.fs}: near's "
                     f"rootfs has {files:,} non-directories and {dirs:,} directories; "
                     f"making them costs the kernel at least {secs:.2f} s ({op} on 2 "
                     f"threads, mkdir on 1) = {secs / cold.seconds:.2f}x cold "
                     f"(measured near: {near.seconds:.2f} s)")
    if notes:
        lines += ["", "What the floor allows for `near`: " + "; ".join(notes) + "."]
    return lines


def targets(cases: Sequence[Case]) -> list[str]:
    """PASS/MISS against the issue's targets (reported, never asserted)."""
    near, disk = [], []
    for c in cases:
        name = f"{c.driver}{' --read-only' if c.read_only else ''} on {c.fs}"
        cold, n = c.times.get("cold"), c.times.get("near")
        if cold and n and cold.ok:
            r = n.seconds / cold.seconds
            near.append(f"{name} {r:.2f}x {'PASS' if r <= 0.10 else 'MISS'}")
        if c.driver == "objects" and c.disk is not None and c.copy_disk:
            r = (c.disk - (c.blobs or 0)) / c.copy_disk
            disk.append(f"{name} {r:.2f}x {'PASS' if r <= 0.6 else 'MISS'}")
    return [f"Target, near <= 0.10x cold: {'; '.join(near) or 'not measured'}.  "
            f"Target, objects disk <= 0.6x of three copies: {'; '.join(disk) or 'not measured'}."]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus")
    ap.add_argument("--workdir", default="/var/tmp")
    ap.add_argument("--lamina", help="lamina command (default: this checkout's)")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--only", help="comma-separated fs:driver cases (default: all)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("drivers_store: needs root (loop filesystems); skipped", file=sys.stderr)
        return 0
    corpus = find_corpus(args.corpus)
    cases = [Case(fs, d, ro, how) for fs, d, ro, how in CASES
             if not args.only or f"{fs}:{d}" in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-drivers-", dir=args.workdir) as td:
        copies = measure(corpus, Path(td), lamina_cmd(args.lamina), cases)
    body = render(cases, copies)
    replace_section(Path(args.out), SECTION, body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

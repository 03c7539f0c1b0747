"""scan(only=...) (a repack.delta-list hook's answer) gives the full scan's changes
when the listed paths are the ones that were edited."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lamina.layer.diff import Change, scan
from lamina.layer.snapshot import take_snapshot


def build(root: Path) -> None:
    for d in ("etc", "usr/bin", "usr/lib/x", "var/log", "tree/a/b", "empty"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(("etc/passwd", "etc/hosts", "usr/bin/tool", "usr/lib/x/lib.so",
                           "var/log/messages", "tree/a/one", "tree/a/b/two", "top")):
        (root / f).write_bytes(f"content {i}\n".encode())
    os.symlink("usr/bin", root / "bin")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool2")
    # mtimes in the past so that edits within the same second are seen
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            os.utime(os.path.join(dirpath, n), (1_600_000_000, 1_600_000_000),
                     follow_symlinks=False)


Edit = Callable[[Path], list[str]]


def modify(r: Path) -> list[str]:
    (r / "etc/passwd").write_text("changed\n")
    return ["etc/passwd"]


def add(r: Path) -> list[str]:
    (r / "usr/lib/x/new").write_text("new\n")
    return ["usr/lib/x/new"]


def remove_file(r: Path) -> list[str]:
    (r / "var/log/messages").unlink()
    return ["var/log/messages"]


def remove_tree(r: Path) -> list[str]:
    shutil.rmtree(r / "tree")
    return ["tree"]


def recreate_dir(r: Path) -> list[str]:
    shutil.rmtree(r / "usr/lib/x")
    (r / "usr/lib/x").mkdir()
    (r / "usr/lib/x/other").write_text("o\n")
    return ["usr/lib/x"]


def chmod(r: Path) -> list[str]:
    os.chmod(r / "etc/hosts", 0o600)
    return ["etc/hosts"]


def dir_to_file(r: Path) -> list[str]:
    shutil.rmtree(r / "tree/a")
    (r / "tree/a").write_text("now a file\n")
    return ["tree/a"]


def retarget_symlink(r: Path) -> list[str]:
    os.unlink(r / "bin")
    os.symlink("/usr/local/bin", r / "bin")
    return ["bin"]


def new_hardlink(r: Path) -> list[str]:
    os.link(r / "top", r / "etc/top-link")
    return ["etc/top-link", "top"]


EDITS: list[Edit] = [modify, add, remove_file, remove_tree, recreate_dir, chmod, dir_to_file,
                     retarget_symlink, new_hardlink]


def key(changes: list[Change]) -> list[tuple[str, str, str]]:
    return [(c.path, c.kind, c.linkname) for c in changes]


@pytest.mark.parametrize("edit", EDITS, ids=lambda e: e.__name__)
def test_only_equals_full_scan(tmp_path: Path, edit: Edit) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    build(root)
    snap = list(take_snapshot(str(root), {}).values())
    listed = edit(root)
    full = scan(str(root), snap)
    only = scan(str(root), snap, only=listed)
    assert full.changes, "the edit must be a change"
    assert key(only.changes) == key(full.changes)
    assert sorted(only.rows) == sorted(full.rows)


def test_random_edit_sets(tmp_path: Path) -> None:
    rng = random.Random(5)
    for n in range(12):
        root = tmp_path / f"r{n}"
        root.mkdir()
        build(root)
        snap = list(take_snapshot(str(root), {}).values())
        listed: list[str] = []
        for e in rng.sample(EDITS, 3):
            try:
                listed += e(root)
            except (FileNotFoundError, NotADirectoryError, FileExistsError):
                pass  # an earlier edit removed what this one changes
        full = scan(str(root), snap)
        only = scan(str(root), snap, only=listed)
        assert key(only.changes) == key(full.changes), listed


def test_unlisted_changes_are_ignored_and_keep_their_row(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    build(root)
    snap = list(take_snapshot(str(root), {}).values())
    (root / "etc/passwd").write_text("changed\n")
    (root / "top").write_text("changed too\n")
    res = scan(str(root), snap, only=["top"])
    assert key(res.changes) == [("top", "file", "")]
    old = {r[0]: r for r in snap}
    new = {r[0]: r for r in res.rows}
    assert new["etc/passwd"] == old["etc/passwd"]
    assert new.keys() == old.keys()


def test_listed_path_behind_a_symlink_is_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    build(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host file\n")
    snap = list(take_snapshot(str(root), {}).values())
    os.symlink(str(outside), root / "link")
    res = scan(str(root), snap, only=["link/secret", "link"])
    assert [c.path for c in res.changes] == ["", "link"]
    assert res.changes[1].kind == "symlink"
    # listing only the path below the link: nothing is read through it
    res = scan(str(root), snap, only=["link/secret"])
    assert "link/secret" not in [c.path for c in res.changes]


def test_parent_of_a_listed_path_became_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    build(root)
    snap = list(take_snapshot(str(root), {}).values())
    shutil.rmtree(root / "var")
    os.symlink("/", root / "var")
    listed = ["var/log/messages"]   # an incomplete answer: "var" itself is not listed
    res = scan(str(root), snap, only=listed)
    assert key(res.changes) == key(scan(str(root), snap).changes)
    assert ("var", "symlink", "/") in key(res.changes)

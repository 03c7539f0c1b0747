"""Overlay mounts for drivers: kernel overlayfs through the new mount API, and
fuse-overlayfs for unprivileged users.

Kernel mounts are built with fsopen/fsconfig/fsmount (Linux 5.2+): every
lower directory is passed on its own (``lowerdir+``, Linux 6.8+; older kernels
get one ``lowerdir=`` string), so a deep chain never meets the one-page limit
of mount(2)'s option string.  The result is a *detached* mount held by a file
descriptor: it is reachable only through that fd and disappears when the fd
is closed, including when the process is killed, so staging work through it
never leaves a stray mount behind.  :func:`attach` puts it at a path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator, Sequence

from lamina.errors import EnvironmentError_

# syscall numbers of the new mount API are the same on every architecture
_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432
_FSOPEN_CLOEXEC = 1
_FSCONFIG_SET_STRING = 1
_FSCONFIG_CMD_CREATE = 6
_FSMOUNT_CLOEXEC = 1
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_AT_FDCWD = -100
_MNT_DETACH = 2
_MOUNT_ATTR_RDONLY = 1

# portable overlays: no inode index, no redirects or metadata-only copy-ups, so
# upper and lower directories stay plain trees any kernel (and repack) can read
OVERLAY_OPTIONS = (("index", "off"), ("redirect_dir", "off"), ("metacopy", "off"))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def _fsconfig(fd: int, key: str, value: str | None, cmd: int = _FSCONFIG_SET_STRING) -> None:
    k = key.encode() if key else None
    v = value.encode() if value is not None else None
    _check(_libc.syscall(_SYS_FSCONFIG, ctypes.c_int(fd), ctypes.c_uint(cmd), k, v,
                         ctypes.c_int(0)), f"overlay option {key}")


def _log_lines(fd: int) -> str:
    # fsopen's fd reads back the kernel's messages about a failed configuration
    out = []
    for _ in range(16):
        try:
            b = os.read(fd, 4096)
        except OSError:
            break
        if not b:
            break
        out.append(b.decode(errors="replace").strip())
    return "; ".join(out)


def overlay_fd(lowers: Sequence[str], upper: str | None = None,
               work: str | None = None, *, read_only: bool = False) -> int:
    """A detached overlay mount (an O_PATH fd of its root): *lowers* top first;
    *read_only* makes the mount itself read-only."""
    fs = _check(_libc.syscall(_SYS_FSOPEN, b"overlay", ctypes.c_uint(_FSOPEN_CLOEXEC)),
                "fsopen(overlay)")
    try:
        try:
            for d in lowers:
                _fsconfig(fs, "lowerdir+", d)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # a kernel before 6.8: one string (it may hit the page-size limit)
            os.close(fs)
            fs = _check(_libc.syscall(_SYS_FSOPEN, b"overlay",
                                      ctypes.c_uint(_FSOPEN_CLOEXEC)), "fsopen(overlay)")
            _fsconfig(fs, "lowerdir", ":".join(_escape(d) for d in lowers))
        if upper is not None:
            assert work is not None
            _fsconfig(fs, "upperdir", upper)
            _fsconfig(fs, "workdir", work)
        for k, v in OVERLAY_OPTIONS:
            _fsconfig(fs, k, v)
        try:
            _fsconfig(fs, "", None, _FSCONFIG_CMD_CREATE)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror} ({_log_lines(fs)})") from None
        attrs = _MOUNT_ATTR_RDONLY if read_only else 0
        return _check(_libc.syscall(_SYS_FSMOUNT, ctypes.c_int(fs),
                                    ctypes.c_uint(_FSMOUNT_CLOEXEC), ctypes.c_uint(attrs)),
                      "fsmount(overlay)")
    finally:
        os.close(fs)


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


def fd_path(mfd: int) -> str:
    """A path naming the root of the mount held by *mfd* (for path-based APIs; the
    trailing "/." lets O_NOFOLLOW opens pass the /proc magic link)."""
    return f"/proc/self/fd/{mfd}/."


def attach(mfd: int, target: str) -> None:
    """Mount the detached mount *mfd* on *target*."""
    _check(_libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(mfd), b"", ctypes.c_int(_AT_FDCWD),
                         os.fsencode(target), ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH)),
           f"move_mount to {target}")


@contextlib.contextmanager
def detached_overlay(lowers: Sequence[str], upper: str, work: str) -> Iterator[str]:
    """A writable overlay for the duration of the block, as a path; gone after
    (or when the process dies)."""
    mfd = overlay_fd(lowers, upper, work)
    try:
        yield fd_path(mfd)
    finally:
        os.close(mfd)


def is_mountpoint(path: str) -> bool:
    return os.path.ismount(path)


def unmount(target: str, *, lazy: bool = False) -> None:
    """Unmount *target* (kernel overlay or FUSE); nothing to do if it is not mounted.
    *lazy*: detach now, even if busy (MNT_DETACH)."""
    if not is_mountpoint(target):
        return
    if os.geteuid() != 0:
        for tool in ("fusermount3", "fusermount"):
            with contextlib.suppress(FileNotFoundError):
                r = subprocess.run([tool, "-u", *(["-z"] if lazy else []), target],
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    return
                raise EnvironmentError_(f"cannot unmount {target}: {r.stderr.strip()}",
                                        hint="stop processes using the bundle and retry")
    if _libc.umount2(os.fsencode(target), ctypes.c_int(_MNT_DETACH if lazy else 0)) != 0:
        e = ctypes.get_errno()
        raise EnvironmentError_(f"cannot unmount {target}: {os.strerror(e)}",
                                hint="stop processes using the bundle (fuser -m) and retry")


def fuse_overlay(lowers: Sequence[str], upper: str, work: str, target: str, *,
                 read_only: bool = False) -> None:
    """Mount with fuse-overlayfs (unprivileged).  Lower paths go through short
    relative symlinks, so a deep chain fits the option string."""
    with tempfile.TemporaryDirectory(prefix="lamina-lower-") as links:
        names = []
        for i, d in enumerate(lowers):
            os.symlink(d, os.path.join(links, str(i)))
            names.append(str(i))
        opts = (f"lowerdir={':'.join(names)},upperdir={os.path.abspath(upper)},"
                f"workdir={os.path.abspath(work)}" + (",ro" if read_only else ""))
        r = subprocess.run(["fuse-overlayfs", "-o", opts, os.path.abspath(target)],
                           cwd=links, capture_output=True, text=True)
    if r.returncode != 0:
        raise EnvironmentError_(f"fuse-overlayfs failed: {r.stderr.strip()}",
                                hint="check that /dev/fuse is usable by this user")


def overlay_mount_works() -> str | None:
    """Why kernel overlay mounts cannot be made here, or None (probes with a tiny
    detached mount)."""
    if os.geteuid() != 0:
        return "needs root (kernel overlay mounts)"
    with tempfile.TemporaryDirectory(prefix="lamina-probe-") as d:
        for n in ("l", "u", "w"):
            os.mkdir(os.path.join(d, n))
        try:
            os.close(overlay_fd([os.path.join(d, "l")], os.path.join(d, "u"),
                                os.path.join(d, "w")))
        except OSError as e:
            return f"kernel overlay mount failed: {e.strerror}"
    return None

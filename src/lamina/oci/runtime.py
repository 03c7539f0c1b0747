"""Generate an OCI runtime-spec ``config.json`` from an image config.

Follows the image-spec's "conversion" document (config.md -> runtime-spec):
Entrypoint+Cmd -> process.args, Env, WorkingDir -> cwd, User -> uid/gid
(names resolved from the rootfs's /etc/passwd and /etc/group, read with the
same scoped resolution as extraction), Labels -> annotations, plus the same
defaults ``runc spec`` writes.  With ``rootless`` the spec gets a user
namespace mapping the caller to root, as ``runc spec --rootless`` does.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from lamina.errors import ImageFormatError, LaminaError
from lamina.layer.extract import clean_name, resolve_scoped
from lamina.layer.idmap import IdMapping
from lamina.oci.model import ImageConfig

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CAPS = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]


def _read_in_root(root_fd: int, rel: str, limit: int = 4 << 20) -> str | None:
    """Read rootfs file *rel*; symlinks are resolved inside the rootfs, never outside."""
    try:
        real = resolve_scoped(root_fd, clean_name(rel), want_dir=False)
        if not real:
            return None
        fd = os.open("/".join(real), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                     dir_fd=root_fd)
    except (OSError, LaminaError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _lookup(text: str | None, name: str, idx_id: int) -> list[str] | None:
    for line in (text or "").splitlines():
        f = line.split(":")
        if len(f) > idx_id and f[0] == name:
            return f
    return None


def resolve_user(user: str, root_fd: int) -> tuple[int, int, list[int], str | None]:
    """Image ``User`` -> (uid, gid, additional gids, home directory)."""
    passwd = _read_in_root(root_fd, "etc/passwd")
    group = _read_in_root(root_fd, "etc/group")
    u, _, g = (user or "0").partition(":")
    home = None
    if u.isdigit():
        uid = int(u)
        gid = 0
        for line in (passwd or "").splitlines():
            f = line.split(":")
            if len(f) >= 6 and f[2] == u:
                gid = int(f[3]) if f[3].isdigit() else 0
                home = f[5]
                break
        uname = None
        for line in (passwd or "").splitlines():
            f = line.split(":")
            if len(f) >= 3 and f[2] == u:
                uname = f[0]
    else:
        ent = _lookup(passwd, u, 3)
        if ent is None or not ent[2].isdigit():
            raise ImageFormatError(f"image user {u!r} is not in the image's /etc/passwd")
        uid, gid = int(ent[2]), int(ent[3]) if ent[3].isdigit() else 0
        home = ent[5] if len(ent) > 5 else None
        uname = u
    if g:
        if g.isdigit():
            gid = int(g)
        else:
            ent = _lookup(group, g, 2)
            if ent is None or not ent[2].isdigit():
                raise ImageFormatError(f"image group {g!r} is not in the image's /etc/group")
            gid = int(ent[2])
    extra: list[int] = []
    if uname is not None and not g:
        for line in (group or "").splitlines():
            f = line.split(":")
            if (len(f) >= 4 and uname in f[3].split(",") and f[2].isdigit()
                    and int(f[2]) != gid):
                extra.append(int(f[2]))
    return uid, gid, sorted(set(extra)), home


def generate(cfg: ImageConfig, root_fd: int, *, rootless: bool = False,
             uid_map: tuple[IdMapping, ...] = (), gid_map: tuple[IdMapping, ...] = (),
             image_annotations: dict[str, str] | None = None) -> dict[str, Any]:
    c = cfg.config
    entry = list(c.get("Entrypoint") or [])
    cmd = list(c.get("Cmd") or [])
    args = entry + cmd or ["sh"]
    env = [e for e in (c.get("Env") or []) if isinstance(e, str)]
    uid, gid, extra_gids, home = resolve_user(str(c.get("User") or ""), root_fd)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    if not any(e.startswith("HOME=") for e in env):
        env.append(f"HOME={home or '/'}")
    if not any(e.startswith("TERM=") for e in env):
        env.append("TERM=xterm")
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if extra_gids:
        user["additionalGids"] = extra_gids
    annotations = dict(image_annotations or {})
    for k, v in (c.get("Labels") or {}).items():
        annotations.setdefault(str(k), str(v))
    if c.get("StopSignal"):
        annotations["org.opencontainers.image.stopSignal"] = str(c["StopSignal"])
    if cfg.raw.get("author"):
        annotations.setdefault("org.opencontainers.image.author", str(cfg.raw["author"]))
    if cfg.raw.get("created"):
        annotations.setdefault("org.opencontainers.image.created", str(cfg.raw["created"]))
    annotations["org.opencontainers.image.os"] = cfg.os
    annotations["org.opencontainers.image.architecture"] = cfg.architecture
    caps = list(_CAPS)
    spec: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": user,
            "args": args,
            "env": env,
            "cwd": c.get("WorkingDir") or "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "lamina",
        "mounts": _mounts(rootless),
        "annotations": annotations,
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }
    linux = spec["linux"]
    if rootless:
        linux["namespaces"].append({"type": "user"})
        linux["uidMappings"] = [{"containerID": 0, "hostID": os.geteuid(), "size": 1}]
        linux["gidMappings"] = [{"containerID": 0, "hostID": os.getegid(), "size": 1}]
        del linux["resources"]
    elif uid_map or gid_map:
        linux["namespaces"].append({"type": "user"})
        linux["uidMappings"] = [{"containerID": m.container, "hostID": m.host, "size": m.size}
                                for m in uid_map]
        linux["gidMappings"] = [{"containerID": m.container, "hostID": m.host, "size": m.size}
                                for m in gid_map]
    return spec


def _mounts(rootless: bool) -> list[dict[str, Any]]:
    m: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
         + ([] if rootless else ["gid=5"])},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
    ]
    if rootless:
        m.append({"destination": "/sys", "type": "none", "source": "/sys",
                  "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]})
    else:
        m.append({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                  "options": ["nosuid", "noexec", "nodev", "ro"]})
        m.append({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                  "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]})
    return m


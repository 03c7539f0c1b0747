"""Hook executables run at fixed points of unpack and repack.

Hooks are admin configuration: executables listed in TOML files, read in this
order (all files found are used; their hooks run in file order)::

    /etc/lamina/hooks.toml
    $XDG_CONFIG_HOME/lamina/hooks.toml     (~/.config/lamina/hooks.toml)
    --hooks FILE                           (repeatable)

Schema: one array of tables per event, each table one hook::

    [["layer.try-skip"]]
    path = "/usr/local/libexec/reuse-layer"   # absolute, or relative to the TOML file
    args = ["--cache", "/var/cache/other-tool"]
    timeout = 30                              # seconds, default 60
    env = { CACHE = "/var/cache/other-tool" }
    when = { media_type = ["*tar+gzip"], annotations = { "org.example.reuse" = "yes" } }

Hooks run with lamina's privileges: a hooks file or executable not owned by
root or the current user, or writable by group/others, is refused.

Protocol: the hook gets one JSON object on stdin (``version`` =
:data:`PROTOCOL_VERSION`, ``event`` and the event's fields, see
``docs/plugins.md``) and answers with its exit status:

- ``0`` (:data:`EXIT_HANDLED`): handled; for ``repack.delta-list`` stdout holds
  NUL-separated rootfs-relative paths, for ``lookup`` an OCI layout path;
- ``3`` (:data:`EXIT_DECLINED`): declined, lamina asks the next hook or does
  the work itself;
- anything else, a signal or the timeout: failed.  The operation aborts with
  :class:`~lamina.errors.HookError` (exit code 12) carrying the hook's stderr
  tail, and leaves nothing half-written.

Events where the first ``handled`` answer wins (the "question" events):
``layer.try-skip``, ``repack.delta-list``, ``lookup``.  On the others
(``layer.pre-extract``, ``layer.post-extract``, ``repack.refresh-bundle``) every
matching hook runs.

Call-site API::

    from lamina.hooks import HookOptions, HookRunner
    runner = HookRunner.load(HookOptions(files=("/path/hooks.toml",)))
    res = runner.run("layer.try-skip", {"manifest": ..., "layer": desc.to_json(),
                                        "chain_id": ..., "bundle": ..., "rootfs": ...})
    if res.status == "handled": ...      # res.stdout: bytes, res.hook: the hook's path
    paths = parse_paths(res.stdout)       # repack.delta-list answers

``HookRunner.load`` with no file present is cheap and ``run`` then answers
``declined`` without starting anything, so behaviour without hooks is
unchanged.  ``HookOptions(system=False)`` skips the /etc and XDG files (tests).
"""

from __future__ import annotations

from lamina.hooks.config import (
    EVENTS,
    QUESTION_EVENTS,
    Hook,
    HookOptions,
    default_files,
    load_hooks,
)
from lamina.hooks.runner import (
    EXIT_DECLINED,
    EXIT_HANDLED,
    PROTOCOL_VERSION,
    HookResult,
    HookRunner,
    parse_paths,
)

__all__ = [
    "EVENTS",
    "EXIT_DECLINED",
    "EXIT_HANDLED",
    "PROTOCOL_VERSION",
    "QUESTION_EVENTS",
    "Hook",
    "HookOptions",
    "HookResult",
    "HookRunner",
    "default_files",
    "load_hooks",
    "parse_paths",
]

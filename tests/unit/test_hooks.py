"""Hook config loading and the hook protocol, with real executables."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from lamina.errors import HookError
from lamina.hooks import HookOptions, HookRunner, load_hooks, parse_paths


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def config(tmp_path: Path, text: str, name: str = "hooks.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def runner(*files: Path) -> HookRunner:
    return HookRunner.load(HookOptions(files=tuple(str(f) for f in files), system=False))


def test_no_hooks_declines_without_running_anything(tmp_path: Path) -> None:
    r = runner()
    assert r.hooks == []
    res = r.run("layer.try-skip", {"rootfs": str(tmp_path)})
    assert res.status == "declined" and res.hook is None


def test_document_on_stdin_and_handled(tmp_path: Path) -> None:
    out = tmp_path / "doc.json"
    h = script(tmp_path / "h.sh", f'cat > {out}\necho "$LAMINA_HOOK_EVENT $1 $X"\nexit 0\n')
    cfg = config(tmp_path, f'[["layer.try-skip"]]\npath = "{h}"\nargs = ["a1"]\n'
                 'env = { X = "xv" }\n')
    res = runner(cfg).run("layer.try-skip", {"chain_id": "sha256:ab", "rootfs": "/r"})
    assert res.status == "handled"
    assert res.hook == str(h)
    assert res.stdout == b"layer.try-skip a1 xv\n"
    doc = json.loads(out.read_text())
    assert doc == {"version": 1, "event": "layer.try-skip", "chain_id": "sha256:ab",
                   "rootfs": "/r"}


def test_declined_asks_next_and_first_handled_wins(tmp_path: Path) -> None:
    log = tmp_path / "log"
    a = script(tmp_path / "a.sh", f"cat >/dev/null; echo a >> {log}; exit 3\n")
    b = script(tmp_path / "b.sh", f"cat >/dev/null; echo b >> {log}; printf 'x\\0'; exit 0\n")
    c = script(tmp_path / "c.sh", f"cat >/dev/null; echo c >> {log}; exit 0\n")
    cfg = config(tmp_path, "".join(f'[["repack.delta-list"]]\npath = "{p}"\n' for p in (a, b, c)))
    res = runner(cfg).run("repack.delta-list", {})
    assert res.status == "handled" and res.hook == str(b) and res.stdout == b"x\0"
    assert log.read_text() == "a\nb\n"


def test_notification_events_run_every_hook(tmp_path: Path) -> None:
    log = tmp_path / "log"
    a = script(tmp_path / "a.sh", f"cat >/dev/null; echo a >> {log}; exit 0\n")
    b = script(tmp_path / "b.sh", f"cat >/dev/null; echo b >> {log}; exit 3\n")
    cfg = config(tmp_path, f'[["layer.post-extract"]]\npath = "{a}"\n'
                 f'[["layer.post-extract"]]\npath = "{b}"\n')
    assert runner(cfg).run("layer.post-extract", {}).status == "handled"
    assert log.read_text() == "a\nb\n"


def test_failure_carries_stderr_tail(tmp_path: Path) -> None:
    h = script(tmp_path / "h.sh", "echo 'disk on fire' >&2; exit 7\n")
    cfg = config(tmp_path, f'[["layer.pre-extract"]]\npath = "{h}"\n')
    with pytest.raises(HookError) as ei:
        runner(cfg).run("layer.pre-extract", {})
    assert ei.value.code == 12
    assert "exit status 7" in ei.value.message and "disk on fire" in ei.value.message
    assert ei.value.hint and str(cfg) in ei.value.hint


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # the child keeps running after its parent: only a process-group kill stops it
    h = script(tmp_path / "h.sh", f"sleep 60 & echo $! > {pidfile}\nwait\n")
    cfg = config(tmp_path, f'[["lookup"]]\npath = "{h}"\ntimeout = 0.5\n')
    t0 = time.monotonic()
    with pytest.raises(HookError, match=r"timed out after 0\.5s"):
        runner(cfg).run("lookup", {})
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        # a zombie until init reaps it: check its state
        st = Path(f"/proc/{pid}/stat")
        if st.exists() and st.read_text().split(") ")[1].startswith("Z"):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"child {pid} of the timed-out hook still runs")


def test_killed_by_signal(tmp_path: Path) -> None:
    h = script(tmp_path / "h.sh", "kill -9 $$\n")
    cfg = config(tmp_path, f'[["lookup"]]\npath = "{h}"\n')
    with pytest.raises(HookError, match="killed by signal 9"):
        runner(cfg).run("lookup", {})


def test_hook_not_reading_stdin(tmp_path: Path) -> None:
    # a large document and a hook that never reads it: no EPIPE, the answer counts
    h = script(tmp_path / "h.sh", "exit 3\n")
    cfg = config(tmp_path, f'[["lookup"]]\npath = "{h}"\n')
    assert runner(cfg).run("lookup", {"big": "x" * (1 << 20)}).status == "declined"


def test_when_filters(tmp_path: Path) -> None:
    h = script(tmp_path / "h.sh", "cat >/dev/null; exit 0\n")
    cfg = config(tmp_path, f'[["layer.try-skip"]]\npath = "{h}"\n'
                 'when = { media_type = "*tar+gzip", annotations = { "org.x/k" = "y*" } }\n')
    r = runner(cfg)
    gz = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}
    zst = {"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd"}
    assert r.run("layer.try-skip", {"layer": gz, "annotations": {"org.x/k": "yes"}}
                 ).status == "handled"
    assert r.run("layer.try-skip", {"layer": zst, "annotations": {"org.x/k": "yes"}}
                 ).status == "declined"
    assert r.run("layer.try-skip", {"layer": gz, "annotations": {"org.x/k": "no"}}
                 ).status == "declined"
    assert r.run("layer.try-skip", {"layer": gz}).status == "declined"
    # layer annotations count too
    assert r.run("layer.try-skip", {"layer": {**gz, "annotations": {"org.x/k": "yy"}}}
                 ).status == "handled"


def test_relative_path_and_file_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "lamina").mkdir(parents=True)
    script(xdg / "lamina" / "user.sh", "exit 3\n")
    config(xdg / "lamina", '[["lookup"]]\npath = "user.sh"\n')
    other = tmp_path / "other"
    other.mkdir()
    script(other / "cli.sh", "exit 0\n")
    cli = config(other, '[["lookup"]]\npath = "cli.sh"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    hooks = load_hooks(HookOptions(files=(str(cli),)))
    mine = [h.path for h in hooks if not h.source.startswith("/etc/")]
    assert mine == [str(xdg / "lamina" / "user.sh"), str(other / "cli.sh")]


@pytest.mark.parametrize(("text", "message"), [
    ('[["layer.try-skp"]]\npath = "/bin/true"\n', "unknown hook event 'layer.try-skp'"),
    ('["lookup"]\npath = "/bin/true"\n', "must be an array of tables"),
    ('[["lookup"]]\nargs = []\n', "'path' (the executable) is required"),
    ('[["lookup"]]\npath = "/nonexistent/hook"\n', "does not exist"),
    ('[["lookup"]]\npath = "/bin/true"\ntimeout = 0\n', "'timeout' must be a positive"),
    ('[["lookup"]]\npath = "/bin/true"\nargs = "x"\n', "'args' must be a list"),
    ('[["lookup"]]\npath = "/bin/true"\nenv = { A = 1 }\n', "'env' must be a table"),
    ('[["lookup"]]\npath = "/bin/true"\nwhen = { os = "x" }\n', "'when' takes only"),
    ('[["lookup"]]\npath = "/bin/true"\ncmd = "x"\n', "unknown key(s) cmd"),
    ('[["lookup"]\npath = \n', "not valid TOML"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    cfg = config(tmp_path, text)
    with pytest.raises(HookError) as ei:
        runner(cfg)
    assert message in ei.value.message
    assert str(cfg) in ei.value.message
    assert ei.value.hint


def test_not_executable_and_missing_file(tmp_path: Path) -> None:
    h = tmp_path / "h.sh"
    h.write_text("#!/bin/sh\n")
    h.chmod(0o644)
    cfg = config(tmp_path, f'[["lookup"]]\npath = "{h}"\n')
    with pytest.raises(HookError, match="is not executable") as ei:
        runner(cfg)
    assert ei.value.hint == f"chmod +x {h}"
    with pytest.raises(HookError, match="does not exist"):
        runner(tmp_path / "missing.toml")


def test_parse_paths() -> None:
    assert parse_paths(b"etc/passwd\0./usr/bin/x\0dir/\0etc/passwd\0\0.\0") == [
        "etc/passwd", "usr/bin/x", "dir"]
    assert parse_paths(b"") == []
    assert parse_paths(b"caf\xe9\0") == ["caf\udce9"]
    for bad in (b"/etc/passwd\0", b"a/../b\0", b"a//b\0", b"..\0", b"a/./b\0"):
        with pytest.raises(HookError, match="invalid path"):
            parse_paths(bad)


def test_cli_lists_hooks(tmp_path: Path, lamina: Any) -> None:
    h = script(tmp_path / "h.sh", "exit 0\n")
    cfg = config(tmp_path, f'[["layer.try-skip"]]\npath = "{h}"\ntimeout = 5\n'
                 'when = { media_type = ["*gzip"] }\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "none")}
    p = lamina(["hooks", "--hooks", str(cfg)], env=env)
    assert p.returncode == 0, p.stderr
    assert "layer.try-skip" in p.stdout and str(h) in p.stdout and "timeout 5s" in p.stdout
    p = lamina(["hooks", "--hooks", str(cfg), "--json"], env=env)
    listed = [x for x in json.loads(p.stdout) if x["source"] == str(cfg)]
    assert listed == [{"event": "layer.try-skip", "path": str(h), "args": [], "timeout": 5.0,
                       "env": {}, "source": str(cfg), "executable": True,
                       "when": {"media_type": ["*gzip"], "annotations": {}}}]
    bad = config(tmp_path, '[["nope"]]\npath = "/bin/true"\n', "bad.toml")
    p = lamina(["hooks", "--hooks", str(bad)], env=env)
    assert p.returncode == 12
    assert "unknown hook event 'nope'" in p.stderr


def test_files_others_can_change_are_refused(tmp_path: Path) -> None:
    h = script(tmp_path / "h.sh", "exit 0\n")
    cfg = config(tmp_path, f'[["lookup"]]\npath = "{h}"\n')
    assert len(runner(cfg).hooks) == 1
    h.chmod(0o777)
    with pytest.raises(HookError, match="is writable by other users") as ei:
        runner(cfg)
    assert ei.value.hint == f"chmod go-w {h}"
    h.chmod(0o755)
    cfg.chmod(0o666)
    with pytest.raises(HookError, match=r"hooks file .* is writable by other users"):
        runner(cfg)
    cfg.chmod(0o644)
    if os.geteuid() == 0:
        os.chown(h, 12345, 12345)
        with pytest.raises(HookError, match="belongs to uid 12345"):
            runner(cfg)

#!/usr/bin/env python3
"""Pull benchmark: `lamina pull` vs `skopeo copy` from a loopback registry.

    python bench/pull.py [--corpus DIR] [--tag app] [--repeat N] [--out BENCHMARKS.md]

Starts Debian's docker-registry on a free 127.0.0.1 port with its storage
below --workdir, pushes CORPUS/oci:TAG into it once with skopeo (untimed), then
times, interleaved (lamina, skopeo, lamina, ...), N pulls per tool into a
fresh empty OCI layout each:

- lamina: `lamina pull --quiet --insecure 127.0.0.1:PORT/corpus/TAG:TAG --layout DIR:TAG`
- skopeo: `skopeo copy --src-tls-verify=false docker://... oci:DIR:TAG`

and, after each lamina run, the same pull again into the layout that now has
every blob (the try-skip path). Both tools verify every blob's digest. The
registry's storage is read once before timing, so it serves from the page
cache. Reports median (min) wall time and peak RSS, the target (lamina no
slower than skopeo) as PASS/MISS, writes the section between
<!-- bench:pull:begin --> and <!-- bench:pull:end --> of --out and prints it.
Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from common import (
    REPO,
    RunResult,
    find_corpus,
    fmt_time,
    fs_type,
    join_markdown,
    lamina_cmd,
    lamina_version,
    layout_tags,
    load_note,
    machine_line,
    md_table,
    median,
    peak_cell,
    print_run,
    remove_tree,
    replace_section,
    report_tail,
    rerun_line,
    resolve_layers,
    rss_method,
    run_measured,
    tool_version,
    warm,
)

SECTION = "pull"
TOOLS = ("lamina", "skopeo", "lamina-again")
REGISTRY = "/usr/bin/docker-registry"




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cfg = {"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
           "storage": {"filesystem": {"rootdirectory": str(root / "registry")}},
           "http": {"addr": f"127.0.0.1:{port}", "secret": "bench"}}
    conf = root / "registry.yml"
    conf.write_text(json.dumps(cfg))  # YAML is a superset of JSON
    log = open(root / "registry.log", "wb")  # noqa: SIM115 - lives as long as the registry
    proc = subprocess.Popen([REGISTRY, "serve", str(conf)], stdout=log, stderr=log)
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    raise SystemExit(f"error: docker-registry did not start; see {root / 'registry.log'}")


def command(tool: str, ref: str, dest: Path, tag: str, lamina: list[str]) -> list[str]:
    if tool.startswith("lamina"):
        return [*lamina, "pull", "--quiet", "--insecure", ref, "--layout", f"{dest}:{tag}"]
    return ["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
            f"oci:{dest}:{tag}"]


def tagged_digest(layout: Path, tag: str) -> str | None:
    try:
        idx = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError):
        return None
    for m in idx.get("manifests", []):
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
            return str(m.get("digest"))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--corpus", help="corpus dir (default: $LAMINA_CORPUS or "
                   "/var/tmp/lamina-corpus)")
    p.add_argument("--tag", default="app", help="tag of CORPUS/oci (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=3, help="pulls per tool (default 3)")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"),
                   help="markdown file whose pull section is rewritten ('' = print only)")
    p.add_argument("--workdir", default="/var/tmp/lamina-bench",
                   help="registry storage and layouts go here (default: %(default)s)")
    p.add_argument("--lamina", help="lamina command (default: the venv's console script)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per command")
    args = p.parse_args(argv)
    corpus = find_corpus(args.corpus)
    src = corpus / "oci"
    if args.tag not in layout_tags(src):
        print(f"error: {src} has no tag {args.tag!r}", file=sys.stderr)
        return 2
    for tool in ("skopeo", REGISTRY):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found (make apt-deps installs it)", file=sys.stderr)
            return 2
    lamina = lamina_cmd(args.lamina)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="pull-", dir=workdir))
    layers = resolve_layers(src, args.tag)
    size = sum(ly.size for ly in layers)
    runs: dict[str, list[RunResult]] = {t: [] for t in TOOLS}
    digests: dict[str, set[str | None]] = {t: set() for t in TOOLS}
    proc, host = start_registry(root)
    ref = f"{host}/corpus/{args.tag}:{args.tag}"
    try:
        print(f"pull benchmark: {args.tag} ({len(layers)} layers, {size / 1e6:.1f} MB) from "
              f"{host}, {args.repeat} runs per tool, work dir {root}", file=sys.stderr)
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                        f"oci:{src}:{args.tag}", f"docker://{ref}"], check=True)
        warm([p for p in (root / "registry").rglob("data") if p.is_file()])
        for rep in range(args.repeat):
            for tool in ("lamina", "skopeo"):
                dest = root / f"dest-{tool}"
                remove_tree(dest)
                os.sync()
                r = run_measured(command(tool, ref, dest, args.tag, lamina),
                                 timeout=args.timeout)
                runs[tool].append(r)
                digests[tool].add(tagged_digest(dest, args.tag))
                report(tool, rep, args.repeat, r)
                if tool == "lamina" and r.ok:
                    r2 = run_measured(command(tool, ref, dest, args.tag, lamina),
                                      timeout=args.timeout)
                    runs["lamina-again"].append(r2)
                    report("lamina-again", rep, args.repeat, r2)
                remove_tree(dest)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        remove_tree(root)
    body = render(runs, digests, corpus=corpus, tag=args.tag, layers=len(layers), size=size,
                  workdir=workdir, repeat=args.repeat, lamina=lamina, argv=argv)
    print(body)
    if args.out:
        replace_section(Path(args.out), SECTION, body)
        print(f"\nwrote section '{SECTION}' of {args.out}", file=sys.stderr)
    return 0


def report(tool: str, rep: int, repeat: int, r: RunResult) -> None:
    print_run(f"  {tool:<12} {rep + 1}/{repeat}: ", r, cpu=None)


def render(runs: dict[str, list[RunResult]], digests: dict[str, set[str | None]], *,
           corpus: Path, tag: str, layers: int, size: int, workdir: Path, repeat: int,
           lamina: list[str], argv: Sequence[str]) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    la, sk = [r for r in runs["lamina"] if r.ok], [r for r in runs["skopeo"] if r.ok]
    if la and sk:
        q = median([r.seconds for r in la]) / median([r.seconds for r in sk])
        ratio = f"{q:.2f} {'PASS' if q <= 1.0 else 'MISS'}"
    else:
        ratio = "FAIL MISS"
    rows = [
        ["lamina pull", fmt_time(runs["lamina"]), ratio, peak_cell(runs["lamina"])],
        ["skopeo copy", fmt_time(runs["skopeo"]), "1.00", peak_cell(runs["skopeo"])],
        ["lamina pull, blobs present", fmt_time(runs["lamina-again"]), "",
         peak_cell(runs["lamina-again"])],
    ]
    same = digests["lamina"] == digests["skopeo"] and None not in digests["lamina"]
    again = [r for r in runs["lamina-again"] if r.ok]
    split = ""
    if la and sk and again:
        fixed, total = median([r.seconds for r in again]), median([r.seconds for r in la])
        split = (f"- Where lamina's time goes: {fixed:.2f} s is fixed cost (Python start-up "
                 f"and imports, the manifest, the tag: the \"blobs present\" row), so the "
                 f"transfer itself took about {total - fixed:.2f} s, against "
                 f"{median([r.seconds for r in sk]):.2f} s for all of skopeo's run.")
    load = load_note((r for rs in runs.values() for r in rs),
                     incl=", incl. the registry serving the blobs")
    fails = []
    for t, rs in runs.items():
        bad = [r for r in rs if not r.ok]
        if bad:
            fails.append(f"- {t}: {len(bad)}/{len(rs)} runs failed: `{bad[-1].last_line[:200]}`")
    raw = []
    for t, rs in runs.items():
        secs = ", ".join(f"{r.seconds:.2f}" if r.ok else "fail" for r in rs)
        cpu = ", ".join("?" if r.cpu_seconds is None else f"{r.cpu_seconds:.2f}" for r in rs)
        raw.append(f"- {t}: wall {secs} s; cpu {cpu} s")
    versions = (f"{lamina_version(lamina)}, "
                f"{tool_version(['skopeo', '--version'])}, docker-registry "
                f"{tool_version([REGISTRY, '--version']).split()[-1]}")
    lines = [
        "## Pull: lamina vs skopeo from a loopback registry",
        "",
        f"{now}; {machine_line()}; work dir {workdir} on {fs_type(workdir)}; image "
        f"{corpus}/oci:{tag} ({layers} layers, {size / 1e6:.1f} MB compressed). Tools: "
        f"{versions}.",
        "",
        "Target: `lamina pull` no slower than `skopeo copy docker://... oci:...` (medians).",
        "",
        md_table(["command", "wall s", "vs skopeo", "peak RSS MB"], rows,
                 [False, True, True, True]),
        "",
        f"- Times are wall seconds, median (min) of {repeat} runs per tool, interleaved "
        "(lamina, skopeo, lamina, ...) in one process, each into a fresh empty layout on the "
        "same filesystem (removed outside the timing), `sync` before each run. The registry "
        "(docker-registry, filesystem storage under the work dir, plain http on 127.0.0.1) "
        "got the image once from `skopeo copy` and serves it from the page cache.",
        "- lamina: `lamina pull --quiet --insecure REF --layout DIR:TAG` (4 concurrent blob "
        "downloads, sha256 verified while streaming, every blob fsynced before it is "
        "renamed into place); skopeo: `skopeo copy -q --src-tls-verify=false docker://REF "
        "oci:DIR:TAG`. \"blobs present\": lamina pulled again into the layout it just "
        "filled (manifest fetched, every blob skipped).",
        f"- Both tools wrote the same manifest digest: {'yes' if same else 'NO'}. Peak RSS: "
        f"largest max-RSS over the runs ({rss_method()}); MB = 10^6 bytes.",
        split,
        *fails,
        f"- {load} **The machine may be busy with other work (2 shared CPUs): timings are "
        "noisy; compare the min column.**",
        *report_tail(raw, rerun_line("bench/pull.py", argv)),
    ]
    return join_markdown(lines)


if __name__ == "__main__":
    raise SystemExit(main())

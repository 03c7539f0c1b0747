#!/usr/bin/env python3
"""Repack benchmark: lamina vs umoci on the corpus `app` image.

    python bench/repack.py [--corpus DIR] [--tag app] [--repeat N] [--out BENCHMARKS.md]

Two scenarios: touch10 (a line appended to 10 existing regular files of the
rootfs) and add1000 (1000 new small files in a new directory). For each tool
and scenario the image is unpacked once with the tool's own unpacker
(`lamina unpack` / `umoci unpack`), outside the timing, the identical edit is
applied, and then only the repack is timed, N times, interleaved (lamina,
umoci, lamina, ...), each run tagging a new image (repack does not refresh
the bundle, so every run computes the same diff). Everything is written into
a private copy of the layout below --workdir (index.json and oci-layout
copied, blobs hard-linked), never into the corpus. Reports median and
minimum wall time, peak RSS and the size of the new layer, writes the section
between <!-- bench:repack:begin --> and <!-- bench:repack:end --> of --out
and prints it. Targets (lamina <= 0.25x umoci for touch10, <= 0.5x for
add1000) are marked PASS/MISS; nothing here asserts on timings.

If bench/unpack.py is running, this waits for it (up to --wait seconds)
before anything is unpacked or timed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from common import (
    REPO,
    RunResult,
    can_drop_caches,
    drop_clean_caches,
    failure_note,
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
    publish,
    remove_tree,
    report_tail,
    rerun_line,
    resolve_layers,
    rss_method,
    run_measured,
    run_numbers,
    scratch_dir,
    tool_version,
)

SECTION = "repack"
TOOLS = ("lamina", "umoci")
SCENARIOS = ("touch10", "add1000")
TARGETS = {"touch10": 0.25, "add1000": 0.5}  # lamina/umoci wall time, at most
DESCRIBE = {
    "touch10": "a line appended to 10 existing regular files",
    "add1000": "1000 new small files in a new directory",
}
OTHER_BENCH = "bench/unpack.py"
ADD_DIR = "lamina-bench-add1000"


@dataclass
class Case:
    scenario: str
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    layer_size: dict[str, int] = field(default_factory=dict)
    setup_errors: dict[str, str] = field(default_factory=dict)

    def ok_runs(self, tool: str) -> list[RunResult]:
        return [r for r in self.runs.get(tool, []) if r.ok]


# --------------------------------------------------------------------------- commands




def unpack_cmd(tool: str, ref: str, bundle: Path, lamina: list[str],
               rootless: bool) -> list[str]:
    extra = ["--rootless"] if rootless else []
    if tool == "lamina":
        return [*lamina, "unpack", "--quiet", *extra, "--image", ref, str(bundle)]
    return ["umoci", "unpack", *extra, "--image", ref, str(bundle)]


def repack_cmd(tool: str, ref: str, bundle: Path, lamina: list[str]) -> list[str]:
    if tool == "lamina":
        return [*lamina, "repack", "--quiet", "--image", ref, str(bundle)]
    return ["umoci", "repack", "--image", ref, str(bundle)]


# --------------------------------------------------------------------------- setup


def other_bench_running() -> list[int]:
    """pids of processes (not this one) whose command line contains bench/unpack.py."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if OTHER_BENCH in cmd:
            pids.append(int(d))
    return pids


def wait_for_other_bench(limit: float, poll: float = 10.0) -> str:
    """Poll until bench/unpack.py is gone; returns a note for the report ('' if idle)."""
    t0 = time.monotonic()
    pids = other_bench_running()
    if not pids:
        return ""
    print(f"waiting for {OTHER_BENCH} (pids {pids}) to finish, up to {limit:.0f} s ...",
          file=sys.stderr, flush=True)
    while pids and time.monotonic() - t0 < limit:
        time.sleep(poll)
        pids = other_bench_running()
    waited = time.monotonic() - t0
    if pids:
        print(f"warning: {OTHER_BENCH} still running after {waited:.0f} s; going on",
              file=sys.stderr, flush=True)
        return (f"**{OTHER_BENCH} was still running during this benchmark (waited "
                f"{waited:.0f} s): timings are noisy.**")
    print(f"{OTHER_BENCH} finished after {waited:.0f} s", file=sys.stderr, flush=True)
    return f"Waited {waited:.0f} s for a running {OTHER_BENCH} to finish before starting."


def private_layout(src: Path, dest: Path) -> None:
    """index.json + oci-layout copied, blobs/ hard-linked (copied across filesystems)."""
    dest.mkdir(parents=True)
    for name in ("index.json", "oci-layout"):
        shutil.copy2(src / name, dest / name)
    r = subprocess.run(["cp", "-al", str(src / "blobs"), str(dest / "blobs")],
                       stderr=subprocess.PIPE, check=False)
    if r.returncode != 0:
        remove_tree(dest / "blobs")
        subprocess.run(["cp", "-r", str(src / "blobs"), str(dest / "blobs")], check=True)


def pick_touch_files(rootfs: Path, n: int = 10) -> list[str]:
    """N regular files (not hard-linked, non-empty) spread evenly over the sorted tree."""
    cands = []
    for dirpath, dirnames, filenames in os.walk(rootfs):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.isfile(p) and not os.path.islink(p) and st.st_nlink == 1 \
                    and st.st_size > 0:
                cands.append(os.path.relpath(p, rootfs))
    if len(cands) <= n:  # tiny images (smoke tests): all of them
        return cands
    step = len(cands) / n
    return [cands[int(i * step + step / 2)] for i in range(n)]


def apply_edit(scenario: str, rootfs: Path, touch: Sequence[str]) -> None:
    if scenario == "touch10":
        for rel in touch:
            p = rootfs / rel
            if not p.is_file() or p.is_symlink():
                raise RuntimeError(f"{p}: not a regular file in this bundle")
            with open(p, "ab") as f:
                f.write(b"# touched by lamina bench/repack.py\n")
    elif scenario == "add1000":
        d = rootfs / ADD_DIR
        d.mkdir()
        for i in range(1000):
            (d / f"file-{i:04d}.txt").write_text(f"lamina repack benchmark file {i}\n" * 4)
    else:
        raise ValueError(scenario)


# --------------------------------------------------------------------------- running


def run_all(cases: Sequence[Case], *, layout_src: Path, tag: str, root: Path, repeat: int,
            lamina: list[str], rootless: bool, timeout: float, drop: bool) -> None:
    touch: list[str] = []
    for case in cases:
        bundles: dict[str, Path] = {}
        layouts: dict[str, Path] = {}
        for tool in TOOLS:
            case.runs[tool] = []
            layout = root / f"oci-{case.scenario}-{tool}"
            private_layout(layout_src, layout)
            bundle = root / f"bundle-{case.scenario}-{tool}"
            if drop:
                drop_clean_caches()
            t0 = time.perf_counter()
            r = subprocess.run(unpack_cmd(tool, f"{layout}:{tag}", bundle, lamina, rootless),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=timeout, check=False)
            if r.returncode != 0:
                err = r.stderr.decode("utf-8", "replace").strip().splitlines()
                case.setup_errors[tool] = f"unpack failed (rc {r.returncode}): " + \
                    (err[-1] if err else "")
                print(f"  {case.scenario:<8} {tool:<6} {case.setup_errors[tool]}",
                      file=sys.stderr)
                continue
            if not touch:
                touch = pick_touch_files(bundle / "rootfs")
            try:
                apply_edit(case.scenario, bundle / "rootfs", touch)
            except (OSError, RuntimeError) as e:
                case.setup_errors[tool] = f"edit failed: {e}"
                continue
            print(f"  {case.scenario:<8} {tool:<6} unpacked + edited "
                  f"({time.perf_counter() - t0:.1f} s, untimed)", file=sys.stderr, flush=True)
            bundles[tool], layouts[tool] = bundle, layout
        for rep in range(repeat):
            for tool, bundle in bundles.items():
                new_tag = f"new-{case.scenario}-{rep}"
                os.sync()
                r = run_measured(repack_cmd(tool, f"{layouts[tool]}:{new_tag}", bundle, lamina),
                                 timeout=timeout)
                case.runs[tool].append(r)
                if r.ok and tool not in case.layer_size:
                    layers = resolve_layers(layouts[tool], new_tag)
                    base = resolve_layers(layouts[tool], tag)
                    if len(layers) == len(base) + 1:
                        case.layer_size[tool] = layers[-1].size
                print_run(f"  {case.scenario:<8} {tool:<6} repack {rep + 1}/{repeat}: ", r)
        for tool in TOOLS:
            remove_tree(root / f"bundle-{case.scenario}-{tool}")
            remove_tree(root / f"oci-{case.scenario}-{tool}")


# --------------------------------------------------------------------------- report


def fmt_size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def table_rows(cases: Sequence[Case]) -> list[list[str]]:
    rows = []
    for c in cases:
        la, um = c.ok_runs("lamina"), c.ok_runs("umoci")
        target = TARGETS[c.scenario]
        if la and um:
            q = median([r.seconds for r in la]) / median([r.seconds for r in um])
            ratio, verdict = f"{q:.2f}", "PASS" if q <= target else "MISS"
        else:
            ratio, verdict = "FAIL", "MISS"
        rows.append([c.scenario, fmt_time(la), fmt_time(um), ratio,
                     f"<= {target}x {verdict}",
                     fmt_size(c.layer_size.get("lamina")), fmt_size(c.layer_size.get("umoci")),
                     peak_cell(la), peak_cell(um)])
    return rows


def notes(cases: Sequence[Case], repeat: int) -> list[str]:
    out = []
    for c in cases:
        for tool, err in c.setup_errors.items():
            out.append(f"{c.scenario}: {tool} {err[:200]}")
        for tool in TOOLS:
            failed = failure_note(f"{c.scenario}: {tool} repack", c.runs.get(tool, []), repeat)
            if failed:
                out.append(failed)
    return out


def render(cases: Sequence[Case], *, corpus: Path, tag: str, workdir: Path, repeat: int,
           lamina: list[str], rootless: bool, argv: Sequence[str], wait_note: str,
           base_layers: int | None) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = ["scenario", "lamina s", "umoci s", "lamina/umoci", "target",
              "lamina layer", "umoci layer", "lamina peak RSS MB", "umoci peak RSS MB"]
    right = [False, True, True, True, False, True, True, True, True]
    versions = f"{lamina_version(lamina)}, {tool_version(['umoci', '--version'])}"
    files = f" ({base_layers} layers)" if base_layers is not None else ""
    load = load_note((r for c in cases for rs in c.runs.values() for r in rs),
                     compare="the min columns")
    lines = [
        "## Repack: lamina vs umoci",
        "",
        f"{now}; {machine_line()}; work dir {workdir} on {fs_type(workdir)}; "
        f"image {corpus}/oci:{tag}{files}. Tools: {versions}.",
        "",
        "Targets (wall time, medians): lamina <= 0.25x umoci after touching 10 files, "
        "<= 0.5x after adding 1000 files.",
        "",
        md_table(header, table_rows(cases), right),
        "",
        "- Scenarios: " + "; ".join(f"{s}: {DESCRIBE[s]}" for s in SCENARIOS) +
        " (the same paths and contents for both tools).",
        "- Per tool and scenario the image is unpacked once with the tool's own unpacker "
        "(`lamina unpack --quiet --image L:TAG B` / `umoci unpack --image L:TAG B`) and "
        "edited, outside the timing; only the repack is timed: `lamina repack --quiet "
        "--image L:new-N B` / `umoci repack --image L:new-N B` (gzip layers, no "
        "bundle refresh, so every run computes the same diff).",
        f"- Times are wall seconds, median (min) of {repeat} repacks per tool, run "
        "interleaved (lamina, umoci, lamina, ...) with `sync` before each; the rootfs is "
        "in the page cache (just unpacked). Layer: compressed size of the new layer blob. "
        f"Peak RSS: largest max-RSS over the runs ({rss_method()}); MB = 10^6 bytes.",
        "- Each tool writes into its own private copy of the layout (index.json and "
        "oci-layout copied, blobs hard-linked); the corpus is not modified.",
        *[f"- {n}" for n in notes(cases, repeat)],
        f"- {wait_note}" if wait_note else "",
        f"- {load}" if load else "",
        "- Run as non-root: both tools unpack with `--rootless`." if rootless else "",
        *report_tail([run_numbers(f"{c.scenario} / {tool}", c.runs[tool])
                      for c in cases for tool in TOOLS if c.runs.get(tool)],
                     rerun_line("bench/repack.py", argv)),
    ]
    return join_markdown(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--corpus", help="corpus dir (default: $LAMINA_CORPUS or "
                   "/var/tmp/lamina-corpus)")
    p.add_argument("--tag", default="app", help="tag of CORPUS/oci (default: %(default)s)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help="subset of %(default)s")
    p.add_argument("--repeat", type=int, default=3,
                   help="repacks per tool and scenario (default 3)")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"),
                   help="markdown file whose repack section is rewritten ('' = print only)")
    p.add_argument("--workdir", default="/var/tmp/lamina-bench",
                   help="where layouts and bundles go (default: %(default)s)")
    p.add_argument("--lamina", help="lamina command (default: the console script next to "
                   "this python, else 'python -m lamina')")
    p.add_argument("--wait", type=float, default=480.0,
                   help=f"seconds to wait for a running {OTHER_BENCH} (default: %(default)s)")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                   help="do not drop the clean page cache before each (untimed) unpack")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per command")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    bad = set(a.scenarios.split(",")) - set(SCENARIOS)
    if bad:
        p.error(f"unknown scenarios: {', '.join(sorted(bad))}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    corpus = find_corpus(args.corpus)
    layout_src = corpus / "oci"
    if args.tag not in layout_tags(layout_src):
        print(f"error: {layout_src} has no tag {args.tag!r}", file=sys.stderr)
        return 2
    if shutil.which("umoci") is None:
        print("error: umoci not found (apt-get install umoci)", file=sys.stderr)
        return 2
    cases = [Case(s) for s in SCENARIOS if s in args.scenarios.split(",")]
    lamina = lamina_cmd(args.lamina)
    rootless = os.geteuid() != 0
    drop = args.drop_caches and can_drop_caches()
    wait_note = wait_for_other_bench(args.wait)
    workdir = Path(args.workdir).resolve()
    with scratch_dir(workdir, "repack-") as root:
        print(f"repack benchmark: {len(cases)} scenarios x {len(TOOLS)} tools x "
              f"{args.repeat} runs, work dir {root} ({fs_type(root)})", file=sys.stderr)
        run_all(cases, layout_src=layout_src, tag=args.tag, root=root, repeat=args.repeat,
                lamina=lamina, rootless=rootless, timeout=args.timeout, drop=drop)
    body = render(cases, corpus=corpus, tag=args.tag, workdir=workdir, repeat=args.repeat,
                  lamina=lamina, rootless=rootless, argv=argv, wait_note=wait_note,
                  base_layers=len(resolve_layers(layout_src, args.tag)))
    publish(body, args.out, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

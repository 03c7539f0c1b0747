#!/usr/bin/env python3
"""Unpack benchmark: lamina vs umoci vs GNU tar on the real corpus.

    python bench/unpack.py [--corpus DIR] [--tags base,py,app,many] [--repeat N]
                           [--out BENCHMARKS.md]

For each tag the three commands run interleaved (lamina, umoci, tar, lamina,
...), N times each, every run into a fresh directory below --workdir (removed
again outside the timing, `sync` before every timed run). Reports median and
minimum wall time and the peak RSS, writes the section between
<!-- bench:unpack:begin --> and <!-- bench:unpack:end --> of --out and prints
it. The targets (lamina <= 0.5x umoci, <= 1.3x tar, peak RSS < 200 MB) are
marked PASS/MISS; nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from common import (
    REPO,
    Layer,
    RunResult,
    can_drop_caches,
    count_files,
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
    peak_mb,
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
    warm,
)

SECTION = "unpack"
TOOLS = ("lamina", "umoci", "tar")
TARGET_UMOCI = 0.5  # lamina/umoci wall time, at most
TARGET_TAR = 1.3  # lamina/tar wall time, at most
TARGET_RSS_MB = 200.0  # lamina peak RSS, below
TAR_DONE = "Exiting with failure status due to previous errors"


@dataclass
class Case:
    label: str
    layout: Path
    tag: str
    layers: list[Layer]
    tools: tuple[str, ...]  # what runs
    wanted: tuple[str, ...]  # what applies to this image (umoci: not for zstd)
    runs: dict[str, list[RunResult]] = field(default_factory=dict)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    tar_errors: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.layout}:{self.tag}"

    @property
    def slug(self) -> str:
        return f"{self.layout.name}-{self.tag}"

    def ok_runs(self, tool: str) -> list[RunResult]:
        return [r for r in self.runs.get(tool, []) if r.ok]


# --------------------------------------------------------------------------- commands




def tar_script(layers: Sequence[Layer], dest: Path) -> str:
    """All layers in order; a layer tar fails on does not stop the later ones."""
    flags = {"gzip": ["-xzf"], "zstd": ["--zstd", "-xf"], "none": ["-xf"]}
    parts = [shlex.join(["tar", *flags[la.compression], str(la.path), "-C", str(dest)])
             + " || rc=$?" for la in layers]
    return "rc=0; " + "; ".join(parts) + "; exit $rc"


def command(tool: str, case: Case, dest: Path, lamina: list[str], rootless: bool) -> list[str]:
    extra = ["--rootless"] if rootless else []
    if tool == "lamina":
        return [*lamina, "unpack", "--quiet", *extra, "--image", case.ref, str(dest)]
    if tool == "umoci":
        return ["umoci", "unpack", *extra, "--image", case.ref, str(dest)]
    if tool == "tar":
        return ["sh", "-c", tar_script(case.layers, dest)]
    raise ValueError(tool)


# --------------------------------------------------------------------------- running


def run_case(case: Case, root: Path, repeat: int, lamina: list[str], rootless: bool,
             timeout: float, drop: bool) -> None:
    blobs = [la.path for la in case.layers]
    warm(blobs)
    for tool in case.tools:
        case.runs[tool] = []
    for rep in range(repeat):
        for tool in case.tools:
            dest = root / f"{case.slug}-{tool}-{rep}"
            remove_tree(dest)
            if tool == "tar":
                dest.mkdir()  # lamina and umoci create the bundle themselves
            cmd = command(tool, case, dest, lamina, rootless)
            if drop:  # see common.drop_clean_caches: undo the cost of the last deletion
                drop_clean_caches()
                warm(blobs)
            os.sync()
            r = run_measured(cmd, timeout=timeout)
            if tool == "tar" and r.rc == 2 and TAR_DONE in r.stderr_tail:
                # GNU tar went through the whole archive but could not apply some
                # member (e.g. a file replacing a directory of a lower layer): the
                # time is kept and the error reported in the notes
                case.tar_errors = [ln for ln in r.stderr_tail.splitlines()
                                   if ln.startswith("tar: ") and TAR_DONE not in ln]
                r.rc = 0
            case.runs[tool].append(r)
            tar_errors = tool == "tar" and case.tar_errors
            print_run(f"  {case.label:<12} {tool:<6} run {rep + 1}/{repeat}: ", r, cpu=".1f",
                      kib=True, note=" (tar reported errors, see notes)" if tar_errors else "")
            if r.ok and tool not in case.counts:
                tree = dest if tool == "tar" else dest / "rootfs"
                case.counts[tool] = count_files(tree)
            remove_tree(dest)


# --------------------------------------------------------------------------- report


def ratio_cell(case: Case, other: str, target: float) -> str:
    if other not in case.tools:
        return "n/a" if other not in case.wanted else "not run"
    if "lamina" not in case.tools:
        return "not run"
    a, b = case.ok_runs("lamina"), case.ok_runs(other)
    if not a or not b:
        return "FAIL"
    q = median([r.seconds for r in a]) / median([r.seconds for r in b])
    return f"{q:.2f} {'PASS' if q <= target else 'MISS'}"


def table_rows(cases: Sequence[Case]) -> list[list[str]]:
    rows = []
    for c in cases:
        files = next((f"{c.counts[t][0]:,}" + ("" if t == "lamina" else f" ({t})")
                      for t in ("lamina", "umoci", "tar") if t in c.counts), "?")
        comp = sum(la.size for la in c.layers) / 1e6
        cells = [c.label, str(len(c.layers)), files, f"{comp:.1f} MB"]
        for tool in TOOLS:
            cells.append(fmt_time(c.ok_runs(tool)) if tool in c.tools
                         else "n/a" if tool not in c.wanted else "not run")
        if c.tar_errors:
            cells[-1] += " *"
        cells.append(ratio_cell(c, "umoci", TARGET_UMOCI))
        cells.append(ratio_cell(c, "tar", TARGET_TAR))
        for tool in ("lamina", "umoci"):
            mb = peak_mb(c.ok_runs(tool)) if tool in c.tools else None
            if tool not in c.tools:
                cells.append("n/a" if tool not in c.wanted else "not run")
            elif mb is None:
                cells.append("?")
            elif tool == "lamina":
                cells.append(f"{mb:.0f} {'PASS' if mb < TARGET_RSS_MB else 'MISS'}")
            else:
                cells.append(f"{mb:.0f}")
        rows.append(cells)
    return rows


def notes(cases: Sequence[Case], repeat: int) -> list[str]:
    out = []
    for c in cases:
        got = {t: n for t, (n, _) in c.counts.items()}
        if "lamina" in got and "umoci" in got and got["lamina"] != got["umoci"]:
            out.append(f"{c.label}: lamina produced {got['lamina']:,} regular files, "
                       f"umoci {got['umoci']:,}.")
        if "lamina" in got and "tar" in got and got["lamina"] != got["tar"]:
            out.append(f"{c.label}: raw tar extraction leaves {got['tar']:,} regular files "
                       f"(whiteouts not applied, `.wh.*` markers kept) vs lamina's "
                       f"{got['lamina']:,}.")
        if c.tar_errors:
            errs = "; ".join(f"`{e[:150]}`" for e in c.tar_errors[:3])
            out.append(f"{c.label}: tar (marked *) exits with status 2 after extracting "
                       f"everything: {errs} (a file replaces a directory of a lower layer; "
                       "only whiteout handling would allow that).")
        for tool in c.tools:
            failed = failure_note(f"{c.label}: {tool}", c.runs.get(tool, []), repeat)
            if failed:
                out.append(failed)
    return out


def render(cases: Sequence[Case], *, corpus: Path, workdir: Path, repeat: int,
           lamina: list[str], rootless: bool, argv: Sequence[str], drop: bool) -> str:
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = ["tag", "layers", "files", "compressed", "lamina s", "umoci s", "tar s",
              "lamina/umoci", "lamina/tar", "lamina peak RSS MB", "umoci peak RSS MB"]
    right = [False, True, True, True, True, True, True, True, True, True, True]
    versions = (f"{lamina_version(lamina)}, "
                f"{tool_version(['umoci', '--version'])}, {tool_version(['tar', '--version'])}")
    extra = list(notes(cases, repeat))
    load = load_note((r for c in cases for rs in c.runs.values() for r in rs),
                     incl=", incl. kernel writeback threads", compare="the min column")
    lines = [
        "## Unpack: lamina vs umoci vs GNU tar",
        "",
        f"{now}; {machine_line()}; work dir {workdir} on {fs_type(workdir)}; "
        f"corpus {corpus}. Tools: {versions}.",
        "",
        f"Targets: lamina <= {TARGET_UMOCI}x umoci, <= {TARGET_TAR}x GNU tar (wall time, "
        f"medians), peak RSS < {TARGET_RSS_MB:.0f} MB.",
        "",
        md_table(header, table_rows(cases), right),
        "",
        f"- Times are wall seconds, median (min) of {repeat} runs per tool; the tools run "
        "interleaved (lamina, umoci, tar, lamina, ...) in one process, each run into a "
        "fresh directory on the same filesystem, removed outside the timing; `sync` "
        "before every timed run; blobs pre-read into the page cache.",
        "- Before every run the clean page cache is dropped (`sync; echo 1 > "
        "/proc/sys/vm/drop_caches`) and the blobs re-read: on ext4 without a journal, "
        "creating inodes probes every inode deleted in the last 60 s whose inode-table "
        "block is cached (`recently_deleted()`), so removing the previous run's tree made "
        "the next run several times slower (system time), for every tool."
        if drop else
        "- The page cache was **not** dropped between runs (not root, or --no-drop-caches): "
        "on ext4 without a journal the deletion of the previous run's tree slows down "
        "inode creation in the next run (`recently_deleted()`), for every tool.",
        "- lamina: `lamina unpack --quiet --image OCI:TAG BUNDLE` (rootfs, config.json, "
        "lamina.json, lamina.snapshot); umoci: `umoci unpack --image OCI:TAG BUNDLE` "
        "(rootfs, config.json, mtree manifest).  lamina's modules are byte-compiled before "
        "the runs, as `pip install` does, and its compiled fast path (`lamina._fastpath`) "
        "is used.",
        "- tar: raw extraction, `tar -xzf BLOB -C DIR` (`tar --zstd -xf` for zstd) per "
        "layer in order in one `sh -c` (a failing layer does not stop the next); **tar does "
        "not apply whiteouts** and writes no config, so it does less work than a real unpack.",
        "- py (zstd) is the same image with zstd layers (`oci-zstd:py`); umoci 0.4.7 "
        "cannot read zstd layers (n/a).",
        f"- files: regular files in lamina's rootfs. Peak RSS: largest max-RSS of the "
        f"command and its children, over all runs ({rss_method()}); MB = 10^6 bytes.",
        *[f"- {n}" for n in extra],
        f"- {load}" if load else "",
        "" if not rootless else "- Run as non-root: lamina and umoci with `--rootless`.",
        *report_tail([run_numbers(f"{c.label} / {tool}", c.runs[tool], cpu=".1f", kib=True)
                      for c in cases for tool in c.tools],
                     rerun_line("bench/unpack.py", argv)),
    ]
    return join_markdown(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--corpus", help="corpus dir (default: $LAMINA_CORPUS or "
                   "/var/tmp/lamina-corpus)")
    p.add_argument("--tags", default="base,py,app,many",
                   help="comma-separated tags of CORPUS/oci (default: %(default)s)")
    p.add_argument("--zstd-tags", default="py",
                   help="tags of CORPUS/oci-zstd, lamina vs tar only; '' to skip "
                   "(default: %(default)s)")
    p.add_argument("--tools", default=",".join(TOOLS),
                   help="subset of %(default)s (e.g. umoci,tar while lamina is broken)")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool and tag (default 3)")
    p.add_argument("--out", default=str(REPO / "BENCHMARKS.md"),
                   help="markdown file whose unpack section is rewritten ('' = print only)")
    p.add_argument("--workdir", default="/var/tmp/lamina-bench",
                   help="where bundles are unpacked (default: %(default)s)")
    p.add_argument("--lamina", help="lamina command (default: the console script next to "
                   "this python, else 'python -m lamina')")
    p.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                   help="do not drop the clean page cache before each run (it is dropped "
                   "by default when writable: see the notes in the output)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    bad = set(a.tools.split(",")) - set(TOOLS)
    if bad:
        p.error(f"unknown tools: {', '.join(sorted(bad))}")
    return a


def build_cases(corpus: Path, args: argparse.Namespace) -> list[Case]:
    tools = tuple(t for t in TOOLS if t in args.tools.split(","))
    wanted: list[tuple[str, str, str, tuple[str, ...]]] = [
        ("oci", t, t, TOOLS) for t in args.tags.split(",") if t]
    if args.zstd_tags and (corpus / "oci-zstd" / "index.json").is_file():
        # umoci 0.4.7 cannot read zstd layers
        wanted += [("oci-zstd", t, f"{t} (zstd)", ("lamina", "tar"))
                   for t in args.zstd_tags.split(",") if t]
    elif args.zstd_tags:
        print(f"warning: {corpus}/oci-zstd missing, zstd rows skipped", file=sys.stderr)
    cases = []
    for sub, tag, label, applies in wanted:
        layout = corpus / sub
        if tag not in layout_tags(layout):
            print(f"warning: {layout} has no tag {tag!r}, skipped", file=sys.stderr)
            continue
        ts = tuple(t for t in applies if t in tools)
        cases.append(Case(label, layout, tag, resolve_layers(layout, tag), ts, applies))
    return cases


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    corpus = find_corpus(args.corpus)
    cases = build_cases(corpus, args)
    if not cases:
        print("error: nothing to benchmark", file=sys.stderr)
        return 2
    tools = {t for c in cases for t in c.tools}
    if "umoci" in tools and shutil.which("umoci") is None:
        print("error: umoci not found (apt-get install umoci, or --tools lamina,tar)",
              file=sys.stderr)
        return 2
    lamina = lamina_cmd(args.lamina)
    rootless = os.geteuid() != 0
    drop = args.drop_caches and can_drop_caches()
    workdir = Path(args.workdir).resolve()
    with scratch_dir(workdir, "unpack-") as root:
        print(f"unpack benchmark: {len(cases)} images x {len(tools)} tools x {args.repeat} "
              f"runs, work dir {root} ({fs_type(root)})", file=sys.stderr)
        for c in cases:
            run_case(c, root, args.repeat, lamina, rootless, args.timeout, drop)
    body = render(cases, corpus=corpus, workdir=workdir, repeat=args.repeat, lamina=lamina,
                  rootless=rootless, argv=argv, drop=drop)
    publish(body, args.out, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

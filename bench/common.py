"""Shared helpers for lamina's benchmarks (stdlib only; no timing assertions).

- locating the corpus built by ``shared/corpus/build-corpus.sh``
- resolving an OCI layout tag to its layer blobs
- running one command with wall time and peak RSS
- describing the machine and the filesystem of a directory
- replacing one marked section of a markdown file (BENCHMARKS.md)
- the pieces of a report several scripts print alike (progress lines, median (min)
  cells, peak RSS, load and failure notes, the per-run details and the rerun line)
- the set-up both lazy mount benchmarks share (options, root, a private layout)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def lamina_cmd(override: str | None) -> list[str]:
    """The lamina console script next to this interpreter, else `python -m lamina`.

    lamina's modules are byte-compiled first, as ``pip install`` does: an editable
    install under PYTHONDONTWRITEBYTECODE would otherwise compile ~30 modules from
    source on every run (~0.1 s), which no installed lamina pays.
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src" / "lamina")],
                   check=False, env={k: v for k, v in os.environ.items()
                                     if k != "PYTHONDONTWRITEBYTECODE"})
    if override:
        return shlex.split(override)
    for cand in (Path(sys.executable).parent / "lamina", REPO / ".venv" / "bin" / "lamina"):
        if cand.is_file() and os.access(cand, os.X_OK):
            return [str(cand)]
    found = shutil.which("lamina")
    if found:
        return [found]
    return [sys.executable, "-m", "lamina"]
DEFAULT_CORPUS = Path("/var/tmp/lamina-corpus")
BUILD_SCRIPT = REPO.parent / "shared" / "corpus" / "build-corpus.sh"
GNU_TIME = Path("/usr/bin/time")

# --------------------------------------------------------------------------- corpus


def find_corpus(arg: str | None, need: str = "oci") -> Path:
    """--corpus, else $LAMINA_CORPUS, else /var/tmp/lamina-corpus; exit 2 if absent."""
    src = arg or os.environ.get("LAMINA_CORPUS") or str(DEFAULT_CORPUS)
    corpus = Path(src).expanduser().resolve()
    if not (corpus / need / "index.json").is_file():
        rel = os.path.relpath(BUILD_SCRIPT, Path.cwd())
        print(f"error: no benchmark corpus at {corpus} (missing {need}/index.json)",
              file=sys.stderr)
        print("hint: build it first (needs root, debootstrap, umoci, skopeo; several minutes):\n"
              f"  sudo {rel} {DEFAULT_CORPUS}\n"
              "then pass --corpus DIR or set LAMINA_CORPUS if you built it elsewhere",
              file=sys.stderr)
        raise SystemExit(2)
    return corpus


# --------------------------------------------------------------------------- OCI layout

MT_INDEX = ("application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.list.v2+json")


@dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str
    size: int
    path: Path

    @property
    def compression(self) -> str:
        """'gzip', 'zstd' or 'none' from the layer media type."""
        mt = self.media_type
        if mt.endswith("gzip"):  # OCI tar+gzip and Docker's .tar.gzip
            return "gzip"
        if mt.endswith("zstd"):
            return "zstd"
        return "none"


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return layout / "blobs" / algo / hexd


def _read_json(path: Path) -> dict[str, object]:
    with open(path, "rb") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def _pick(manifests: list[dict[str, object]]) -> dict[str, object]:
    """From an image index: this machine's linux platform, else the first entry."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    for m in manifests:
        plat = m.get("platform")
        if isinstance(plat, dict) and plat.get("os") == "linux" \
                and plat.get("architecture") == arch:
            return m
    return manifests[0]


def resolve_layers(layout: Path, tag: str) -> list[Layer]:
    """Layers (in application order) of LAYOUT:TAG, read from index.json and the manifest."""
    index = _read_json(layout / "index.json")
    entries = index.get("manifests")
    assert isinstance(entries, list)
    desc: dict[str, object] | None = None
    for m in entries:
        ann = m.get("annotations") or {}
        if ann.get("org.opencontainers.image.ref.name") == tag:
            desc = m
            break
    if desc is None:
        raise KeyError(f"{layout}: no tag {tag!r}")
    for _ in range(8):  # nested indexes
        doc = _read_json(_blob(layout, str(desc["digest"])))
        if desc.get("mediaType") in MT_INDEX or doc.get("mediaType") in MT_INDEX:
            sub = doc.get("manifests")
            assert isinstance(sub, list) and sub
            desc = _pick(sub)
            continue
        layers = doc.get("layers")
        assert isinstance(layers, list)
        return [Layer(str(ld["digest"]), str(ld["mediaType"]), int(ld["size"]),
                      _blob(layout, str(ld["digest"]))) for ld in layers]
    raise ValueError(f"{layout}:{tag}: image index nesting too deep")


def layout_tags(layout: Path) -> list[str]:
    index = _read_json(layout / "index.json")
    entries = index.get("manifests")
    assert isinstance(entries, list)
    names = [(m.get("annotations") or {}).get("org.opencontainers.image.ref.name")
             for m in entries]
    return [str(n) for n in names if n]


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_caches() -> bool:
    return os.access(DROP_CACHES, os.W_OK)


def drop_clean_caches() -> bool:
    """sync, then drop the clean page cache (echo 1 > drop_caches); False if not allowed.

    Needed after deleting a big tree on ext4 without a journal: inode
    allocation skips and probes every inode deleted in the last 60 s whose
    inode-table block is still in the buffer cache (ext4 recently_deleted()),
    which made creating files several times slower for the next run.
    """
    os.sync()
    try:
        DROP_CACHES.write_text("1\n")
    except OSError:
        return False
    return True


def warm(paths: Sequence[Path]) -> None:
    """Read files once so every tool starts with the blobs in the page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass


# --------------------------------------------------------------------------- running

_WRAPPER = r"""
import json, resource, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
rc = subprocess.call(cmd)
dt = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as f:
    json.dump({"rc": rc, "seconds": dt, "maxrss_kb": ru.ru_maxrss,
               "cpu": ru.ru_utime + ru.ru_stime}, f)
"""


def busy_cpu_seconds() -> float | None:
    """Machine-wide non-idle CPU seconds so far (user+nice+system+irq+softirq)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass
class RunResult:
    rc: int
    seconds: float
    maxrss_kb: int | None
    stderr_tail: str
    cpu_seconds: float | None = None  # user+sys of the command and its children
    other_cpu: float | None = None  # average CPUs busy with anything else during the run

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def last_line(self) -> str:
        """The last line of the stderr tail ('' if none): what a report quotes of a failure."""
        lines = self.stderr_tail.strip().splitlines()
        return lines[-1] if lines else ""


def rss_method() -> str:
    return "/usr/bin/time -f %M" if GNU_TIME.is_file() and os.access(GNU_TIME, os.X_OK) \
        else "getrusage(RUSAGE_CHILDREN) in a python wrapper"


def run_measured(cmd: Sequence[str], timeout: float | None = None,
                 cwd: Path | None = None) -> RunResult:
    """Run CMD once: wall seconds (perf_counter around the process) and peak RSS (kB).

    Peak RSS is the largest max-RSS of the command and any of its descendants
    (what wait4() reports), via GNU time or a fresh python wrapper process.
    Also the command's CPU time and, from /proc/stat, how much CPU everything
    else on the machine used meanwhile (other benchmarks, builds: noise).
    stdout is discarded, the tail of stderr is kept for error reports.
    """
    with tempfile.TemporaryDirectory(prefix="bench-run-") as td:
        meas = Path(td) / "meas"
        errf = Path(td) / "stderr"
        use_time = rss_method().startswith("/usr/bin/time")
        if use_time:
            full = [str(GNU_TIME), "-f", "%M %U %S", "-o", str(meas), *cmd]
        else:
            full = [sys.executable, "-c", _WRAPPER, str(meas), *cmd]
        with open(errf, "wb") as err:
            busy0 = busy_cpu_seconds()
            t0 = time.perf_counter()
            try:
                p = subprocess.run(full, stdout=subprocess.DEVNULL, stderr=err,
                                   timeout=timeout, cwd=cwd, check=False)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = -9
            dt = time.perf_counter() - t0
            busy1 = busy_cpu_seconds()
        tail = errf.read_bytes()[-2000:].decode("utf-8", "replace")
        rss: int | None = None
        cpu: float | None = None
        try:
            text = meas.read_text()
        except OSError:
            text = ""
        if use_time:
            # GNU time writes "Command exited with non-zero status N" first on failure
            lines = [ln.split() for ln in text.splitlines() if ln.strip()]
            if lines and len(lines[-1]) == 3:
                rss = int(lines[-1][0])
                cpu = float(lines[-1][1]) + float(lines[-1][2])
        elif text:
            data = json.loads(text)
            rss = int(data["maxrss_kb"])
            cpu = float(data["cpu"])
            rc = int(data["rc"]) if rc == 0 else rc
            dt = float(data["seconds"])  # without the wrapper's own start-up
        other: float | None = None
        if busy0 is not None and busy1 is not None and cpu is not None and dt > 0:
            other = max(0.0, (busy1 - busy0 - cpu) / dt)
        return RunResult(rc, dt, rss, tail, cpu, other)


def remove_tree(path: Path) -> None:
    """rm -rf PATH (fast for 100k files); retries after chmod for read-only dirs."""
    if not os.path.lexists(path):
        return
    if subprocess.run(["rm", "-rf", "--", str(path)], stderr=subprocess.DEVNULL,
                      check=False).returncode != 0:
        subprocess.run(["chmod", "-R", "u+rwx", "--", str(path)], stderr=subprocess.DEVNULL,
                       check=False)
        subprocess.run(["rm", "-rf", "--", str(path)], check=True)


@contextlib.contextmanager
def scratch_dir(workdir: Path, prefix: str) -> Iterator[Path]:
    """A fresh directory below WORKDIR for one benchmark's runs, removed afterwards,
    and WORKDIR with it if this made it (and nothing else is left in it)."""
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        yield root
    finally:
        remove_tree(root)
        if created:
            try:
                workdir.rmdir()
            except OSError:
                pass


def count_files(root: Path) -> tuple[int, int]:
    """(regular files, all entries) below ROOT, symlinks not followed."""
    files = total = 0
    stack = [str(root)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                total += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.is_file(follow_symlinks=False):
                    files += 1
    return files, total


# --------------------------------------------------------------------------- machine


def fs_type(path: Path) -> str:
    """Filesystem type of PATH from /proc/self/mountinfo (longest mount-point prefix)."""
    real = os.path.realpath(path)
    best, best_fs = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].replace("\\040", " ")
                fst = right.split()[0]
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, best_fs = mnt, fst
    except OSError:
        pass
    return best_fs


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return 0.0


def machine_line() -> str:
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{ncpu} CPUs (nproc; {cpu_model()}), {mem_total_gb():.1f} GB RAM, "
            f"Linux {platform.release()}, Python {platform.python_version()}")


def tool_version(cmd: Sequence[str]) -> str:
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).is_file():
        return "not installed"
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    out = (p.stdout or p.stderr).strip().splitlines()
    return out[0].strip() if out else "unknown"


def lamina_version(lamina: Sequence[str]) -> str:
    """'lamina X.Y' as the reports name it."""
    return f"lamina {tool_version([*lamina, '--version']).removeprefix('lamina ')}"


# --------------------------------------------------------------------------- stats / output


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def replace_section(path: Path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Write BODY between <!-- bench:NAME:begin --> and <!-- bench:NAME:end --> in PATH.

    Everything outside the markers is kept; file and markers are created when
    missing (a new section goes at the end of the file).
    """
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else ""
    i, j = text.find(begin), text.find(end)
    if i >= 0 and j > i:
        new = text[:i] + block + text[j + len(end):]
    else:
        if not text.strip():
            text = (f"{title}\n\nGenerated by the scripts in `bench/`; each section is "
                    "rewritten by its script, do not edit between the markers.\n")
        new = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]],
             right: Sequence[bool] | None = None) -> str:
    right = right or [False] * len(header)
    sep = ["---:" if r else "---" for r in right]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def join_markdown(lines: list[str]) -> str:
    """Join report lines, collapsing runs of blank lines (optional notes leave gaps)."""
    return "\n".join(ln for i, ln in enumerate(lines)
                     if not (ln == "" and i > 0 and lines[i - 1] == ""))


# --------------------------------------------------------------------------- report pieces


def opt(x: float | None, fmt: str) -> str:
    """X formatted with FMT, '?' when it was not measured."""
    return "?" if x is None else format(x, fmt)


def _mb(kb: int, kib: bool) -> float:
    # maxrss_kb is in KiB; unpack.py's figures count it so, repack.py's and pull.py's
    # progress lines and per-run numbers have always divided by 1000 (kept as printed)
    return kb * (1024 if kib else 1000) / 1e6


def print_run(prefix: str, r: RunResult, *, cpu: str | None = ".2f", kib: bool = False,
              note: str = "") -> None:
    """One progress line on stderr: PREFIX, wall time, CPU time (format CPU; left out
    when None), peak RSS, other load, status + NOTE; a failed run's stderr tail below."""
    rss = f"{_mb(r.maxrss_kb, kib):.0f} MB" if r.maxrss_kb is not None else "?"
    cpu_part = "" if cpu is None else f" cpu {opt(r.cpu_seconds, cpu):>5} s"
    status = ("ok" if r.ok else f"FAILED rc={r.rc}") + note
    print(f"{prefix}{r.seconds:7.2f} s{cpu_part}  peak {rss:>7}  "
          f"other load {opt(r.other_cpu, '.2f')} CPUs  {status}", file=sys.stderr, flush=True)
    if not r.ok:
        print("    " + r.stderr_tail.strip().replace("\n", "\n    "), file=sys.stderr)


def median_min(secs: Sequence[float]) -> str:
    """'median (min)' of SECS, 'FAIL' when there are none."""
    return f"{median(secs):.2f} ({min(secs):.2f})" if secs else "FAIL"


def fmt_time(runs: Iterable[RunResult]) -> str:
    """'median (min)' wall seconds of the successful RUNS, 'FAIL' if none succeeded."""
    return median_min([r.seconds for r in runs if r.ok])


def peak_mb(runs: Iterable[RunResult]) -> float | None:
    """Largest max-RSS of RUNS in MB (10^6 bytes), None if none was measured."""
    vals = [r.maxrss_kb for r in runs if r.maxrss_kb is not None]
    return _mb(max(vals), True) if vals else None


def peak_cell(runs: Iterable[RunResult]) -> str:
    mb = peak_mb(runs)
    return "?" if mb is None else f"{mb:.0f}"


def load_note(runs: Iterable[RunResult], *, incl: str = "", compare: str | None = None) -> str:
    """How busy the machine was with other work during the timed RUNS ('' if unmeasured).

    INCL follows 'from /proc/stat' (what else that counts); with COMPARE, a busy machine
    (mean above 0.25 or peak above 0.75 CPUs) adds a warning to compare COMPARE instead.
    """
    vals = [r.other_cpu for r in runs if r.other_cpu is not None]
    if not vals:
        return ""
    mean, worst = sum(vals) / len(vals), max(vals)
    text = (f"Other load during the timed runs (CPU time of everything but the measured "
            f"command, from /proc/stat{incl}): mean {mean:.2f}, max {worst:.2f} of "
            f"{len(os.sched_getaffinity(0))} CPUs.")
    if compare and (mean > 0.25 or worst > 0.75):
        text += (f" **The machine was not idle: timings are noisy; compare {compare} "
                 "and rerun on a quiet machine.**")
    return text


def failure_note(what: str, runs: Sequence[RunResult], repeat: int) -> str:
    """'WHAT failed N/REPEAT runs (rc R): `last stderr line`', '' if none of RUNS failed."""
    bad = [r for r in runs if not r.ok]
    if not bad:
        return ""
    return (f"{what} failed {len(bad)}/{repeat} runs (rc {bad[-1].rc}): "
            f"`{bad[-1].last_line[:200]}`")


def run_numbers(label: str, runs: Sequence[RunResult], *, cpu: str = ".2f",
                kib: bool = False) -> str:
    """One line of a report's per-run details: wall, CPU, peak RSS and other load of
    every run of LABEL, in order."""
    secs = ", ".join(f"{r.seconds:.2f}" if r.ok else "fail" for r in runs)
    cpus = ", ".join(opt(r.cpu_seconds, cpu) for r in runs)
    rss = ", ".join(opt(_mb(r.maxrss_kb, kib) if r.maxrss_kb else None, ".0f") for r in runs)
    other = ", ".join(opt(r.other_cpu, ".2f") for r in runs)
    return f"- {label}: wall {secs} s; cpu {cpus} s; peak RSS {rss} MB; other load {other} CPUs"


def rerun_line(script: str, argv: Sequence[str]) -> str:
    """A report's last line: how to run SCRIPT again with the same arguments."""
    return (f"Rerun: `{shlex.join(['python', script, *argv])}` (from the repo root, "
            "with the venv's python).")


def report_tail(details: Sequence[str], rerun: str,
                summary: str = "per-run numbers") -> list[str]:
    """A report's closing lines: DETAILS folded into a <details> block, then RERUN."""
    return ["", f"<details><summary>{summary}</summary>", "", *details, "", "</details>", "",
            rerun]


def publish(body: str, out: str, section: str) -> None:
    """Print the report BODY and, unless OUT is '', write it as SECTION of the file OUT."""
    print(body)
    if out:
        path = Path(out)
        replace_section(path, section, body)
        print(f"\nwrote section '{section}' of {path}", file=sys.stderr)


# --------------------------------------------------------------------------- lazy mounts


def lazy_parser(description: str | None, workdir: str) -> argparse.ArgumentParser:
    """The options of bench/lazy.py and bench/lazy_remote.py; each adds its own --out."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--corpus")
    ap.add_argument("--tag", default="app")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", default=workdir)
    ap.add_argument("--lamina", help="command to run lamina (default: the venv's)")
    return ap


def require_root(why: str) -> None:
    """Exit 2 with an error naming WHY unless this runs as root."""
    if os.geteuid() != 0:
        print(f"error: needs root ({why})", file=sys.stderr)
        raise SystemExit(2)


def private_corpus_layout(corpus: Path, work: Path) -> Path:
    """WORK emptied, holding WORK/oci: CORPUS/oci with its blobs hard-linked and its
    index.json copied, so nothing lamina writes there (lazy indexes) reaches the corpus."""
    remove_tree(work)
    work.mkdir(parents=True)
    lay = work / "oci"
    shutil.copytree(corpus / "oci", lay, copy_function=os.link)
    os.unlink(lay / "index.json")           # written by nobody here, but keep it private
    shutil.copy(corpus / "oci" / "index.json", lay / "index.json")
    return lay


def lamina_umount(lamina: Sequence[str], mnt: Path) -> None:
    """`lamina umount MNT`, then a lazy umount if something is still mounted there."""
    subprocess.run([*lamina, "umount", str(mnt)], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    if os.path.ismount(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)

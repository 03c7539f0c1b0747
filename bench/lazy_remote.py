#!/usr/bin/env python3
"""Lazy mount from a registry: time from command to the first successful
`cat /etc/os-release` of the corpus `app` image served by a loopback registry,
lazy mount vs pull + full unpack.

    sudo .venv/bin/python bench/lazy_remote.py [--corpus DIR] [--tag app] [--repeat N]

Needs root (FUSE; unpack with ownership). Starts Debian's docker-registry on a
free 127.0.0.1 port (storage under --workdir), pushes a private copy of
CORPUS/oci:TAG (blobs hard-linked) with `lamina push --lazy-index` (untimed;
the index build and the artifact size are reported), then times, interleaved,
each as one `sh -c 'COMMAND && cat FILE'`:

- lazy:        `lamina mount -q --insecure docker://REF M && cat M/etc/os-release`
               (manifest, config and the index artifact fetched, then the file's
               compressed range; a fresh private cache each time)
- lazy, kept:  the same with `--cache DIR` kept from the previous lazy-kept run
               (index and file already local: manifests only)
- pull+unpack: `lamina pull -q --insecure REF --layout D:TAG &&
               lamina unpack -q --image D:TAG B && cat B/rootfs/etc/os-release`
- skopeo+umoci: `skopeo copy docker://REF oci:D:TAG && umoci unpack --image D:TAG B
               && cat ...` (when both are installed)

Bytes over the network: for lazy, the mount's `user.lamina.lazy.stats`
(`blob_bytes_read`: range-request bytes) plus the index artifact's blobs; for
the full paths, every blob. Writes the section between
<!-- bench:lazy-remote:begin --> and <!-- bench:lazy-remote:end --> of --out
and prints it. Nothing here asserts on timings.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from common import (
    REPO,
    RunResult,
    drop_clean_caches,
    find_corpus,
    fmt_time,
    fs_type,
    join_markdown,
    lamina_cmd,
    lamina_umount,
    lazy_parser,
    machine_line,
    md_table,
    median,
    private_corpus_layout,
    remove_tree,
    replace_section,
    report_tail,
    require_root,
    resolve_layers,
    run_measured,
    tool_version,
    warm,
)
from pull import REGISTRY, start_registry

SECTION = "lazy-remote"
OS = "etc/os-release"
STATS = "user.lamina.lazy.stats"
KINDS = ("lazy", "lazy-kept", "pull+unpack", "skopeo+umoci")


def sh(*cmds: list[str]) -> str:
    """One shell command line running *cmds* in turn, stopping at the first failure."""
    return " && ".join(shlex.join(c) for c in cmds)


def main() -> int:
    ap = lazy_parser(__doc__.split("\n\n")[0] if __doc__ else None,
                     "/var/tmp/lamina-bench-lazy-remote")
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"),
                    help="markdown file whose section is rewritten ('' = print only)")
    args = ap.parse_args()
    require_root("FUSE mounts, unpack with ownership")
    corpus = find_corpus(args.corpus)
    lamina = lamina_cmd(args.lamina)
    umoci = shutil.which("umoci") and shutil.which("skopeo")
    kinds = KINDS if umoci else KINDS[:3]
    work = Path(args.workdir)
    lay = private_corpus_layout(corpus, work)
    layers = resolve_layers(lay, args.tag)
    compressed = sum(la.size for la in layers)
    proc, host = start_registry(work)
    ref = f"{host}/corpus/{args.tag}:{args.tag}"
    runs: dict[str, list[RunResult]] = {k: [] for k in kinds}
    lazy_bytes: dict[str, list[int]] = {"lazy": [], "lazy-kept": []}
    mnt, kept = work / "mnt", work / "kept-cache"
    mnt.mkdir()
    try:
        t0 = time.monotonic()
        r = subprocess.run([*lamina, "push", "--json", "--insecure", "--lazy-index",
                            "--layout", f"{lay}:{args.tag}", ref],
                           capture_output=True, text=True, check=False)
        if r.returncode:
            print(f"push failed: {r.stderr}", file=sys.stderr)
            return 1
        push_secs = time.monotonic() - t0
        art = json.loads(r.stdout)["lazy_index"]["artifacts"][0]
        index_bytes = int(art["index_bytes"])
        print(f"pushed {ref} with its lazy index ({index_bytes / 1e6:.2f} MB) in "
              f"{push_secs:.1f}s", file=sys.stderr)
        stored = [p for p in (work / "registry").rglob("data") if p.is_file()]
        warm(stored)
        for rep in range(args.repeat):
            for kind in kinds:
                for d in ("dest", "bundle"):
                    remove_tree(work / d)
                if kind in ("pull+unpack", "skopeo+umoci") and drop_clean_caches():
                    warm(stored)    # see bench/lazy.py: a deleted big tree slows ext4
                os.sync()
                dest, bundle = work / "dest", work / "bundle"
                remote = f"docker://{ref}"
                mount = [*lamina, "mount", "-q", "--insecure"]
                if kind == "lazy-kept" and rep == 0:    # fill the kept cache, untimed
                    subprocess.run(["sh", "-c", sh([*mount, "--cache", str(kept), remote,
                                                    str(mnt)], ["cat", f"{mnt}/{OS}"])],
                                   stdout=subprocess.DEVNULL, check=True)
                    lamina_umount(lamina, mnt)
                if kind == "lazy":
                    cmd = sh([*mount, remote, str(mnt)], ["cat", f"{mnt}/{OS}"])
                elif kind == "lazy-kept":
                    cmd = sh([*mount, "--cache", str(kept), remote, str(mnt)],
                             ["cat", f"{mnt}/{OS}"])
                elif kind == "pull+unpack":
                    cmd = sh([*lamina, "pull", "-q", "--insecure", ref, "--layout",
                              f"{dest}:{args.tag}"],
                             [*lamina, "unpack", "-q", "--image", f"{dest}:{args.tag}",
                              str(bundle)],
                             ["cat", f"{bundle}/rootfs/{OS}"])
                else:
                    cmd = sh(["skopeo", "copy", "-q", "--src-tls-verify=false", remote,
                              f"oci:{dest}:{args.tag}"],
                             ["umoci", "--log", "error", "unpack", "--image",
                              f"{dest}:{args.tag}", str(bundle)],
                             ["cat", f"{bundle}/rootfs/{OS}"])
                res = run_measured(["sh", "-c", cmd])
                runs[kind].append(res)
                status = "ok" if res.ok else f"FAILED: {res.stderr_tail.strip()[-300:]}"
                print(f"  {kind:<13} {rep + 1}/{args.repeat}: {res.seconds:6.2f} s  {status}",
                      file=sys.stderr, flush=True)
                if kind.startswith("lazy"):
                    if res.ok:
                        stats = json.loads(os.getxattr(mnt, STATS))
                        lazy_bytes[kind].append(int(stats["blob_bytes_read"]))
                    lamina_umount(lamina, mnt)
                    time.sleep(0.2)
                if not res.ok:
                    return 1
        for d in ("dest", "bundle"):
            remove_tree(work / d)
    finally:
        lamina_umount(lamina, mnt)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    full = median([x.seconds for x in runs["pull+unpack"]])
    lazy = median([x.seconds for x in runs["lazy"]])
    lb = max(lazy_bytes["lazy"])
    net = lb + index_bytes
    rows = [   # every run kept succeeded: a failure ends the benchmark
        ["lazy mount from the registry, then cat", fmt_time(runs["lazy"]), f"{full / lazy:.1f}",
         f"{net / 1e6:.2f} ({100 * net / compressed:.1f}%): index {index_bytes / 1e6:.2f} "
         f"+ ranges {lb / 1e6:.2f}"],
        ["lazy mount, index and file kept in --cache", fmt_time(runs["lazy-kept"]),
         f"{full / median([x.seconds for x in runs['lazy-kept']]):.1f}",
         f"{max(lazy_bytes['lazy-kept']) / 1e6:.2f} (manifests only)"],
        ["lamina pull + lamina unpack, then cat", fmt_time(runs["pull+unpack"]), "1.0",
         f"{compressed / 1e6:.1f} (100%)"],
    ]
    if "skopeo+umoci" in runs:
        rows.append(["skopeo copy + umoci unpack, then cat", fmt_time(runs["skopeo+umoci"]),
                     f"{full / median([x.seconds for x in runs['skopeo+umoci']]):.2f}",
                     f"{compressed / 1e6:.1f} (100%)"])
    others = [x.other_cpu for xs in runs.values() for x in xs if x.other_cpu is not None]
    versions = (f"docker-registry {tool_version([REGISTRY, '--version']).split()[-1]}"
                + (f", {tool_version(['skopeo', '--version'])}, "
                   f"{tool_version(['umoci', '--version'])}" if umoci else ""))
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Lazy mount from a registry: time to the first `cat /etc/os-release`",
        "",
        f"{now}; {machine_line()}; work dir {work} on {fs_type(work)}; image "
        f"{corpus}/oci:{args.tag} ({len(layers)} layers, {compressed / 1e6:.1f} MB "
        f"compressed) in a loopback docker-registry (plain http on 127.0.0.1); {versions}.",
        "",
        md_table(["command", "wall s", "speed-up vs pull+unpack", "MB over the network"],
                 rows, [False, True, True, True]),
        "",
        f"- Times are wall seconds, median (min) of {args.repeat} runs, interleaved, each a "
        "single `sh -c 'COMMAND && cat FILE'`; the registry's storage in the page cache, "
        "`sync` before each run, and before each full unpack the previous bundle deleted and "
        "the clean page cache dropped (as bench/lazy.py does), the registry's blobs read "
        "back in.",
        "- lazy: `lamina mount -q --insecure docker://REF DIR`: the manifest, the config, "
        "the referrers tag (distribution 2.8 has no referrers API) and the lazy index "
        f"artifact ({index_bytes / 1e6:.2f} MB: member lists and gzip checkpoints of all "
        f"layers, {100 * index_bytes / compressed:.1f}% of the image) are fetched, the "
        "merged tree is built, then the cat reads one file: the compressed range from its "
        "checkpoint (every 2 MiB of output), fetched with one HTTP range request and "
        "verified against its sha256. \"kept\": the same with `--cache DIR` holding the "
        "index, tree and file from an earlier mount (only manifests are fetched).",
        f"- Setup (untimed): `lamina push --lazy-index` of the private layout took "
        f"{push_secs:.1f} s, mostly building the indexes (every blob read once).",
        "- pull+unpack: `lamina pull` (4 concurrent downloads, digests verified) then "
        "`lamina unpack` of the whole image; skopeo+umoci: `skopeo copy` then "
        "`umoci unpack`.",
        f"- Other load during the timed runs (CPUs busy with anything else, from /proc/stat, "
        f"incl. the registry): mean {sum(others) / max(len(others), 1):.2f}, max "
        f"{max(others, default=0):.2f} of {os.cpu_count()} CPUs. **2 CPUs shared with other "
        "engineers' work: timings are noisy; compare the min column.**",
        *report_tail([
            *[f"- {k}: {', '.join(f'{x.seconds:.2f}' for x in runs[k])} s" for k in runs],
            f"- lazy range bytes: {', '.join(str(b) for b in lazy_bytes['lazy'])}",
        ], "Rerun: `sudo .venv/bin/python bench/lazy_remote.py` (from the repo root)."),
    ]
    body = join_markdown(lines)
    if args.out:
        replace_section(Path(args.out), SECTION, body)
    print(body)
    remove_tree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

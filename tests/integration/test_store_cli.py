"""The store through the real CLI: parallel imports, SIGKILL, the corpus image, errors."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import LAMINA, run_lamina
from lamina.oci.layout import OCILayout
from lamina.store import Store, StoreOptions
from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder

CORPUS = Path("/var/tmp/lamina-corpus")


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def files_layer(n: int, seed: str, size: int = 700) -> bytes:
    t = TarBuilder()
    for d in range(20):
        t.add_dir(f"d{d}")
    for i in range(n):
        body = hashlib.sha256(f"{seed}{i}".encode()).digest() * (size // 32)
        t.add_file(f"d{i % 20}/f{i}", body)
    return t.build()


def cli_json(args: list[str], rc: int = 0) -> Any:
    r = run_lamina([*args, "--json"])
    assert r.returncode == rc, r.stderr + r.stdout
    return json.loads(r.stdout)


def fsck(store: Path, rc: int = 0) -> Any:
    return cli_json(["fsck", "--store", str(store)], rc)


class _Sink:
    def write(self, b: bytes) -> int:
        return len(b)


def blocked_waiters(path: Path) -> int:
    """Processes blocked in flock() on *path*, from /proc/locks ("->" lines)."""
    ino = os.stat(path).st_ino
    n = 0
    with open("/proc/locks") as f:
        for line in f:
            if "->" in line and line.split()[6].endswith(f":{ino}"):
                n += 1
    return n


def test_parallel_imports_ingest_shared_layers_once(tmp_path: Path) -> None:
    base = files_layer(1500, "base")
    lay = tmp_path / "lay"
    build_image(str(lay), "a", [base, TarBuilder().add_file("a", b"a").build()])
    build_image(str(lay), "b", [base, TarBuilder().add_file("b", b"b").build()],
                compression="zstd")     # same diff_id, another blob
    store = tmp_path / "store"
    Store.open(str(store), options=StoreOptions(fsync=False)).close()
    # hold the base layer's work lock so both imports are surely in flight at once
    lock = store / "locks" / f"layer-{sha(base)[7:]}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    procs = [subprocess.Popen([*LAMINA, "import", "--json", "--store", str(store),
                               f"{lay}:{t}", f"img:{t}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for t in ("a", "b")]
    try:
        deadline = time.monotonic() + 60
        while blocked_waiters(lock) < 2:
            assert time.monotonic() < deadline, "the imports never waited for the layer lock"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
    finally:
        os.close(fd)    # releases the lock
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    base_rows = [o["layers"][0] for o in outs]
    assert all(r["diff_id"] == sha(base) and r["waited"] for r in base_rows)
    assert sum(r["ingested"] for r in base_rows) == 1          # the work was done once
    assert all(o["layers"][1]["ingested"] for o in outs)
    res = fsck(store)
    assert res["ok"] and res["garbage"] == []
    assert [i["name"] for i in cli_json(["images", "--store", str(store)])] == ["img:a", "img:b"]


def test_free_running_parallel_imports(tmp_path: Path) -> None:
    shared = [files_layer(800, "s1"), files_layer(800, "s2")]
    lay = tmp_path / "lay"
    for t in ("a", "b", "c"):
        build_image(str(lay), t, [*shared, TarBuilder().add_file(t, t.encode()).build()])
    store = tmp_path / "store"
    procs = [subprocess.Popen([*LAMINA, "import", "--json", "--store", str(store), f"{lay}:{t}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for t in ("a", "b", "c")]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outs.append(json.loads(out))
    # 2 shared layers + 3 own layers: each ingested by exactly one process
    assert sum(o["ingested"] for o in outs) == 5
    for i in (0, 1):
        assert sum(o["layers"][i]["ingested"] for o in outs) == 1
    res = fsck(store)
    assert res["ok"] and res["garbage"] == []


def test_sigkill_during_import_leaves_nothing_visible(tmp_path: Path) -> None:
    big = files_layer(20000, "kill", size=1024)
    lay = tmp_path / "lay"
    build_image(str(lay), "t", [TarBuilder().add_file("small", b"first").build(), big])
    store = tmp_path / "store"
    p = subprocess.Popen([*LAMINA, "import", "--store", str(store), f"{lay}:t", "victim"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    objects = store / "objects"
    deadline = time.monotonic() + 60
    while True:     # kill it in the middle of the big layer
        n = sum(len(os.listdir(objects / d)) for d in os.listdir(objects)) \
            if objects.is_dir() else 0
        if n > 200:
            break
        assert p.poll() is None, "import finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert any((store / "tmp").iterdir())           # its staging is still there...
    assert cli_json(["images", "--store", str(store)]) == []   # ...and nothing is visible
    with Store.open(str(store), create=False) as st:   # (opening reclaims the staging)
        assert list((store / "tmp").iterdir()) == []
        assert st.layer(sha(big)) is None
        assert not Path(st.tar_split_path(sha(big))).exists()
    res = fsck(store)
    assert res["ok"]        # leftovers are garbage, not damage
    assert {g["kind"] for g in res["garbage"]} <= {"unreferenced-object",
                                                   "unreferenced-tar-split",
                                                   "unreferenced-blob"}
    r = run_lamina(["import", "--store", str(store), f"{lay}:t", "victim"])
    assert r.returncode == 0, r.stderr
    res = fsck(store)
    assert res["ok"] and res["garbage"] == []       # the retry reused every leftover object
    with Store.open(str(store), create=False) as st:
        assert st.export_layer(sha(big), _Sink()) == sha(big)  # type: ignore[arg-type]


@pytest.mark.skipif(not (CORPUS / "oci").is_dir(), reason="corpus not built")
def test_corpus_image_round_trips_through_the_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = cli_json(["import", "--store", str(store), f"{CORPUS}/oci:py", "py"])
    assert out["ingested"] == len(out["layers"]) == 2
    cfg = OCILayout.open(str(CORPUS / "oci"))
    diff_ids = cfg.config_for(cfg.resolve("py")).diff_ids
    with Store.open(str(store), create=False) as st:
        for d in diff_ids:
            assert st.export_layer(d, _Sink()) == d  # type: ignore[arg-type]
    res = fsck(store)
    assert res["ok"] and res["garbage"] == [] and res["checked"]["layers"] == 2
    if (CORPUS / "oci-zstd").is_dir():
        # the same layers compressed with zstd: new blobs, nothing ingested again
        z = cli_json(["import", "--store", str(store), f"{CORPUS}/oci-zstd:py", "py-zstd"])
        assert z["ingested"] == 0
        assert fsck(store)["ok"]


def test_cli_errors_gc_and_repair(tmp_path: Path) -> None:
    store = tmp_path / "store"
    lay = tmp_path / "lay"
    r = run_lamina(["import", "--json", "--store", str(store), f"{tmp_path}/nope:t"])
    assert r.returncode == 3 and json.loads(r.stdout)["error"] == "not-found"
    tar = TarBuilder().add_file("f", b"z" * 3000).build()
    build_image(str(lay), "bad", [tar], compression="tar")
    ol = OCILayout.open(str(lay))
    blob = Path(ol.blob_path(ol.resolve("bad").layers[0].digest))
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    r = run_lamina(["import", "--store", str(store), f"{lay}:bad"])
    assert r.returncode == 5 and "error:" in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr
    assert cli_json(["images", "--store", str(store)]) == []
    # two images sharing a layer; remove one, collect, the other is intact
    shared = TarBuilder().add_file("shared", b"s" * 2000).build()
    build_image(str(lay), "a", [shared, TarBuilder().add_file("a", b"A").build()])
    build_image(str(lay), "b", [shared, TarBuilder().add_file("b", b"B").build()])
    for t in ("a", "b"):
        assert run_lamina(["import", "--store", str(store), f"{lay}:{t}", t]).returncode == 0
    assert run_lamina(["rmi", "--store", str(store), "a"]).returncode == 0
    g = cli_json(["gc", "--store", str(store)])
    assert g["counts"]["manifests"] == 1 and g["counts"]["layers"] == 1
    # "A", and the object the failed import above wrote before its digest check failed
    assert g["counts"]["objects"] == 2 and g["total_freed"] > 0
    assert [i["name"] for i in cli_json(["images", "--store", str(store)])] == ["b:latest"]
    assert fsck(store)["ok"]
    # the layout mode of gc is unchanged
    assert cli_json(["gc", "--layout", str(lay), "--dry-run"])["layout"] == str(lay)
    # damage: fsck exits 6 and names the image to re-import; repair + import fixes it
    obj = store / "objects" / hashlib.sha256(b"B").hexdigest()[:2] / \
        hashlib.sha256(b"B").hexdigest()[2:]
    os.chmod(obj, 0o644)
    obj.write_bytes(b"C")
    r = run_lamina(["fsck", "--store", str(store)])
    assert r.returncode == 6 and "corrupt-object" in r.stderr and "--repair" in r.stderr
    res = fsck(store, rc=6)
    assert res["affected_refs"] == ["b:latest"]
    r = run_lamina(["fsck", "--repair", "--store", str(store)])
    assert r.returncode == 6 and "import again: b:latest" in r.stderr
    assert run_lamina(["import", "--store", str(store), f"{lay}:b", "b"]).returncode == 0
    res = fsck(store)
    assert res["ok"] and res["garbage"] == []

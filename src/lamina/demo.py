"""``python -m lamina.demo DIR``: build a small multi-layer image and unpack it.

The image is made with lamina's own test kit (no network, no other tool) and
shows the layer semantics lamina gets right: whiteouts and an opaque
directory, hardlinks across layers, symlinks, a directory replacing a file,
xattrs, setuid bits and owners.  ``make demo`` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from lamina.testing.images import build_image
from lamina.testing.layers import TarBuilder
from lamina.testing.tree import tree_manifest


def build(layout: str) -> None:
    base = (TarBuilder()
            .add_dir("etc").add_file("etc/os-release", b"NAME=lamina-demo\n")
            .add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                                    b"app:x:1000:1000:app:/home/app:/bin/sh\n")
            .add_file("etc/group", b"root:x:0:\napp:x:1000:\n")
            .add_dir("usr").add_dir("usr/bin")
            .add_file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755)
            .add_dir("usr/share").add_dir("usr/share/doc")
            .add_file("usr/share/doc/README", b"lower-layer docs\n")
            .add_file("usr/share/doc/CHANGES", b"lower-layer changes\n")
            .add_file("var-was-a-file", b"replaced by a directory above\n")
            .add_dir("home").add_dir("home/app", mode=0o750, uid=1000, gid=1000)
            .build())
    app = (TarBuilder()
           .add_opaque("usr/share/doc")
           .add_file("usr/share/doc/README", b"only this survives the opaque dir\n")
           .add_whiteout("etc/os-release")
           .add_file("etc/os-release.d", b"NAME=lamina-demo (upper)\n")
           .add_hardlink("usr/bin/tool-link", "usr/bin/tool")
           .add_symlink("usr/bin/sh-link", "/usr/bin/tool")
           .add_dir("var-was-a-file")
           .add_file("var-was-a-file/log", b"now a directory\n")
           .add_file("home/app/data", b"owned by app\n", uid=1000, gid=1000,
                     xattrs={"user.demo": b"hello"})
           .build())
    build_image(layout, "demo", [base, app], compression=["gzip", "zstd"],
                config={"Entrypoint": ["/usr/bin/tool"], "Cmd": ["--help"],
                        "Env": ["DEMO=1"], "WorkingDir": "/home/app", "User": "app"})


def main() -> int:
    out = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "demo")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    layout, bundle = os.path.join(out, "layout"), os.path.join(out, "bundle")
    build(layout)
    print(f"built {layout}:demo (2 layers: gzip + zstd)")
    cmd = [sys.executable, "-m", "lamina", "unpack", "--image", f"{layout}:demo", bundle]
    if os.geteuid() != 0:
        cmd.insert(4, "--rootless")
    print("$ lamina " + " ".join(cmd[3:]), flush=True)
    rc = subprocess.call(cmd)
    if rc:
        return rc
    man = tree_manifest(os.path.join(bundle, "rootfs"), include_root=False)
    print(f"\nrootfs of {bundle}:")
    for path in sorted(man):
        e = man[path]
        extra = f" -> {e['target']}" if e.get("target") else ""
        print(f"  {e['type']:8} {e['mode']:>06o} {e['uid']:>5}:{e['gid']:<5} /{path}{extra}")
    with open(os.path.join(bundle, "config.json"), encoding="utf-8") as f:
        proc = json.load(f)["process"]
    print(f"\nconfig.json: args={proc['args']} user={proc['user']} cwd={proc['cwd']}")
    expect = {"usr/share/doc/README", "usr/bin/tool-link", "var-was-a-file/log"}
    missing = expect - set(man)
    gone = {"usr/share/doc/CHANGES", "etc/os-release"} & set(man)
    if missing or gone:
        print(f"demo FAILED: missing {sorted(missing)}, not hidden {sorted(gone)}")
        return 1
    print("\ndemo OK: opaque dir, whiteout, hardlink, symlink and type change applied")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Where the store lives by default (light: every ``--store`` help text needs it)."""

from __future__ import annotations

import os


def default_store_path() -> str:
    """``/var/lib/lamina`` for root, else ``$XDG_DATA_HOME/lamina`` (or ``~/.local/share``)."""
    if os.geteuid() == 0:
        return "/var/lib/lamina"
    base = os.environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says relative values are invalid
        base = os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "lamina")

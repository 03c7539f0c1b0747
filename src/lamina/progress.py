"""Progress callbacks for unpack, repack and imports; the CLI renders them.

Kept apart from :mod:`lamina.bundle` so the CLI's progress bars load without
the unpack machinery (``lamina pull`` never needs it).
"""

from __future__ import annotations


class Progress:
    """Callbacks the CLI can implement; the library never prints."""

    def start(self, total_bytes: int, layers: int) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def layer_done(self, index: int) -> None: ...
    def warn(self, message: str) -> None: ...

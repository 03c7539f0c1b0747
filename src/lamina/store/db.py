"""The store's SQLite index (``lamina.db``): schema, versioning, transactions.

The database is an index over the files, never the only copy of content: a
row is written only after the file it describes is complete and (with fsync
on) durable, and files are deleted only after the rows naming them are gone.
So a crash at any point leaves, at worst, files without rows (garbage that
``gc`` reclaims), never rows without files.

WAL mode lets readers run while one writer commits; ``busy_timeout`` makes
concurrent writers from several ``lamina`` processes queue instead of failing.
Write transactions are ``BEGIN IMMEDIATE`` so a writer takes the write lock up
front and cannot deadlock upgrading a read.

The schema version lives in ``PRAGMA user_version``.  A store written by a
newer lamina (higher version) is refused rather than guessed at.

``layer_objects`` has no index on ``object``: only ``gc`` asks "which objects
does no layer reference", and SQLite answers that ``NOT IN`` with a temporary
index built once per gc, while a permanent one doubled the cost of recording a
layer (tens of thousands of rows).  Stores made before it was dropped keep it;
both work.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator

from lamina.errors import EnvironmentError_, UnsupportedError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 120_000

# Digests are stored as "sha256:<hex>" everywhere, times as UNIX seconds.
_SCHEMA_V1 = """
CREATE TABLE refs (                 -- GC roots: NAME:TAG -> image manifest
    name      TEXT PRIMARY KEY,
    manifest  TEXT NOT NULL,
    created   REAL NOT NULL
);
CREATE TABLE blobs (                -- files in blobs/sha256/
    digest     TEXT PRIMARY KEY,
    media_type TEXT NOT NULL,
    size       INTEGER NOT NULL
);
CREATE TABLE manifests (            -- image manifests (one platform each)
    digest     TEXT PRIMARY KEY,
    media_type TEXT NOT NULL,
    size       INTEGER NOT NULL,
    config     TEXT NOT NULL,
    platform   TEXT NOT NULL,
    created    REAL NOT NULL
);
CREATE TABLE manifest_layers (      -- a manifest's layers, bottom first
    manifest   TEXT NOT NULL,
    idx        INTEGER NOT NULL,
    blob       TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size       INTEGER NOT NULL,
    diff_id    TEXT NOT NULL,
    chain_id   TEXT NOT NULL,
    PRIMARY KEY (manifest, idx)
) WITHOUT ROWID;
CREATE TABLE layers (               -- ingested layers: layers/<hex>.tar-split + objects
    diff_id    TEXT PRIMARY KEY,
    blob       TEXT NOT NULL,       -- the blob it was ingested from
    media_type TEXT NOT NULL,
    blob_size  INTEGER NOT NULL,
    tar_size   INTEGER NOT NULL,
    files      INTEGER NOT NULL,    -- regular files with content (object references)
    state      TEXT NOT NULL,       -- 'ready' (rows exist only once a layer is complete)
    created    REAL NOT NULL
);
CREATE TABLE chains (               -- OCI ChainIDs: a layer named by everything below it
    chain_id   TEXT PRIMARY KEY,
    parent     TEXT,                -- NULL for a bottom layer
    diff_id    TEXT NOT NULL,
    depth      INTEGER NOT NULL
);
CREATE TABLE objects (              -- files in objects/xx/
    digest     TEXT PRIMARY KEY,
    size       INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE layer_objects (        -- which objects a layer's tar-split references
    diff_id    TEXT NOT NULL,
    object     TEXT NOT NULL,
    PRIMARY KEY (diff_id, object)
) WITHOUT ROWID;
CREATE TABLE extractions (          -- what drivers made under extract/<driver>/
    driver     TEXT NOT NULL,
    chain_id   TEXT NOT NULL,
    path       TEXT NOT NULL,
    state      TEXT NOT NULL,       -- 'ready' or a driver-defined state
    in_use     INTEGER NOT NULL DEFAULT 0,   -- 1: a GC root (e.g. mounted)
    created    REAL NOT NULL,
    PRIMARY KEY (driver, chain_id)
);
"""


def layer_objects_of(schema: str = "main") -> str:
    """``FROM ... WHERE`` of a layer's objects (``l``: its layer_objects rows, ``o``:
    their objects rows) in the store index *schema*; the layer's diff_id is ``?``."""
    return (f"FROM {schema}.layer_objects l JOIN {schema}.objects o "
            f"ON o.digest = l.object WHERE l.diff_id = ?")


class Database:
    """One connection to ``lamina.db``, shared by the threads of a process."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000,
                                        isolation_level=None, check_same_thread=False)
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error as e:
            raise EnvironmentError_(f"cannot open the store index {path}: {e}",
                                    hint="check permissions on the store directory") from None
        self.mu = threading.RLock()

    def version(self) -> int:
        with self.mu:
            return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def initialise(self) -> None:
        """Create the schema (the caller holds the store's exclusive lock)."""
        with self.mu:
            v = self.version()
            if v == SCHEMA_VERSION:
                return
            if v > SCHEMA_VERSION:
                raise UnsupportedError(
                    f"the store index {self.path} has schema version {v}; this lamina "
                    f"understands up to {SCHEMA_VERSION}",
                    hint="use the lamina version that created the store, or a newer one")
            # journal_mode is persistent; set it before any table exists
            self.conn.execute("PRAGMA journal_mode = WAL")
            with self.tx():
                # statement by statement: executescript() would commit our transaction
                for stmt in _SCHEMA_V1.split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def check_version(self) -> None:
        v = self.version()
        if v != SCHEMA_VERSION:
            raise UnsupportedError(
                f"the store index {self.path} has schema version {v}, expected "
                f"{SCHEMA_VERSION}", hint="use the lamina version that created the store")

    def configure(self) -> None:
        with self.mu:
            # WAL + NORMAL: a commit survives a process crash; after a power loss the
            # last commits may roll back, which only turns finished files into garbage
            self.conn.execute("PRAGMA synchronous = NORMAL")
            # 32 MiB of page cache (default 2): a layer commits tens of thousands of
            # object rows in one transaction; with a small cache its B-tree pages
            # spill to the WAL mid-transaction and are rewritten
            self.conn.execute("PRAGMA cache_size = -32768")

    @contextlib.contextmanager
    def tx(self, *, deferred: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any exception.

        *deferred*: for a transaction that reads an :meth:`attached` database.
        ``BEGIN IMMEDIATE`` would take the write lock of every attached database
        too; a deferred one whose first statement writes ``main`` takes only that.
        """
        with self.mu:
            self.conn.execute("BEGIN" if deferred else "BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def attached(self, path: str) -> Iterator[str | None]:
        """Another store's index attached to this connection for reading; yields
        its schema name, or None when it cannot be (unreadable, or another schema
        version: the caller then reads it another way)."""
        alias = f"src_{os.urandom(6).hex()}"     # the connection is shared by threads
        if not os.path.isfile(path):            # ATTACH would create an empty one
            yield None
            return
        try:
            with self.mu:
                self.conn.execute("ATTACH DATABASE ? AS " + alias, (path,))
        except sqlite3.Error:
            yield None
            return
        try:
            try:
                with self.mu:
                    v = int(self.conn.execute(f"PRAGMA {alias}.user_version").fetchone()[0])
            except sqlite3.Error:       # not a database, unreadable
                v = -1
            yield alias if v == SCHEMA_VERSION else None
        finally:
            with self.mu:
                self.conn.execute(f"DETACH DATABASE {alias}")

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self.mu:
            return list(self.conn.execute(sql, args).fetchall())

    def close(self) -> None:
        with self.mu:
            self.conn.close()

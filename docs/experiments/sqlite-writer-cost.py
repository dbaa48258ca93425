#!/usr/bin/env python3
"""CPU cost of the registry's group commit on SQLite, statement by statement.

Replays the statements the gateway's group commit runs for a group of
enrollments (gateway/src/registry/group.rs: its writes, multi-row VALUES
and CASE updates, and its check of the keys' owners; synchronous=FULL,
WAL) against a copy of a registry
left by the benchmark, single-threaded and with nothing else running, so the
figures are the writer's own CPU, without the thread hand-offs and the
contention of the real gateway. Python's sqlite3 module links the system's
SQLite (not the one sqlx bundles), so compare the variants with each other.

    idgate bench enroll --devices 16000 --keep /tmp/kept
    python3 docs/experiments/sqlite-writer-cost.py /tmp/kept/registry.db

Variants: the schema as it is; WITHOUT ROWID for the tables keyed by a
natural key; foreign keys off; no WAL checkpoints; page sizes 1024 and 2048;
synchronous=NORMAL. Each copies the registry to a temporary directory, adds
GROUP * GROUPS pending devices (untimed), then records them as enrollments in
random order, GROUP per transaction.
"""

import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time

GROUP = 64
GROUPS = 150

WITHOUT_ROWID = """
BEGIN;
CREATE TABLE device_keys2 (key_fingerprint BYTEA PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices (id), bound_at BIGINT NOT NULL) WITHOUT ROWID;
INSERT INTO device_keys2 SELECT * FROM device_keys;
DROP TABLE device_keys; ALTER TABLE device_keys2 RENAME TO device_keys;
CREATE TABLE requests2 (device_id TEXT NOT NULL REFERENCES devices (id), op TEXT NOT NULL,
    rid TEXT NOT NULL, csr_sha256 BYTEA NOT NULL, serial TEXT NOT NULL REFERENCES certificates (serial),
    at BIGINT NOT NULL, PRIMARY KEY (device_id, op, rid)) WITHOUT ROWID;
INSERT INTO requests2 SELECT * FROM requests;
DROP TABLE requests; ALTER TABLE requests2 RENAME TO requests;
CREATE TABLE audit_log2 (id TEXT PRIMARY KEY, at BIGINT NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, device_id TEXT, serial TEXT, outcome TEXT NOT NULL,
    detail TEXT NOT NULL) WITHOUT ROWID;
INSERT INTO audit_log2 SELECT * FROM audit_log;
DROP TABLE audit_log; ALTER TABLE audit_log2 RENAME TO audit_log;
CREATE INDEX audit_log_device ON audit_log (device_id, id);
CREATE INDEX audit_log_at ON audit_log (at);
COMMIT;
"""

VARIANTS = {
    "as is": {},
    "without rowid": {"script": WITHOUT_ROWID},
    "foreign keys off": {"foreign_keys": "off"},
    "no checkpoints": {"wal_autocheckpoint": 0},
    "page_size 1024": {"page_size": 1024},
    "page_size 2048": {"page_size": 2048},
    "synchronous normal": {"synchronous": "normal"},
}


def prepare(source, directory, variant):
    path = os.path.join(directory, "registry.db")
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    shutil.copy(source, path)
    db = sqlite3.connect(path, isolation_level=None)
    if "page_size" in variant:
        db.execute("PRAGMA journal_mode = DELETE")
        db.execute(f"PRAGMA page_size = {variant['page_size']}")
        db.execute("VACUUM")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {variant.get('synchronous', 'full')}")
    if "script" in variant:
        db.executescript(variant["script"])
    db.execute(f"PRAGMA foreign_keys = {variant.get('foreign_keys', 'on')}")
    if "wal_autocheckpoint" in variant:
        db.execute(f"PRAGMA wal_autocheckpoint = {variant['wal_autocheckpoint']}")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


def pending_devices(db):
    owner = db.execute("SELECT owner FROM devices LIMIT 1").fetchone()[0]
    ids = [f"exp-{i:06d}" for i in range(GROUP * GROUPS)]
    db.execute("BEGIN")
    for device in ids:
        db.execute(
            "INSERT INTO devices (id, owner, site, status, created_by, created_at, updated_at) "
            "VALUES (?, ?, 's', 'pending', 'exp', 1, 1)",
            (device, owner),
        )
        db.execute(
            "INSERT INTO enrollment_credentials (device_id, kind, secret, created_at) "
            "VALUES (?, 'token', ?, 1)",
            (device, os.urandom(48)),
        )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    random.shuffle(ids)
    return ids


def rows(n, columns):
    return ", ".join("(" + ", ".join("?" * columns) + ")" for _ in range(n))


def record(db, ids):
    spent = {}

    def timed(label, sql, args=()):
        start = time.process_time()
        db.execute(sql, args)
        spent[label] = spent.get(label, 0.0) + time.process_time() - start

    der = os.urandom(480)
    wall = time.perf_counter()
    for g in range(GROUPS):
        group = ids[g * GROUP:(g + 1) * GROUP]
        at = 1_000 + g
        case = " ".join("WHEN ? THEN CAST(? AS BIGINT)" for _ in group)
        within = ", ".join("?" * len(group))
        pairs = [v for d in group for v in (d, at)]
        keys = [os.urandom(32) for _ in group]
        serials = [os.urandom(16).hex() for _ in group]
        timed("begin", "BEGIN IMMEDIATE")
        timed("credentials", f"UPDATE enrollment_credentials SET used_at = CASE device_id {case} END "
              f"WHERE used_at IS NULL AND device_id IN ({within})", pairs + group)
        timed("devices", f"UPDATE devices SET status = 'active', updated_at = CASE id {case} END, "
              f"last_seen_at = CASE id {case} END WHERE +status = 'pending' AND id IN ({within})",
              pairs + pairs + group)
        timed("device_keys", "INSERT INTO device_keys (key_fingerprint, device_id, bound_at) VALUES "
              + rows(len(group), 3), [v for k, d in zip(keys, group) for v in (k, d, at)])
        timed("certificates", "INSERT INTO certificates (serial, device_id, key_fingerprint, "
              "not_before, not_after, issued_at, der, renewed_from) VALUES " + rows(len(group), 8),
              [v for s, k, d in zip(serials, keys, group)
               for v in (s, d, k, at, at + 86_400, at, der, None)])
        timed("requests", "INSERT INTO requests (device_id, op, rid, csr_sha256, serial, at) VALUES "
              + rows(len(group), 6),
              [v for s, d in zip(serials, group)
               for v in (d, "enroll", os.urandom(8).hex(), os.urandom(32), s, at)])
        timed("audit_log", "INSERT INTO audit_log (id, at, actor, action, device_id, serial, "
              "outcome, detail) VALUES " + rows(len(group), 8),
              [v for i, (s, d) in enumerate(zip(serials, group))
               for v in (f"{1_700_000_000_000 + g * 100 + i:014d}{random.getrandbits(64):016x}",
                         at, "device:" + d, "enroll", d, s, "ok", "")])
        timed("keys_check", "SELECT key_fingerprint, device_id FROM device_keys "
              f"WHERE key_fingerprint IN ({within})", keys)
        timed("commit", "COMMIT")
    wall = time.perf_counter() - wall
    return spent, wall


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    n = GROUP * GROUPS
    with tempfile.TemporaryDirectory() as directory:
        for name, variant in VARIANTS.items():
            db = prepare(sys.argv[1], directory, variant)
            ids = pending_devices(db)
            spent, wall = record(db, ids)
            per = " ".join(f"{k} {v / n * 1e6:.1f}" for k, v in spent.items())
            if variant.get("wal_autocheckpoint") == 0:
                # Nothing checkpointed: the WAL holds every page written.
                frames = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
                per += f"; {frames / n:.1f} pages written to the WAL per enrollment"
            db.close()
            print(f"{name:20s} {sum(spent.values()) / n * 1e6:6.1f} µs CPU per enrollment, "
                  f"{wall / GROUPS * 1e3:5.2f} ms per group of {GROUP}  ({per})")


if __name__ == "__main__":
    main()

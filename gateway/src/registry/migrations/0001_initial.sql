-- idgate registry, version 1. Portable SQL: the same text runs on SQLite and
-- PostgreSQL. Times are unix seconds (BIGINT); binary values are BYTEA (SQLite
-- stores them as BLOBs whatever the declared type).

CREATE TABLE owners (
    email      TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);

CREATE TABLE devices (
    id         TEXT PRIMARY KEY,
    owner      TEXT NOT NULL REFERENCES owners (email),
    site       TEXT NOT NULL,
    model      TEXT,
    status     TEXT NOT NULL CHECK (status IN ('pending', 'active', 'suspect', 'suspended', 'revoked', 'retired')),
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- Highest renewal counter accepted; a renewal must bring a greater one.
    renew_counter BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX devices_site ON devices (site);
CREATE INDEX devices_owner ON devices (owner);
CREATE INDEX devices_status ON devices (status);

-- One-time enrollment secrets. `secret` is sealed (never the clear token).
CREATE TABLE enrollment_credentials (
    device_id  TEXT PRIMARY KEY REFERENCES devices (id),
    kind       TEXT NOT NULL,
    secret     BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    used_at    BIGINT
);

CREATE TABLE certificates (
    serial            TEXT PRIMARY KEY,
    device_id         TEXT NOT NULL REFERENCES devices (id),
    key_fingerprint   BYTEA NOT NULL,
    not_before        BIGINT NOT NULL,
    not_after         BIGINT NOT NULL,
    issued_at         BIGINT NOT NULL,
    der               BYTEA NOT NULL,
    revoked_at        BIGINT,
    -- RFC 5280 CRLReason name (keyCompromise, certificateHold, ...).
    revocation_reason TEXT,
    -- The certificate this one renewed, if it came from a renewal.
    renewed_from      TEXT
);
CREATE INDEX certificates_device ON certificates (device_id);
CREATE INDEX certificates_renewed_from ON certificates (renewed_from);
CREATE INDEX certificates_revoked ON certificates (revoked_at);

-- Which device a public key belongs to: a key is never bound to two devices.
CREATE TABLE device_keys (
    key_fingerprint BYTEA PRIMARY KEY,
    device_id       TEXT NOT NULL REFERENCES devices (id),
    bound_at        BIGINT NOT NULL
);

-- Answered requests, so that a repeated rid gets the same certificate.
CREATE TABLE requests (
    device_id  TEXT NOT NULL REFERENCES devices (id),
    op         TEXT NOT NULL,
    rid        TEXT NOT NULL,
    csr_sha256 BYTEA NOT NULL,
    serial     TEXT NOT NULL REFERENCES certificates (serial),
    at         BIGINT NOT NULL,
    PRIMARY KEY (device_id, op, rid)
);

-- Counters other processes watch: `revocation` grows on every revocation,
-- suspension or resumption, so every gateway replica notices and refreshes its
-- CRL, its TLS verifier and its live sessions.
CREATE TABLE registry_state (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO registry_state (name, value) VALUES ('revocation', 0);

-- Append-only: the registry has no statement that updates or deletes a row here.
-- `id` sorts in time order (milliseconds, then random).
CREATE TABLE audit_log (
    id        TEXT PRIMARY KEY,
    at        BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    device_id TEXT,
    serial    TEXT,
    outcome   TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX audit_log_device ON audit_log (device_id, id);

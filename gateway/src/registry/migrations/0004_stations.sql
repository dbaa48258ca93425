-- idgate registry, version 4: line stations and the creation chain. Portable
-- SQL as in 0001.

-- A programming station on a manufacturing line: a non-human identity that
-- may relay enrollments for the devices of its batches only.
CREATE TABLE stations (
    id         TEXT PRIMARY KEY,
    status     TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The batches a station may enroll devices of.
CREATE TABLE station_batches (
    station_id TEXT NOT NULL REFERENCES stations (id),
    batch_id   TEXT NOT NULL REFERENCES batches (id),
    PRIMARY KEY (station_id, batch_id)
);

-- Certificates issued to stations (signed by the issuing CA like device
-- certificates, so they appear on the same CRL once revoked).
CREATE TABLE station_certificates (
    serial            TEXT PRIMARY KEY,
    station_id        TEXT NOT NULL REFERENCES stations (id),
    not_before        BIGINT NOT NULL,
    not_after         BIGINT NOT NULL,
    issued_at         BIGINT NOT NULL,
    der               BYTEA NOT NULL,
    revoked_at        BIGINT,
    revocation_reason TEXT
);
CREATE INDEX station_certificates_station ON station_certificates (station_id);
CREATE INDEX station_certificates_revoked ON station_certificates (revoked_at);

-- The creation chain: which station relayed the enrollment that issued a
-- device certificate. Written in the same transaction as the certificate.
CREATE TABLE station_enrollments (
    serial     TEXT PRIMARY KEY REFERENCES certificates (serial),
    device_id  TEXT NOT NULL REFERENCES devices (id),
    station_id TEXT NOT NULL REFERENCES stations (id),
    at         BIGINT NOT NULL
);
CREATE INDEX station_enrollments_device ON station_enrollments (device_id);
CREATE INDEX station_enrollments_station ON station_enrollments (station_id);

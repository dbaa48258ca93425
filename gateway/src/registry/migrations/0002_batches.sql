-- idgate registry, version 2: manufacturing batches. Portable SQL as in 0001.

-- A batch of devices registered together from one file on a manufacturing
-- line. `device_count` is what was imported; the devices keep their own status.
CREATE TABLE batches (
    id           TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    site         TEXT NOT NULL,
    model        TEXT,
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    device_count BIGINT NOT NULL
);

-- NULL for devices added one by one. SQLite accepts a REFERENCES column in
-- ALTER TABLE only with a NULL default, which is what this is.
ALTER TABLE devices ADD COLUMN batch_id TEXT REFERENCES batches (id);
CREATE INDEX devices_batch ON devices (batch_id);

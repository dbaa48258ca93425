-- idgate registry, version 5: what the web console needs. Portable SQL as in 0001.

-- The label printed on the device's case (facilities know a sensor by it).
ALTER TABLE devices ADD COLUMN label TEXT;
CREATE INDEX devices_label ON devices (label);
CREATE INDEX devices_model ON devices (model);

-- When the device last connected with its certificate, or was last connected
-- (unix seconds); written at most once a minute per device.
ALTER TABLE devices ADD COLUMN last_seen_at BIGINT;

-- The audit log page reads it newest first.
CREATE INDEX audit_log_at ON audit_log (at);

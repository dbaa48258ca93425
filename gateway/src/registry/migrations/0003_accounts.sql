-- idgate registry, version 3: staff accounts, their sessions, API tokens and
-- failed logins (for rate limiting across replicas). Portable SQL as in 0001.
-- No secret is stored in the clear: passwords as argon2id PHC strings, session
-- ids and API tokens as SHA-256 digests (both are 256-bit random values, so a
-- plain digest suffices).

CREATE TABLE accounts (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    password_hash TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    disabled_at   BIGINT
);

CREATE TABLE sessions (
    id_sha256    BYTEA PRIMARY KEY,
    account      TEXT NOT NULL REFERENCES accounts (name),
    -- Sent back in forms and the X-CSRF-Token header; not a credential alone.
    csrf_token   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    last_used_at BIGINT NOT NULL,
    client       TEXT NOT NULL
);
CREATE INDEX sessions_account ON sessions (account);
CREATE INDEX sessions_expires ON sessions (expires_at);

-- Tokens for automation (line stations, scripts): each acts under its own name
-- (actor `token:NAME`) with its own role.
CREATE TABLE api_tokens (
    name         TEXT PRIMARY KEY,
    token_sha256 BYTEA NOT NULL UNIQUE,
    role         TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    created_by   TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    last_used_at BIGINT,
    revoked_at   BIGINT
);

-- One row per failed login, by `account:NAME` and by `ip:ADDRESS`; rows older
-- than the rate-limit window are deleted as new ones arrive.
CREATE TABLE login_failures (
    subject TEXT NOT NULL,
    at      BIGINT NOT NULL
);
CREATE INDEX login_failures_subject ON login_failures (subject, at);

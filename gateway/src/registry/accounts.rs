//! Staff accounts, their browser sessions, API tokens for automation, and
//! failed logins (the rate limiter's memory, shared by every replica). Only
//! digests and argon2id hashes are stored; hashing and checking live in
//! `crate::api::auth`.

use std::fmt;
use std::str::FromStr;

use sqlx::Row;
use sqlx::any::AnyRow;

use super::{AuditEntry, Registry, RegistryError, insert_audit};

/// What a staff member or token may do. Ordered: each role may do everything
/// the roles below it may.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads devices, certificates, batches and the audit log.
    Viewer,
    /// Also revokes, suspends and resumes devices and edits owner and site.
    Operator,
    /// Everything: also adds devices, imports batches, manages accounts and tokens.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}` (viewer, operator, admin)"))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks an account or token name: 1–64 of `A–Z a–z 0–9 . _ @ -`, starting
/// with a letter or digit (an email address fits).
pub fn check_account_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'@' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "name {name:?} must be 1–64 of A–Z a–z 0–9 . _ @ -, starting with a letter or digit"
        ))
    }
}

/// A staff account.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Account {
    /// Login name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// argon2id PHC string.
    #[serde(skip)]
    pub password_hash: String,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: i64,
    /// When it was disabled, if it is.
    pub disabled_at: Option<i64>,
}

/// A session to store.
#[derive(Clone, Debug)]
pub struct NewSession {
    /// SHA-256 of the cookie value.
    pub id_sha256: Vec<u8>,
    /// The account.
    pub account: String,
    /// The per-session CSRF token.
    pub csrf_token: String,
    /// Created.
    pub created_at: i64,
    /// Hard end.
    pub expires_at: i64,
    /// The client's address, for the audit log and the account's session list.
    pub client: String,
}

/// A stored session with its account's current role and state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// The account.
    pub account: String,
    /// The account's role now.
    pub role: Role,
    /// Whether the account is disabled.
    pub disabled: bool,
    /// The CSRF token.
    pub csrf_token: String,
    /// Created.
    pub created_at: i64,
    /// Hard end.
    pub expires_at: i64,
    /// Last request.
    pub last_used_at: i64,
}

/// An API token to store.
#[derive(Clone, Debug)]
pub struct NewApiToken {
    /// Its name (`station-3`); the actor is `token:NAME`.
    pub name: String,
    /// SHA-256 of the token.
    pub token_sha256: Vec<u8>,
    /// What it may do.
    pub role: Role,
    /// Who created it.
    pub created_by: String,
    /// Created.
    pub created_at: i64,
    /// When it stops working, if ever.
    pub expires_at: Option<i64>,
}

/// A stored API token (never the token itself).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ApiToken {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Who created it.
    pub created_by: String,
    /// Created.
    pub created_at: i64,
    /// Expiry, if any.
    pub expires_at: Option<i64>,
    /// Last use (updated at most once a minute).
    pub last_used_at: Option<i64>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

/// An account or token change was refused; nothing was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccountError {
    /// The name is taken.
    #[error("`{0}` already exists")]
    Exists(String),
    /// No such account or token.
    #[error("no `{0}` exists")]
    Unknown(String),
    /// The database failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl From<sqlx::Error> for AccountError {
    fn from(e: sqlx::Error) -> Self {
        AccountError::Registry(e.into())
    }
}

const ACCOUNT_COLUMNS: &str = "name, role, password_hash, created_by, created_at, disabled_at";
const TOKEN_COLUMNS: &str =
    "name, role, created_by, created_at, expires_at, last_used_at, revoked_at";

impl Registry {
    /// Creates an account and audits it (`account.add`).
    pub async fn add_account(&self, account: &Account, actor: &str) -> Result<(), AccountError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        let taken = sqlx::query("SELECT 1 FROM accounts WHERE name = $1")
            .bind(&account.name)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(AccountError::Exists(account.name.clone()));
        }
        sqlx::query(
            "INSERT INTO accounts (name, role, password_hash, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&account.name)
        .bind(account.role.as_str())
        .bind(&account.password_hash)
        .bind(&account.created_by)
        .bind(account.created_at)
        .execute(&mut *tx)
        .await?;
        let audit = AuditEntry::new(account.created_at, actor, "account.add")
            .detail(format!("account={} role={}", account.name, account.role));
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// One account.
    pub async fn account(&self, name: &str) -> Result<Option<Account>, RegistryError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE name = $1"
        )))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(account_from_row).transpose()
    }

    /// Every account, by name.
    pub async fn accounts(&self) -> Result<Vec<Account>, RegistryError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ACCOUNT_COLUMNS} FROM accounts ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(account_from_row).collect()
    }

    /// Disables (`true`) or re-enables an account. Disabling ends its
    /// sessions at once. Audited as `account.disable` / `account.enable`.
    pub async fn set_account_disabled(
        &self,
        name: &str,
        disabled: bool,
        actor: &str,
        at: i64,
    ) -> Result<(), AccountError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query("UPDATE accounts SET disabled_at = $1 WHERE name = $2")
            .bind(disabled.then_some(at))
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if changed.rows_affected() != 1 {
            return Err(AccountError::Unknown(name.to_owned()));
        }
        if disabled {
            sqlx::query("DELETE FROM sessions WHERE account = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
        }
        let action = if disabled {
            "account.disable"
        } else {
            "account.enable"
        };
        let audit = AuditEntry::new(at, actor, action).detail(format!("account={name}"));
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces an account's password hash and ends its sessions. Audited as
    /// `account.password`.
    pub async fn set_password(
        &self,
        name: &str,
        password_hash: &str,
        actor: &str,
        at: i64,
    ) -> Result<(), AccountError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query("UPDATE accounts SET password_hash = $1 WHERE name = $2")
            .bind(password_hash)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        if changed.rows_affected() != 1 {
            return Err(AccountError::Unknown(name.to_owned()));
        }
        sqlx::query("DELETE FROM sessions WHERE account = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let audit =
            AuditEntry::new(at, actor, "account.password").detail(format!("account={name}"));
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores a new session, and audits the login (`account.login`).
    pub async fn create_session(&self, session: &NewSession) -> Result<(), RegistryError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO sessions (id_sha256, account, csrf_token, created_at, expires_at, \
             last_used_at, client) VALUES ($1, $2, $3, $4, $5, $4, $6)",
        )
        .bind(session.id_sha256.clone())
        .bind(&session.account)
        .bind(&session.csrf_token)
        .bind(session.created_at)
        .bind(session.expires_at)
        .bind(&session.client)
        .execute(&mut *tx)
        .await?;
        let audit = AuditEntry::new(
            session.created_at,
            format!("user:{}", session.account),
            "account.login",
        )
        .detail(format!("client={}", session.client));
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The session whose id hashes to `id_sha256`, with its account's role.
    pub async fn session(&self, id_sha256: &[u8]) -> Result<Option<SessionRecord>, RegistryError> {
        let row = sqlx::query(
            "SELECT s.account, a.role, a.disabled_at, s.csrf_token, s.created_at, s.expires_at, \
             s.last_used_at FROM sessions s JOIN accounts a ON a.name = s.account \
             WHERE s.id_sha256 = $1",
        )
        .bind(id_sha256.to_vec())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let role: String = row.try_get("role")?;
        let disabled_at: Option<i64> = row.try_get("disabled_at")?;
        Ok(Some(SessionRecord {
            account: row.try_get("account")?,
            role: role.parse().map_err(RegistryError::Corrupt)?,
            disabled: disabled_at.is_some(),
            csrf_token: row.try_get("csrf_token")?,
            created_at: row.try_get("created_at")?,
            expires_at: row.try_get("expires_at")?,
            last_used_at: row.try_get("last_used_at")?,
        }))
    }

    /// Records that a session was used at `at`.
    pub async fn touch_session(&self, id_sha256: &[u8], at: i64) -> Result<(), RegistryError> {
        sqlx::query("UPDATE sessions SET last_used_at = $1 WHERE id_sha256 = $2")
            .bind(at)
            .bind(id_sha256.to_vec())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends a session (logout), auditing it as `account.logout` when it existed.
    pub async fn delete_session(&self, id_sha256: &[u8], at: i64) -> Result<(), RegistryError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT account FROM sessions WHERE id_sha256 = $1")
            .bind(id_sha256.to_vec())
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(row) = row {
            let account: String = row.try_get("account")?;
            sqlx::query("DELETE FROM sessions WHERE id_sha256 = $1")
                .bind(id_sha256.to_vec())
                .execute(&mut *tx)
                .await?;
            let audit = AuditEntry::new(at, format!("user:{account}"), "account.logout");
            insert_audit(&mut tx, &audit).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes sessions that ended before `now`; returns how many.
    pub async fn delete_expired_sessions(&self, now: i64) -> Result<u64, RegistryError> {
        let deleted = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(deleted.rows_affected())
    }

    /// Stores an API token and audits it (`token.create`).
    pub async fn add_api_token(&self, token: &NewApiToken) -> Result<(), AccountError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        let taken = sqlx::query("SELECT 1 FROM api_tokens WHERE name = $1")
            .bind(&token.name)
            .fetch_optional(&mut *tx)
            .await?;
        if taken.is_some() {
            return Err(AccountError::Exists(token.name.clone()));
        }
        sqlx::query(
            "INSERT INTO api_tokens (name, token_sha256, role, created_by, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&token.name)
        .bind(token.token_sha256.clone())
        .bind(token.role.as_str())
        .bind(&token.created_by)
        .bind(token.created_at)
        .bind(token.expires_at)
        .execute(&mut *tx)
        .await?;
        let audit = AuditEntry::new(token.created_at, &token.created_by, "token.create")
            .detail(format!("token={} role={}", token.name, token.role));
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The token whose SHA-256 is `token_sha256`, revoked or not.
    pub async fn api_token_by_digest(
        &self,
        token_sha256: &[u8],
    ) -> Result<Option<ApiToken>, RegistryError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_sha256 = $1"
        )))
        .bind(token_sha256.to_vec())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    /// Every API token, by name.
    pub async fn api_tokens(&self) -> Result<Vec<ApiToken>, RegistryError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY name"
        )))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    /// Records that a token was used at `at`.
    pub async fn touch_api_token(&self, name: &str, at: i64) -> Result<(), RegistryError> {
        sqlx::query("UPDATE api_tokens SET last_used_at = $1 WHERE name = $2")
            .bind(at)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Revokes a token for good (`token.revoke`).
    pub async fn revoke_api_token(
        &self,
        name: &str,
        actor: &str,
        at: i64,
    ) -> Result<(), AccountError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 WHERE name = $2 AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        if changed.rows_affected() != 1 {
            return Err(AccountError::Unknown(name.to_owned()));
        }
        let audit = AuditEntry::new(at, actor, "token.revoke").detail(format!("token={name}"));
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Failed logins recorded for each subject since `since`, in order.
    pub async fn login_failures(
        &self,
        subjects: &[&str],
        since: i64,
    ) -> Result<Vec<i64>, RegistryError> {
        let mut counts = Vec::with_capacity(subjects.len());
        for subject in subjects {
            let count: i64 =
                sqlx::query("SELECT COUNT(*) FROM login_failures WHERE subject = $1 AND at > $2")
                    .bind(*subject)
                    .bind(since)
                    .fetch_one(&self.pool)
                    .await?
                    .try_get(0)?;
            counts.push(count);
        }
        Ok(counts)
    }

    /// Records a failed login against each subject, forgets failures older
    /// than `forget_before`, and audits it (`account.login`, outcome
    /// `invalid_credentials`).
    pub async fn record_login_failure(
        &self,
        subjects: &[&str],
        audit: &AuditEntry,
        forget_before: i64,
    ) -> Result<(), RegistryError> {
        let _turn = self.write_turn.lock().await;
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM login_failures WHERE at <= $1")
            .bind(forget_before)
            .execute(&mut *tx)
            .await?;
        for subject in subjects {
            sqlx::query("INSERT INTO login_failures (subject, at) VALUES ($1, $2)")
                .bind(*subject)
                .bind(audit.at)
                .execute(&mut *tx)
                .await?;
        }
        insert_audit(&mut tx, audit).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets the failed logins of `subject` (after a successful login).
    pub async fn clear_login_failures(&self, subject: &str) -> Result<(), RegistryError> {
        sqlx::query("DELETE FROM login_failures WHERE subject = $1")
            .bind(subject)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

fn account_from_row(row: &AnyRow) -> Result<Account, RegistryError> {
    let role: String = row.try_get("role")?;
    Ok(Account {
        name: row.try_get("name")?,
        role: role.parse().map_err(RegistryError::Corrupt)?,
        password_hash: row.try_get("password_hash")?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        disabled_at: row.try_get("disabled_at")?,
    })
}

fn token_from_row(row: &AnyRow) -> Result<ApiToken, RegistryError> {
    let role: String = row.try_get("role")?;
    Ok(ApiToken {
        name: row.try_get("name")?,
        role: role.parse().map_err(RegistryError::Corrupt)?,
        created_by: row.try_get("created_by")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        last_used_at: row.try_get("last_used_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestDatabase, registry};

    on_both_backends!(accounts_and_sessions, api_tokens, login_failures_age_out);

    fn account(name: &str, role: Role) -> Account {
        Account {
            name: name.into(),
            role,
            password_hash: "$argon2id$stub".into(),
            created_by: "cli:test".into(),
            created_at: 100,
            disabled_at: None,
        }
    }

    fn session(account: &str, id: u8) -> NewSession {
        NewSession {
            id_sha256: vec![id; 32],
            account: account.into(),
            csrf_token: format!("csrf-{id}"),
            created_at: 200,
            expires_at: 1000,
            client: "127.0.0.1".into(),
        }
    }

    async fn accounts_and_sessions(db: TestDatabase) {
        let Some((registry, _keep)) = registry(db).await else {
            return;
        };
        registry
            .add_account(&account("alice", Role::Admin), "cli:test")
            .await
            .unwrap();
        registry
            .add_account(&account("bob", Role::Viewer), "cli:test")
            .await
            .unwrap();
        assert!(matches!(
            registry
                .add_account(&account("alice", Role::Viewer), "cli:test")
                .await,
            Err(AccountError::Exists(name)) if name == "alice"
        ));
        let names: Vec<_> = registry
            .accounts()
            .await
            .unwrap()
            .into_iter()
            .map(|a| (a.name, a.role))
            .collect();
        assert_eq!(
            names,
            [
                ("alice".to_owned(), Role::Admin),
                ("bob".to_owned(), Role::Viewer)
            ]
        );
        assert_eq!(
            registry
                .account("alice")
                .await
                .unwrap()
                .unwrap()
                .password_hash,
            "$argon2id$stub"
        );
        assert!(registry.account("carol").await.unwrap().is_none());

        registry.create_session(&session("alice", 1)).await.unwrap();
        registry.create_session(&session("bob", 2)).await.unwrap();
        let found = registry.session(&[1; 32]).await.unwrap().unwrap();
        assert_eq!(
            (found.account.as_str(), found.role, found.disabled),
            ("alice", Role::Admin, false)
        );
        assert_eq!(found.csrf_token, "csrf-1");
        assert_eq!(found.last_used_at, 200);
        registry.touch_session(&[1; 32], 300).await.unwrap();
        assert_eq!(
            registry
                .session(&[1; 32])
                .await
                .unwrap()
                .unwrap()
                .last_used_at,
            300
        );
        assert!(registry.session(&[9; 32]).await.unwrap().is_none());

        // Disabling ends the account's sessions; enabling does not revive them.
        registry
            .set_account_disabled("bob", true, "user:alice", 400)
            .await
            .unwrap();
        assert!(registry.session(&[2; 32]).await.unwrap().is_none());
        assert_eq!(
            registry.account("bob").await.unwrap().unwrap().disabled_at,
            Some(400)
        );
        registry
            .set_account_disabled("bob", false, "user:alice", 410)
            .await
            .unwrap();
        assert_eq!(
            registry.account("bob").await.unwrap().unwrap().disabled_at,
            None
        );
        assert!(matches!(
            registry
                .set_account_disabled("carol", true, "user:alice", 400)
                .await,
            Err(AccountError::Unknown(_))
        ));

        // A new password ends sessions too.
        registry
            .set_password("alice", "$argon2id$new", "cli:test", 500)
            .await
            .unwrap();
        assert!(registry.session(&[1; 32]).await.unwrap().is_none());

        registry.create_session(&session("alice", 3)).await.unwrap();
        registry.delete_session(&[3; 32], 600).await.unwrap();
        assert!(registry.session(&[3; 32]).await.unwrap().is_none());

        let mut old = session("alice", 4);
        old.expires_at = 650;
        registry.create_session(&old).await.unwrap();
        registry.create_session(&session("alice", 5)).await.unwrap();
        assert_eq!(registry.delete_expired_sessions(700).await.unwrap(), 1);
        assert!(registry.session(&[5; 32]).await.unwrap().is_some());
    }

    async fn api_tokens(db: TestDatabase) {
        let Some((registry, _keep)) = registry(db).await else {
            return;
        };
        let token = NewApiToken {
            name: "station-3".into(),
            token_sha256: vec![7; 32],
            role: Role::Operator,
            created_by: "cli:test".into(),
            created_at: 100,
            expires_at: Some(5000),
        };
        registry.add_api_token(&token).await.unwrap();
        assert!(matches!(
            registry.add_api_token(&token).await,
            Err(AccountError::Exists(_))
        ));
        let found = registry
            .api_token_by_digest(&[7; 32])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.name.as_str(), found.role, found.expires_at),
            ("station-3", Role::Operator, Some(5000))
        );
        assert!(
            registry
                .api_token_by_digest(&[8; 32])
                .await
                .unwrap()
                .is_none()
        );
        registry.touch_api_token("station-3", 150).await.unwrap();
        registry
            .revoke_api_token("station-3", "user:alice", 200)
            .await
            .unwrap();
        let listed = registry.api_tokens().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last_used_at, Some(150));
        assert_eq!(listed[0].revoked_at, Some(200));
        assert!(matches!(
            registry
                .revoke_api_token("station-3", "user:alice", 300)
                .await,
            Err(AccountError::Unknown(_))
        ));
    }

    async fn login_failures_age_out(db: TestDatabase) {
        let Some((registry, _keep)) = registry(db).await else {
            return;
        };
        let subjects = ["account:alice", "ip:10.0.0.1"];
        for at in [100, 200, 300] {
            let audit =
                AuditEntry::new(at, "user:alice", "account.login").outcome("invalid_credentials");
            registry
                .record_login_failure(&subjects, &audit, at - 150)
                .await
                .unwrap();
        }
        // The row at 100 was forgotten when the one at 300 came.
        assert_eq!(
            registry
                .login_failures(&["account:alice", "ip:10.0.0.1", "ip:x"], 0)
                .await
                .unwrap(),
            [2, 2, 0]
        );
        assert_eq!(
            registry
                .login_failures(&["account:alice"], 250)
                .await
                .unwrap(),
            [1]
        );
        registry
            .clear_login_failures("account:alice")
            .await
            .unwrap();
        assert_eq!(
            registry
                .login_failures(&["account:alice", "ip:10.0.0.1"], 0)
                .await
                .unwrap(),
            [0, 2]
        );
    }
}

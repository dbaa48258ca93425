//! `idgate user …` and `idgate token …`: staff accounts for the admin API and
//! web console, and API tokens for automation.

use std::io::{BufRead, IsTerminal};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use idgate_gateway::api::auth::{check_password, hash_password, new_api_token};
use idgate_gateway::datadir::DataDir;
use idgate_gateway::registry::{Account, NewApiToken, Role, check_account_name, now};

use super::{actor, format_time, open_registry, parse_duration};

#[derive(Debug, Subcommand)]
pub(super) enum UserCommand {
    /// Create a staff account. The password is read from standard input (one
    /// line) or, on a terminal, asked for twice without echo; never from the
    /// command line.
    Add {
        /// Login name: 1–64 of A–Z a–z 0–9 . _ @ -.
        name: String,
        /// viewer (read), operator (revoke, suspend, resume, edit owner/site)
        /// or admin (everything).
        #[arg(long)]
        role: Role,
    },
    /// List accounts.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Disable an account: its sessions end at once, it can no longer log
    /// in, and the API tokens it made stop working (until enabled again).
    Disable {
        /// Login name.
        name: String,
    },
    /// Enable a disabled account again.
    Enable {
        /// Login name.
        name: String,
    },
    /// Set a new password (read as for `add`); the account's sessions end.
    Password {
        /// Login name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum TokenCommand {
    /// Create an API token and print it once (send it as
    /// `Authorization: Bearer TOKEN`).
    Create {
        /// Its name, e.g. station-3 (the audit log says `token:NAME`).
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: Role,
        /// Lifetime, e.g. 30d or 365d; `never` for a token that lasts
        /// until revoked (or its creator's account is disabled).
        #[arg(long, value_parser = parse_token_lifetime, default_value = "90d")]
        expires_in: TokenLifetime,
    },
    /// List API tokens (never the tokens themselves).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API token for good.
    Revoke {
        /// Its name.
        name: String,
    },
}

/// An API token's lifetime; `None`: until revoked.
#[derive(Clone, Copy, Debug)]
pub(super) struct TokenLifetime(Option<Duration>);

fn parse_token_lifetime(text: &str) -> Result<TokenLifetime, String> {
    if text.trim() == "never" {
        return Ok(TokenLifetime(None));
    }
    parse_duration(text).map(|d| TokenLifetime(Some(d)))
}

/// Reads a new password: one line of stdin, or twice from the terminal.
fn read_new_password() -> Result<String> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("New password: ").context("reading the password")?;
        let second = rpassword::prompt_password("Repeat it: ").context("reading the password")?;
        if first != second {
            bail!("the passwords differ; nothing was changed");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line.trim_end_matches(['\r', '\n']).to_owned()
    };
    check_password(&password).map_err(anyhow::Error::msg)?;
    Ok(password)
}

pub(super) async fn user(
    data: DataDir,
    database: Option<String>,
    command: UserCommand,
) -> Result<()> {
    match command {
        UserCommand::Add { name, role } => {
            check_account_name(&name).map_err(anyhow::Error::msg)?;
            let password = read_new_password()?;
            let password_hash = hash_password(&password)
                .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
            let registry = open_registry(&data, database).await?;
            let account = Account {
                name: name.clone(),
                role,
                password_hash,
                created_by: actor(),
                created_at: now(),
                disabled_at: None,
            };
            let added = registry.add_account(&account, &actor()).await;
            registry.close().await;
            added?;
            say!("Created account {name} ({role}).");
            Ok(())
        }
        UserCommand::List { json } => {
            let registry = open_registry(&data, database).await?;
            let accounts = registry.accounts().await?;
            registry.close().await;
            if json {
                say!("{}", serde_json::to_string_pretty(&accounts)?);
                return Ok(());
            }
            say!(
                "{:<24} {:<9} {:<9} {:<21} CREATED BY",
                "NAME",
                "ROLE",
                "STATE",
                "CREATED"
            );
            for a in &accounts {
                say!(
                    "{:<24} {:<9} {:<9} {:<21} {}",
                    a.name,
                    a.role,
                    if a.disabled_at.is_some() {
                        "disabled"
                    } else {
                        "enabled"
                    },
                    format_time(a.created_at),
                    a.created_by
                );
            }
            say!("{} account(s)", accounts.len());
            Ok(())
        }
        UserCommand::Disable { name } => {
            let registry = open_registry(&data, database).await?;
            let changed = registry
                .set_account_disabled(&name, true, &actor(), now())
                .await;
            registry.close().await;
            changed?;
            say!("Disabled account {name}; its sessions have ended.");
            Ok(())
        }
        UserCommand::Enable { name } => {
            let registry = open_registry(&data, database).await?;
            let changed = registry
                .set_account_disabled(&name, false, &actor(), now())
                .await;
            registry.close().await;
            changed?;
            say!("Enabled account {name}.");
            Ok(())
        }
        UserCommand::Password { name } => {
            let password = read_new_password()?;
            let password_hash = hash_password(&password)
                .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
            let registry = open_registry(&data, database).await?;
            let changed = registry
                .set_password(&name, &password_hash, &actor(), now())
                .await;
            registry.close().await;
            changed?;
            say!("Changed the password of {name}; its sessions have ended.");
            Ok(())
        }
    }
}

pub(super) async fn token(
    data: DataDir,
    database: Option<String>,
    command: TokenCommand,
) -> Result<()> {
    match command {
        TokenCommand::Create {
            name,
            role,
            expires_in,
        } => {
            check_account_name(&name).map_err(anyhow::Error::msg)?;
            let (token, token_sha256) = new_api_token();
            let at = now();
            let registry = open_registry(&data, database).await?;
            let added = registry
                .add_api_token(&NewApiToken {
                    name: name.clone(),
                    token_sha256,
                    role,
                    created_by: actor(),
                    created_at: at,
                    expires_at: expires_in.0.map(|d| at.saturating_add(d.as_secs() as i64)),
                })
                .await;
            registry.close().await;
            added?;
            say!("Created API token {name} ({role}). Shown only now; store it safely:");
            say!("{token}");
            Ok(())
        }
        TokenCommand::List { json } => {
            let registry = open_registry(&data, database).await?;
            let tokens = registry.api_tokens().await?;
            registry.close().await;
            if json {
                say!("{}", serde_json::to_string_pretty(&tokens)?);
                return Ok(());
            }
            say!(
                "{:<24} {:<9} {:<9} {:<21} {:<21} LAST USED",
                "NAME",
                "ROLE",
                "STATE",
                "CREATED",
                "EXPIRES"
            );
            let at = now();
            for t in &tokens {
                let state = if t.revoked_at.is_some() {
                    "revoked"
                } else if t.expires_at.is_some_and(|e| e <= at) {
                    "expired"
                } else {
                    "valid"
                };
                say!(
                    "{:<24} {:<9} {:<9} {:<21} {:<21} {}",
                    t.name,
                    t.role,
                    state,
                    format_time(t.created_at),
                    t.expires_at.map_or_else(|| "never".to_owned(), format_time),
                    t.last_used_at
                        .map_or_else(|| "never".to_owned(), format_time)
                );
            }
            say!("{} token(s)", tokens.len());
            Ok(())
        }
        TokenCommand::Revoke { name } => {
            let registry = open_registry(&data, database).await?;
            let revoked = registry.revoke_api_token(&name, &actor(), now()).await;
            registry.close().await;
            revoked?;
            say!("Revoked API token {name}.");
            Ok(())
        }
    }
}

//! Test support shared by the gateway's unit tests and the end-to-end tests:
//! throwaway registries on SQLite and PostgreSQL.
//!
//! PostgreSQL tests use `IDGATE_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`), each in a schema of its own. When
//! the server is unreachable they fail with a message saying so; setting
//! `IDGATE_TEST_POSTGRES=skip` skips them loudly instead.

use std::path::PathBuf;

use rand::RngCore;

use crate::registry::{Registry, sqlite_url};

/// The backends a registry test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestDatabase {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh schema in the test PostgreSQL database.
    Postgres,
}

/// A registry URL for a test, and what keeps it alive.
#[derive(Debug)]
pub struct TestRegistryUrl {
    /// The URL to open.
    pub url: String,
    /// The temporary directory holding a SQLite file (dropped with this).
    pub dir: Option<tempfile::TempDir>,
}

/// The PostgreSQL server tests use, or `None` when told to skip.
pub fn postgres_base_url() -> Option<String> {
    let url = std::env::var("IDGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    if url == "skip" {
        eprintln!("SKIPPED: PostgreSQL variant (IDGATE_TEST_POSTGRES=skip)");
        return None;
    }
    Some(url)
}

/// Makes a URL for an empty registry on `database`; `None` if PostgreSQL tests
/// are skipped. Panics (failing the test) with a clear message when PostgreSQL
/// should be there and is not.
pub async fn registry_url(database: TestDatabase) -> Option<TestRegistryUrl> {
    match database {
        TestDatabase::Sqlite => {
            let dir = tempfile::tempdir().expect("temporary directory");
            let path: PathBuf = dir.path().join("registry.db");
            Some(TestRegistryUrl {
                url: sqlite_url(&path),
                dir: Some(dir),
            })
        }
        TestDatabase::Postgres => {
            let base = postgres_base_url()?;
            sqlx::any::install_default_drivers();
            let schema = format!("t_{:016x}", rand::rngs::OsRng.next_u64());
            let pool = sqlx::AnyPool::connect(&base).await.unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL is not reachable at {base}: {e}\n\
                     Start it (.ci/run does), point IDGATE_TEST_POSTGRES at one, \
                     or set IDGATE_TEST_POSTGRES=skip to skip the PostgreSQL variants."
                )
            });
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                .execute(&pool)
                .await
                .expect("create test schema");
            pool.close().await;
            let separator = if base.contains('?') { '&' } else { '?' };
            Some(TestRegistryUrl {
                url: format!("{base}{separator}options=-c%20search_path%3D{schema}"),
                dir: None,
            })
        }
    }
}

/// Opens an empty registry on `database` (see [`registry_url`]).
pub async fn registry(database: TestDatabase) -> Option<(Registry, TestRegistryUrl)> {
    let url = registry_url(database).await?;
    let registry = Registry::open(&url.url).await.expect("open test registry");
    Some((registry, url))
}

//! End-to-end tests: a real gateway (in-process), real TLS, real MQTT through
//! the embedded broker, simulated devices running the real firmware agent.
//! One integration binary, so the tests share a build and run in parallel.
// Test bodies are plain async fns run by generated #[test]s; an unwrap there is
// an assertion, as in any test.
#![allow(clippy::unwrap_used)]

mod bad_input;
mod console;
mod console_http;
mod enroll;
mod front;
mod lifecycle;
mod line;
mod qemu;
mod renew_bad_input;

/// Runs an async test body on SQLite and on PostgreSQL.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(idgate_gateway::testing::TestDatabase::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(idgate_gateway::testing::TestDatabase::Postgres).await;
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;

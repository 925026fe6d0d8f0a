//! Test support for Sluice's integration tests: access to the real servers that the test command
//! (`tests/run.sh`) starts, PostgreSQL, a Kubernetes API server and a fault-injecting proxy, and
//! ways to run the ingest service against them.

pub mod filesystem;
pub mod ingest;
pub mod kube;
pub mod postgres;
pub mod sender;
pub mod toxiproxy;

/// Defines, for each named scenario `async fn NAME(backend: Backend)` of the calling test file, a
/// test `postgres::NAME` and a test `sqlite::NAME`: the same behaviour proven on both databases.
#[macro_export]
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                super::$scenario($crate::ingest::Backend::Postgres).await
            })*
        }
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                super::$scenario($crate::ingest::Backend::Sqlite).await
            })*
        }
    };
}

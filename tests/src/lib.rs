//! Test support for Sluice's integration tests: access to the real servers that the test command
//! (`tests/run.sh`) starts, PostgreSQL and a Kubernetes API server, and ways to run the ingest
//! service against them.

pub mod ingest;
pub mod kube;
pub mod postgres;

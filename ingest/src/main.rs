//! `sluice-ingest`: see `sluice_ingest::Config` (or `--help`) for the flags.

use std::process::ExitCode;

use clap::Parser;
use sluice_ingest::config::Command;
use sluice_ingest::load::OldRows;
use sluice_ingest::{Config, erase, reset, run};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of the C library's allocator: parsing and flattening events allocate many
/// small values, and with glibc's malloc the ingest spent about a quarter more CPU per event
/// (README, "Benchmark").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    match &config.command {
        Some(Command::Erase { user_id }) => {
            return print_json(erase(&config, user_id).await, "erase");
        }
        Some(Command::Reset {
            tables,
            all,
            drop_old,
            keep_old: _,
        }) => {
            let tables = if *all {
                config.selected_tables()
            } else {
                tables.clone()
            };
            let old_rows = if *drop_old {
                OldRows::Drop
            } else {
                OldRows::Keep
            };
            return print_json(reset(&config, &tables, old_rows).await, "reset");
        }
        None => {}
    }
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(listen = %config.listen, error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    match run(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "sluice-ingest failed");
            ExitCode::FAILURE
        }
    }
}

/// Prints what a one-off `task` did as JSON on standard output; a failure is logged on
/// standard error and exits with 1.
fn print_json<T: serde::Serialize, E: std::fmt::Display>(
    outcome: Result<T, E>,
    task: &str,
) -> ExitCode {
    let value = match outcome {
        Ok(value) => value,
        Err(e) => {
            tracing::error!(error = %e, "{task} failed");
            return ExitCode::FAILURE;
        }
    };
    match serde_json::to_string_pretty(&value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot print what {task} did");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: no new requests; committing what is queued");
}

//! `sluice-operator`: `run` runs the controller against the cluster of the current kubeconfig (or
//! the pod's service account); `crd` prints the CustomResourceDefinition.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluice_operator::controller;
use sluice_operator::leader;
use sluice_operator::metrics::{self, Metrics};
use tracing_subscriber::EnvFilter;

/// Kubernetes operator for Sluice's SegmentIntegration resources.
#[derive(Debug, Parser)]
#[command(name = "sluice-operator", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller until SIGTERM or Ctrl-C.
    Run(Box<Run>),
    /// Print the SegmentIntegration CustomResourceDefinition as YAML.
    Crd,
}

#[derive(Debug, clap::Args)]
struct Run {
    #[command(flatten)]
    controller: controller::Config,
    /// Address to serve /healthz and /metrics on.
    #[arg(long, env = "SLUICE_OPERATOR_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Take part in leader election, so only one replica reconciles at a time. Turn off only for
    /// a single replica run by hand.
    #[arg(long, env = "SLUICE_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease. Default: the operator's own namespace (POD_NAMESPACE), or
    /// the kubeconfig's.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, env = "SLUICE_LEASE_NAME", default_value = "sluice-operator")]
    lease_name: String,
    /// How long a candidate waits, after it last saw the Lease change, before taking it over
    /// (client-go's LeaseDuration), e.g. 15s.
    #[arg(long, env = "SLUICE_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// How long the leader keeps reconciling after its last successful renewal was sent; shorter
    /// than the lease duration (client-go's RenewDeadline), e.g. 10s.
    #[arg(long, env = "SLUICE_LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    lease_renew_deadline: Duration,
    /// How often the leader renews and a candidate looks at the Lease; shorter than the renew
    /// deadline (client-go's RetryPeriod), e.g. 2s.
    #[arg(long, env = "SLUICE_LEASE_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    lease_retry_period: Duration,
    /// Log filter (tracing's EnvFilter syntax), e.g. info or sluice_operator=debug.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", sluice_operator::crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Run(run) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    EnvFilter::try_new(&run.log).unwrap_or_else(|_| EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            serve(*run).await
        }
    }
}

async fn serve(run: Run) -> ExitCode {
    let timing = match leader::Timing::new(
        run.lease_duration,
        run.lease_renew_deadline,
        run.lease_retry_period,
    ) {
        Ok(timing) => timing,
        Err(error) => {
            tracing::error!(
                "invalid --lease-duration, --lease-renew-deadline or --lease-retry-period: {error}"
            );
            return ExitCode::FAILURE;
        }
    };
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot reach the Kubernetes API server");
            return ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(Metrics::default());
    let listener = match tokio::net::TcpListener::bind(run.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(listen = %run.listen, %error, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    tokio::spawn({
        let metrics = metrics.clone();
        async move {
            if let Err(error) = metrics::serve(listener, metrics).await {
                tracing::error!(%error, "the /healthz and /metrics server stopped");
            }
        }
    });

    let mut config = run.controller;
    let identity = config
        .instance
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("sluice-operator-{}", std::process::id()));
    config.instance = Some(identity.clone());
    tracing::info!(namespace = ?config.namespace, image = %config.ingest_image, %identity, "starting");

    if !run.leader_election {
        controller::run(client, config, metrics, shutdown_signal()).await;
        return ExitCode::SUCCESS;
    }
    let settings = leader::Settings {
        namespace: run
            .lease_namespace
            .unwrap_or_else(|| client.default_namespace().to_owned()),
        name: run.lease_name,
        identity,
        timing,
    };
    let ended = leader::lead(
        client.clone(),
        client,
        settings,
        shutdown_signal(),
        |client, gate, shutdown| controller::run_gated(client, config, metrics, gate, shutdown),
    )
    .await;
    match ended {
        leader::Ended::Shutdown => ExitCode::SUCCESS,
        // Exit non-zero so the pod restarts as a candidate.
        leader::Ended::Lost => {
            tracing::error!("stopped because the leader Lease was lost");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

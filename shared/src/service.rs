//! What both binaries' `main` does: load config (every problem listed, exit 2), answer
//! `--health`, set up logging and signals, build the service and run it until SIGTERM.

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Sources};
use crate::http::Server;

/// Runs a service binary. `build` gets the validated config and the shutdown token.
pub async fn main_with<F, Fut>(service: &'static str, default_port: u16, build: F) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = Result<Server, String>>,
{
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match Config::load(&Sources::from_process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{service}: {e}");
            return ExitCode::from(2);
        }
    };
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] => {}
        ["--health"] => return health_probe(config.port_or(default_port)).await,
        _ => {
            eprintln!(
                "usage: {service} [--health]\n  --health  exit 0 when GET /healthz on the local port answers 200"
            );
            return ExitCode::from(2);
        }
    }
    crate::telemetry::init(&config.log);
    let shutdown = CancellationToken::new();
    crate::http::cancel_on_signals(shutdown.clone());
    let server = match build(config, shutdown).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "{service} failed to start");
            return ExitCode::FAILURE;
        }
    };
    if let Ok(addr) = server.local_addr() {
        tracing::info!(%addr, "{service} listening");
    }
    match server.run_until_stopped().await {
        Ok(()) => {
            tracing::info!("{service} stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "{service} server error");
            ExitCode::FAILURE
        }
    }
}

/// `--health`: the container health check, without a shell or curl in the image.
async fn health_probe(port: u16) -> ExitCode {
    let client = match reqwest::Client::builder().timeout(Duration::from_secs(3)).build() {
        Ok(c) => c,
        Err(_) => return ExitCode::FAILURE,
    };
    match client.get(format!("http://127.0.0.1:{port}/healthz")).send().await {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("unhealthy: /healthz answered {}", r.status());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}

//! What both binaries' `main` does: take an inherited listening socket if there is one (socket
//! activation), load config (every problem listed, exit 2), answer `--health`, set up logging and
//! signals, build the service and run it until SIGTERM.

use std::future::Future;
use std::net::TcpListener;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, Sources};
use crate::error::Chain;
use crate::http::Server;
use crate::internal::PeerClientError;
use crate::keyvault::KeyVaultError;
use crate::storage::StoreError;

/// Why a service could not start. `main` prints it with its sources.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The connection string's source (Key Vault) cannot be used.
    #[error(transparent)]
    KeyVault(#[from] KeyVaultError),
    /// The store could not be opened (the embedded file; a MongoDB store connects in the background).
    #[error("cannot open the store")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Peer(#[from] PeerClientError),
    #[error("cannot serve on the listener given")]
    Listener(#[source] std::io::Error),
    #[error("cannot listen on {host}:{port}")]
    Listen {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// Runs a service binary. `build` gets the validated config, the inherited listener if any, and
/// the shutdown token.
///
/// Socket activation: with `LISTEN_FDS=1` in the environment (systemd's protocol, as systemd's
/// socket units, `systemd-socket-activate` or a test harness set it; `LISTEN_PID`, when set, must
/// be this process), the service serves on the listening TCP socket it inherited as descriptor 3
/// instead of binding `server.host`/`server.port`. Whoever bound it holds the port, so there is no
/// moment in which the port is free, and connections made while the process (re)starts wait in the
/// socket's backlog. The socket is taken before the runtime starts any thread, because taking it
/// removes those variables from the environment.
pub fn main_with<F, Fut>(service: &'static str, default_port: u16, build: F) -> ExitCode
where
    F: FnOnce(Config, Option<TcpListener>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<Server, StartError>>,
{
    let inherited = match listenfd::ListenFd::from_env().take_tcp_listener(0) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{service}: LISTEN_FDS is set but descriptor 3 is not a listening TCP socket: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{service}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(service, default_port, inherited, build))
}

async fn serve<F, Fut>(service: &'static str, default_port: u16, inherited: Option<TcpListener>, build: F) -> ExitCode
where
    F: FnOnce(Config, Option<TcpListener>, CancellationToken) -> Fut,
    Fut: Future<Output = Result<Server, StartError>>,
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
    let telemetry = crate::telemetry::init_service(&config.log, service);
    let shutdown = CancellationToken::new();
    crate::http::cancel_on_signals(shutdown.clone());
    let server = match build(config, inherited, shutdown).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %Chain(&e), "{service} failed to start");
            return ExitCode::FAILURE;
        }
    };
    if let Ok(addr) = server.local_addr() {
        tracing::info!(%addr, "{service} listening");
    }
    let code = match server.run_until_stopped().await {
        Ok(()) => {
            tracing::info!("{service} stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "{service} server error");
            ExitCode::FAILURE
        }
    };
    // Spans still queued for the OTLP exporter are sent before the process exits.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    code
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

/// What a service brings to [`bind_service`]: its name and default port, the readiness and metrics
/// its parts already use, and the dependencies `/health/deep` checks.
pub struct ServiceParts {
    pub service: &'static str,
    pub default_port: u16,
    pub readiness: std::sync::Arc<crate::health::Readiness>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    pub dependencies: Vec<std::sync::Arc<dyn crate::health::Dependency>>,
}

/// The start-up steps both services share: ops routes, the shared middleware and docs around the
/// service's API routes, binding the configured address (or serving on `listener`, bound already),
/// and marking the server initialised.
pub async fn bind_service(
    config: &Config,
    listener: Option<TcpListener>,
    parts: ServiceParts,
    api: utoipa_axum::router::OpenApiRouter,
    shutdown: CancellationToken,
    describe: impl FnOnce(&mut utoipa::openapi::OpenApi),
) -> Result<Server, StartError> {
    let ServiceParts {
        service,
        default_port,
        readiness,
        metrics,
        dependencies,
    } = parts;
    let ops = std::sync::Arc::new(crate::http::Ops {
        service,
        readiness: readiness.clone(),
        metrics,
        dependencies,
    });
    let router = crate::http::assemble(api, ops, config, describe);
    raise_open_files_limit();
    let drain = Duration::from_millis(config.server.drain_timeout_ms);
    let server = match listener {
        Some(listener) => {
            Server::from_listener(listener, router, readiness.clone(), shutdown, drain).map_err(StartError::Listener)?
        }
        None => {
            let port = config.port_or(default_port);
            Server::bind(&config.server.host, port, router, readiness.clone(), shutdown, drain)
                .await
                .map_err(|source| StartError::Listen {
                    host: config.server.host.clone(),
                    port,
                    source,
                })?
        }
    };
    readiness.set_initialised();
    Ok(server)
}

/// The OpenAPI info both services share: title, version, the project's licence (not utoipa's
/// own contact and licence, which it fills in by default) and a description.
pub fn describe_service(doc: &mut utoipa::openapi::OpenApi, title: &str, description: &str) {
    doc.info.title = title.into();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc.info.contact = None;
    doc.info.license = Some(
        utoipa::openapi::LicenseBuilder::new()
            .name("MIT")
            .identifier(Some("MIT"))
            .build(),
    );
    doc.info.description = Some(description.into());
}

/// Raises the soft open-files limit to the hard one: every live-results subscriber and every
/// keep-alive client holds a descriptor, and some container runtimes start processes with a soft
/// limit of 1,024 (containerd 2.x on systemd nodes) under a much higher hard limit.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "open-files limit raised to the hard limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

//! The poll service: poll definitions and their lifecycle, results as JSON and as live streams.

pub mod access;
pub mod api;
pub mod export;
pub mod hub;
pub mod methods;
pub mod model;
pub mod record;
pub mod snapshots;
pub mod state;
pub mod store;
pub mod stream;
pub mod votes;

use std::sync::Arc;
use std::time::Duration;

use shared::Config;
use shared::health::{Dependency, Readiness};
use shared::http::Server;
use shared::internal::PeerClient;
use shared::keyvault::connection_source;
use shared::metrics::Metrics;
use shared::service::{ServiceParts, StartError, bind_service, describe_service};
use shared::storage::StoreHealth;
use tokio_util::sync::CancellationToken;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

pub const SERVICE: &str = "poll";
pub const DEFAULT_PORT: u16 = 4000;
/// How often a watched poll's results are re-read for its live streams.
pub const STREAM_INTERVAL: Duration = Duration::from_millis(250);

/// Builds the poll service, bound and ready to run: on `listener` when one is given (bound
/// already: socket activation, or the tests binding port 0 first), else on the configured address.
pub async fn build(
    config: Config,
    listener: Option<std::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<Server, StartError> {
    let readiness = Arc::new(Readiness::default());
    let metrics = Arc::new(Metrics::new(SERVICE));
    let source = connection_source(&config, &readiness)?;
    let keyvault = source.health.clone();
    let store = store::open(&config, &readiness, source, metrics.clone())?;
    let peer = PeerClient::new(
        "vote service",
        &config.services.vote_url,
        Duration::from_millis(config.services.timeout_ms),
    )?
    .with_metrics(metrics.clone());
    let votes = votes::VoteClient { peer: peer.clone() };
    let snapshots = Arc::new(snapshots::Snapshots::new(store.clone(), votes.clone()));
    let hub = hub::Hub::new(snapshots.clone(), STREAM_INTERVAL, shutdown.clone());
    let state = Arc::new(state::AppState {
        store: store.clone(),
        votes,
        snapshots,
        hub,
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
    });
    let db = store.clone();
    let database: Arc<dyn Dependency> = Arc::new(StoreHealth(move || {
        let db = db.clone();
        async move { db.ping().await }
    }));
    let parts = ServiceParts {
        service: SERVICE,
        default_port: DEFAULT_PORT,
        readiness,
        metrics,
        dependencies: [database, Arc::new(peer)].into_iter().chain(keyvault).collect(),
    };
    bind_service(&config, listener, parts, api::router(state), shutdown, describe).await
}

/// The OpenAPI document's description.
pub fn describe(doc: &mut OpenApi) {
    describe_service(
        doc,
        "Poll service",
        "Polls and their lifecycle. Errors are application/problem+json (RFC 9457). Changing, closing and \
         deleting a poll needs the admin token returned once at creation, as `Authorization: Bearer <token>`.",
    );
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "admin_token",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("The poll's admin token"))
                .build(),
        ),
    );
}

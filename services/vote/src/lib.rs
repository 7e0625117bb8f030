//! The vote service: ballots (who voted what) and the tallies derived from them.

pub mod api;
pub mod ballot;
pub mod catalog;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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

pub const SERVICE: &str = "vote";
pub const DEFAULT_PORT: u16 = 5000;

/// Builds the vote service, bound and ready to run: on `listener` when one is given (bound
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
        "poll service",
        &config.services.poll_url,
        Duration::from_millis(config.services.timeout_ms),
    )?
    .with_metrics(metrics.clone());
    let outcomes = Family::<api::OutcomeLabels, Counter>::default();
    metrics.register(
        "pollvote_ballots",
        "Ballots by outcome (accepted, replayed, duplicate, closed, not_open, rejected, unavailable; replaced, withdrawn: changes by their voters)",
        outcomes.clone(),
    );
    let catalog = catalog::Catalog::new(peer.clone(), Duration::from_millis(config.services.poll_cache_ttl_ms))
        .with_metrics(metrics.clone());
    let state = Arc::new(api::AppState {
        store: store.clone(),
        catalog,
        outcomes,
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
        "Vote service",
        "Ballots. One ballot per voter per poll (by client address, voter id, or none, as the poll says), \
         enforced by a unique key in the database. Errors are application/problem+json (RFC 9457). \
         A ballot's voter sees it as counted with the receipt returned once when it was stored.",
    );
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "receipt",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("The ballot's receipt"))
                .build(),
        ),
    );
}

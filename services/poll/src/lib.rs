//! The poll service: poll definitions and their lifecycle, results as JSON and as live streams.

pub mod api;
pub mod model;
pub mod stream;
pub mod votes;

use std::sync::Arc;
use std::time::Duration;

use shared::Config;
use shared::http::{Dependency, Ops, Readiness, Server, assemble};
use shared::internal::PeerClient;
use shared::metrics::Metrics;
use shared::store::{StoreHealth, connection_source, open_poll_store};
use tokio_util::sync::CancellationToken;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{LicenseBuilder, OpenApi};

pub const SERVICE: &str = "poll";
pub const DEFAULT_PORT: u16 = 4000;
/// How often a watched poll's results are re-read for its live streams.
pub const STREAM_INTERVAL: Duration = Duration::from_millis(250);

/// Builds the poll service, bound and ready to run.
pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Server, String> {
    let readiness = Arc::new(Readiness::default());
    let metrics = Arc::new(Metrics::new(SERVICE));
    let source = connection_source(&config, &readiness)?;
    let keyvault = source.health.clone();
    let store = open_poll_store(&config, &readiness, source).await?;
    let peer = PeerClient::new(
        "vote service",
        &config.services.vote_url,
        Duration::from_millis(config.services.timeout_ms),
    )?;
    let votes = votes::VoteClient { peer: peer.clone() };
    let hub = stream::Hub::new(store.clone(), votes.clone(), STREAM_INTERVAL, shutdown.clone());
    let state = Arc::new(api::AppState {
        store: store.clone(),
        votes,
        hub,
        shutdown: shutdown.clone(),
    });
    let db = store.clone();
    let ops = Arc::new(Ops {
        service: SERVICE,
        readiness: readiness.clone(),
        metrics,
        dependencies: vec![
            Arc::new(StoreHealth(move || {
                let db = db.clone();
                async move { db.ping().await }
            })) as Arc<dyn Dependency>,
            Arc::new(peer),
        ]
        .into_iter()
        .chain(keyvault)
        .collect(),
    });
    let router = assemble(api::router(state), ops, &config, describe);
    let port = config.port_or(DEFAULT_PORT);
    let server = Server::bind(
        &config.server.host,
        port,
        router,
        readiness.clone(),
        shutdown,
        Duration::from_millis(config.server.drain_timeout_ms),
    )
    .await
    .map_err(|e| format!("cannot listen on {}:{port}: {e}", config.server.host))?;
    readiness.set_initialised();
    Ok(server)
}

/// The OpenAPI document's description.
pub fn describe(doc: &mut OpenApi) {
    doc.info.title = "Poll service".into();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    // Not utoipa's own contact and licence, which it fills in by default.
    doc.info.contact = None;
    doc.info.license = Some(LicenseBuilder::new().name("MIT").identifier(Some("MIT")).build());
    doc.info.description = Some(
        "Polls and their lifecycle. Errors are application/problem+json (RFC 9457). Changing, closing and \
         deleting a poll needs the admin token returned once at creation, as `Authorization: Bearer <token>`."
            .into(),
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

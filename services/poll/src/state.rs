//! What the poll service's handlers share.

use std::sync::Arc;

use axum::extract::State;

use crate::hub::Hub;
use crate::snapshots::Snapshots;
use crate::store::DynPollStore;
use crate::votes::VoteClient;

pub struct AppState {
    pub store: DynPollStore,
    pub votes: VoteClient,
    pub snapshots: Arc<Snapshots>,
    pub hub: Arc<Hub>,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub metrics: Arc<shared::metrics::Metrics>,
}

pub type St = State<Arc<AppState>>;

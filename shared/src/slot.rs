//! A store that is filled in the background and can be replaced while in use.
//!
//! With MongoDB the services start serving at once (probes answer, `/readyz` says why it is not
//! ready), while a task connects, creates collections and indexes, and then puts the store in the
//! slot. When the connection string changes (Key Vault rotation), a new client and store are built
//! and swapped in; requests already running keep the old store (`Arc`) until they finish, so none
//! is dropped. If the new one cannot connect, the old one keeps serving.
//!
//! A rotated password: the old client keeps its authenticated connections, and the first new
//! connection it opens is refused ([`StoreError::CredentialsRejected`]), which is reported to Key
//! Vault's reader (the secret is read again at once, see [`crate::keyvault`]). A call refused so
//! waits (up to the slot's `rebuild_wait`) for the client rebuilt from the new secret and runs
//! once more on it: the refused command was never sent (authentication precedes it), so running
//! it again is safe, and callers see no failure from a rotation.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::Secret;
use crate::backoff::Backoff;
use crate::health::Readiness;
use crate::storage::{StoreError, StoreResult};

const WHAT: &str = "database";

pub struct Slot<T: ?Sized> {
    current: RwLock<Option<Arc<T>>>,
    /// Why the last attempt to open a store failed, while none is set (calls and `/health/deep`
    /// report it).
    last_error: RwLock<Option<StoreError>>,
    /// Counts the stores set; a refused call waits on it for the next one.
    generation: watch::Sender<u64>,
    /// How long a call refused for its credentials waits for a rebuilt store (zero when the
    /// connection string cannot change).
    rebuild_wait: Duration,
}

impl<T: ?Sized> Slot<T> {
    pub fn empty() -> Self {
        Self::with_rebuild_wait(Duration::ZERO)
    }

    /// An empty slot whose refused calls wait up to `rebuild_wait` for a rebuilt store.
    pub fn with_rebuild_wait(rebuild_wait: Duration) -> Self {
        Self {
            current: RwLock::new(None),
            last_error: RwLock::new(None),
            generation: watch::Sender::new(0),
            rebuild_wait,
        }
    }

    pub fn set(&self, store: Arc<T>) {
        if let Ok(mut c) = self.current.write() {
            *c = Some(store);
        }
        if let Ok(mut e) = self.last_error.write() {
            *e = None;
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Records why the store cannot be opened (shown while the slot is empty).
    pub fn set_error(&self, error: StoreError) {
        if let Ok(mut e) = self.last_error.write() {
            *e = Some(error);
        }
    }

    pub fn is_set(&self) -> bool {
        self.current.read().map(|c| c.is_some()).unwrap_or(false)
    }

    fn get(&self) -> StoreResult<Arc<T>> {
        self.current.read().ok().and_then(|c| c.clone()).ok_or_else(|| {
            self.last_error
                .read()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_else(|| StoreError::unavailable("not connected to the database yet"))
        })
    }

    /// The store set after `old`, waiting up to `wait` for one.
    async fn replacement(&self, old: &Arc<T>, wait: Duration) -> Option<Arc<T>> {
        let mut generations = self.generation.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Ok(Some(current)) = self.get().map(Some)
                && !std::ptr::addr_eq(Arc::as_ptr(&current), Arc::as_ptr(old))
            {
                return Some(current);
            }
            match tokio::time::timeout_at(deadline, generations.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// Runs `op` on the current store; when the database refused its credentials, once more on
    /// the store rebuilt after it (see the module docs).
    pub async fn call<R, F, Fut>(&self, op: F) -> StoreResult<R>
    where
        F: Fn(Arc<T>) -> Fut,
        Fut: Future<Output = StoreResult<R>>,
    {
        let store = self.get()?;
        let result = op(store.clone()).await;
        if !matches!(result, Err(StoreError::CredentialsRejected { .. })) {
            return result;
        }
        match self.replacement(&store, self.rebuild_wait).await {
            Some(rebuilt) => {
                tracing::debug!("the database refused the credentials; running the call again on the rebuilt client");
                op(rebuilt).await
            }
            None => result,
        }
    }
}

/// Reconnects wait 200 ms doubling to 5 s, jittered: replicas that lost the database together do
/// not come back in lockstep.
pub const RECONNECT: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).with_jitter();

/// Starts the task that (re)builds the store for every connection string `uris` yields, retrying
/// with [`RECONNECT`] backoff while the database is unreachable. Returns the slot the task fills; its calls
/// refused for their credentials wait up to `rebuild_wait` for a rebuilt store (zero when the
/// connection string cannot change).
pub fn connect_in_background<T, F, Fut>(
    readiness: Arc<Readiness>,
    mut uris: watch::Receiver<Option<Secret>>,
    rebuild_wait: Duration,
    open: F,
) -> Arc<Slot<T>>
where
    T: ?Sized + Send + Sync + 'static,
    Slot<T>: Send + Sync,
    F: Fn(Secret) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StoreResult<Arc<T>>> + Send,
{
    let slot = Arc::new(Slot::<T>::with_rebuild_wait(rebuild_wait));
    readiness.wait_for(WHAT, "connecting");
    let filled = slot.clone();
    tokio::spawn(async move {
        loop {
            let uri = uris.borrow_and_update().clone();
            if let Some(uri) = uri {
                for delay in RECONNECT.delays() {
                    match open(uri.clone()).await {
                        Ok(store) => {
                            let rotated = filled.is_set();
                            filled.set(store);
                            readiness.resolve(WHAT);
                            tracing::info!(rotated, "database connected");
                            break;
                        }
                        Err(e) => {
                            // Messages are scrubbed of connection strings where they are made.
                            let why = match &e {
                                StoreError::Unavailable { message, .. } => {
                                    format!("the database is unreachable: {message}")
                                }
                                StoreError::CredentialsRejected { message } => {
                                    format!("the database refused the credentials of the connection string ({message})")
                                }
                                StoreError::Internal(cause) => crate::error::Chain(&**cause).to_string(),
                            };
                            tracing::warn!(error = %crate::error::Chain(&e), retry_in_ms = delay.as_millis() as u64, "cannot open the database");
                            if !filled.is_set() {
                                filled.set_error(e);
                                readiness.wait_for(WHAT, why);
                            }
                            tokio::select! {
                                () = tokio::time::sleep(delay) => {}
                                changed = uris.changed() => {
                                    if changed.is_err() { return; }
                                    break;
                                }
                            }
                        }
                    }
                }
                if uris.has_changed().unwrap_or(false) {
                    continue;
                }
            } else if !filled.is_set() {
                readiness.wait_for(WHAT, "waiting for the connection string");
            }
            if uris.changed().await.is_err() {
                return;
            }
        }
    });
    slot
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use async_trait::async_trait;

    use super::*;

    /// A store whose `ping` answers `answer`, counting calls.
    struct Fake {
        answer: fn() -> StoreResult<()>,
        calls: AtomicUsize,
    }

    impl Fake {
        fn new(answer: fn() -> StoreResult<()>) -> Arc<Self> {
            Arc::new(Self {
                answer,
                calls: AtomicUsize::new(0),
            })
        }
        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    fn refused() -> StoreResult<()> {
        Err(StoreError::CredentialsRejected {
            message: "SCRAM failure: Authentication failed.".into(),
        })
    }

    fn fine() -> StoreResult<()> {
        Ok(())
    }

    fn unreachable() -> StoreResult<()> {
        Err(StoreError::unavailable("connection refused"))
    }

    /// The one call these tests make through a slot.
    #[async_trait]
    trait Ping: Send + Sync + 'static {
        async fn ping(&self) -> StoreResult<()>;
    }

    #[async_trait]
    impl Ping for Fake {
        async fn ping(&self) -> StoreResult<()> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            (self.answer)()
        }
    }

    #[async_trait]
    impl Ping for Slot<dyn Ping> {
        async fn ping(&self) -> StoreResult<()> {
            self.call(|s| async move { s.ping().await }).await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_refused_for_its_credentials_runs_again_on_the_rebuilt_store() {
        let slot: Arc<Slot<dyn Ping>> = Arc::new(Slot::with_rebuild_wait(Duration::from_secs(5)));
        let (old, rebuilt) = (Fake::new(refused), Fake::new(fine));
        slot.set(old.clone());
        let call = tokio::spawn({
            let slot = slot.clone();
            async move { slot.ping().await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!call.is_finished(), "waits for the rebuilt store");
        slot.set(rebuilt.clone());
        assert!(call.await.expect("join").is_ok(), "ran again on the rebuilt store");
        assert_eq!((old.calls(), rebuilt.calls()), (1, 1));

        // Refused by a store replaced while the call ran: at once on the current one.
        let current = Fake::new(fine);
        let first = std::sync::atomic::AtomicBool::new(true);
        let started = tokio::time::Instant::now();
        let result = slot
            .call(|s| {
                let replace = first.swap(false, Ordering::SeqCst).then(|| current.clone());
                let slot = &slot;
                async move {
                    match replace {
                        Some(current) => {
                            slot.set(current);
                            refused()
                        }
                        None => s.ping().await,
                    }
                }
            })
            .await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!((started.elapsed(), current.calls()), (Duration::ZERO, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_without_a_rebuild_is_returned_after_the_wait_and_other_errors_at_once() {
        let slot: Slot<dyn Ping> = Slot::with_rebuild_wait(Duration::from_secs(5));
        let old = Fake::new(refused);
        slot.set(old.clone());
        let started = tokio::time::Instant::now();
        let result = slot.ping().await;
        assert!(
            matches!(result, Err(StoreError::CredentialsRejected { .. })),
            "{result:?}"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(old.calls(), 1, "not run again on the same store");

        // A connection string that cannot change: no wait at all.
        let fixed: Slot<dyn Ping> = Slot::empty();
        fixed.set(Fake::new(refused));
        let started = tokio::time::Instant::now();
        assert!(fixed.ping().await.is_err());
        assert_eq!(started.elapsed(), Duration::ZERO);

        // Other failures (an outage) are answered at once and never run again.
        let down = Fake::new(unreachable);
        slot.set(down.clone());
        let started = tokio::time::Instant::now();
        assert!(matches!(slot.ping().await, Err(StoreError::Unavailable { .. })));
        assert_eq!((started.elapsed(), down.calls()), (Duration::ZERO, 1));
    }

    #[tokio::test]
    async fn while_empty_calls_and_readiness_say_why_the_store_cannot_be_opened() {
        let readiness = Arc::new(Readiness::default());
        readiness.set_initialised();
        let (tx, rx) = watch::channel(Some(Secret::new("mongodb://app:hunter2@db/")));
        let slot: Arc<Slot<dyn Ping>> = connect_in_background(readiness.clone(), rx, Duration::ZERO, |_uri| async {
            refused().map(|()| unreachable_store())
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let why = loop {
            match readiness.state() {
                Err(why) if why.contains("refused") => break why,
                _ if tokio::time::Instant::now() > deadline => panic!("no reason: {:?}", readiness.state()),
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        };
        assert!(
            why.contains(
                "database: the database refused the credentials of the connection string (SCRAM failure: Authentication failed.)"
            ),
            "{why}"
        );
        assert!(!why.contains("hunter2"), "{why}");
        let result = slot.ping().await;
        assert!(
            matches!(result, Err(StoreError::CredentialsRejected { .. })),
            "{result:?}"
        );
        drop(tx);
    }

    fn unreachable_store() -> Arc<dyn Ping> {
        Fake::new(unreachable)
    }
}

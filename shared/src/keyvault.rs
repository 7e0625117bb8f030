//! The MongoDB connection string from Azure Key Vault, read with the pod's workload identity.
//!
//! [`start`] chooses a credential ([`choose_credential`]: workload identity when the webhook's
//! variables are set, the Azure CLI on a laptop, else a start-up error naming what is missing),
//! then a background task reads the secret:
//!
//! - at start, retrying with exponential backoff; until the secret is loaded, readiness waits for
//!   `secret` with the reason (vault, secret name and error, never a token or the value), and past
//!   the start-up deadline the failure is also logged as an error. Reads go on until one succeeds,
//!   so the service becomes ready by itself once the vault or the identity is fixed;
//! - then every refresh interval, and at once (at most every [`MIN_GAP`]) when the database refuses
//!   the current credentials. A changed value is sent on the channel, and the store slot builds a
//!   new client and swaps it in (see [`crate::slot`]); an unchanged one is not.
//!
//! `/health/deep` gets a `keyvault` dependency reporting the last read. The value only ever lives
//! in a [`Secret`], which masks itself in `Debug`, `Display` and serialisation.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use azure_core::credentials::TokenCredential;
use azure_core::http::{ClientOptions, RetryOptions, Transport};
use azure_identity::{
    ClientAssertionCredentialOptions, DeveloperToolsCredential, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use azure_security_keyvault_secrets::{SecretClient, SecretClientOptions};
use tokio::sync::{Notify, watch};

use crate::Secret;
use crate::backoff::Backoff;
use crate::config::KeyVaultConfig;
use crate::health::{Dependency, Readiness, Unhealthy};

/// The readiness condition this module holds until the secret is loaded.
pub const READINESS_KEY: &str = "secret";
/// Reads triggered by refused credentials are at least this far apart.
pub const MIN_GAP: Duration = Duration::from_secs(5);

const WORKLOAD_IDENTITY_VARS: [&str; 3] = ["AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE"];

/// Why Key Vault cannot be used (a start-up error). SDK errors are kept as messages made by
/// [`describe`] (the kind, status and error code, never a response body: a body may hold the
/// secret).
#[derive(Debug, thiserror::Error)]
pub enum KeyVaultError {
    #[error(
        "Key Vault: workload identity is only partly configured: {} not set (the Azure Workload Identity \
         webhook sets AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE and AZURE_AUTHORITY_HOST in \
         pods labelled azure.workload.identity/use=true whose service account names the client id)",
        missing.join(", ")
    )]
    PartlyConfigured { missing: Vec<&'static str> },
    #[error(
        "Key Vault: no Azure credential: AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE are \
         not set (workload identity, set in AKS by its webhook) and the Azure CLI (`az`) is not on PATH (on a \
         laptop: install it and run `az login`)"
    )]
    NoCredential,
    #[error("Key Vault: cannot build the HTTPS client")]
    HttpClient(#[source] reqwest::Error),
    /// The SDK refused to make the credential (`what`) or the client.
    #[error("Key Vault: {what}")]
    Sdk {
        what: String,
        #[source]
        cause: SdkError,
    },
}

/// An Azure SDK error as [`describe`] tells it: log- and probe-safe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SdkError(pub String);

impl SdkError {
    fn of(e: &azure_core::Error) -> Self {
        Self(describe(e))
    }
}

/// Why one read of the secret failed: a message without secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SecretReadError(pub String);

impl From<String> for SecretReadError {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for SecretReadError {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

/// Which Azure credential reads the vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialChoice {
    /// AKS: the workload identity webhook's variables (`AZURE_AUTHORITY_HOST` is read by the SDK).
    WorkloadIdentity {
        client_id: String,
        tenant_id: String,
        token_file: PathBuf,
    },
    /// A developer's machine: the Azure CLI (`az login`), then the Azure Developer CLI.
    DeveloperTools,
}

impl CredentialChoice {
    pub fn name(&self) -> &'static str {
        match self {
            Self::WorkloadIdentity { .. } => "WorkloadIdentityCredential",
            Self::DeveloperTools => "DeveloperToolsCredential (Azure CLI)",
        }
    }
}

/// Chooses the credential from the environment (`var`) and whether a program is on `PATH`.
pub fn choose_credential(
    var: impl Fn(&str) -> Option<String>,
    on_path: impl Fn(&str) -> bool,
) -> Result<CredentialChoice, KeyVaultError> {
    let value = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    let missing: Vec<&str> = WORKLOAD_IDENTITY_VARS
        .into_iter()
        .filter(|n| value(n).is_none())
        .collect();
    match (
        missing.len(),
        value("AZURE_CLIENT_ID"),
        value("AZURE_TENANT_ID"),
        value("AZURE_FEDERATED_TOKEN_FILE"),
    ) {
        (0, Some(client_id), Some(tenant_id), Some(token_file)) => Ok(CredentialChoice::WorkloadIdentity {
            client_id,
            tenant_id,
            token_file: PathBuf::from(token_file),
        }),
        (n, ..) if n < WORKLOAD_IDENTITY_VARS.len() => Err(KeyVaultError::PartlyConfigured { missing }),
        _ if on_path("az") || on_path("azd") => Ok(CredentialChoice::DeveloperTools),
        _ => Err(KeyVaultError::NoCredential),
    }
}

/// Whether `program` is an executable file in one of `PATH`'s directories.
fn on_path(program: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| is_executable(&dir.join(program)))
}

#[cfg(unix)]
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(p: &Path) -> bool {
    p.is_file()
}

/// The SDK's transport: the workspace's reqwest (rustls; roots from the OS store, or from
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` when set) with our timeouts, and no retries of its own: the
/// task below retries with its own backoff.
fn client_options(config: &KeyVaultConfig) -> Result<ClientOptions, KeyVaultError> {
    let timeout = Duration::from_millis(config.timeout_ms);
    let http = reqwest::Client::builder()
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(KeyVaultError::HttpClient)?;
    Ok(ClientOptions {
        transport: Some(Transport::new(Arc::new(http))),
        retry: RetryOptions::none(),
        ..ClientOptions::default()
    })
}

fn credential(choice: &CredentialChoice, options: &ClientOptions) -> Result<Arc<dyn TokenCredential>, KeyVaultError> {
    match choice {
        CredentialChoice::WorkloadIdentity {
            client_id,
            tenant_id,
            token_file,
        } => {
            let options = WorkloadIdentityCredentialOptions {
                credential_options: ClientAssertionCredentialOptions {
                    client_options: options.clone(),
                },
                client_id: Some(client_id.clone()),
                tenant_id: Some(tenant_id.clone()),
                token_file_path: Some(token_file.clone()),
            };
            WorkloadIdentityCredential::new(Some(options))
                .map(|c| c as Arc<dyn TokenCredential>)
                .map_err(|e| KeyVaultError::Sdk {
                    what: "workload identity".into(),
                    cause: SdkError::of(&e),
                })
        }
        CredentialChoice::DeveloperTools => DeveloperToolsCredential::new(None)
            .map(|c| c as Arc<dyn TokenCredential>)
            .map_err(|e| KeyVaultError::Sdk {
                what: "Azure CLI credential".into(),
                cause: SdkError::of(&e),
            }),
    }
}

/// The credential with a span around each token request (the workload identity's token exchange
/// with Microsoft Entra, or the Azure CLI), a child of the Key Vault read that needs it. The
/// credential caches tokens: a request answered from its cache is a short span.
#[derive(Debug)]
struct TracedCredential(Arc<dyn TokenCredential>);

#[async_trait]
impl TokenCredential for TracedCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<azure_core::credentials::TokenRequestOptions<'_>>,
    ) -> azure_core::Result<azure_core::credentials::AccessToken> {
        let span = if crate::telemetry::span_wanted() {
            tracing::info_span!(
                "token",
                otel.name = "Entra get_token",
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let token = tracing::Instrument::instrument(self.0.get_token(scopes, options), span.clone()).await;
        if token.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        token
    }
}

/// Something that reads the secret's current value (Key Vault, or a script in tests).
#[async_trait]
pub trait SecretReader: Send + Sync + 'static {
    /// The value, or why not (a message without secrets).
    async fn read(&self) -> Result<Secret, SecretReadError>;
}

struct VaultReader {
    client: SecretClient,
    name: String,
}

#[async_trait]
impl SecretReader for VaultReader {
    async fn read(&self) -> Result<Secret, SecretReadError> {
        let response = self
            .client
            .get_secret(&self.name, None)
            .await
            .map_err(|e| SecretReadError(describe(&e)))?;
        let secret = response.into_model().map_err(|e| SecretReadError(describe(&e)))?;
        secret
            .value
            .map(Secret::new)
            .ok_or_else(|| "the secret has no value".into())
    }
}

/// An SDK error as a log- and probe-safe message: the kind, the service's status and error code,
/// the messages of the error chain; never response bodies (a body may hold the secret).
fn describe(e: &azure_core::Error) -> String {
    use azure_core::error::ErrorKind;
    match e.kind() {
        ErrorKind::HttpResponse { status, error_code, .. } => {
            let hint = match u16::from(*status) {
                401 => " (the vault refused the access token)",
                403 => " (the identity may not get secrets from this vault)",
                404 => " (no such secret)",
                429 => " (throttled)",
                _ => "",
            };
            format!(
                "Key Vault answered {status} {}{hint}",
                error_code.as_deref().unwrap_or("(no error code)")
            )
        }
        ErrorKind::DataConversion => "unreadable answer (not a Key Vault secret)".into(),
        ErrorKind::Connection | ErrorKind::Io => format!("cannot reach the vault: {}", chain(e)),
        _ => chain(e),
    }
}

/// An error's message followed by those of its sources, on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// How the task paces its reads.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub refresh: Duration,
    /// Start-up reads until the secret loads (jittered: replicas starting together against one
    /// vault spread their reads).
    pub retry: Backoff,
    pub startup_deadline: Duration,
    pub min_gap: Duration,
}

impl Timing {
    pub fn of(config: &KeyVaultConfig) -> Self {
        Self {
            refresh: Duration::from_millis(config.refresh_interval_ms),
            retry: Backoff::new(
                Duration::from_millis(config.retry_initial_ms),
                Duration::from_millis(config.retry_max_ms),
            )
            .with_jitter(),
            startup_deadline: Duration::from_millis(config.startup_deadline_ms),
            min_gap: MIN_GAP,
        }
    }
}

/// Where the MongoDB connection string comes from, and where to report that the database refused it.
#[derive(Clone)]
pub struct ConnectionSource {
    /// The current connection string (`None` until known); a new value is a rotation.
    pub uris: tokio::sync::watch::Receiver<Option<Secret>>,
    /// Reported when the database refuses the credentials (Key Vault then reads the secret at once).
    pub credentials_rejected: CredentialsRejected,
    /// Key Vault's state for `/health/deep`, when the connection string comes from there.
    pub health: Option<Arc<dyn Dependency>>,
}

/// The connection string as configured: from Key Vault when `keyvault` is in use (fetched in the
/// background, refreshed, readiness waiting for "secret" until loaded), else `storage.mongodb_uri`,
/// a value that never changes. Errors are start-up errors (no usable Azure credential, …).
pub fn connection_source(
    config: &crate::Config,
    readiness: &Arc<Readiness>,
) -> Result<ConnectionSource, KeyVaultError> {
    if config.keyvault.in_use() {
        return start(&config.keyvault, readiness);
    }
    let uri = config.storage.mongodb_uri.clone();
    let (tx, rx) = tokio::sync::watch::channel((!uri.is_empty()).then_some(uri));
    // Keep the sender alive for the life of the process so receivers never see "closed".
    std::mem::forget(tx);
    Ok(ConnectionSource {
        uris: rx,
        credentials_rejected: CredentialsRejected::default(),
        health: None,
    })
}

/// Where "the database refused our credentials" is reported: a rotated password then gets the
/// connection string read again from Key Vault at once instead of at the next refresh. Does
/// nothing unless made with [`CredentialsRejected::notifying`].
#[derive(Clone, Default)]
pub struct CredentialsRejected(Option<std::sync::Arc<tokio::sync::Notify>>);

impl CredentialsRejected {
    /// Reports to `notify` (one stored permit however many failures: the reader coalesces them).
    pub fn notifying(notify: std::sync::Arc<tokio::sync::Notify>) -> Self {
        Self(Some(notify))
    }

    /// Whether a report reaches someone (who may then change the connection string).
    pub fn is_heard(&self) -> bool {
        self.0.is_some()
    }

    pub fn report(&self) {
        if let Some(n) = &self.0 {
            n.notify_one();
        }
    }
}

impl std::fmt::Debug for CredentialsRejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "CredentialsRejected(reported)"
        } else {
            "CredentialsRejected(ignored)"
        })
    }
}

impl PartialEq for CredentialsRejected {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for CredentialsRejected {}

/// Reads the connection string from Key Vault as `config` says; see the module docs.
pub fn start(config: &KeyVaultConfig, readiness: &Arc<Readiness>) -> Result<ConnectionSource, KeyVaultError> {
    let url = config.url.trim();
    let choice = choose_credential(|name| std::env::var(name).ok(), on_path)?;
    let options = client_options(config)?;
    let credential: Arc<dyn TokenCredential> = Arc::new(TracedCredential(credential(&choice, &options)?));
    let defaults = SecretClientOptions::default();
    let client = SecretClient::new(
        url,
        credential,
        Some(SecretClientOptions {
            api_version: if config.api_version.is_empty() {
                defaults.api_version
            } else {
                config.api_version.clone()
            },
            client_options: options,
            verify_challenge_resource: Some(config.verify_challenge_resource),
        }),
    )
    .map_err(|e| KeyVaultError::Sdk {
        what: url.to_owned(),
        cause: SdkError::of(&e),
    })?;
    tracing::info!(
        vault = url,
        secret = %config.secret_name,
        credential = choice.name(),
        "reading the MongoDB connection string from Key Vault"
    );
    let reader = VaultReader {
        client,
        name: config.secret_name.clone(),
    };
    let what = format!("secret `{}` in Key Vault {url}", config.secret_name);
    Ok(spawn(Arc::new(reader), what, Timing::of(config), readiness.clone()))
}

/// Starts the task that reads through `reader`; `what` names the secret and vault in messages.
pub fn spawn(
    reader: Arc<dyn SecretReader>,
    what: String,
    timing: Timing,
    readiness: Arc<Readiness>,
) -> ConnectionSource {
    let (tx, rx) = watch::channel(None);
    let rejected = Arc::new(Notify::new());
    let state = Arc::new(Mutex::new(LastRead::default()));
    readiness.wait_for(READINESS_KEY, format!("reading {what}"));
    let task = Task {
        reader,
        what: what.clone(),
        timing,
        tx,
        state: state.clone(),
        readiness,
        rejected: rejected.clone(),
    };
    tokio::spawn(task.run());
    ConnectionSource {
        uris: rx,
        credentials_rejected: CredentialsRejected::notifying(rejected),
        health: Some(Arc::new(KeyVaultHealth { what, state })),
    }
}

#[derive(Debug, Default)]
struct LastRead {
    loaded: bool,
    error: Option<String>,
}

struct Task {
    reader: Arc<dyn SecretReader>,
    what: String,
    timing: Timing,
    tx: watch::Sender<Option<Secret>>,
    state: Arc<Mutex<LastRead>>,
    readiness: Arc<Readiness>,
    rejected: Arc<Notify>,
}

impl Task {
    async fn run(self) {
        let started = Instant::now();
        let mut reported = false;
        for delay in self.timing.retry.delays() {
            match self.read().await {
                Ok(value) => {
                    self.tx.send_replace(Some(value));
                    self.readiness.resolve(READINESS_KEY);
                    tracing::info!(secret = %self.what, "connection string loaded from Key Vault");
                    break;
                }
                Err(e) => {
                    self.readiness
                        .wait_for(READINESS_KEY, format!("cannot read {}: {e}; retrying", self.what));
                    let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                    if !reported && started.elapsed() >= self.timing.startup_deadline {
                        reported = true;
                        tracing::error!(
                            secret = %self.what,
                            error = %e,
                            retry_in_ms,
                            "no connection string from Key Vault within the start-up deadline; not ready, still retrying"
                        );
                    } else {
                        tracing::warn!(secret = %self.what, error = %e, retry_in_ms, "cannot read the connection string from Key Vault");
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
        let mut last = Instant::now();
        loop {
            let refused = tokio::select! {
                () = tokio::time::sleep(self.timing.refresh) => false,
                () = self.rejected.notified() => true,
            };
            if refused {
                tokio::time::sleep(self.timing.min_gap.saturating_sub(last.elapsed())).await;
                tracing::info!(secret = %self.what, "the database refused the credentials; reading the secret again");
                // Reports that came meanwhile are answered by this read.
                let _ = futures_util::FutureExt::now_or_never(self.rejected.notified());
            }
            last = Instant::now();
            match self.read().await {
                Ok(value) if self.tx.borrow().as_ref() == Some(&value) => {}
                Ok(value) => {
                    tracing::info!(secret = %self.what, "the connection string changed in Key Vault; reconnecting");
                    self.tx.send_replace(Some(value));
                }
                Err(e) => tracing::warn!(
                    secret = %self.what,
                    error = %e,
                    "cannot refresh the connection string from Key Vault; keeping the current one"
                ),
            }
        }
    }

    /// One read, checked, with its outcome recorded for `/health/deep`.
    async fn read(&self) -> Result<Secret, SecretReadError> {
        let span = if crate::telemetry::span_wanted() {
            tracing::info_span!(
                "keyvault",
                otel.name = "Key Vault GetSecret",
                otel.kind = "client",
                otel.status_code = tracing::field::Empty,
                az.namespace = "Microsoft.KeyVault",
            )
        } else {
            tracing::Span::none()
        };
        let read = tracing::Instrument::instrument(self.reader.read(), span.clone()).await;
        let result = read.and_then(|value| {
            let value = Secret::new(value.expose().trim());
            let uri = value.expose();
            if uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://") {
                Ok(value)
            } else {
                // Never echo the value.
                Err("its value is not a MongoDB connection string (mongodb:// or mongodb+srv://)".into())
            }
        });
        if let Ok(mut s) = self.state.lock() {
            s.loaded |= result.is_ok();
            s.error = result.as_ref().err().map(ToString::to_string);
        }
        crate::metrics::keyvault().read(result.is_ok());
        if result.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        result
    }
}

/// `/health/deep`'s `keyvault`: the outcome of the last read (no request per probe).
struct KeyVaultHealth {
    what: String,
    state: Arc<Mutex<LastRead>>,
}

#[async_trait]
impl Dependency for KeyVaultHealth {
    fn name(&self) -> &'static str {
        "keyvault"
    }

    async fn check(&self) -> Result<(), Unhealthy> {
        let (loaded, error) = self
            .state
            .lock()
            .map(|s| (s.loaded, s.error.clone()))
            .unwrap_or((false, Some("state unavailable".into())));
        match (loaded, error) {
            (true, None) => Ok(()),
            (false, None) => Err(format!("reading {} (no answer yet)", self.what).into()),
            (false, Some(e)) => Err(format!("cannot read {}: {e}", self.what).into()),
            (true, Some(e)) => Err(format!(
                "cannot read {}: {e} (serving with the connection string read before)",
                self.what
            )
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn workload_identity_when_the_webhook_variables_are_set() {
        let vars = [
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_TENANT_ID", "t"),
            (
                "AZURE_FEDERATED_TOKEN_FILE",
                "/var/run/secrets/azure/tokens/azure-identity-token",
            ),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
        ];
        let choice = choose_credential(env(&vars), |_| true).expect("chosen");
        assert_eq!(
            choice,
            CredentialChoice::WorkloadIdentity {
                client_id: "c".into(),
                tenant_id: "t".into(),
                token_file: PathBuf::from("/var/run/secrets/azure/tokens/azure-identity-token"),
            },
            "workload identity wins over the CLI"
        );
    }

    #[test]
    fn partial_workload_identity_names_what_is_missing() {
        let err = choose_credential(env(&[("AZURE_CLIENT_ID", "c"), ("AZURE_TENANT_ID", " ")]), |_| true)
            .expect_err("partial")
            .to_string();
        assert!(
            err.contains("AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE not set"),
            "{err}"
        );
        assert!(!err.contains("AZURE_CLIENT_ID not set"), "{err}");
    }

    #[test]
    fn the_azure_cli_on_a_laptop_otherwise_a_clear_error() {
        assert_eq!(
            choose_credential(env(&[]), |p| p == "az").ok(),
            Some(CredentialChoice::DeveloperTools)
        );
        let err = choose_credential(env(&[]), |_| false).expect_err("nothing").to_string();
        for needle in [
            "AZURE_CLIENT_ID",
            "AZURE_TENANT_ID",
            "AZURE_FEDERATED_TOKEN_FILE",
            "`az`",
            "az login",
        ] {
            assert!(err.contains(needle), "`{needle}` missing from: {err}");
        }
    }

    const VALUE: &str = "mongodb://user:hunter2@db:27017/?tls=true";
    const ROTATED: &str = "mongodb://user:correct-horse@db:27017/?tls=true";

    /// Answers from a script (the last answer repeats), counting reads.
    struct Script {
        answers: Mutex<VecDeque<Result<&'static str, &'static str>>>,
        reads: Mutex<usize>,
    }

    impl Script {
        fn new(answers: Vec<Result<&'static str, &'static str>>) -> Arc<Self> {
            Arc::new(Self {
                answers: Mutex::new(answers.into()),
                reads: Mutex::new(0),
            })
        }
        /// From now on, always this answer.
        fn set(&self, answer: Result<&'static str, &'static str>) {
            *self.answers.lock().expect("lock") = VecDeque::from([answer]);
        }
        fn reads(&self) -> usize {
            *self.reads.lock().expect("lock")
        }
    }

    #[async_trait]
    impl SecretReader for Script {
        async fn read(&self) -> Result<Secret, SecretReadError> {
            *self.reads.lock().expect("lock") += 1;
            let mut answers = self.answers.lock().expect("lock");
            let answer = if answers.len() > 1 {
                answers.pop_front()
            } else {
                answers.front().copied()
            };
            match answer.expect("an answer") {
                Ok(v) => Ok(Secret::new(v)),
                Err(e) => Err(e.into()),
            }
        }
    }

    fn timing() -> Timing {
        Timing {
            refresh: Duration::from_secs(60),
            retry: Backoff::new(Duration::from_millis(100), Duration::from_millis(400)),
            startup_deadline: Duration::from_secs(1),
            min_gap: Duration::from_secs(5),
        }
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn start_up_retries_with_backoff_until_loaded_and_says_why_meanwhile() {
        let readiness = Arc::new(Readiness::default());
        readiness.set_initialised();
        let script = Script::new(vec![
            Err("cannot reach the vault"),
            Err("cannot reach the vault"),
            Err("cannot reach the vault"),
            Err("cannot reach the vault"),
            Ok(VALUE),
        ]);
        let what = "secret `db` in Key Vault https://kv.example/".to_owned();
        let source = spawn(script.clone(), what, timing(), readiness.clone());
        let health = source.health.clone().expect("health");
        settle().await;
        assert_eq!(script.reads(), 1);
        let why = readiness.state().expect_err("not ready");
        assert!(
            why.contains("secret: cannot read secret `db` in Key Vault https://kv.example/: cannot reach the vault"),
            "{why}"
        );
        assert!(health.check().await.is_err());
        assert!(source.uris.borrow().is_none());
        // Backoff 100, 200, 400, 400 ms (capped).
        for (after_ms, reads) in [(100, 2), (200, 3), (400, 4), (400, 5)] {
            tokio::time::advance(Duration::from_millis(after_ms - 1)).await;
            settle().await;
            assert_eq!(script.reads(), reads - 1, "not before {after_ms} ms");
            tokio::time::advance(Duration::from_millis(1)).await;
            settle().await;
            assert_eq!(script.reads(), reads, "after {after_ms} ms");
        }
        assert_eq!(readiness.state(), Ok(()));
        assert_eq!(source.uris.borrow().as_ref().map(Secret::expose), Some(VALUE));
        assert_eq!(health.check().await, Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_send_only_changes_and_refused_credentials_read_at_once() {
        let readiness = Arc::new(Readiness::default());
        let script = Script::new(vec![Ok(VALUE)]);
        let mut source = spawn(script.clone(), "s".into(), timing(), readiness.clone());
        settle().await;
        assert!(source.uris.has_changed().expect("open"));
        source.uris.borrow_and_update();

        // The same value at the next refresh: nothing is sent.
        tokio::time::advance(Duration::from_secs(60)).await;
        settle().await;
        assert_eq!(script.reads(), 2);
        assert!(!source.uris.has_changed().expect("open"));

        // Rotated: the next refresh sends it.
        script.set(Ok(ROTATED));
        tokio::time::advance(Duration::from_secs(60)).await;
        settle().await;
        assert!(source.uris.has_changed().expect("open"));
        assert_eq!(
            source.uris.borrow_and_update().as_ref().map(Secret::expose),
            Some(ROTATED)
        );

        // The database refuses the credentials: read again without waiting for the refresh,
        // reports coalesced, and no sooner than MIN_GAP after the last read.
        script.set(Ok(VALUE));
        for _ in 0..3 {
            source.credentials_rejected.report();
        }
        settle().await;
        assert_eq!(script.reads(), 3, "not within the minimum gap");
        tokio::time::advance(Duration::from_secs(5)).await;
        settle().await;
        assert_eq!(script.reads(), 4);
        assert_eq!(
            source.uris.borrow_and_update().as_ref().map(Secret::expose),
            Some(VALUE)
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        settle().await;
        assert_eq!(script.reads(), 4, "one read for several reports");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_keeps_the_value_and_shows_in_deep_health() {
        let readiness = Arc::new(Readiness::default());
        readiness.set_initialised();
        let script = Script::new(vec![Ok(VALUE), Err("Key Vault answered 403 Forbidden")]);
        let source = spawn(script.clone(), "secret `db`".into(), timing(), readiness.clone());
        settle().await;
        tokio::time::advance(Duration::from_secs(60)).await;
        settle().await;
        assert_eq!(script.reads(), 2);
        assert_eq!(readiness.state(), Ok(()), "still ready: the loaded value keeps serving");
        assert_eq!(source.uris.borrow().as_ref().map(Secret::expose), Some(VALUE));
        let why = source.health.expect("health").check().await.expect_err("down");
        assert!(
            why.contains("403") && why.contains("serving with the connection string read before"),
            "{why}"
        );
        assert!(!why.contains("hunter2"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_value_that_is_not_a_connection_string_is_refused_without_echo() {
        let readiness = Arc::new(Readiness::default());
        readiness.set_initialised();
        let script = Script::new(vec![Ok("postgres://user:hunter2@db/")]);
        let source = spawn(script, "secret `db`".into(), timing(), readiness.clone());
        settle().await;
        let why = readiness.state().expect_err("not ready");
        assert!(why.contains("not a MongoDB connection string"), "{why}");
        assert!(!why.contains("hunter2"), "{why}");
        assert!(source.uris.borrow().is_none());
    }
}

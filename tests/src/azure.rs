//! Azure doubles over HTTPS for the Key Vault tests: a test CA (rcgen), a fake Microsoft Entra
//! token endpoint that checks the workload identity's client assertion, and a Key Vault double
//! serving the secrets REST API the SDK uses (an authentication challenge, then bearer tokens
//! that the fake Entra issued). The services trust the test CA through `SSL_CERT_FILE`, as an
//! operator would.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// A certificate authority of the test's own, and a server certificate for `localhost` and
/// `127.0.0.1` signed by it.
pub struct TestCa {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    server: Arc<rustls::ServerConfig>,
}

impl TestCa {
    pub fn new() -> Self {
        Self::named("pollvote test CA")
    }

    /// A CA whose name is `common_name` (CAs with the same name are told apart by their keys only).
    pub fn named(common_name: &str) -> Self {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.distinguished_name.push(DnType::CommonName, common_name);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("ca key")).expect("ca cert");
        let mut leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("params");
        leaf.distinguished_name.push(DnType::CommonName, "localhost");
        let leaf_key = KeyPair::generate().expect("key");
        let leaf = leaf.signed_by(&leaf_key, &ca).expect("leaf cert");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
            .expect("server config");
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            ca_pem: ca.pem(),
            server_cert_pem: leaf.pem(),
            server_key_pem: leaf_key.serialize_pem(),
            server: Arc::new(server),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server certificate (`localhost`, `127.0.0.1`) and its private key (PKCS#8), PEM, for
    /// servers of other programs (a TLS database).
    pub fn server_pem(&self) -> (&str, &str) {
        (&self.server_cert_pem, &self.server_key_pem)
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// An HTTPS server running `router` until dropped.
pub struct HttpsServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HttpsServer {
    /// Serves on `127.0.0.1`, on a port the kernel picks.
    pub async fn start(ca: &TestCa, router: Router) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind");
        Self::start_on(ca, listener, router)
    }

    /// Serves on `listener` (bound already: e.g. a port that refused connections until now,
    /// [`crate::reserved_port`]).
    pub fn start_on(ca: &TestCa, listener: TcpListener, router: Router) -> Self {
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, router) = (acceptor.clone(), router.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { addr, task }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}/", self.addr.port())
    }
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn random_token(prefix: &str) -> String {
    format!(
        "{prefix}.{}.{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// One token request as the fake Entra endpoint saw it.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub tenant: String,
    pub form: BTreeMap<String, String>,
    pub granted: bool,
}

/// A fake Microsoft Entra token endpoint (`POST /{tenant}/oauth2/v2.0/token`) for one workload
/// identity: it grants a token only for the expected tenant, client id and client assertion
/// (the federated token file's content), and records what it saw.
pub struct FakeEntra {
    pub tenant: String,
    pub client_id: String,
    expected_assertion: Mutex<String>,
    failure: Mutex<Option<(StatusCode, &'static str)>>,
    seen: Mutex<Vec<TokenRequest>>,
    issued: Mutex<HashSet<String>>,
}

impl FakeEntra {
    pub fn new(expected_assertion: &str) -> Arc<Self> {
        Arc::new(Self {
            tenant: uuid::Uuid::new_v4().to_string(),
            client_id: uuid::Uuid::new_v4().to_string(),
            expected_assertion: Mutex::new(expected_assertion.to_owned()),
            failure: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
            issued: Mutex::new(HashSet::new()),
        })
    }

    /// From now on, answer every request with this error (`None`: back to normal).
    pub fn fail_with(&self, failure: Option<(StatusCode, &'static str)>) {
        *self.failure.lock().expect("lock") = failure;
    }

    pub fn seen(&self) -> Vec<TokenRequest> {
        self.seen.lock().expect("lock").clone()
    }

    /// Every access token granted so far.
    pub fn issued(&self) -> Vec<String> {
        self.issued.lock().expect("lock").iter().cloned().collect()
    }

    pub fn is_issued(&self, token: &str) -> bool {
        self.issued.lock().expect("lock").contains(token)
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .with_state(self.clone())
    }
}

fn entra_error(status: StatusCode, code: u32, description: &str) -> Response {
    let body = json!({
        "error": if status.is_server_error() { "temporarily_unavailable" } else { "invalid_client" },
        "error_description": description,
        "error_codes": [code],
        "timestamp": "2026-11-21 08:00:00Z",
        "trace_id": uuid::Uuid::new_v4().to_string(),
        "correlation_id": uuid::Uuid::new_v4().to_string(),
    });
    (status, axum::Json(body)).into_response()
}

async fn token(
    State(entra): State<Arc<FakeEntra>>,
    Path(tenant): Path<String>,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    let expected = entra.expected_assertion.lock().expect("lock").clone();
    let failure = *entra.failure.lock().expect("lock");
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    let problem = if let Some((status, description)) = failure {
        Some(entra_error(status, 50000, description))
    } else if tenant != entra.tenant {
        Some(entra_error(
            StatusCode::BAD_REQUEST,
            90002,
            "AADSTS90002: Tenant not found.",
        ))
    } else if field("client_id") != entra.client_id {
        Some(entra_error(
            StatusCode::BAD_REQUEST,
            700016,
            "AADSTS700016: Application with the identifier was not found in the directory.",
        ))
    } else if field("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        || field("grant_type") != "client_credentials"
        || !field("scope").ends_with("/.default")
    {
        Some(entra_error(
            StatusCode::BAD_REQUEST,
            900144,
            "AADSTS900144: The request body is not valid.",
        ))
    } else if field("client_assertion") != expected {
        Some(entra_error(
            StatusCode::UNAUTHORIZED,
            700213,
            "AADSTS700213: No matching federated identity record found for presented assertion subject.",
        ))
    } else {
        None
    };
    entra.seen.lock().expect("lock").push(TokenRequest {
        tenant,
        form: form.clone(),
        granted: problem.is_none(),
    });
    if let Some(p) = problem {
        return p;
    }
    let access_token = random_token("eyJ0eXAiOiJKV1QifQ");
    entra.issued.lock().expect("lock").insert(access_token.clone());
    axum::Json(json!({
        "token_type": "Bearer",
        "expires_in": 3599,
        "ext_expires_in": 3599,
        "access_token": access_token,
    }))
    .into_response()
}

/// One request as the Key Vault double saw it.
#[derive(Debug, Clone)]
pub struct VaultRequest {
    pub method: String,
    pub path: String,
    pub api_version: Option<String>,
    /// The bearer token was one the fake Entra issued.
    pub authorized: bool,
}

/// A Key Vault double: `GET /secrets/{name}[/{version}]` and `PUT /secrets/{name}`, answering a
/// request without a token Entra issued with Key Vault's 401 challenge, and any API version but
/// `api_version` with 400 (as a vault that does not know it).
pub struct KeyVaultDouble {
    entra: Arc<FakeEntra>,
    api_version: String,
    secrets: Mutex<BTreeMap<String, (String, String)>>,
    seen: Mutex<Vec<VaultRequest>>,
}

impl KeyVaultDouble {
    pub fn new(entra: Arc<FakeEntra>, api_version: &str) -> Arc<Self> {
        Arc::new(Self {
            entra,
            api_version: api_version.to_owned(),
            secrets: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(Vec::new()),
        })
    }

    pub fn set(&self, name: &str, value: &str) {
        let version = uuid::Uuid::new_v4().simple().to_string();
        self.secrets
            .lock()
            .expect("lock")
            .insert(name.to_owned(), (version, value.to_owned()));
    }

    pub fn seen(&self) -> Vec<VaultRequest> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/secrets/{name}", get(get_secret).put(put_secret))
            .route("/secrets/{name}/", get(get_secret))
            .route("/secrets/{name}/{version}", get(get_version))
            .with_state(self.clone())
    }

    /// Records the request; the error response when it must not proceed.
    fn admit(
        &self,
        method: &str,
        path: String,
        headers: &HeaderMap,
        query: &BTreeMap<String, String>,
    ) -> Option<Response> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let authorized = self.entra.is_issued(token);
        let api_version = query.get("api-version").cloned();
        self.seen.lock().expect("lock").push(VaultRequest {
            method: method.to_owned(),
            path,
            api_version: api_version.clone(),
            authorized,
        });
        if !authorized {
            let challenge = format!(
                "Bearer authorization=\"https://login.microsoftonline.com/{}\", resource=\"https://vault.azure.net\"",
                self.entra.tenant
            );
            let body = json!({"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}});
            return Some(
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, challenge)],
                    axum::Json(body),
                )
                    .into_response(),
            );
        }
        if api_version.as_deref() != Some(self.api_version.as_str()) {
            let body = json!({"error": {"code": "BadParameter", "message": format!(
                "The specified version ({}) is not recognized. Consider using the latest supported version ({}).",
                api_version.unwrap_or_default(), self.api_version
            )}});
            return Some((StatusCode::BAD_REQUEST, axum::Json(body)).into_response());
        }
        None
    }

    fn answer(&self, host: &str, name: &str) -> Response {
        match self.secrets.lock().expect("lock").get(name) {
            Some((version, value)) => axum::Json(json!({
                "value": value,
                "id": format!("https://{host}/secrets/{name}/{version}"),
                "attributes": {"enabled": true, "created": 1_795_000_000, "updated": 1_795_000_000, "recoveryLevel": "Recoverable+Purgeable"},
                "tags": {},
            }))
            .into_response(),
            None => (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": {"code": "SecretNotFound", "message": format!("A secret with (name/id) {name} was not found in this key vault.")}})),
            )
                .into_response(),
        }
    }
}

fn host(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost")
        .to_owned()
}

async fn get_secret(
    State(vault): State<Arc<KeyVaultDouble>>,
    Path(name): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = vault.admit("GET", format!("/secrets/{name}"), &headers, &query) {
        return refused;
    }
    vault.answer(&host(&headers), &name)
}

async fn get_version(
    State(vault): State<Arc<KeyVaultDouble>>,
    Path((name, version)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = vault.admit("GET", format!("/secrets/{name}/{version}"), &headers, &query) {
        return refused;
    }
    vault.answer(&host(&headers), &name)
}

async fn put_secret(
    State(vault): State<Arc<KeyVaultDouble>>,
    Path(name): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    if let Some(refused) = vault.admit("PUT", format!("/secrets/{name}"), &headers, &query) {
        return refused;
    }
    let Some(value) = body["value"].as_str() else {
        return (StatusCode::BAD_REQUEST, "value missing").into_response();
    };
    vault.set(&name, value);
    vault.answer(&host(&headers), &name)
}

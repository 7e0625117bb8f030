//! Issue 4 end to end: the vote service reads its MongoDB connection string from a Key Vault with
//! Azure Workload Identity, over HTTPS, and follows its rotation.
//!
//! The vault is Lowkey Vault when `LOWKEY_VAULT_URL` (and `LOWKEY_VAULT_CA`, the CA that signed its
//! certificate) name one (scripts/lowkey-vault), else the Key Vault double of `api_tests::azure`;
//! the token endpoint is the fake Microsoft Entra of `api_tests::azure`; the databases are FerretDB
//! (`MONGODB_TEST_URI`, and a second one from scripts/ferretdb for the rotation). The services trust
//! the test CAs through `SSL_CERT_FILE`. Every service runs as a child process whose environment
//! holds no connection string; their logs are scanned at the end for secrets and tokens.
//!
//! scripts/test runs this with `POLLVOTE_TEST_KEYVAULT=1`; elsewhere it is skipped with a note.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use api_tests::azure::{FakeEntra, HttpsServer, KeyVaultDouble, TestCa};
use api_tests::{Proc, base_config, drop_databases, free_port, wait_ready};
use mongodb::bson::doc;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const API_VERSION: &str = "7.4";
const REFRESH_MS: u64 = 1000;

/// The FerretDB URI, when this test should run.
fn enabled() -> Option<String> {
    if std::env::var("POLLVOTE_TEST_KEYVAULT").as_deref() != Ok("1") {
        eprintln!("skipped: the Key Vault tests run in scripts/test's Key Vault stage (POLLVOTE_TEST_KEYVAULT=1)");
        return None;
    }
    match std::env::var("MONGODB_TEST_URI") {
        Ok(uri) if !uri.is_empty() => Some(uri),
        _ => {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI runs the Key Vault tests with FerretDB (MONGODB_TEST_URI)"
            );
            eprintln!("skipped: the Key Vault tests need MONGODB_TEST_URI (scripts/test starts FerretDB)");
            None
        }
    }
}

fn ferretdb(args: &[&str]) -> Result<String, String> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/ferretdb");
    let out = std::process::Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("run scripts/ferretdb");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "scripts/ferretdb {args:?} exited {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `uri` with a marker option, so that the log scan looks for something unique to this secret.
fn with_marker(uri: &str, marker: &str) -> String {
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}appName={marker}")
}

/// The vault the services read.
enum Vault {
    Double {
        double: Arc<KeyVaultDouble>,
        server: HttpsServer,
    },
    Lowkey {
        url: String,
        http: reqwest::Client,
    },
}

impl Vault {
    fn url(&self) -> String {
        match self {
            Vault::Double { server, .. } => server.url(),
            Vault::Lowkey { url, .. } => url.clone(),
        }
    }

    /// Sets the secret's value (Lowkey Vault: its REST API; it wants a bearer token, any will do).
    async fn set(&self, name: &str, value: &str) {
        match self {
            Vault::Double { double, .. } => double.set(name, value),
            Vault::Lowkey { url, http } => {
                let res = http
                    .put(format!(
                        "{}/secrets/{name}?api-version={API_VERSION}",
                        url.trim_end_matches('/')
                    ))
                    .bearer_auth("seed")
                    .json(&json!({"value": value}))
                    .send()
                    .await
                    .expect("seed Lowkey Vault");
                assert!(res.status().is_success(), "seeding Lowkey Vault: {}", res.status());
            }
        }
    }
}

/// The workload identity: the fake Entra endpoint, the projected token file, the CA bundle.
struct Identity {
    entra: Arc<FakeEntra>,
    entra_server: HttpsServer,
    assertion: String,
    token_file: PathBuf,
    bundle: PathBuf,
}

impl Identity {
    /// What the webhook and the operator put in the pod, pointing at `vault`.
    fn env(&self, vault: &str, secret: &str) -> Vec<(&'static str, String)> {
        vec![
            ("KEYVAULT_URL", vault.to_owned()),
            ("KEYVAULT_SECRET_NAME", secret.to_owned()),
            ("AZURE_CLIENT_ID", self.entra.client_id.clone()),
            ("AZURE_TENANT_ID", self.entra.tenant.clone()),
            ("AZURE_FEDERATED_TOKEN_FILE", self.token_file.display().to_string()),
            ("AZURE_AUTHORITY_HOST", self.entra_server.url()),
            ("SSL_CERT_FILE", self.bundle.display().to_string()),
            ("KEYVAULT_API_VERSION", API_VERSION.to_owned()),
            ("KEYVAULT_VERIFY_CHALLENGE_RESOURCE", "false".to_owned()),
        ]
    }
}

struct Run {
    dir: tempfile::TempDir,
    logs: Vec<PathBuf>,
    http: reqwest::Client,
    poll_url: String,
}

impl Run {
    fn log(&mut self, name: &str) -> PathBuf {
        let p = self.dir.path().join(format!("{name}.log"));
        self.logs.push(p.clone());
        p
    }

    /// The vote service's environment: `identity` for `vault`, plus the test's plumbing.
    fn vote_env(
        &self,
        port: u16,
        identity: &Identity,
        vault: &str,
        secret: &str,
        db: &str,
    ) -> Vec<(&'static str, String)> {
        let mut env = identity.env(vault, secret);
        env.extend([
            ("PORT", port.to_string()),
            ("POLL_API", self.poll_url.clone()),
            ("KEYVAULT_REFRESH_INTERVAL_MS", REFRESH_MS.to_string()),
            ("POLLVOTE__KEYVAULT__RETRY_MAX_MS", "1000".to_owned()),
            ("POLLVOTE__KEYVAULT__STARTUP_DEADLINE_MS", "2000".to_owned()),
            ("POLLVOTE__STORAGE__DATABASE", db.to_owned()),
            ("RATE_LIMIT_PER_MINUTE", "0".to_owned()),
            // The most verbose logs (the SDK's and the driver's too), for the scan at the end.
            ("RUST_LOG", "debug".to_owned()),
        ]);
        env
    }

    async fn get(&self, url: String) -> (u16, Value) {
        let res = self.http.get(url).send().await.expect("GET");
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Waits until `/readyz` answers 503 with a reason containing every needle; returns it.
    async fn not_ready_because(&self, p: &Proc, needles: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let Ok(res) = self.http.get(format!("{}/readyz", p.url)).send().await else {
                // Not listening yet.
                assert!(Instant::now() < deadline, "{} never answered", p.url);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            let detail = body["detail"].as_str().unwrap_or_default().to_owned();
            if status == 503 && needles.iter().all(|n| detail.contains(n)) {
                return detail;
            }
            assert!(status != 200, "ready, expected not ready because of {needles:?}");
            assert!(
                Instant::now() < deadline,
                "readiness never said {needles:?}; last: {status} {body}; log:\n{}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn keyvault_health(&self, p: &Proc) -> (u16, Value) {
        let (status, body) = self.get(format!("{}/health/deep", p.url)).await;
        (status, body["dependencies"]["keyvault"].clone())
    }
}

async fn wait_for_log(p: &Proc, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        if log.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "`{needle}` never logged:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn count_ballots(uri: &str, db: &str) -> u64 {
    let client = mongodb::Client::with_uri_str(uri).await.expect("client");
    client
        .database(db)
        .collection::<mongodb::bson::Document>("ballots")
        .count_documents(doc! {})
        .await
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_vault_end_to_end() {
    let Some(mongo) = enabled() else { return };
    let started = Instant::now();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let dir = tempfile::tempdir().expect("tempdir");

    // The workload identity: a projected service account token, and Entra trusting it.
    let ca = TestCa::new();
    let assertion = format!("eyJhbGciOiJSUzI1NiJ9.{}.sig", uuid::Uuid::new_v4().simple());
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, &assertion).expect("token file");
    let entra = FakeEntra::new(&assertion);
    let entra_server = HttpsServer::start(&ca, 0, entra.router()).await;
    let mut bundle_pem = ca.pem().to_owned();
    let lowkey = match (std::env::var("LOWKEY_VAULT_URL"), std::env::var("LOWKEY_VAULT_CA")) {
        (Ok(url), Ok(ca_file)) if !url.is_empty() => {
            let pem = std::fs::read_to_string(&ca_file).expect("LOWKEY_VAULT_CA");
            bundle_pem.push_str(&pem);
            let http = reqwest::Client::builder()
                .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).expect("Lowkey CA")])
                .build()
                .expect("client");
            Some(Vault::Lowkey { url, http })
        }
        _ => None,
    };
    let bundle = dir.path().join("ca-bundle.pem");
    std::fs::write(&bundle, &bundle_pem).expect("bundle");
    let identity = Identity {
        entra: entra.clone(),
        entra_server,
        assertion: assertion.clone(),
        token_file,
        bundle,
    };
    let vault = match lowkey {
        Some(v) => {
            eprintln!("vault: Lowkey Vault at {}", v.url());
            v
        }
        None => {
            let double = KeyVaultDouble::new(entra.clone(), API_VERSION);
            let server = HttpsServer::start(&ca, 0, double.router()).await;
            eprintln!("vault: the Key Vault double at {} (no LOWKEY_VAULT_URL)", server.url());
            Vault::Double { double, server }
        }
    };

    // The poll service (in process, embedded store): the vote service asks it about polls.
    let poll_dir = tempfile::tempdir().expect("tempdir");
    let (poll_port, vote_port) = (free_port(), free_port());
    let mut poll_config = base_config();
    poll_config.storage.data_dir = poll_dir.path().to_path_buf();
    poll_config.server.port = poll_port;
    poll_config.services.vote_url = format!("http://127.0.0.1:{vote_port}");
    let poll_shutdown = CancellationToken::new();
    let poll = poll_service::build(poll_config, poll_shutdown.clone())
        .await
        .expect("poll service");
    tokio::spawn(poll.run_until_stopped());
    let mut run = Run {
        dir: tempfile::tempdir().expect("tempdir"),
        logs: Vec::new(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        poll_url: format!("http://127.0.0.1:{poll_port}"),
    };
    wait_ready(&run.http, &run.poll_url, Duration::from_secs(20)).await;

    let secret = format!("cosmosdb-connection-string-{}", &suffix[..8]);
    let db = format!("t{suffix}_vote");
    let conn1 = with_marker(&mongo, &format!("kv-first-{suffix}"));
    let mut secrets = vec![conn1.clone(), format!("kv-first-{suffix}"), assertion.clone()];
    let mut databases = vec![(mongo.clone(), db.clone())];

    // ---- 1. Only Key Vault and the workload identity: the secret is read, FerretDB serves the API.
    let step = Instant::now();
    vault.set(&secret, &conn1).await;
    let env = run.vote_env(vote_port, &identity, &vault.url(), &secret, &db);
    for (k, v) in &env {
        assert!(!v.contains("mongodb://"), "{k} holds a connection string");
    }
    let log = run.log("1-vote");
    let vote = Proc::start("vote", &env, log).await;
    let created: Value = run
        .http
        .post(format!("{}/api/polls", run.poll_url))
        .json(&json!({"name": "Key Vault", "options": ["red", "green"], "dedupe": "voter"}))
        .send()
        .await
        .expect("create poll")
        .json()
        .await
        .expect("json");
    let poll_id = created["id"].as_str().expect("poll id").to_owned();
    let res = run
        .http
        .post(format!("{}/api/votes", vote.url))
        .json(&json!({"poll_id": poll_id, "option": "green", "voter_id": "first"}))
        .send()
        .await
        .expect("vote");
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap_or_default());
    let (status, p) = run.get(format!("{}/api/polls/{poll_id}", run.poll_url)).await;
    assert_eq!((status, &p["votes"]["count"]), (200, &json!(1)), "{p}");
    assert_eq!(count_ballots(&mongo, &db).await, 1, "the ballot is in FerretDB");
    let seen = entra.seen();
    assert!(!seen.is_empty(), "the token endpoint was asked");
    for r in &seen {
        assert!(r.granted, "{r:?}");
        assert_eq!(r.tenant, entra.tenant);
        assert_eq!(
            r.form.get("client_assertion"),
            Some(&identity.assertion),
            "exactly the federated token"
        );
        assert_eq!(r.form.get("client_id"), Some(&entra.client_id));
        assert_eq!(
            r.form.get("client_assertion_type").map(String::as_str),
            Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        );
        assert_eq!(r.form.get("grant_type").map(String::as_str), Some("client_credentials"));
    }
    if let Vault::Double { double, .. } = &vault {
        let reads: Vec<_> = double.seen().into_iter().filter(|r| r.authorized).collect();
        assert!(!reads.is_empty(), "the vault was read with a token Entra issued");
        assert!(
            reads.iter().all(|r| r.api_version.as_deref() == Some(API_VERSION)),
            "{reads:?}"
        );
        assert!(
            reads
                .iter()
                .all(|r| r.method == "GET" && r.path == format!("/secrets/{secret}")),
            "{reads:?}"
        );
    }
    let (status, kv) = run.keyvault_health(&vote).await;
    assert_eq!((status, kv["status"].as_str()), (200, Some("up")), "{kv}");
    eprintln!("1. connection string from Key Vault, API served: {:?}", step.elapsed());

    // ---- 2. Rotation to another FerretDB, ballots flowing, none failed.
    let step = Instant::now();
    let ferret_dir = tempfile::tempdir().expect("tempdir");
    match ferretdb(&["start", ferret_dir.path().to_str().expect("path")]) {
        Ok(other) => {
            let conn2 = with_marker(&other, &format!("kv-second-{suffix}"));
            secrets.extend([conn2.clone(), format!("kv-second-{suffix}")]);
            databases.push((other.clone(), db.clone()));
            let stop = Arc::new(AtomicBool::new(false));
            let mut clients = Vec::new();
            for c in 0..4 {
                let (http, url, poll_id, stop) = (run.http.clone(), vote.url.clone(), poll_id.clone(), stop.clone());
                clients.push(tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    let mut n = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let res = http
                            .post(format!("{url}/api/votes"))
                            .json(&json!({"poll_id": poll_id, "option": "red", "voter_id": format!("c{c}-{n}")}))
                            .send()
                            .await;
                        outcomes.push(res.map(|r| r.status().as_u16()).map_err(|e| e.to_string()));
                        n += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    outcomes
                }));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            vault.set(&secret, &conn2).await;
            let rotated = Instant::now();
            while count_ballots(&other, &db).await == 0 {
                assert!(
                    rotated.elapsed() < Duration::from_millis(REFRESH_MS) + Duration::from_secs(10),
                    "no ballot reached the new database; log:\n{}",
                    std::fs::read_to_string(&vote.log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let switched = rotated.elapsed();
            tokio::time::sleep(Duration::from_secs(1)).await;
            stop.store(true, Ordering::SeqCst);
            let mut outcomes = Vec::new();
            for c in clients {
                outcomes.extend(c.await.expect("client"));
            }
            let failed: Vec<_> = outcomes.iter().filter(|o| **o != Ok(201)).collect();
            assert!(failed.is_empty(), "failed during the swap: {failed:?}");
            let (old, new) = (count_ballots(&mongo, &db).await, count_ballots(&other, &db).await);
            assert_eq!(
                old + new,
                outcomes.len() as u64 + 1,
                "every acknowledged ballot is stored once"
            );
            assert!(old > 1 && new > 0, "ballots went to both databases: {old} then {new}");
            wait_for_log(
                &vote,
                "the connection string changed in Key Vault; reconnecting",
                Duration::from_secs(1),
            )
            .await;
            eprintln!(
                "2. rotation: writes in the new database {switched:?} after the change (refresh {REFRESH_MS} ms); \
                 {} ballots, none failed ({old} before, {new} after): {:?}",
                outcomes.len(),
                step.elapsed()
            );
        }
        Err(e) => {
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{e}");
            eprintln!("2. rotation skipped: no second FerretDB ({e})");
        }
    }
    drop(vote);

    // ---- 3. Vault down at start: not ready, saying why; ready by itself once it answers.
    let step = Instant::now();
    let late_port = free_port();
    let late_url = format!("https://localhost:{late_port}/");
    let late = KeyVaultDouble::new(entra.clone(), API_VERSION);
    late.set(&secret, &conn1);
    let port = free_port();
    let log = run.log("3-vote-vault-down");
    let down = Proc::spawn("vote", &run.vote_env(port, &identity, &late_url, &secret, &db), log);
    let why = run
        .not_ready_because(
            &down,
            &["secret: cannot read", &secret, &late_url, "cannot reach the vault"],
            Duration::from_secs(20),
        )
        .await;
    let (status, kv) = run.keyvault_health(&down).await;
    assert_eq!(status, 503);
    assert_eq!(kv["status"], "down", "{kv}");
    let detail = kv["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&secret) && detail.contains(&late_url) && detail.contains("cannot reach the vault"),
        "{kv}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = run.get(format!("{}/readyz", down.url)).await;
    assert_eq!(status, 503, "stays not ready while the vault is down");
    let _late_server = HttpsServer::start(&ca, late_port, late.router()).await;
    let up = Instant::now();
    down.wait_ready(Duration::from_secs(15)).await;
    let (status, kv) = run.keyvault_health(&down).await;
    assert_eq!((status, kv["status"].as_str()), (200, Some("up")), "{kv}");
    eprintln!(
        "3. vault down at start: not ready ({why}); ready {:?} after the vault came up: {:?}",
        up.elapsed(),
        step.elapsed()
    );
    drop(down);

    // ---- 4. Wrong client assertion, token endpoint failing, identity missing: clear start-up errors.
    let step = Instant::now();
    let wrong = format!("eyJhbGciOiJSUzI1NiJ9.{}.forged", uuid::Uuid::new_v4().simple());
    secrets.push(wrong.clone());
    let wrong_file = run.dir.path().join("wrong-token");
    std::fs::write(&wrong_file, &wrong).expect("token file");
    let mut env = run.vote_env(free_port(), &identity, &vault.url(), &secret, &db);
    for (k, v) in &mut env {
        if *k == "AZURE_FEDERATED_TOKEN_FILE" {
            *v = wrong_file.display().to_string();
        }
    }
    let log = run.log("4-vote-wrong-assertion");
    let forged = Proc::spawn("vote", &env, log);
    run.not_ready_because(
        &forged,
        &[
            "secret: cannot read",
            &secret,
            "WorkloadIdentityCredential authentication failed",
            "AADSTS700213",
        ],
        Duration::from_secs(20),
    )
    .await;
    let (_, kv) = run.keyvault_health(&forged).await;
    assert!(
        kv["detail"].as_str().unwrap_or_default().contains("AADSTS700213"),
        "{kv}"
    );
    wait_for_log(
        &forged,
        "no connection string from Key Vault within the start-up deadline",
        Duration::from_secs(10),
    )
    .await;
    let text = std::fs::read_to_string(&forged.log).unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.contains("start-up deadline"))
        .unwrap_or_default();
    assert!(
        line.contains("\"level\":\"ERROR\"") && line.contains("AADSTS700213"),
        "{line}"
    );
    eprintln!("4. the start-up error logged: {line}");
    assert!(
        entra
            .seen()
            .iter()
            .any(|r| !r.granted && r.form.get("client_assertion") == Some(&wrong)),
        "the forged assertion was presented and refused"
    );
    drop(forged);

    entra.fail_with(Some((
        reqwest::StatusCode::SERVICE_UNAVAILABLE,
        "AADSTS50000: There was an error issuing a token.",
    )));
    let log = run.log("4-vote-entra-down");
    let refused = Proc::spawn(
        "vote",
        &run.vote_env(free_port(), &identity, &vault.url(), &secret, &db),
        log,
    );
    run.not_ready_because(
        &refused,
        &["secret: cannot read", "AADSTS50000"],
        Duration::from_secs(20),
    )
    .await;
    entra.fail_with(None);
    refused.wait_ready(Duration::from_secs(15)).await;
    drop(refused);

    let mut env = run.vote_env(free_port(), &identity, &vault.url(), &secret, &db);
    env.retain(|(k, _)| !matches!(*k, "AZURE_TENANT_ID" | "AZURE_FEDERATED_TOKEN_FILE"));
    let log = run.log("4-vote-no-identity");
    let mut missing = Proc::spawn("vote", &env, log);
    let exit = tokio::time::timeout(Duration::from_secs(20), missing.child.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(!exit.success(), "starting without a complete identity fails");
    let text = std::fs::read_to_string(&missing.log).unwrap_or_default();
    assert!(
        text.contains("AZURE_TENANT_ID, AZURE_FEDERATED_TOKEN_FILE not set"),
        "{text}"
    );
    eprintln!(
        "4. refused assertion, failing token endpoint, missing identity: clear errors: {:?}",
        step.elapsed()
    );

    // ---- 5. No connection string, assertion or token in any log these services wrote.
    let issued = entra.issued();
    assert!(!issued.is_empty());
    secrets.extend(issued);
    let mut scanned = 0;
    for path in &run.logs {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        scanned += text.len();
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "{} holds a secret", path.display());
        }
        assert!(!text.contains(&mongo), "{} holds the database URI", path.display());
    }
    assert!(scanned > 0);
    eprintln!(
        "5. {} logs ({scanned} bytes) scanned for {} secrets: clean. Total {:?}",
        run.logs.len(),
        secrets.len(),
        started.elapsed()
    );

    poll_shutdown.cancel();
    let _ = ferretdb(&["kill", ferret_dir.path().to_str().expect("path")]);
    for (uri, db) in databases {
        drop_databases(uri, vec![db]);
    }
}

//! Issue 4 end to end: the vote service reads its MongoDB connection string from a Key Vault with
//! Azure Workload Identity, over HTTPS, and follows its rotation.
//!
//! The vault is Lowkey Vault when `LOWKEY_VAULT_URL` (and `LOWKEY_VAULT_CA`, the CA that signed its
//! certificate) name one (scripts/lowkey-vault), else the Key Vault double of `api_tests::azure`;
//! the token endpoint is the fake Microsoft Entra of `api_tests::azure`; the database is
//! `MONGODB_TEST_URI` (and a FerretDB from scripts/ferretdb for the rotation). The services trust
//! the test CAs through `SSL_CERT_FILE`. Every vote service runs as a child process whose environment holds no connection string; each `key_vault_*` test sets up
//! its own identity, vault and poll service ([`KeyVault::setup`]), so one failing step hides no
//! other, and scans its logs at its end for secrets and tokens.
//!
//! Database credentials and TLS (the `database_*` tests) run against SecantusDB
//! instances of their own (`scripts/secantusdb start <dir> --auth | --tls-cert-file …`), killed when
//! the test ends or fails: a right and a wrong password, a password rotated in the database and in
//! the vault while requests flow, and TLS with a test CA and with an unrelated one.
//!
//! scripts/test runs these with `POLLVOTE_TEST_KEYVAULT=1` (`--test api -- keyvault::`); elsewhere
//! they are skipped with a visible note. Under `CI=true` a server that cannot be provisioned
//! (SecantusDB, the rotation's FerretDB) or a missing `MONGODB_TEST_URI` fails the tests that need it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use api_tests::azure::{FakeEntra, HttpsServer, KeyVaultDouble, TestCa};
use api_tests::secantusdb::OwnSecantusDb;
use api_tests::{Proc, base_config, drop_databases, listener, wait_ready};
use mongodb::bson::doc;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const API_VERSION: &str = "7.4";
const REFRESH_MS: u64 = 1000;

/// The database URI, when this test should run.
fn enabled() -> Option<String> {
    if std::env::var("POLLVOTE_TEST_KEYVAULT").as_deref() != Ok("1") {
        api_tests::skipped("the Key Vault tests run in scripts/test's Key Vault stage (POLLVOTE_TEST_KEYVAULT=1)");
        return None;
    }
    match std::env::var("MONGODB_TEST_URI") {
        Ok(uri) if !uri.is_empty() => Some(uri),
        _ => {
            api_tests::skip("the Key Vault tests need MONGODB_TEST_URI (scripts/test starts SecantusDB)");
            None
        }
    }
}

/// The second FerretDB of the rotation step, killed when dropped: also when the test fails.
struct OwnFerretDb(tempfile::TempDir);

impl Drop for OwnFerretDb {
    fn drop(&mut self) {
        if let Some(dir) = self.0.path().to_str() {
            let _ = ferretdb(&["kill", dir]);
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
    fn vote_env(&self, identity: &Identity, vault: &str, secret: &str, db: &str) -> Vec<(&'static str, String)> {
        let mut env = identity.env(vault, secret);
        env.extend([
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
        api_tests::eventually(within, Duration::from_millis(100), || async {
            let Ok(res) = self.http.get(format!("{}/readyz", p.url)).send().await else {
                return Err(format!("{} never answered", p.url));
            };
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            let detail = body["detail"].as_str().unwrap_or_default().to_owned();
            if status == 503 && needles.iter().all(|n| detail.contains(n)) {
                return Ok(detail);
            }
            assert!(status != 200, "ready, expected not ready because of {needles:?}");
            Err(format!(
                "readiness never said {needles:?}; last: {status} {body}; log:\n{}",
                std::fs::read_to_string(&p.log).unwrap_or_default()
            ))
        })
        .await
    }

    async fn keyvault_health(&self, p: &Proc) -> (u16, Value) {
        let (status, body) = self.get(format!("{}/health/deep", p.url)).await;
        (status, body["dependencies"]["keyvault"].clone())
    }
}

async fn wait_for_log(p: &Proc, needle: &str, within: Duration) {
    api_tests::wait_for_log(&p.log, needle, within).await
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

/// What every Key Vault test sets up: the workload identity (a projected token, the fake Entra
/// trusting it, over HTTPS with a test CA), the vault (Lowkey Vault or the double) holding the
/// connection string of `MONGODB_TEST_URI` with a marker, and the poll service in process on the
/// embedded store. Dropping it stops the poll service and drops the test's databases.
struct KeyVault {
    mongo: String,
    suffix: String,
    ca: TestCa,
    entra: Arc<FakeEntra>,
    identity: Identity,
    vault: Vault,
    run: Run,
    secret: String,
    db: String,
    /// The connection string in the vault at first (`mongo` with a marker).
    conn1: String,
    /// What no log may hold (the tokens Entra issued are added at the scan).
    secrets: Vec<String>,
    /// (server, database) pairs to drop at the end.
    databases: Vec<(String, String)>,
    poll_listener: Option<std::net::TcpListener>,
    poll_shutdown: CancellationToken,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl KeyVault {
    /// The identity, the vault (holding `conn1` under `secret`) and the poll service's address;
    /// the poll service itself starts with [`KeyVault::start_poll`].
    async fn setup(mongo: String) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new();
        let assertion = format!("eyJhbGciOiJSUzI1NiJ9.{}.sig", uuid::Uuid::new_v4().simple());
        let token_file = dir.path().join("azure-identity-token");
        std::fs::write(&token_file, &assertion).expect("token file");
        let entra = FakeEntra::new(&assertion);
        let entra_server = HttpsServer::start(&ca, entra.router()).await;
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
                let server = HttpsServer::start(&ca, double.router()).await;
                eprintln!("vault: the Key Vault double at {} (no LOWKEY_VAULT_URL)", server.url());
                Vault::Double { double, server }
            }
        };
        let (poll_listener, poll_port) = api_tests::listener();
        let run = Run::new(&format!("http://127.0.0.1:{poll_port}"));
        let secret = format!("cosmosdb-connection-string-{}", &suffix[..8]);
        let db = format!("t{suffix}_vote");
        let conn1 = with_marker(&mongo, &format!("kv-first-{suffix}"));
        vault.set(&secret, &conn1).await;
        Self {
            secrets: vec![conn1.clone(), format!("kv-first-{suffix}"), assertion],
            databases: vec![(mongo.clone(), db.clone())],
            mongo,
            suffix,
            ca,
            entra,
            identity,
            vault,
            run,
            secret,
            db,
            conn1,
            poll_listener: Some(poll_listener),
            poll_shutdown: CancellationToken::new(),
            _dirs: (dir, tempfile::tempdir().expect("tempdir")),
        }
    }

    /// Starts the poll service (in process, embedded store) on its listener; `vote_url` is the
    /// vote service it asks for tallies, when the test reads any.
    async fn start_poll(&mut self, vote_url: Option<&str>) {
        let mut poll_config = base_config();
        poll_config.storage.data_dir = self._dirs.1.path().to_path_buf();
        if let Some(url) = vote_url {
            poll_config.services.vote_url = url.to_owned();
        }
        let listener = self.poll_listener.take().expect("the poll service starts once");
        let poll = poll_service::build(poll_config, Some(listener), self.poll_shutdown.clone())
            .await
            .expect("poll service");
        tokio::spawn(poll.run_until_stopped());
        wait_ready(&self.run.http, &self.run.poll_url, Duration::from_secs(20)).await;
    }

    /// The vote service's environment for the vault at `vault`.
    fn vote_env(&self, vault: &str) -> Vec<(&'static str, String)> {
        self.run.vote_env(&self.identity, vault, &self.secret, &self.db)
    }

    /// The vote service reading `conn1` from the vault, and the poll service asking it for
    /// tallies: a poll created, one ballot (voter `first`) cast. Returns the vote service and the
    /// poll's id.
    async fn serving(&mut self) -> (Proc, String) {
        let env = self.vote_env(&self.vault.url());
        for (k, v) in &env {
            assert!(!v.contains("mongodb://"), "{k} holds a connection string");
        }
        let log = self.run.log("1-vote");
        let vote = Proc::spawn("vote", listener().0, &env, log);
        self.start_poll(Some(&vote.url)).await;
        vote.wait_ready(Duration::from_secs(20)).await;
        let created: Value = self
            .run
            .http
            .post(format!("{}/api/polls", self.run.poll_url))
            .json(&json!({"name": "Key Vault", "options": ["red", "green"], "dedupe": "voter"}))
            .send()
            .await
            .expect("create poll")
            .json()
            .await
            .expect("json");
        let poll_id = created["id"].as_str().expect("poll id").to_owned();
        let res = self
            .run
            .http
            .post(format!("{}/api/votes", vote.url))
            .json(&json!({"poll_id": poll_id, "option": "green", "voter_id": "first"}))
            .send()
            .await
            .expect("vote");
        assert_eq!(res.status(), 201, "{}", res.text().await.unwrap_or_default());
        (vote, poll_id)
    }

    /// No connection string, assertion or token in any log these services wrote.
    fn assert_logs_clean(&self) {
        let mut secrets = self.secrets.clone();
        secrets.extend(self.entra.issued());
        let mut scanned = 0;
        for path in &self.run.logs {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            scanned += text.len();
            for s in &secrets {
                assert!(!text.contains(s.as_str()), "{} holds a secret", path.display());
            }
            assert!(!text.contains(&self.mongo), "{} holds the database URI", path.display());
        }
        assert!(scanned > 0);
        eprintln!(
            "{} logs ({scanned} bytes) scanned for {} secrets: clean",
            self.run.logs.len(),
            secrets.len()
        );
    }
}

impl Drop for KeyVault {
    fn drop(&mut self) {
        self.poll_shutdown.cancel();
        for (uri, db) in std::mem::take(&mut self.databases) {
            drop_databases(uri, vec![db]);
        }
    }
}

/// Only Key Vault and the workload identity: the secret is read, the database serves the API, the
/// token endpoint and the vault saw exactly the requests they should, and no log holds a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_vault_gives_the_vote_service_its_connection_string() {
    let Some(mongo) = enabled() else { return };
    let step = Instant::now();
    let mut kv = KeyVault::setup(mongo).await;
    let (vote, poll_id) = kv.serving().await;
    let (status, p) = kv.run.get(format!("{}/api/polls/{poll_id}", kv.run.poll_url)).await;
    assert_eq!((status, &p["votes"]["count"]), (200, &json!(1)), "{p}");
    assert_eq!(
        count_ballots(&kv.mongo, &kv.db).await,
        1,
        "the ballot is in the database"
    );
    let entra = &kv.entra;
    let seen = entra.seen();
    assert!(!seen.is_empty(), "the token endpoint was asked");
    for r in &seen {
        assert!(r.granted, "{r:?}");
        assert_eq!(r.tenant, entra.tenant);
        assert_eq!(
            r.form.get("client_assertion"),
            Some(&kv.identity.assertion),
            "exactly the federated token"
        );
        assert_eq!(r.form.get("client_id"), Some(&entra.client_id));
        assert_eq!(
            r.form.get("client_assertion_type").map(String::as_str),
            Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        );
        assert_eq!(r.form.get("grant_type").map(String::as_str), Some("client_credentials"));
    }
    if let Vault::Double { double, .. } = &kv.vault {
        let reads: Vec<_> = double.seen().into_iter().filter(|r| r.authorized).collect();
        assert!(!reads.is_empty(), "the vault was read with a token Entra issued");
        assert!(
            reads.iter().all(|r| r.api_version.as_deref() == Some(API_VERSION)),
            "{reads:?}"
        );
        assert!(
            reads
                .iter()
                .all(|r| r.method == "GET" && r.path == format!("/secrets/{}", kv.secret)),
            "{reads:?}"
        );
    }
    let (status, health) = kv.run.keyvault_health(&vote).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("up")), "{health}");
    eprintln!("connection string from Key Vault, API served: {:?}", step.elapsed());
    drop(vote);
    assert!(!kv.entra.issued().is_empty());
    kv.assert_logs_clean();
}

/// Rotation to another database (a FerretDB of the test's own), ballots flowing: none fails, each
/// is stored once, in the old database before the change and in the new one after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_vault_rotation_moves_the_ballots_to_the_new_database_without_a_failure() {
    let Some(mongo) = enabled() else { return };
    let ferret_dir = OwnFerretDb(tempfile::tempdir().expect("tempdir"));
    let other = match ferretdb(&["start", ferret_dir.0.path().to_str().expect("path")]) {
        Ok(other) => other,
        Err(e) => return api_tests::skip(format!("the Key Vault rotation test: no second FerretDB ({e})")),
    };
    let mut kv = KeyVault::setup(mongo).await;
    let (vote, poll_id) = kv.serving().await;
    let step = Instant::now();
    let conn2 = with_marker(&other, &format!("kv-second-{}", kv.suffix));
    kv.secrets.extend([conn2.clone(), format!("kv-second-{}", kv.suffix)]);
    kv.databases.push((other.clone(), kv.db.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (http, url, poll_id) = (kv.run.http.clone(), vote.url.clone(), poll_id.clone());
        let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
        clients.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let res = http
                    .post(format!("{url}/api/votes"))
                    .json(&json!({"poll_id": poll_id, "option": "red", "voter_id": format!("c{c}-{n}")}))
                    .send()
                    .await;
                let outcome = res.map(|r| r.status().as_u16()).map_err(|e| e.to_string());
                if outcome == Ok(201) {
                    acknowledged.fetch_add(1, Ordering::SeqCst);
                }
                outcomes.push(outcome);
                n += 1;
                // A client's pace, not a wait for anything.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            outcomes
        }));
    }
    // Ballots flow into the first database (the assertions below want more than one there).
    let flowing = |at_least: u64| {
        let acknowledged = acknowledged.clone();
        move || {
            let n = acknowledged.load(Ordering::SeqCst);
            async move {
                if n >= at_least {
                    Ok(())
                } else {
                    Err(format!("only {n} of {at_least} ballots acknowledged"))
                }
            }
        }
    };
    api_tests::eventually(Duration::from_secs(10), Duration::from_millis(20), flowing(8)).await;
    kv.vault.set(&kv.secret, &conn2).await;
    let rotated = Instant::now();
    api_tests::eventually(
        Duration::from_millis(REFRESH_MS) + Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            if count_ballots(&other, &kv.db).await > 0 {
                Ok(())
            } else {
                Err(format!(
                    "no ballot reached the new database; log:\n{}",
                    std::fs::read_to_string(&vote.log).unwrap_or_default()
                ))
            }
        },
    )
    .await;
    let switched = rotated.elapsed();
    // Ballots keep flowing, now into the new database.
    let after_switch = acknowledged.load(Ordering::SeqCst) + 8;
    api_tests::eventually(
        Duration::from_secs(10),
        Duration::from_millis(20),
        flowing(after_switch),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for c in clients {
        outcomes.extend(c.await.expect("client"));
    }
    let failed: Vec<_> = outcomes.iter().filter(|o| **o != Ok(201)).collect();
    assert!(failed.is_empty(), "failed during the swap: {failed:?}");
    let (old, new) = (
        count_ballots(&kv.mongo, &kv.db).await,
        count_ballots(&other, &kv.db).await,
    );
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
        "rotation: writes in the new database {switched:?} after the change (refresh {REFRESH_MS} ms); \
         {} ballots, none failed ({old} before, {new} after): {:?}",
        outcomes.len(),
        step.elapsed()
    );
    drop(vote);
    kv.assert_logs_clean();
    drop(kv);
    drop(ferret_dir);
}

/// The vault down at start: not ready, saying why; ready by itself once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_vault_down_at_start_is_not_ready_saying_why_then_ready_by_itself() {
    let Some(mongo) = enabled() else { return };
    let mut kv = KeyVault::setup(mongo).await;
    kv.start_poll(None).await;
    let step = Instant::now();
    // Bound, not listening: connections are refused until the vault comes up on this very port.
    let (late_socket, late_port) = api_tests::reserved_port();
    let late_url = format!("https://localhost:{late_port}/");
    let late = KeyVaultDouble::new(kv.entra.clone(), API_VERSION);
    late.set(&kv.secret, &kv.conn1);
    let log = kv.run.log("3-vote-vault-down");
    let down = Proc::spawn("vote", listener().0, &kv.vote_env(&late_url), log);
    let secret = kv.secret.clone();
    let why = kv
        .run
        .not_ready_because(
            &down,
            &["secret: cannot read", &secret, &late_url, "cannot reach the vault"],
            Duration::from_secs(20),
        )
        .await;
    let (status, health) = kv.run.keyvault_health(&down).await;
    assert_eq!(status, 503);
    assert_eq!(health["status"], "down", "{health}");
    let detail = health["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&secret) && detail.contains(&late_url) && detail.contains("cannot reach the vault"),
        "{health}"
    );
    // What is under test: it stays not ready for a while (no sooner condition to wait for).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = kv.run.get(format!("{}/readyz", down.url)).await;
    assert_eq!(status, 503, "stays not ready while the vault is down");
    let listener = late_socket.listen(1024).expect("listen");
    let _late_server = HttpsServer::start_on(&kv.ca, listener, late.router());
    let up = Instant::now();
    down.wait_ready(Duration::from_secs(15)).await;
    let (status, health) = kv.run.keyvault_health(&down).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("up")), "{health}");
    eprintln!(
        "vault down at start: not ready ({why}); ready {:?} after the vault came up: {:?}",
        up.elapsed(),
        step.elapsed()
    );
    drop(down);
    kv.assert_logs_clean();
}

/// A forged client assertion: a clear start-up error, in readiness, `/health/deep` and the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_vault_a_refused_assertion_is_a_clear_start_up_error() {
    let Some(mongo) = enabled() else { return };
    let mut kv = KeyVault::setup(mongo).await;
    kv.start_poll(None).await;
    let wrong = format!("eyJhbGciOiJSUzI1NiJ9.{}.forged", uuid::Uuid::new_v4().simple());
    kv.secrets.push(wrong.clone());
    let wrong_file = kv.run.dir.path().join("wrong-token");
    std::fs::write(&wrong_file, &wrong).expect("token file");
    let mut env = kv.vote_env(&kv.vault.url());
    for (k, v) in &mut env {
        if *k == "AZURE_FEDERATED_TOKEN_FILE" {
            *v = wrong_file.display().to_string();
        }
    }
    let log = kv.run.log("4-vote-wrong-assertion");
    let forged = Proc::spawn("vote", listener().0, &env, log);
    let secret = kv.secret.clone();
    kv.run
        .not_ready_because(
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
    let (_, health) = kv.run.keyvault_health(&forged).await;
    assert!(
        health["detail"].as_str().unwrap_or_default().contains("AADSTS700213"),
        "{health}"
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
    eprintln!("the start-up error logged: {line}");
    assert!(
        kv.entra
            .seen()
            .iter()
            .any(|r| !r.granted && r.form.get("client_assertion") == Some(&wrong)),
        "the forged assertion was presented and refused"
    );
    drop(forged);
    kv.assert_logs_clean();
}

/// The token endpoint failing: not ready, saying why; ready by itself once it issues tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_vault_a_failing_token_endpoint_is_not_ready_then_ready_by_itself() {
    let Some(mongo) = enabled() else { return };
    let mut kv = KeyVault::setup(mongo).await;
    kv.start_poll(None).await;
    kv.entra.fail_with(Some((
        reqwest::StatusCode::SERVICE_UNAVAILABLE,
        "AADSTS50000: There was an error issuing a token.",
    )));
    let log = kv.run.log("4-vote-entra-down");
    let refused = Proc::spawn("vote", listener().0, &kv.vote_env(&kv.vault.url()), log);
    kv.run
        .not_ready_because(
            &refused,
            &["secret: cannot read", "AADSTS50000"],
            Duration::from_secs(20),
        )
        .await;
    kv.entra.fail_with(None);
    refused.wait_ready(Duration::from_secs(15)).await;
    drop(refused);
    kv.assert_logs_clean();
}

/// An incomplete workload identity: the service does not start, naming what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_vault_a_missing_identity_stops_the_start_naming_what_is_missing() {
    let Some(mongo) = enabled() else { return };
    let mut kv = KeyVault::setup(mongo).await;
    let mut env = kv.vote_env(&kv.vault.url());
    env.retain(|(k, _)| !matches!(*k, "AZURE_TENANT_ID" | "AZURE_FEDERATED_TOKEN_FILE"));
    let log = kv.run.log("4-vote-no-identity");
    let mut missing = Proc::spawn("vote", listener().0, &env, log);
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
    kv.assert_logs_clean();
}

// ---------------------------------------------------------------------------------------------
// Database credentials and TLS, against SecantusDB instances of these tests' own
// (scripts/secantusdb start <dir> --auth | --tls-…), killed when the test ends or fails.

/// Whether the tests with SecantusDB instances of their own run: in scripts/test's Key Vault
/// stage (`POLLVOTE_TEST_KEYVAULT=1`); elsewhere a visible skip.
fn own_servers_enabled(test: &str) -> bool {
    let on = std::env::var("POLLVOTE_TEST_KEYVAULT").as_deref() == Ok("1");
    if !on {
        api_tests::skipped(format!(
            "{test} runs in scripts/test's Key Vault stage (POLLVOTE_TEST_KEYVAULT=1)"
        ));
    }
    on
}

/// A SecantusDB of the test's own, or `None` after a visible skip when it cannot be provisioned
/// here (never under `CI=true`, where the script fails and the test with it).
fn own_secantusdb(test: &str, args: &[&str]) -> Option<OwnSecantusDb> {
    match OwnSecantusDb::start(args) {
        Ok(db) => Some(db),
        Err(why) => {
            api_tests::skip(format!("{test}: no SecantusDB on this machine ({why})"));
            None
        }
    }
}

/// `mongodb://user:password@<server>/?authSource=admin` followed by `extra` (`&…` options).
fn with_credentials(server: &OwnSecantusDb, user: &str, password: &str, extra: &str) -> String {
    format!(
        "mongodb://{user}:{password}@{}/?authSource=admin{extra}",
        server.address()
    )
}

fn password(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// On a fresh `--auth` server: an administrator (through the localhost exception: while no user
/// exists, a loopback client may create the first one on `admin`) and the services' user
/// `pollvote`, `readWrite` on `database` only. Returns the administrator's client.
async fn create_users(server: &OwnSecantusDb, admin_pw: &str, app_pw: &str, database: &str) -> mongodb::Client {
    let anonymous = mongodb::Client::with_uri_str(&server.uri).await.expect("client");
    anonymous
        .database("admin")
        .run_command(doc! {"createUser": "admin", "pwd": admin_pw, "roles": ["root"]})
        .await
        .expect("the first user, through the localhost exception");
    let admin = mongodb::Client::with_uri_str(with_credentials(server, "admin", admin_pw, ""))
        .await
        .expect("client");
    admin
        .database("admin")
        .run_command(doc! {
            "createUser": "pollvote",
            "pwd": app_pw,
            "roles": [{"role": "readWrite", "db": database}],
        })
        .await
        .expect("the services' user");
    admin
}

/// Whether a client with `uri` is let in (a `ping` needs an authenticated connection under --auth).
async fn logs_in(uri: &str) -> Result<(), String> {
    let options = mongodb::options::ClientOptions::parse(uri)
        .await
        .map_err(|e| e.to_string())?;
    let client = mongodb::Client::with_options(options).map_err(|e| e.to_string())?;
    let result = client
        .database("admin")
        .run_command(doc! {"ping": 1})
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    client.shutdown().immediate(true).await;
    result
}

/// The poll service in process on the embedded store (the vote service asks it about polls).
struct PollService {
    url: String,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl PollService {
    async fn start(http: &reqwest::Client) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (listener, port) = api_tests::listener();
        let mut config = base_config();
        config.storage.data_dir = dir.path().to_path_buf();
        config.server.port = port;
        let shutdown = CancellationToken::new();
        let poll = poll_service::build(config, Some(listener), shutdown.clone())
            .await
            .expect("poll service");
        tokio::spawn(poll.run_until_stopped());
        let url = format!("http://127.0.0.1:{port}");
        wait_ready(http, &url, Duration::from_secs(20)).await;
        Self {
            url,
            shutdown,
            _dir: dir,
        }
    }

    /// A poll with options red and green, one ballot per voter id.
    async fn create_poll(&self, http: &reqwest::Client) -> String {
        let created: Value = http
            .post(format!("{}/api/polls", self.url))
            .json(&json!({"name": "Credentials", "options": ["red", "green"], "dedupe": "voter"}))
            .send()
            .await
            .expect("create poll")
            .json()
            .await
            .expect("json");
        created["id"].as_str().expect("poll id").to_owned()
    }
}

impl Drop for PollService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Run {
    fn new(poll_url: &str) -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            logs: Vec::new(),
            http: api_tests::http_client(),
            poll_url: poll_url.to_owned(),
        }
    }

    /// The vote service's environment with the connection string itself (no Key Vault).
    fn db_vote_env(&self, connection_string: &str, database: &str) -> Vec<(&'static str, String)> {
        vec![
            ("POLL_API", self.poll_url.clone()),
            ("MONGODB_CONNECTION_STRING", connection_string.to_owned()),
            ("POLLVOTE__STORAGE__DATABASE", database.to_owned()),
            ("RATE_LIMIT_PER_MINUTE", "0".to_owned()),
            // The most verbose logs (the driver's too), for the scan at the end.
            ("RUST_LOG", "debug".to_owned()),
        ]
    }

    async fn ballot(&self, vote: &Proc, poll_id: &str, voter: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/api/votes", vote.url))
            .json(&json!({"poll_id": poll_id, "option": "green", "voter_id": voter}))
            .send()
            .await
            .expect("vote")
    }

    /// `/health/deep`'s `database`.
    async fn database_health(&self, p: &Proc) -> (u16, Value) {
        let (status, body) = self.get(format!("{}/health/deep", p.url)).await;
        (status, body["dependencies"]["database"].clone())
    }

    /// Asserts that no log of this run holds any of `secrets`.
    fn assert_logs_hold_none_of(&self, secrets: &[&str]) -> usize {
        let mut scanned = 0;
        for path in &self.logs {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            scanned += text.len();
            for s in secrets {
                assert!(!text.contains(s), "{} holds a secret", path.display());
            }
        }
        assert!(scanned > 0, "nothing was logged");
        scanned
    }
}

async fn count_in(client: &mongodb::Client, database: &str) -> u64 {
    client
        .database(database)
        .collection::<mongodb::bson::Document>("ballots")
        .count_documents(doc! {})
        .await
        .expect("count ballots")
}

/// Item 4: real credentials. A connection string with the right user and password serves; with a
/// wrong password the service stays not ready saying the database refused the credentials,
/// `/health/deep` says the same of `database`, ballots get a quick 503, and no log holds a password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_credentials_a_right_password_serves_a_wrong_one_is_not_ready_saying_why() {
    const TEST: &str = "the database credentials test (SecantusDB --auth)";
    if !own_servers_enabled(TEST) {
        return;
    }
    let Some(server) = own_secantusdb(TEST, &["--auth", "--cache-size", "256M"]) else {
        return;
    };
    let started = Instant::now();
    let database = format!("t{}_vote", uuid::Uuid::new_v4().simple());
    let (admin_pw, app_pw, wrong_pw) = (password("adm"), password("app"), password("wrong"));
    let admin = create_users(&server, &admin_pw, &app_pw, &database).await;
    let http = reqwest::Client::new();
    let polls = PollService::start(&http).await;
    let mut run = Run::new(&polls.url);
    let poll_id = polls.create_poll(&run.http).await;

    // The right password: ready, and the ballot is stored.
    let right = with_credentials(&server, "pollvote", &app_pw, "");
    let log = run.log("db-right-password");
    let vote = Proc::start("vote", listener().0, &run.db_vote_env(&right, &database), log).await;
    let res = run.ballot(&vote, &poll_id, "first").await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap_or_default());
    assert_eq!(count_in(&admin, &database).await, 1, "stored in SecantusDB");
    let (status, db) = run.database_health(&vote).await;
    assert_eq!((status, db["status"].as_str()), (200, Some("up")), "{db}");
    drop(vote);

    // A wrong password: not ready, saying why; deep health names the database; quick 503s.
    let wrong = with_credentials(&server, "pollvote", &wrong_pw, "");
    let log = run.log("db-wrong-password");
    let refused = Proc::spawn("vote", listener().0, &run.db_vote_env(&wrong, &database), log);
    let why = run
        .not_ready_because(
            &refused,
            &[
                "database: the database refused the credentials of the connection string",
                "Authentication failed",
            ],
            Duration::from_secs(20),
        )
        .await;
    let (status, db) = run.database_health(&refused).await;
    assert_eq!((status, db["status"].as_str()), (503, Some("down")), "{db}");
    let detail = db["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("authentication failed: the database refused the credentials of the connection string"),
        "{db}"
    );
    let asked = Instant::now();
    let res = run.ballot(&refused, &poll_id, "second").await;
    assert_eq!(res.status(), 503);
    assert!(res.headers().contains_key("retry-after"));
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "fails fast: {:?}",
        asked.elapsed()
    );
    wait_for_log(
        &refused,
        "the database refused the credentials: SCRAM failure",
        Duration::from_secs(5),
    )
    .await;
    // What is under test: it stays not ready for a while (no sooner condition to wait for).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, _) = run.get(format!("{}/readyz", refused.url)).await;
    assert_eq!(status, 503, "stays not ready");
    drop(refused);
    assert_eq!(
        count_in(&admin, &database).await,
        1,
        "nothing stored with the wrong password"
    );

    let scanned = run.assert_logs_hold_none_of(&[&app_pw, &wrong_pw, &admin_pw, &right, &wrong]);
    eprintln!(
        "credentials: right password served; wrong password not ready ({why}); {} logs ({scanned} bytes) \
         hold no password: {:?}",
        run.logs.len(),
        started.elapsed()
    );
}

/// Item 5: TLS to the database. `tls=true&tlsCAFile=<the test CA>` against SecantusDB serving a
/// certificate that CA signed works; a CA file of another CA is refused, and readiness,
/// `/health/deep` and the log say it is the server's certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_tls_trusts_the_test_ca_and_refuses_another_ca_saying_why() {
    const TEST: &str = "the database TLS test (SecantusDB --tls-cert-file)";
    if !own_servers_enabled(TEST) {
        return;
    }
    let (ca, other) = (TestCa::new(), TestCa::named("another CA"));
    let files = tempfile::tempdir().expect("tempdir");
    let path = |name: &str| files.path().join(name).display().to_string();
    let (cert, key) = ca.server_pem();
    for (name, pem) in [
        ("ca.pem", ca.pem()),
        ("other-ca.pem", other.pem()),
        ("server.pem", cert),
        ("server-key.pem", key),
    ] {
        std::fs::write(path(name), pem).expect("write PEM");
    }
    let Some(server) = own_secantusdb(
        TEST,
        &[
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server-key.pem"),
            "--cache-size",
            "256M",
        ],
    ) else {
        return;
    };
    let started = Instant::now();
    let tls = |ca_file: &str| format!("mongodb://{}/?tls=true&tlsCAFile={ca_file}", server.address());
    let database = format!("t{}_vote", uuid::Uuid::new_v4().simple());
    let trusted = tls(&path("ca.pem"));
    logs_in(&trusted).await.expect("the test's own client over TLS");
    // Without TLS nothing is served (the driver's plain hello goes unanswered).
    let plain = tokio::time::timeout(Duration::from_secs(3), logs_in(&server.uri)).await;
    assert!(!matches!(plain, Ok(Ok(()))), "the server speaks TLS only");
    let http = reqwest::Client::new();
    let polls = PollService::start(&http).await;
    let mut run = Run::new(&polls.url);
    let poll_id = polls.create_poll(&run.http).await;

    // The test CA: ready, the ballot is stored.
    let log = run.log("db-tls-trusted");
    let vote = Proc::start("vote", listener().0, &run.db_vote_env(&trusted, &database), log).await;
    let res = run.ballot(&vote, &poll_id, "first").await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap_or_default());
    let client = mongodb::Client::with_uri_str(&trusted).await.expect("client");
    assert_eq!(count_in(&client, &database).await, 1, "stored over TLS");
    drop(vote);

    // Another CA: the server's certificate is refused, and every report says so.
    let log = run.log("db-tls-other-ca");
    let foreign = tls(&path("other-ca.pem"));
    let refused = Proc::spawn("vote", listener().0, &run.db_vote_env(&foreign, &database), log);
    let needles = [
        "TLS: the database's certificate was refused (invalid peer certificate: UnknownIssuer; \
         is tlsCAFile the CA that signed it?)",
    ];
    let why = run
        .not_ready_because(
            &refused,
            &["database: the database is unreachable", needles[0]],
            Duration::from_secs(30),
        )
        .await;
    let (status, db) = run.database_health(&refused).await;
    assert_eq!((status, db["status"].as_str()), (503, Some("down")), "{db}");
    let detail = db["detail"].as_str().unwrap_or_default();
    assert!(needles.iter().all(|n| detail.contains(n)), "{db}");
    let log = std::fs::read_to_string(&refused.log).unwrap_or_default();
    let line = log
        .lines()
        .find(|l| l.contains("cannot open the database"))
        .unwrap_or_default();
    assert!(
        line.contains("\"level\":\"WARN\"") && needles.iter().all(|n| line.contains(n)),
        "the refusal is logged with its reason: {line}"
    );
    let res = run.ballot(&refused, &poll_id, "second").await;
    assert_eq!(res.status(), 503);
    drop(refused);
    assert_eq!(count_in(&client, &database).await, 1);
    eprintln!(
        "TLS: the test CA served; another CA not ready ({why}); logged: {line}; {:?}",
        started.elapsed()
    );
}

/// The service's own log lines at INFO and above (not the libraries' debug lines).
fn notable(log: &std::path::Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.contains("\"level\":\"DEBUG\"") && !l.contains("\"level\":\"TRACE\""))
        .filter(|l| !l.contains("tower_http"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One request of the rotation test: when it was sent and answered, and how.
#[derive(Debug)]
struct Sent {
    what: &'static str,
    started: Instant,
    ended: Instant,
    outcome: Result<u16, String>,
}

impl Sent {
    fn ok(&self) -> bool {
        matches!(self.outcome, Ok(s) if (200..300).contains(&s))
    }
}

async fn send(what: &'static str, request: reqwest::RequestBuilder) -> Sent {
    let started = Instant::now();
    let outcome = request
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string());
    Sent {
        what,
        started,
        ended: Instant::now(),
        outcome,
    }
}

/// Item 4: a password rotated in the database and in Key Vault. The vote service reads its
/// connection string (user `pollvote`, password 1) from the Key Vault double with its workload
/// identity, with a refresh interval far longer than the test, so only the refusal can make it
/// read again. Ballots and reads flow continuously; the password is changed in SecantusDB
/// (`updateUser`) and then in the vault; the service keeps its authenticated connections, so
/// bursts of concurrent reads make its pool open new ones, which the database refuses. The service
/// must then read the secret again, rebuild its client and run the refused calls again on it.
///
/// Asserted bound: every failed request was in flight at the rotation (sent before the vault held
/// the new password, answered after the database dropped the old one); none sent later fails.
/// Also: the refusal happened and triggered the read (logs, the vault's reads), the client was
/// rebuilt by the same process (no restart), every acknowledged ballot is stored once, and no log
/// holds a password, connection string, assertion or token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_password_rotation_is_followed_through_key_vault_without_failed_requests() {
    const TEST: &str = "the password rotation test (SecantusDB --auth, Key Vault double)";
    if !own_servers_enabled(TEST) {
        return;
    }
    let Some(server) = own_secantusdb(TEST, &["--auth", "--cache-size", "256M"]) else {
        return;
    };
    let started = Instant::now();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let database = format!("t{suffix}_vote");
    let (admin_pw, old_pw, new_pw) = (password("adm"), password("old"), password("new"));
    let admin = create_users(&server, &admin_pw, &old_pw, &database).await;
    let http = reqwest::Client::new();
    let polls = PollService::start(&http).await;
    let mut run = Run::new(&polls.url);

    // The workload identity and the vault double, as in `key_vault_end_to_end`.
    let ca = TestCa::new();
    let assertion = format!("eyJhbGciOiJSUzI1NiJ9.{}.sig", uuid::Uuid::new_v4().simple());
    let token_file = run.dir.path().join("azure-identity-token");
    std::fs::write(&token_file, &assertion).expect("token file");
    let entra = FakeEntra::new(&assertion);
    let entra_server = HttpsServer::start(&ca, entra.router()).await;
    let bundle = run.dir.path().join("ca-bundle.pem");
    std::fs::write(&bundle, ca.pem()).expect("bundle");
    let identity = Identity {
        entra: entra.clone(),
        entra_server,
        assertion: assertion.clone(),
        token_file,
        bundle,
    };
    let double = KeyVaultDouble::new(entra.clone(), API_VERSION);
    let vault = HttpsServer::start(&ca, double.router()).await;
    let secret = format!("cosmosdb-connection-string-{}", &suffix[..8]);
    let old = with_credentials(&server, "pollvote", &old_pw, &format!("&appName=rot-old-{suffix}"));
    let new = with_credentials(&server, "pollvote", &new_pw, &format!("&appName=rot-new-{suffix}"));
    double.set(&secret, &old);
    let vault_reads = || {
        double
            .seen()
            .iter()
            .filter(|r| r.authorized && r.method == "GET")
            .count()
    };

    let mut env = run.vote_env(&identity, &vault.url(), &secret, &database);
    for (k, v) in &mut env {
        if *k == "KEYVAULT_REFRESH_INTERVAL_MS" {
            *v = "3600000".to_owned();
        }
    }
    let log = run.log("rotation-vote");
    let mut vote = Proc::start("vote", listener().0, &env, log).await;
    let ready = Instant::now();
    let pid = vote.child.id();
    let poll_id = polls.create_poll(&run.http).await;
    let res = run.ballot(&vote, &poll_id, "first").await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap_or_default());

    // Traffic: 4 clients casting ballots one after another, 1 reading the audit (a database read).
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..5 {
        let (http, url, poll_id, stop) = (run.http.clone(), vote.url.clone(), poll_id.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                sent.push(if c == 4 {
                    send("audit", http.get(format!("{url}/internal/polls/{poll_id}/audit"))).await
                } else {
                    let ballot = json!({"poll_id": poll_id, "option": "red", "voter_id": format!("c{c}-{n}")});
                    send("ballot", http.post(format!("{url}/api/votes")).json(&ballot)).await
                });
                n += 1;
                // A client's pace, not a wait for anything.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        }));
    }

    // The refusal reads the secret again at once only past keyvault::MIN_GAP after the last read
    // (here: at start-up): a time the service measures, so a sleep.
    let since_read = ready.elapsed();
    tokio::time::sleep((shared::keyvault::MIN_GAP + Duration::from_millis(500)).saturating_sub(since_read)).await;
    let reads_before = vault_reads();

    // ---- The rotation: the database first, then the vault.
    let rotation_began = Instant::now();
    admin
        .database("admin")
        .run_command(doc! {"updateUser": "pollvote", "pwd": &new_pw})
        .await
        .expect("updateUser");
    double.set(&secret, &new);
    let rotation_ended = Instant::now();
    assert!(logs_in(&old).await.is_err(), "the old password is refused now");
    logs_in(&new).await.expect("the new password is let in");

    // Bursts of concurrent reads until the service has rebuilt its client.
    let mut bursts = Vec::new();
    let rebuilt = loop {
        let text = std::fs::read_to_string(&vote.log).unwrap_or_default();
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("\"message\":\"database connected\"") && l.contains("\"rotated\":true"))
        {
            break line.to_owned();
        }
        assert!(
            rotation_ended.elapsed() < Duration::from_secs(30),
            "no rebuilt client within 30 s of the rotation; log:\n{text}"
        );
        let burst = (0..16).map(|_| {
            send(
                "burst",
                run.http.get(format!("{}/internal/polls/{poll_id}/audit", vote.url)),
            )
        });
        bursts.extend(futures_util::future::join_all(burst).await);
        // The bursts' pace (each burst is the action that makes the service notice).
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rebuilt_after = rotation_ended.elapsed();
    // What is under test: a second of traffic on the rebuilt client, none of which may fail.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let mut sent = bursts;
    for c in clients {
        sent.extend(c.await.expect("client"));
    }

    // The bound: a request may fail only if it was in flight at the rotation.
    let in_flight = |s: &Sent| s.started <= rotation_ended && s.ended >= rotation_began;
    let failed: Vec<&Sent> = sent.iter().filter(|s| !s.ok()).collect();
    let late: Vec<&&Sent> = failed.iter().filter(|s| !in_flight(s)).collect();
    assert!(
        late.is_empty(),
        "{} requests sent outside the rotation failed: {late:?}; the service's log said:\n{}",
        late.len(),
        notable(&vote.log)
    );
    let at_rotation = sent.iter().filter(|s| in_flight(s)).count();
    let after = sent.iter().filter(|s| s.started > rotation_ended).count();
    assert!(after > 16, "requests were sent after the rotation: {after}");

    // The refusal made the service read the secret again and rebuild its client, by itself.
    let text = std::fs::read_to_string(&vote.log).unwrap_or_default();
    for needle in [
        "the database refused the credentials; reading the secret again",
        "the connection string changed in Key Vault; reconnecting",
    ] {
        assert!(text.contains(needle), "`{needle}` not logged:\n{text}");
    }
    assert!(
        vault_reads() > reads_before,
        "the secret was read again after the rotation ({reads_before} reads before)"
    );
    assert!(
        vote.child.try_wait().expect("status").is_none(),
        "the service kept running"
    );
    assert_eq!(vote.child.id(), pid, "the same process");
    let (status, db) = run.database_health(&vote).await;
    assert_eq!((status, db["status"].as_str()), (200, Some("up")), "{db}");

    // Exactly once: every acknowledged ballot is stored, once.
    let acknowledged = sent
        .iter()
        .filter(|s| s.what == "ballot" && s.outcome == Ok(201))
        .count();
    assert_eq!(
        count_in(&admin, &database).await,
        acknowledged as u64 + 1,
        "every acknowledged ballot is stored once"
    );
    drop(vote);

    let mut secrets = vec![
        admin_pw.as_str(),
        old_pw.as_str(),
        new_pw.as_str(),
        old.as_str(),
        new.as_str(),
        assertion.as_str(),
    ];
    let issued = entra.issued();
    secrets.extend(issued.iter().map(String::as_str));
    let scanned = run.assert_logs_hold_none_of(&secrets);
    eprintln!(
        "rotation: {} requests ({after} sent after the rotation, {} bursts of 16 reads), {} failed (bound: the {at_rotation} \
         in flight at the rotation); client rebuilt {rebuilt_after:?} after it: {rebuilt}; log ({scanned} bytes) \
         clean; {:?}",
        sent.len(),
        sent.iter().filter(|s| s.what == "burst").count() / 16,
        failed.len(),
        started.elapsed()
    );
}

//! Test harness: both services over real HTTP on loopback sockets, each with its own data.
//!
//! [`Stack::start`] runs both services in-process (on listeners bound to port 0 before the
//! services are built, fresh store per stack). [`Proc`] runs a real binary as a child process (kill -9, signals, replicas).
//! With `POLLVOTE_TEST_BACKEND=mongodb` and `MONGODB_TEST_URI`, stacks use that server with one
//! database per stack (dropped afterwards); otherwise the embedded store in a temp directory.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use shared::config::{Config, Sources};
use tokio_util::sync::CancellationToken;

pub mod azure;
pub mod secantusdb;

/// A listener on `127.0.0.1`, on a port the kernel picked, bound now: hand it to the service
/// (`poll_service::build`, `vote_service::build`) and nothing can take the port in between.
/// Connections made before the service runs wait in the listen backlog.
pub fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0");
    let port = l.local_addr().expect("local addr").port();
    (l, port)
}

/// A port bound but not listening: connections to it are refused (nothing answers there) until
/// [`tokio::net::TcpSocket::listen`] turns it into a listener; nothing else can take it meanwhile.
/// For a dependency that is down at first and comes up later on the address already configured.
pub fn reserved_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    let port = socket.local_addr().expect("local addr").port();
    (socket, port)
}

/// A test that cannot run on this machine (a server or tool it needs cannot be provisioned):
/// under `CI=true` a failure, since CI provisions everything; elsewhere one line `skipped: <why>`
/// written straight to stderr, which the harness does not capture, so the skip is seen even when
/// the test passes.
pub fn skip(why: impl std::fmt::Display) {
    assert_ne!(
        std::env::var("CI").as_deref(),
        Ok("true"),
        "CI=true: nothing may be skipped, but {why}"
    );
    skipped(why);
}

/// A test that runs in another stage of scripts/test (another backend, the Key Vault stage), so
/// not in this run, also under `CI=true`: one visible `skipped: <why>` line, as [`skip`] writes.
pub fn skipped(why: impl std::fmt::Display) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

/// Calls `attempt` until it gives `Ok` (right away, then every `every`), and returns that;
/// panics with the last `Err` once `deadline` has passed. For conditions that become true by
/// themselves (a snapshot refreshed, a tally folded, a log line written).
pub async fn until<T, F, Fut>(deadline: Instant, every: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    loop {
        match attempt().await {
            Ok(v) => return v,
            Err(why) => {
                assert!(Instant::now() < deadline, "{why}");
                tokio::time::sleep(every).await;
            }
        }
    }
}

/// [`until`] `within` from now.
pub async fn eventually<T, F, Fut>(within: Duration, every: Duration, attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    until(Instant::now() + within, every, attempt).await
}

/// Response header `name` as text; empty when it is absent or not text.
pub fn header(res: &reqwest::Response, name: &str) -> String {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// `Retry-After` as delta-seconds, when it is that.
pub fn retry_after_secs(res: &reqwest::Response) -> Option<u64> {
    header(res, "retry-after").parse().ok()
}

/// Waits until the log file at `path` holds `needle`.
pub async fn wait_for_log(path: &std::path::Path, needle: &str, within: Duration) {
    eventually(within, Duration::from_millis(100), || async {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) {
            Ok(())
        } else {
            Err(format!("`{needle}` never logged in {}:\n{log}", path.display()))
        }
    })
    .await
}

/// The built-in defaults, as a test's starting point.
pub fn base_config() -> Config {
    let sources = Sources {
        config_dir: PathBuf::from("/nonexistent"),
        env: BTreeMap::new(),
    };
    let mut c = Config::load(&sources).expect("defaults load");
    c.server.host = "127.0.0.1".into();
    c.rate_limit.writes_per_minute = 0;
    c.log.level = "warn".into();
    c
}

/// Which backend the stacks use.
pub fn mongo_uri() -> Option<String> {
    match std::env::var("POLLVOTE_TEST_BACKEND").as_deref() {
        Ok("mongodb") => {
            Some(std::env::var("MONGODB_TEST_URI").expect("POLLVOTE_TEST_BACKEND=mongodb needs MONGODB_TEST_URI"))
        }
        _ => None,
    }
}

pub struct Stack {
    pub poll: String,
    pub vote: String,
    pub http: reqwest::Client,
    pub poll_shutdown: CancellationToken,
    pub vote_shutdown: CancellationToken,
    pub poll_task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    pub vote_task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    pub config: Config,
    /// MongoDB databases this stack created, dropped when it is dropped.
    databases: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts both services; `tweak` edits the shared config (ports and URLs are set after it).
    pub async fn start_with(tweak: impl Fn(&mut Config)) -> Self {
        shared::telemetry::init(&base_config().log);
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = base_config();
        config.storage.data_dir = dir.path().to_path_buf();
        if let Some(uri) = mongo_uri() {
            config.storage.mongodb_uri = shared::Secret::new(uri);
        }
        tweak(&mut config);
        let ((poll_listener, poll_port), (vote_listener, vote_port)) = (listener(), listener());
        config.services.poll_url = format!("http://127.0.0.1:{poll_port}");
        config.services.vote_url = format!("http://127.0.0.1:{vote_port}");
        let db_prefix = format!("t{}", uuid::Uuid::new_v4().simple());

        let mut poll_config = config.clone();
        poll_config.server.port = poll_port;
        if poll_config.storage.database.is_empty() {
            poll_config.storage.database = format!("{db_prefix}_poll");
        }
        let mut vote_config = config.clone();
        vote_config.server.port = vote_port;
        if vote_config.storage.database.is_empty() {
            vote_config.storage.database = format!("{db_prefix}_vote");
        }
        let poll_shutdown = CancellationToken::new();
        let vote_shutdown = CancellationToken::new();
        let poll = poll_service::build(poll_config, Some(poll_listener), poll_shutdown.clone())
            .await
            .expect("poll service starts");
        let vote = vote_service::build(vote_config, Some(vote_listener), vote_shutdown.clone())
            .await
            .expect("vote service starts");
        let poll_task = tokio::spawn(poll.run_until_stopped());
        let vote_task = tokio::spawn(vote.run_until_stopped());
        let http = http_client();
        for base in [&config.services.poll_url, &config.services.vote_url] {
            wait_ready(&http, base, Duration::from_secs(30)).await;
        }
        Self {
            poll: config.services.poll_url.clone(),
            vote: config.services.vote_url.clone(),
            http,
            poll_shutdown,
            vote_shutdown,
            poll_task: Some(poll_task),
            vote_task: Some(vote_task),
            databases: if config.storage.mongodb_uri.is_empty() {
                Vec::new()
            } else {
                vec![format!("{db_prefix}_poll"), format!("{db_prefix}_vote")]
            },
            config,
            _dir: dir,
        }
    }

    /// Creates a poll; returns its JSON and admin token.
    pub async fn create_poll(&self, body: Value) -> (Value, String) {
        let res = self
            .http
            .post(format!("{}/api/polls", self.poll))
            .json(&body)
            .send()
            .await
            .expect("create poll");
        assert_eq!(
            res.status(),
            201,
            "create poll: {}",
            res.text().await.unwrap_or_default()
        );
        let v: Value = res.json().await.expect("json");
        let token = v["admin_token"].as_str().expect("admin token").to_owned();
        (v, token)
    }

    /// A poll with options red, green, blue and the given extra fields.
    pub async fn simple_poll(&self, extra: Value) -> (String, String) {
        let mut body = json!({"name": "Colour", "desc": "pick", "options": ["red", "green", "blue"]});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (v, token) = self.create_poll(body).await;
        (v["id"].as_str().expect("id").to_owned(), token)
    }

    pub async fn vote(&self, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/api/votes", self.vote))
            .json(&body)
            .send()
            .await
            .expect("vote")
    }

    pub async fn get_poll(&self, id: &str) -> Value {
        let res = self
            .http
            .get(format!("{}/api/polls/{id}", self.poll))
            .send()
            .await
            .expect("get poll");
        assert_eq!(res.status(), 200);
        res.json().await.expect("json")
    }

    /// The poll service's MongoDB database, when the stack runs on MongoDB.
    pub fn poll_database(&self) -> Option<&str> {
        self.databases.first().map(String::as_str)
    }

    /// The vote service's MongoDB database, when the stack runs on MongoDB.
    pub fn vote_database(&self) -> Option<&str> {
        self.databases.get(1).map(String::as_str)
    }

    /// Stops the vote service and waits until it has stopped (its port refuses connections then).
    pub async fn stop_vote(&mut self) {
        self.vote_shutdown.cancel();
        if let Some(t) = self.vote_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }

    /// Stops the poll service and waits until it has stopped (its port refuses connections then).
    pub async fn stop_poll(&mut self) {
        self.poll_shutdown.cancel();
        if let Some(t) = self.poll_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }

    /// Stops both services and waits for them.
    pub async fn stop(mut self) {
        self.poll_shutdown.cancel();
        self.vote_shutdown.cancel();
        for t in [self.poll_task.take(), self.vote_task.take()].into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.poll_shutdown.cancel();
        self.vote_shutdown.cancel();
        if !self.databases.is_empty() {
            drop_databases(
                self.config.storage.mongodb_uri.expose().to_owned(),
                std::mem::take(&mut self.databases),
            );
        }
    }
}

/// Drops test databases (on a thread of its own: `Drop` cannot await).
pub fn drop_databases(uri: String, names: Vec<String>) {
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        rt.block_on(async {
            let Ok(client) = mongodb::Client::with_uri_str(&uri).await else {
                return;
            };
            for name in names {
                let _ = tokio::time::timeout(Duration::from_secs(5), client.database(&name).drop()).await;
            }
        });
    })
    .join();
}

/// Waits until `base/readyz` answers 200 (with MongoDB, the store connects in the background).
/// An HTTP client whose every request is bounded (30 s): a request nobody answers fails the test
/// instead of hanging it.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub async fn wait_ready(http: &reqwest::Client, base: &str, within: Duration) {
    eventually(within, Duration::from_millis(25), || async {
        match http.get(format!("{base}/readyz")).send().await {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(format!("{base} not ready: {}", r.text().await.unwrap_or_default())),
            Err(e) => Err(format!("{base} not ready: {e}")),
        }
    })
    .await
}

/// `GET url` answered with a JSON body, parsed (panics naming the URL otherwise).
pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    let res = http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    res.json().await.unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// Asserts an RFC 9457 problem response and returns its body.
pub async fn expect_problem(res: reqwest::Response, status: u16) -> Value {
    let got = res.status().as_u16();
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "status; body: {body}");
    assert!(
        ct.starts_with("application/problem+json"),
        "content type {ct}; body: {body}"
    );
    for field in ["type", "title", "status", "detail"] {
        assert!(body.get(field).is_some(), "problem without `{field}`: {body}");
    }
    assert_eq!(body["status"], status);
    body
}

/// Whether a problem's `errors` name `field`.
pub fn names_field(problem: &Value, field: &str) -> bool {
    problem["errors"]
        .as_array()
        .is_some_and(|errs| errs.iter().any(|e| e["field"] == field))
}

/// Where the workspace's binaries are (`cargo build --bins` puts them there).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --bins` first",
        path.display()
    );
    path
}

/// A service running as a child process.
pub struct Proc {
    pub child: tokio::process::Child,
    pub url: String,
    pub log: PathBuf,
}

impl Proc {
    /// Starts binary `name` serving on `listener`, with `env` (and nothing inherited but PATH),
    /// and waits for `/readyz` to answer 200.
    pub async fn start(name: &str, listener: TcpListener, env: &[(&str, String)], log: PathBuf) -> Self {
        let p = Self::spawn(name, listener, env, log);
        p.wait_ready(Duration::from_secs(20)).await;
        p
    }

    /// Starts binary `name` like [`Proc::start`] without waiting for it to be ready.
    ///
    /// The child gets `listener` as descriptor 3 with `LISTEN_FDS=1` (socket activation, see
    /// `shared::service::main_with`): the port was bound before the child existed, so nothing can
    /// take it in between. Keep a copy (`listener.try_clone()`) to start a process again on the
    /// same port after killing it; while the copy is open, connections to the port wait in its
    /// backlog rather than being refused.
    pub fn spawn(name: &str, listener: TcpListener, env: &[(&str, String)], log: PathBuf) -> Self {
        use command_fds::{CommandFdExt, FdMapping};
        let port = listener.local_addr().expect("local addr").port();
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = tokio::process::Command::new(bin_path(name));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (*k, v.clone())))
            .env("LISTEN_FDS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: std::os::fd::OwnedFd::from(listener),
            child_fd: 3,
        }])
        .expect("one descriptor mapping");
        let child = cmd.spawn().expect("spawn service");
        let url = format!("http://127.0.0.1:{port}");
        Self { child, url, log }
    }

    pub async fn wait_ready(&self, within: Duration) {
        let http = reqwest::Client::new();
        eventually(within, Duration::from_millis(50), || async {
            match http.get(format!("{}/readyz", self.url)).send().await {
                Ok(r) if r.status() == 200 => Ok(()),
                _ => Err(format!(
                    "{} not ready; log:\n{}",
                    self.url,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                )),
            }
        })
        .await
    }

    /// SIGKILL, no chance to flush anything.
    pub async fn kill9(&mut self) {
        self.child.kill().await.expect("kill -9");
    }
}

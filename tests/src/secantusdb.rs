//! SecantusDB instances of a test's own (`scripts/secantusdb`), for servers started with options
//! the shared test server has not (`--auth`, TLS). Each runs in a temporary state directory and is
//! killed when its handle is dropped, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running SecantusDB; killed (and its data removed) when dropped.
pub struct OwnSecantusDb {
    state: tempfile::TempDir,
    /// `mongodb://127.0.0.1:<port>/`, as the script printed it.
    pub uri: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/secantusdb")
}

impl OwnSecantusDb {
    /// Starts one with `args` (passed to the server as they are). `Err(why)` when SecantusDB cannot
    /// be provisioned on this machine (the script's exit 77, which it never uses under `CI=true`:
    /// there it fails, and so does this, with its message).
    pub fn start(args: &[&str]) -> Result<Self, String> {
        let state = tempfile::tempdir().expect("tempdir");
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(state.path())
            .args(args)
            .output()
            .expect("run scripts/secantusdb");
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        match out.status.code() {
            Some(0) => Ok(Self {
                uri: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
                state,
            }),
            Some(77) => Err(stderr),
            code => panic!(
                "scripts/secantusdb start {args:?} exited {code:?}: {stderr}\nserver log:\n{}",
                std::fs::read_to_string(state.path().join("secantusd.log")).unwrap_or_default()
            ),
        }
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> &str {
        self.uri.trim_start_matches("mongodb://").trim_end_matches('/')
    }

    /// The server's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("secantusd.log")).unwrap_or_default()
    }

    /// SIGKILL, now (a crash: what was journalled and synced stays); returns once it has exited.
    /// [`OwnSecantusDb::restart`] brings it back; dropping the handle still cleans up.
    pub fn kill(&self) {
        self.script("kill", &[]);
    }

    /// Starts it again after [`OwnSecantusDb::kill`]: same state directory, so the same port (the
    /// same URI), data and arguments; returns once it accepts connections.
    pub fn restart(&self) {
        let uri = self.script("start", &[]);
        assert_eq!(uri, self.uri, "restarted on the same address");
    }

    fn script(&self, command: &str, args: &[&str]) -> String {
        let out = Command::new("bash")
            .arg(script())
            .arg(command)
            .arg(self.state.path())
            .args(args)
            .output()
            .expect("run scripts/secantusdb");
        assert!(
            out.status.success(),
            "scripts/secantusdb {command}: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for OwnSecantusDb {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("kill")
            .arg(self.state.path())
            .output();
    }
}

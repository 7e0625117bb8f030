//! The services under test: started by the load generator (to time start-to-ready) or attached
//! to by pid, and what `/proc` says about them (memory, CPU time) and about the machine.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::process::{Child, Command};

use crate::http::{Conn, request};

/// One service process.
pub struct Service {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub pid: u32,
    child: Option<Child>,
    pub log: Option<PathBuf>,
}

/// Memory of a process, from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Memory {
    pub rss_kib: u64,
    /// Peak resident set size since the process started.
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> Memory {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
    }
}

/// The open-files limit (soft, hard) of a process from `/proc/<pid>/limits`; `pid` 0 means this
/// process. `u64::MAX` for unlimited.
pub fn nofile(pid: u32) -> Option<(u64, u64)> {
    let path = if pid == 0 {
        "/proc/self/limits".to_owned()
    } else {
        format!("/proc/{pid}/limits")
    };
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut v = line["Max open files".len()..].split_whitespace().map(|x| {
        if x == "unlimited" {
            Some(u64::MAX)
        } else {
            x.parse().ok()
        }
    });
    Some((v.next()??, v.next()??))
}

/// Raises this process's soft open-files limit to its hard limit (services started later inherit
/// it). Without `unsafe` (forbidden in the workspace) there is no setrlimit: util-linux's
/// `prlimit` does it, if installed; otherwise the limit stays (scripts/bench raises it with
/// `ulimit -n` before starting loadgen).
pub fn raise_nofile() {
    let Some((soft, hard)) = nofile(0) else { return };
    if soft >= hard {
        return;
    }
    let limit = if hard == u64::MAX {
        "unlimited".to_owned()
    } else {
        hard.to_string()
    };
    let ok = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={limit}:{limit}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("loadgen: could not raise the open-files limit from {soft} to {hard} (no prlimit?)");
    }
}

/// Linux reports utime and stime in USER_HZ ticks, which is 100 per second on every architecture
/// Linux supports (the value exported to user space is fixed, whatever the kernel's HZ).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU seconds (user + system) a process has used so far; `pid` 0 means this process.
pub fn cpu_seconds(pid: u32) -> f64 {
    let path = if pid == 0 {
        "/proc/self/stat".to_owned()
    } else {
        format!("/proc/{pid}/stat")
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // The command name (field 2) may contain spaces: count fields after its closing parenthesis.
    let Some(rest) = text.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / TICKS_PER_SECOND
}

/// What this run ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_mib: u64,
    pub loadavg_before: String,
    pub loadavg_after: String,
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim())
        })
        .unwrap_or("unknown")
        .to_owned();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024;
    Machine {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        memory_mib,
        loadavg_before: loadavg(),
        loadavg_after: String::new(),
    }
}

/// How a spawned service is configured.
pub struct SpawnSpec<'a> {
    pub name: &'static str,
    pub bin: &'a Path,
    /// Bound already (`listener`); the child serves on it (socket activation, `LISTEN_FDS`), so no
    /// other process can take the port between choosing it and the child's start.
    pub listener: TcpListener,
    pub data_dir: &'a Path,
    /// Extra environment (the other service's URL).
    pub env: Vec<(String, String)>,
}

/// A loopback listener on a port the kernel picked, and that port.
pub fn listener() -> std::io::Result<(TcpListener, u16)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

impl Service {
    /// An already running service.
    pub fn attach(name: &'static str, addr: SocketAddr, pid: u32) -> Self {
        Self {
            name,
            addr,
            pid,
            child: None,
            log: None,
        }
    }

    /// Starts the binary and waits until `GET /readyz` answers 200; returns the service and the
    /// time from spawning to ready.
    pub async fn spawn(spec: SpawnSpec<'_>) -> Result<(Self, Duration), String> {
        let log = spec.data_dir.join(format!("{}.log", spec.name));
        let file = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        use command_fds::{CommandFdExt, FdMapping};
        let addr = spec
            .listener
            .local_addr()
            .map_err(|e| format!("the listener for {}: {e}", spec.name))?;
        let mut cmd = Command::new(spec.bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LISTEN_FDS", "1")
            .env("POLLVOTE__SERVER__HOST", "127.0.0.1")
            .env("DATA_DIR", spec.data_dir)
            .env("RATE_LIMIT_PER_MINUTE", "0")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true);
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: std::os::fd::OwnedFd::from(spec.listener),
            child_fd: 3,
        }])
        .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", spec.bin.display()))?;
        let pid = child.id().ok_or("the service exited at once")?;
        // For scripts/bench's clean-up, should this process die without stopping the service.
        let _ = std::fs::write(spec.data_dir.join(format!("{}.pid", spec.name)), pid.to_string());
        let mut service = Self {
            name: spec.name,
            addr,
            pid,
            child: Some(child),
            log: Some(log),
        };
        let probe = request("GET", addr, "/readyz", &[], None);
        let deadline = started + Duration::from_secs(20);
        loop {
            if let Ok(mut conn) = Conn::connect(addr).await
                && let Ok(res) = conn.send(&probe).await
                && res.status == 200
            {
                return Ok((service, started.elapsed()));
            }
            if let Some(Ok(Some(status))) = service.child.as_mut().map(Child::try_wait) {
                return Err(format!("{} exited with {status}: {}", spec.name, service.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!("{} not ready after 20 s: {}", spec.name, service.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let Some(log) = &self.log else { return String::new() };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Lines the service logged at warn or above (the services run with `RUST_LOG=warn`).
    pub fn log_lines(&self) -> usize {
        self.log
            .as_ref()
            .and_then(|l| std::fs::read_to_string(l).ok())
            .map_or(0, |t| t.lines().count())
    }

    pub fn memory(&self) -> Memory {
        memory(self.pid)
    }

    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid)
    }

    /// SIGTERM (through `kill`, no unsafe code here), then waits up to 30 s, then SIGKILL.
    pub async fn stop(&mut self) {
        let Some(child) = self.child.as_mut() else { return };
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

//! One `migratory serve` child per scenario host, on loopback, sharing a fresh cluster key and
//! API token kept in a private scratch directory. Dropping the [`Cluster`] kills (SIGKILL) and
//! reaps every child and removes the directory, so no exit path leaves a daemon behind.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use migratory::model::HostDef;

use super::http::Api;
use super::LiveError;
use crate::cli::token;

/// How long a daemon may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The stderr lines of a daemon kept for an error message.
const KEPT_LOG_LINES: usize = 20;

/// A started daemon.
#[derive(Debug)]
pub struct Daemon {
    /// The scenario host's name.
    pub name: String,
    /// Where it accepts migrations: what `POST /migrations` takes as `to`.
    pub migration_addr: SocketAddr,
    /// Its control API.
    pub api: Api,
    child: Option<Child>,
}

impl Daemon {
    /// Whether it was not killed by [`Cluster::kill`].
    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }
}

/// The daemons of one live run and their scratch directory.
#[derive(Debug)]
pub struct Cluster {
    /// One per scenario host, in the scenario's order.
    pub daemons: Vec<Daemon>,
    scratch: PathBuf,
}

impl Cluster {
    /// Starts one daemon per host with `exe serve` and waits for each to be ready.
    pub fn start(exe: &Path, hosts: &[HostDef]) -> Result<Cluster, LiveError> {
        let scratch = scratch_dir()?;
        // From here on, Drop cleans up whatever was started, however this returns.
        let mut cluster = Cluster {
            daemons: Vec::with_capacity(hosts.len()),
            scratch,
        };
        let key_file = cluster.scratch.join("cluster.key");
        let token_file = cluster.scratch.join("api-token");
        // A cluster key has the same shape as a fresh API token: 32 random bytes as hex, mode
        // 0600; `create_or_read` makes exactly that.
        token::create_or_read(&key_file).map_err(|e| LiveError::Setup(crate::cli::error_text(&e)))?;
        let (api_token, _) =
            token::create_or_read(&token_file).map_err(|e| LiveError::Setup(crate::cli::error_text(&e)))?;
        for host in hosts {
            let daemon = spawn(exe, host, &key_file, &token_file, &api_token)?;
            cluster.daemons.push(daemon);
        }
        Ok(cluster)
    }

    /// SIGKILLs host `index`'s daemon, as a host failure; its VMs die with it.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.daemons.get_mut(index).and_then(|d| d.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.daemons.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// A new private directory for the key and token files.
fn scratch_dir() -> Result<PathBuf, LiveError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("migratory-live-{}-{nanos}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| LiveError::Setup(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

fn spawn(exe: &Path, host: &HostDef, key_file: &Path, token_file: &Path, api_token: &str) -> Result<Daemon, LiveError> {
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .args(["--name", &host.name])
        .args(["--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .args(["--layout", &host.layout.to_string()])
        .args(["--memory-budget", &host.memory_budget_bytes.to_string()])
        .args(["--max-outgoing", &host.max_outgoing.to_string()])
        .args(["--max-incoming", &host.max_incoming.to_string()])
        .arg("--cluster-key-file")
        .arg(key_file)
        .arg("--api-token-file")
        .arg(token_file);
    // The daemon takes whole bytes per second; a budget under 1 B/s is no budget anyone means.
    if host.bandwidth_budget_bytes_per_sec.is_finite() && host.bandwidth_budget_bytes_per_sec >= 1.0 {
        cmd.args([
            "--bandwidth-budget",
            &(host.bandwidth_budget_bytes_per_sec as u64).to_string(),
        ]);
    }
    // Only this run's files decide: nothing from the caller's environment.
    cmd.env_remove("MIGRATORY_CLUSTER_KEY")
        .env_remove(token::TOKEN_FILE_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| LiveError::Spawn {
        host: host.name.clone(),
        exe: exe.to_path_buf(),
        source,
    })?;
    let ready = match child.stderr.take() {
        Some(pipe) => wait_ready(pipe, &host.name),
        None => Err("its stderr was not piped".to_string()),
    };
    let started = ready.and_then(|(migrations, api)| {
        let migration_addr = migrations
            .parse::<SocketAddr>()
            .map_err(|_| format!("migration address {migrations:?}"))?;
        let api_addr = api
            .strip_prefix("http://")
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or_else(|| format!("API address {api:?}"))?;
        Ok((migration_addr, api_addr))
    });
    match started {
        Ok((migration_addr, api_addr)) => Ok(Daemon {
            name: host.name.clone(),
            migration_addr,
            api: Api::new(api_addr, api_token.to_string()),
            child: Some(child),
        }),
        Err(detail) => {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Err(LiveError::NotReady {
                host: host.name.clone(),
                detail: format!("{detail} ({status})"),
            })
        }
    }
}

/// Reads stderr until the ready line, and keeps draining it on a thread afterwards so the pipe
/// never fills. Returns the migration address and the API URL it names.
fn wait_ready(pipe: std::process::ChildStderr, name: &str) -> Result<(String, String), String> {
    let prefix = format!("migratory: host {name} serving migrations on ");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(pipe).lines();
        while let Some(Ok(line)) = lines.next() {
            // Nobody listens once the ready line was found; keep draining regardless.
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut log: Vec<String> = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix(&prefix) {
                    return parse_ready(rest).ok_or_else(|| format!("unexpected ready line {line:?}"));
                }
                log.push(line);
                if log.len() > KEPT_LOG_LINES {
                    log.remove(0);
                }
            }
            Err(e) => {
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => format!("no ready line in {} s", READY_TIMEOUT.as_secs()),
                    mpsc::RecvTimeoutError::Disconnected => "it exited".to_string(),
                };
                return Err(format!("{why}; stderr: {}", log.join(" | ")));
            }
        }
    }
}

/// `ADDR, API on URL[, metrics on URL]`: the two first addresses.
fn parse_ready(rest: &str) -> Option<(String, String)> {
    let (migrations, api) = rest.split_once(", API on ")?;
    let api = api.split(", metrics on ").next()?;
    Some((migrations.to_string(), api.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_ready_reads_the_daemons_line() {
        assert_eq!(
            parse_ready("127.0.0.1:4000, API on http://127.0.0.1:4001"),
            Some(("127.0.0.1:4000".into(), "http://127.0.0.1:4001".into()))
        );
        assert_eq!(
            parse_ready("127.0.0.1:4000, API on http://127.0.0.1:4001, metrics on http://127.0.0.1:9/metrics"),
            Some(("127.0.0.1:4000".into(), "http://127.0.0.1:4001".into()))
        );
        assert_eq!(parse_ready("127.0.0.1:4000"), None);
    }
}

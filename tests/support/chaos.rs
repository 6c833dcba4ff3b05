//! Two real `migratory serve` daemons for the chaos matrix (`tests/chaos.rs`): spawning them,
//! reading their API and stderr, signalling them, and the operator's client commands.
//!
//! Self-contained on purpose: `daemon.rs` and `cli.rs` serve the other process tests and change
//! with the API's authentication; this file speaks to a daemon through raw HTTP for what it
//! observes (fast, bounded, and harmless against a stopped process) and through the CLI binary
//! for what an operator would type.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test, as cargo built it.
const BUILT: &str = env!("CARGO_BIN_EXE_migratory");

/// The binary the matrix runs: a private copy of [`BUILT`], taken once. A target directory
/// shared between worktrees lets another branch's build replace the built file in the middle of
/// a run, and the later cells would then test that branch's code.
pub fn bin() -> &'static Path {
    static COPY: OnceLock<PathBuf> = OnceLock::new();
    COPY.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique("chaos-bin"));
        let copy = dir.join("migratory");
        match std::fs::create_dir_all(&dir).and_then(|()| std::fs::copy(BUILT, &copy)) {
            Ok(_) => copy,
            Err(_) => PathBuf::from(BUILT),
        }
    })
}

/// Removes the copy [`bin`] made, once the matrix is done.
pub fn remove_bin_copy() {
    let copy = bin();
    if copy != Path::new(BUILT) {
        if let Some(dir) = copy.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// True if this build's `serve --help` lists `flag`: the matrix runs against the flags being
/// built (`--drain-to`, `--api-token-file`) when they exist, and without them before.
pub fn serve_has(flag: &'static str) -> bool {
    static HELP: OnceLock<String> = OnceLock::new();
    let help = HELP.get_or_init(|| {
        Command::new(bin())
            .args(["serve", "--help"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    });
    help.contains(flag)
}

/// The bound on every wait of the matrix: a daemon's start, reaching a hold point, settling
/// after a signal, a client command.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// How often both daemons are looked at.
pub const POLL: Duration = Duration::from_millis(50);

/// How long one HTTP request to a daemon may take; a stopped daemon answers nothing, and the
/// poll must go on to the other one.
const HTTP_TIMEOUT: Duration = Duration::from_millis(400);

/// One daemon's answer to a look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The process has exited.
    Down,
    /// It is alive but did not answer (stopped, or refusing).
    NoAnswer(String),
    /// Its `GET /vms` entry for the VM, if it lists one.
    Listed(Option<VmCopy>),
}

/// One host's copy of the VM, as `GET /vms` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCopy {
    /// `running`, `paused`, `migrating (running)`, `committed-unconfirmed`, ...
    pub state: String,
    /// Guest stores so far.
    pub writes: u64,
    /// Why the copy is not running, when the daemon says.
    pub reason: Option<String>,
    /// The operator actions that apply, when the daemon lists them.
    pub actions: Option<Vec<String>>,
}

impl VmCopy {
    fn from_json(v: &Value) -> VmCopy {
        VmCopy {
            state: v["state"].as_str().unwrap_or("?").to_string(),
            writes: v["writes"].as_u64().unwrap_or(0),
            reason: v["reason"].as_str().map(str::to_string),
            actions: v["actions"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()),
        }
    }

    /// True if the guest executes in this state (`migrating (running)` is the source's copy
    /// still running during pre-copy).
    pub fn is_running(&self) -> bool {
        self.state == "running" || self.state == "migrating (running)"
    }

    /// True while a migration still moves this copy (it is not left anywhere yet).
    pub fn is_transient(&self) -> bool {
        self.state == "incoming" || self.state.starts_with("migrating")
    }

    /// True if the daemon lists `action` for this copy.
    pub fn offers(&self, action: &str) -> bool {
        self.actions.as_ref().is_some_and(|a| a.iter().any(|x| x == action))
    }
}

impl Seen {
    /// The copy, if the daemon answered and lists one.
    pub fn copy(&self) -> Option<&VmCopy> {
        match self {
            Seen::Listed(c) => c.as_ref(),
            _ => None,
        }
    }

    /// Short text for the table: `running`, `-` (answered, no copy), `down`, `no answer`.
    pub fn short(&self) -> String {
        match self {
            Seen::Down => "down".into(),
            Seen::NoAnswer(_) => "no-answer".into(),
            Seen::Listed(None) => "-".into(),
            Seen::Listed(Some(c)) => c.state.replace(' ', ""),
        }
    }
}

/// A name no other run uses (two cells never share a VM id, so a late answer cannot be taken
/// for the next cell's).
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Sends `signal` to `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) -> Result<(), String> {
    let pid = libc::pid_t::try_from(pid).map_err(|e| format!("pid {pid}: {e}"))?;
    // SAFETY: kill(2) touches no memory of this process; `pid` is a child this harness spawned
    // and has not reaped (a ChaosDaemon owns its Child until Drop), so it cannot be reused.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("kill({pid}, {signal}): {}", std::io::Error::last_os_error()))
    }
}

/// A directory removed on drop (the cluster key lives there).
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a fresh cluster key of 64 hex characters, mode 0600, and returns its path.
pub fn write_cluster_key(dir: &Path) -> PathBuf {
    // Not a secret worth a CSPRNG: the daemons only need a key they share and nobody else has
    // on this machine for the length of a cell.
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9e37_79b9_7f4a_7c15, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(32);
    let mut key = String::with_capacity(64);
    for _ in 0..4 {
        // xorshift64*: four words of hex.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        key.push_str(&format!("{:016x}", x.wrapping_mul(0x2545_f491_4f6c_dd1d)));
    }
    let path = dir.join("cluster.key");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(key.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// A free loopback port, for a listener whose address the peer must know before it starts
/// (each daemon drains to the other). The port is released before use; another process could
/// take it in between, which would show as a daemon that does not start.
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("cannot find a free port: {e}"))
}

/// How a daemon is started.
#[derive(Debug)]
pub struct DaemonSpec<'a> {
    pub name: &'a str,
    pub listen: SocketAddr,
    pub drain_to: SocketAddr,
    pub key_file: &'a Path,
    /// Where the daemon may keep files (its API token).
    pub dir: &'a Path,
    /// `MIGRATORY_TEST_HOLD` of the process.
    pub hold: &'a str,
}

/// A finished client command.
#[derive(Debug, Clone)]
pub struct Ran {
    pub line: String,
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    /// One line for the table: the command and how it ended.
    pub fn summary(&self) -> String {
        if self.ok {
            format!("{} ok", self.line)
        } else {
            let why = self.stderr.lines().last().unwrap_or("").trim();
            format!("{} FAILED ({why})", self.line)
        }
    }
}

/// One `migratory serve` process, killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct ChaosDaemon {
    pub name: String,
    child: Child,
    /// Where it accepts migrations.
    pub migration_addr: SocketAddr,
    /// Where its control API listens.
    pub api: SocketAddr,
    /// Every stderr line so far, drained by a thread so the pipe never fills.
    stderr: Arc<Mutex<Vec<String>>>,
    exited: bool,
    /// The API's bearer token, where the daemon has one.
    token: Option<String>,
}

impl ChaosDaemon {
    /// Starts the daemon and waits (at most [`TIMEOUT`]) for its ready line.
    pub fn start(spec: &DaemonSpec<'_>) -> Result<ChaosDaemon, String> {
        let listen = spec.listen.to_string();
        let mut cmd = Command::new(bin());
        cmd.args([
            "serve",
            "--listen",
            &listen,
            "--api",
            "127.0.0.1:0",
            "--name",
            spec.name,
        ])
        .arg("--cluster-key-file")
        .arg(spec.key_file);
        if serve_has("--drain-to") {
            cmd.args(["--drain-to", &spec.drain_to.to_string()]);
        }
        // The daemon makes the token file; the harness reads it once the daemon is ready.
        let token_file = serve_has("--api-token-file").then(|| spec.dir.join(format!("api-token-{}", spec.name)));
        if let Some(file) = &token_file {
            cmd.arg("--api-token-file").arg(file);
        }
        cmd.env_remove("MIGRATORY_CLUSTER_KEY")
            .env_remove("MIGRATORY_API_TOKEN_FILE")
            .env("MIGRATORY_TEST_HOLD", spec.hold)
            // The hold line is a warning and the stage lines are info: keep both visible.
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("cannot spawn {cmd:?}: {e}"))?;
        let pipe = child.stderr.take().ok_or("stderr is not piped")?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n') {
                let Ok(line) = line else { return };
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let mut daemon = ChaosDaemon {
            name: spec.name.to_string(),
            child,
            migration_addr: spec.listen,
            api: spec.listen,
            stderr,
            exited: false,
            token: None,
        };
        let prefix = format!("migratory: host {} serving migrations on ", spec.name);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(rest) = daemon.stderr_lines().iter().find_map(|l| l.strip_prefix(&prefix)) {
                daemon.api = parse_ready(rest)?;
                if let Some(file) = &token_file {
                    let token =
                        std::fs::read_to_string(file).map_err(|e| format!("API token {}: {e}", file.display()))?;
                    daemon.token = Some(token.trim().to_string());
                }
                return Ok(daemon);
            }
            if !daemon.is_alive() || Instant::now() >= deadline {
                return Err(format!(
                    "daemon {} did not start; stderr:\n{}",
                    spec.name,
                    daemon.stderr_lines().join("\n")
                ));
            }
            thread::sleep(POLL);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process still runs (a stopped one counts as alive); reaps it once it ended.
    pub fn is_alive(&mut self) -> bool {
        if !self.exited {
            self.exited = !matches!(self.child.try_wait(), Ok(None));
        }
        !self.exited
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The `test hold reached` line for `point`, if the daemon has printed it.
    pub fn hold_line(&self, point: &str) -> Option<String> {
        let quoted = format!("point=\"{point}\"");
        let bare = format!("point={point} ");
        self.stderr_lines()
            .into_iter()
            .find(|l| l.contains("test hold reached") && (l.contains(&quoted) || l.contains(&bare)))
    }

    /// One HTTP/1.1 request to the control API; returns the status code and the body.
    pub fn http(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, String), String> {
        let mut stream = TcpStream::connect_timeout(&self.api, HTTP_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(HTTP_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(HTTP_TIMEOUT)))
            .map_err(|e| format!("socket: {e}"))?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.api,
            body.len()
        );
        stream.write_all(request.as_bytes()).map_err(|e| format!("send: {e}"))?;
        let mut answer = Vec::new();
        // Bounded: a daemon's answer to these requests is small.
        stream
            .take(4 << 20)
            .read_to_end(&mut answer)
            .map_err(|e| format!("read: {e}"))?;
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer.split_once("\r\n\r\n").ok_or("no end of headers")?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        Ok((status, body.to_string()))
    }

    fn get_json(&self, path: &str) -> Result<Value, String> {
        match self.http("GET", path, None)? {
            (200, body) => serde_json::from_str(&body).map_err(|e| format!("{path}: {e}")),
            (status, body) => Err(format!("{path}: {status} {body}")),
        }
    }

    /// What the daemon shows of `vm` now.
    pub fn look(&mut self, vm: &str) -> Seen {
        if !self.is_alive() {
            return Seen::Down;
        }
        match self.get_json("/vms") {
            Ok(Value::Array(vms)) => Seen::Listed(vms.iter().find(|v| v["id"] == vm).map(VmCopy::from_json)),
            Ok(other) => Seen::NoAnswer(format!("/vms is not a list: {other}")),
            Err(e) => Seen::NoAnswer(e),
        }
    }

    /// Whether the daemon has a queued or active migration (`false` when it cannot say).
    pub fn has_live_migration(&mut self) -> bool {
        if !self.is_alive() {
            return false;
        }
        match self.get_json("/migrations") {
            Ok(Value::Array(ms)) => ms
                .iter()
                .any(|m| matches!(m["status"].as_str(), Some("queued" | "active"))),
            _ => false,
        }
    }

    /// `status` of migration `id` (`None` if the daemon cannot say).
    pub fn migration_status(&mut self, id: u64) -> Option<Value> {
        if !self.is_alive() {
            return None;
        }
        self.get_json(&format!("/migrations/{id}")).ok()
    }

    /// Runs the CLI client against this daemon, bounded by [`TIMEOUT`].
    pub fn cli(&self, args: &[&str]) -> Ran {
        let line = format!("{}: migratory {}", self.name, args.join(" "));
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .args(["--api", &format!("http://{}", self.api)])
            .env_remove("MIGRATORY_API")
            .env_remove("MIGRATORY_API_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match &self.token {
            Some(t) => cmd.env("MIGRATORY_API_TOKEN", t),
            None => cmd.env_remove("MIGRATORY_API_TOKEN"),
        };
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Ran {
                    line,
                    ok: false,
                    stdout: String::new(),
                    stderr: format!("cannot spawn: {e}"),
                }
            }
        };
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let out = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
        let err = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
        let deadline = Instant::now() + TIMEOUT;
        let ok = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status.success(),
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break false;
                }
            }
        };
        Ran {
            line,
            ok,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        }
    }
}

impl Drop for ChaosDaemon {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too; an exited one is just reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The API address from the rest of the ready line (`ADDR, API on http://ADDR[, ...]`).
fn parse_ready(rest: &str) -> Result<SocketAddr, String> {
    let api = rest
        .split_once("API on http://")
        .map(|(_, a)| a)
        .ok_or_else(|| format!("no API address in the ready line {rest:?}"))?;
    let api = api
        .split(|c: char| c == ',' || c.is_whitespace() || c == '/')
        .next()
        .unwrap_or("");
    api.parse().map_err(|e| format!("API address {api:?}: {e}"))
}

/// Waits until `probe` returns `Some` or [`TIMEOUT`] passes.
pub fn wait_for<T>(mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_ready_takes_the_api_address() {
        assert_eq!(
            parse_ready("127.0.0.1:7000, API on http://127.0.0.1:8123").unwrap(),
            "127.0.0.1:8123".parse().unwrap()
        );
        assert_eq!(
            parse_ready("127.0.0.1:7000, API on http://127.0.0.1:8123, metrics on http://127.0.0.1:9000").unwrap(),
            "127.0.0.1:8123".parse().unwrap()
        );
    }
}

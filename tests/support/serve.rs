//! Starting a `migratory serve` process and waiting for its ready line, shared by the process
//! tests (`tests/daemon.rs`, `tests/netns.rs`, `tests/kvm.rs`, `tests/api_auth.rs`), and the
//! files a daemon needs: its cluster key and its API token file, in a [`Scratch`] directory of
//! its own.

// Each test binary that includes this file uses a different part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The cluster key of every test daemon that is not testing keys: 32 random bytes as hex, as
/// the daemon demands. Daemons of one test must share it to migrate between them.
pub const TEST_CLUSTER_KEY: &str = "bb6c7bcadfacc9f1d8ed038f325b22bbf18be8bf15b3cccc53b48f635e20d340";

/// A private temporary directory (mode 0700) for one daemon's files, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(prefix: &str) -> Scratch {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "migratory-test-{prefix}-{}-{nanos}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `contents` to `name` with mode 0600; returns its path.
    pub fn private_file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        std::io::Write::write_all(&mut file, contents.as_bytes()).expect("write private file");
        path
    }

    /// The file holding [`TEST_CLUSTER_KEY`].
    pub fn cluster_key(&self) -> PathBuf {
        self.private_file("cluster.key", &format!("{TEST_CLUSTER_KEY}\n"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// What a ready line says after `serving migrations on `: `MIGRATIONS, API on API[, metrics on
/// http://ADDR/metrics]`.
#[derive(Debug)]
pub struct Ready {
    /// The migration listener, `IP:PORT`.
    pub migrations: String,
    /// `http://IP:PORT`, `https://IP:PORT` or `unix:PATH`.
    pub api: String,
    /// `http://IP:PORT` of the metrics listener, when there is one.
    pub metrics: Option<String>,
    /// `IP:PORT` of the `--qemu-incoming` listener, when there is one.
    pub qemu: Option<String>,
}

impl Ready {
    pub fn parse(tail: &str) -> Ready {
        let (tail, qemu) = match tail.split_once(", QEMU migrations on ") {
            Some((head, qemu)) => (head, Some(qemu.to_string())),
            None => (tail, None),
        };
        let (migrations, rest) = tail
            .split_once(", API on ")
            .unwrap_or_else(|| panic!("unexpected ready line tail {tail:?}"));
        let (api, metrics) = match rest.split_once(", metrics on ") {
            Some((api, metrics)) => {
                let base = metrics
                    .strip_suffix("/metrics")
                    .unwrap_or_else(|| panic!("unexpected metrics address in {tail:?}"));
                (api, Some(base.to_string()))
            }
            None => (rest, None),
        };
        assert!(
            api.starts_with("http://") || api.starts_with("https://") || api.starts_with("unix:"),
            "API address {api:?}"
        );
        Ready {
            migrations: migrations.to_string(),
            api: api.to_string(),
            metrics,
            qemu,
        }
    }
}

/// A started daemon: the process, every stderr line so far (drained by a thread so the pipe
/// never fills), and what its ready line says after `serving migrations on `.
pub struct Started {
    pub child: Child,
    pub stderr: Arc<Mutex<Vec<String>>>,
    pub ready: String,
}

/// Spawns `cmd` (a `serve` invocation, possibly wrapped) for host `name` and waits up to
/// `timeout` for its ready line; panics with its stderr if none comes.
pub fn start(mut cmd: Command, name: &str, timeout: Duration) -> Started {
    let mut child = cmd
        .env_remove("MIGRATORY_CLUSTER_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let pipe = child.stderr.take().expect("stderr is piped");
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let (lines_tx, lines) = mpsc::channel::<String>();
    let log = Arc::clone(&stderr);
    thread::spawn(move || {
        let mut pipe = BufReader::new(pipe);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match pipe.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            log.lock().unwrap_or_else(|p| p.into_inner()).push(line.clone());
            // Nobody listens once the ready line was found; keep draining regardless.
            let _ = lines_tx.send(line);
        }
    });
    let prefix = format!("migratory: host {name} serving migrations on ");
    let deadline = Instant::now() + timeout;
    let ready = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix(&prefix) {
                    break rest.to_string();
                }
            }
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "daemon {name} never printed its ready line ({e:?}; exit {status:?}); stderr:\n{}",
                    stderr.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
                );
            }
        }
    };
    Started { child, stderr, ready }
}

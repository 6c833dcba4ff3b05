//! Starting a `migratory serve` process and waiting for its ready line, shared by the process
//! tests (`tests/daemon.rs`, `tests/netns.rs`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

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

//! One `migratory serve` process per [`Daemon`], driven through the CLI client; shared by the
//! test binaries that run real daemons (`#[path]`-included next to `cli.rs` and `serve.rs`).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use super::cli::{wait_until, CliHost, TIMEOUT};
use super::serve::{self, path_str, Ready, Scratch};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_migratory");

/// A name no other test (or earlier run) uses.
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

pub fn send_signal(pid: u32, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) touches no memory of this process; `pid` is a child we spawned and have
    // not reaped yet (Daemon owns the Child until Drop), so the pid cannot have been reused.
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
}

// ---------------------------------------------------------------------------------------------
// Daemons

/// One `migratory serve` process, killed (SIGKILL) and reaped on drop.
pub struct Daemon {
    pub name: String,
    pub child: Child,
    /// Where it accepts migrations.
    pub migration_addr: SocketAddr,
    /// Its control API: `http://IP:PORT` or `unix:PATH`.
    pub api: String,
    /// Base URL of its metrics listener (`--metrics`), if it has one.
    pub metrics: Option<String>,
    /// Its `--qemu-incoming` listener, if it has one.
    pub qemu: Option<String>,
    /// The API token file the CLI is given (`--token-file`) over TCP.
    pub token_file: Option<PathBuf>,
    /// Every stderr line so far, drained by a thread so the pipe never fills.
    pub stderr: Arc<Mutex<Vec<String>>>,
    /// Its key and token files; removed after the process is killed (fields drop after `drop`).
    pub scratch: Scratch,
}

impl Daemon {
    /// Starts `migratory serve` on ephemeral ports and waits for its ready line.
    pub fn start(name: &str, layout: &str, extra: &[&str]) -> Daemon {
        let mut args = vec!["--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--layout", layout];
        args.extend(extra);
        Daemon::launch(name, &args, &[])
    }

    /// Starts `migratory serve --name NAME ARGS` with `env` set, and waits for its ready line.
    /// What `args` leaves out gets the test defaults: `--metrics 127.0.0.1:0`, an
    /// `--api-token-file` in the daemon's scratch directory (the daemon makes it), and the
    /// shared test cluster key unless `--cluster-key-file` or `--insecure-no-auth` is given.
    pub fn launch(name: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let scratch = Scratch::new(name);
        let has = |flag: &str| args.contains(&flag);
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--name", name]).args(args);
        if !has("--metrics") {
            cmd.args(["--metrics", "127.0.0.1:0"]);
        }
        // Where the daemon keeps its token: the flag, else what `env` says, else (a test default)
        // the scratch directory.
        let env_path = |name: &str| env.iter().find(|(k, _)| *k == name).map(|(_, v)| PathBuf::from(v));
        let token_file = if has("--api-token-file") {
            args.iter()
                .position(|a| *a == "--api-token-file")
                .and_then(|i| args.get(i + 1))
                .map(PathBuf::from)
        } else if let Some(file) = env_path("MIGRATORY_API_TOKEN_FILE") {
            Some(file)
        } else if let Some(home) = env_path("HOME") {
            Some(home.join(".migratory").join("api-token"))
        } else {
            let path = scratch.path("api-token");
            cmd.args(["--api-token-file", path_str(&path)]);
            Some(path)
        };
        if !has("--cluster-key-file") && !has("--insecure-no-auth") {
            cmd.args(["--cluster-key-file", path_str(&scratch.cluster_key())]);
        }
        // Only what the test says decides: nothing from the runner's environment.
        cmd.env_remove("MIGRATORY_API_TOKEN_FILE");
        cmd.envs(env.iter().copied());
        let serve::Started { child, stderr, ready } = serve::start(cmd, name, TIMEOUT);
        let ready = Ready::parse(&ready);
        let migration_addr = ready
            .migrations
            .parse()
            .unwrap_or_else(|e| panic!("migration address {:?}: {e}", ready.migrations));
        let token_file = token_file.filter(|_| ready.api.starts_with("http://"));
        Daemon {
            name: name.to_string(),
            child,
            migration_addr,
            api: ready.api,
            metrics: ready.metrics,
            qemu: ready.qemu,
            token_file,
            stderr,
            scratch,
        }
    }

    /// Base URL of the metrics listener; panics if the daemon has none.
    pub fn metrics_url(&self) -> &str {
        self.metrics
            .as_deref()
            .unwrap_or_else(|| panic!("daemon {} serves no metrics", self.name))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: libc::c_int) {
        send_signal(self.pid(), signal);
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap_or_else(|p| p.into_inner()).join("\n")
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let name = self.name.clone();
        wait_until(&format!("daemon {name} to exit"), timeout, || {
            match self.child.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".into()),
                Err(e) => Err(format!("try_wait: {e}")),
            }
        })
    }

    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident memory in bytes, from /proc/PID/statm.
    pub fn resident_bytes(&self) -> u64 {
        let statm = std::fs::read_to_string(format!("/proc/{}/statm", self.pid())).expect("read statm");
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("malformed statm {statm:?}"));
        // SAFETY: sysconf only reads a configuration value.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        pages * u64::try_from(page_size).expect("positive page size")
    }

    /// Creates a VM with a running writer and waits until the writer has stored something.
    pub fn create_vm(&self, id: &str, memory: &str) {
        let run = self.cli(&[
            "vm",
            "create",
            id,
            "--memory",
            memory,
            "--dirty-rate",
            "20MB",
            "--working-set",
            "2MiB",
        ]);
        run.assert_success();
        let expected = format!("created VM {id}: running, ");
        assert!(run.stdout.starts_with(&expected), "{}", run.describe());
        wait_until(
            &format!("the writer of {id} on {}", self.name),
            TIMEOUT,
            || match self.vm(id) {
                Some(vm) if vm["writes"].as_u64().unwrap_or(0) > 0 => Ok(()),
                other => Err(format!("{other:?}")),
            },
        );
    }

    /// Waits until the migration is active and has put bytes on the link.
    pub fn wait_moving(&self, id: u64) -> Value {
        wait_until(&format!("migration {id} to move bytes"), TIMEOUT, || {
            let s = self.status(id);
            if s["status"] == "active" && s["transferred_bytes"].as_u64().unwrap_or(0) > 0 {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        })
    }
}

impl CliHost for Daemon {
    fn name(&self) -> &str {
        &self.name
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(args).args(["--api", &self.api]);
        if let Some(token) = &self.token_file {
            cmd.args(["--token-file", path_str(token)]);
        }
        cmd
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGKILL works on a stopped process too; an already exited one just gets reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

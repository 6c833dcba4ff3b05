//! Driving a `migratory serve` daemon through the CLI client, shared by the process tests
//! (`tests/daemon.rs`, `tests/netns.rs`, `tests/kvm.rs`, `tests/api_auth.rs`). They differ only in how the client is launched
//! (directly, or through `ip netns exec`), which is what [`CliHost::command`] says; the rest of
//! the conversation with a daemon is the same and lives here.

// Each test binary that includes this file uses a different part of it.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The bound on every wait unless a test states its own.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// How often a condition is re-checked.
const POLL: Duration = Duration::from_millis(50);

/// Re-checks `probe` every [`POLL`] until it returns `Ok` or `timeout` passes; then panics with
/// what was being waited for and the probe's last description of what it saw.
pub fn wait_until<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => thread::sleep(POLL),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Runs of a command

/// A finished command.
pub struct Run {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited {}\n--- stdout:\n{}--- stderr:\n{}",
            self.what, self.status, self.stdout, self.stderr
        )
    }

    pub fn assert_success(&self) {
        assert!(self.status.success(), "{}", self.describe());
    }
}

/// A command still running, its output drained by two threads so neither pipe can fill.
pub struct PendingRun {
    what: String,
    child: Child,
    stdout: thread::JoinHandle<String>,
    stderr: thread::JoinHandle<String>,
}

impl PendingRun {
    pub fn spawn(mut cmd: Command) -> std::io::Result<PendingRun> {
        let what = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let drain = |mut pipe: Box<dyn Read + Send>| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let stdout = drain(Box::new(child.stdout.take().expect("stdout is piped")));
        let stderr = drain(Box::new(child.stderr.take().expect("stderr is piped")));
        Ok(PendingRun {
            what,
            child,
            stdout,
            stderr,
        })
    }

    /// Waits (at most [`TIMEOUT`]) for the process to exit and collects its output.
    pub fn finish(mut self) -> Run {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(POLL / 5),
                outcome => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "`{}` did not exit within {TIMEOUT:?} ({outcome:?}); stderr: {}",
                        self.what,
                        self.stderr.join().unwrap_or_default()
                    );
                }
            }
        };
        Run {
            what: self.what,
            status,
            stdout: self.stdout.join().unwrap_or_default(),
            stderr: self.stderr.join().unwrap_or_default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The CLI against one daemon

/// A daemon that the CLI client can reach.
pub trait CliHost {
    /// The daemon's `--name`, for messages.
    fn name(&self) -> &str;

    /// The command line that runs the client with `args` against this daemon's API.
    fn command(&self, args: &[&str]) -> Command;

    /// Runs a client subcommand against this daemon.
    fn cli(&self, args: &[&str]) -> Run {
        self.spawn_cli(args).finish()
    }

    /// Starts a client subcommand against this daemon without waiting for it.
    fn spawn_cli(&self, args: &[&str]) -> PendingRun {
        let mut cmd = self.command(args);
        // `--api` and `--token-file` decide, whatever the environment of the test runner says.
        for var in ["MIGRATORY_API", "MIGRATORY_API_TOKEN", "MIGRATORY_API_TOKEN_FILE"] {
            cmd.env_remove(var);
        }
        let what = format!("{cmd:?}");
        PendingRun::spawn(cmd).unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"))
    }

    /// `vm list --json`.
    fn vms(&self) -> Vec<Value> {
        let run = self.cli(&["vm", "list", "--json"]);
        run.assert_success();
        match serde_json::from_str(&run.stdout) {
            Ok(Value::Array(vms)) => vms,
            other => panic!("vm list --json is not a JSON array ({other:?}): {}", run.describe()),
        }
    }

    fn vm(&self, id: &str) -> Option<Value> {
        self.vms().into_iter().find(|v| v["id"] == id)
    }

    /// Asserts the VM is on this host, running, in `layout`.
    fn assert_runs(&self, id: &str, layout: &str) {
        let vms = self.vms();
        let name = self.name();
        let vm = vms
            .iter()
            .find(|v| v["id"] == id)
            .unwrap_or_else(|| panic!("VM {id} is not on {name}; its VMs: {vms:?}"));
        assert_eq!(vm["state"], "running", "VM {id} on {name}: {vm}");
        assert_eq!(vm["layout"], layout, "VM {id} on {name}: {vm}");
    }

    /// Starts a migration of `vm` to the migration address `to` without `--wait`; returns its
    /// id.
    fn start_migration(&self, vm: &str, to: impl std::fmt::Display, extra: &[&str]) -> u64 {
        let to = to.to_string();
        let mut args = vec!["migrate", vm, "--to", &to];
        args.extend(extra);
        let run = self.cli(&args);
        run.assert_success();
        parse_started(&run)
    }

    /// `status ID --json`.
    fn status(&self, id: u64) -> Value {
        let run = self.cli(&["status", &id.to_string(), "--json"]);
        run.assert_success();
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {}", run.describe()))
    }

    /// Polls the migration's status until it has ended; returns the final status.
    fn wait_finished(&self, id: u64, timeout: Duration) -> Value {
        wait_until(&format!("migration {id} on {} to end", self.name()), timeout, || {
            let s = self.status(id);
            if is_finished(&s) {
                Ok(s)
            } else {
                Err(s.to_string())
            }
        })
    }
}

/// Whether a `status --json` answer is final.
pub fn is_finished(status: &Value) -> bool {
    !matches!(status["status"].as_str(), Some("queued" | "active"))
}

/// `migration N started: ...` -> N.
pub fn parse_started(run: &Run) -> u64 {
    run.stdout
        .strip_prefix("migration ")
        .and_then(|rest| rest.split_once(" started: "))
        .and_then(|(id, _)| id.parse().ok())
        .unwrap_or_else(|| panic!("no migration id in the output: {}", run.describe()))
}

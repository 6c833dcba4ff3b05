//! The operator's commands: `vm resume`, `vm discard`, `migrate --recover`, `drain`,
//! `shutdown`. Each says what happened in one line, and a refusal says why (the daemon's
//! words, e.g. what the peer answered the fence).

use std::thread;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use migratory::format::check_name;
use migratory::protocol::Algorithm;

use super::client::{path_segment, require_success, ApiClient};
use super::commands::{decode, CommandError};
use super::ApiArgs;

/// `migratory drain`.
#[derive(Debug, clap::Args)]
pub struct DrainArgs {
    /// Peers' migration listeners to move the VMs to (HOST:PORT; comma-separated or repeated).
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',', required = true)]
    pub to: Vec<String>,
    /// The algorithm each move uses.
    #[arg(long, default_value = "auto")]
    pub algorithm: Algorithm,
    /// Poll until the evacuation ends and print what moved and what stayed; non-zero exit if
    /// any VM stayed.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

pub(super) fn resume(client: &ApiClient, id: &str, peer_is_dead: bool) -> Result<String, CommandError> {
    check_name("VM id", id)?;
    let path = format!("/vms/{}/resume", path_segment(id));
    let vm: Value = require_success(client.post(&path, Some(&json!({ "peer_is_dead": peer_is_dead })))?)?;
    let state = vm.get("state").and_then(Value::as_str).unwrap_or("?");
    Ok(format!("VM {} resumed here ({state})\n", id.escape_debug()))
}

pub(super) fn discard(client: &ApiClient, id: &str) -> Result<String, CommandError> {
    check_name("VM id", id)?;
    let path = format!("/vms/{}/discard", path_segment(id));
    require_success(client.post(&path, None)?)?;
    Ok(format!("VM {} discarded\n", id.escape_debug()))
}

#[derive(Debug, Deserialize)]
struct Started {
    id: u64,
}

/// Starts the recovery run; returns its migration id.
pub(super) fn recover(client: &ApiClient, vm: &str, to: Option<&str>) -> Result<u64, CommandError> {
    check_name("VM id", vm)?;
    let path = format!("/vms/{}/recover", path_segment(vm));
    let body = match to {
        Some(to) => json!({ "to": to }),
        None => json!({}),
    };
    let started: Started = decode("migration id", require_success(client.post(&path, Some(&body))?)?)?;
    Ok(started.id)
}

#[derive(Debug, Deserialize)]
struct DrainView {
    running: bool,
    #[serde(default)]
    moved: Vec<Value>,
    #[serde(default)]
    stayed: Vec<Value>,
    error: Option<String>,
}

pub(super) fn drain(client: &ApiClient, args: &DrainArgs, poll: Duration) -> Result<String, CommandError> {
    let body = json!({ "to": args.to, "algorithm": args.algorithm.name() });
    require_success(client.post("/drain", Some(&body))?)?;
    if !args.wait {
        return Ok(format!("evacuation to {} started\n", args.to.join(", ")));
    }
    let view = loop {
        let view: DrainView = decode("evacuation status", require_success(client.get("/drain", None)?)?)?;
        if !view.running {
            break view;
        }
        thread::sleep(poll);
    };
    let mut out = String::new();
    for m in &view.moved {
        out.push_str(&format!(
            "moved {} to {}\n",
            m.get("vm").and_then(Value::as_str).unwrap_or("?"),
            m.get("to").and_then(Value::as_str).unwrap_or("?")
        ));
    }
    for s in &view.stayed {
        out.push_str(&format!(
            "stayed {}: {}\n",
            s.get("vm").and_then(Value::as_str).unwrap_or("?"),
            s.get("why").and_then(Value::as_str).unwrap_or("?")
        ));
    }
    if let Some(e) = &view.error {
        return Err(CommandError::Incomplete {
            what: format!("evacuation failed: {e}"),
            summary: out,
        });
    }
    if !view.stayed.is_empty() {
        return Err(CommandError::Incomplete {
            what: format!("{} VM(s) stayed", view.stayed.len()),
            summary: out,
        });
    }
    Ok(out)
}

pub(super) fn shutdown(client: &ApiClient, force: bool) -> Result<String, CommandError> {
    require_success(client.post("/shutdown", Some(&json!({ "force": force })))?)?;
    Ok(if force {
        "forced shutdown requested: VMs still here are destroyed\n".into()
    } else {
        "shutdown requested\n".into()
    })
}

//! The operator's commands: `vm resume`, `vm discard`, `migrate --recover`, `drain`,
//! `shutdown`. Each says what happened in one line, and a refusal says why (the daemon's
//! words, e.g. what the peer answered the fence).

use std::thread;
use std::time::Duration;

use migratory::api;
use migratory::format::check_name;
use migratory::protocol::Algorithm;

use super::client::{path_segment, require_success, ApiClient};
use super::commands::{clean, decode, post, CommandError};
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
    let vm: api::Vm = post(client, &path, &api::ResumeVm { peer_is_dead }, "VM")?;
    Ok(format!(
        "VM {} resumed here ({})\n",
        id.escape_debug(),
        clean(&vm.state)
    ))
}

pub(super) fn discard(client: &ApiClient, id: &str) -> Result<String, CommandError> {
    check_name("VM id", id)?;
    let path = format!("/vms/{}/discard", path_segment(id));
    require_success(client.post(&path, None)?)?;
    Ok(format!("VM {} discarded\n", id.escape_debug()))
}

/// Starts the recovery run; returns its migration id.
pub(super) fn recover(client: &ApiClient, vm: &str, to: Option<&str>) -> Result<u64, CommandError> {
    check_name("VM id", vm)?;
    let path = format!("/vms/{}/recover", path_segment(vm));
    let body = api::RecoverVm {
        to: to.map(str::to_string),
    };
    let started: api::MigrationStarted = post(client, &path, &body, "migration id")?;
    Ok(started.id)
}

pub(super) fn drain(client: &ApiClient, args: &DrainArgs, poll: Duration) -> Result<String, CommandError> {
    let body = api::StartDrain {
        to: args.to.clone(),
        algorithm: Some(args.algorithm.name().to_string()),
    };
    let _: api::DrainStarted = post(client, "/drain", &body, "evacuation start")?;
    if !args.wait {
        return Ok(format!("evacuation to {} started\n", args.to.join(", ")));
    }
    let view = loop {
        let view: api::DrainStatus = decode("evacuation status", require_success(client.get("/drain", None)?)?)?;
        if !view.running {
            break view;
        }
        thread::sleep(poll);
    };
    let mut out = String::new();
    for m in &view.moved {
        out.push_str(&format!("moved {} to {}\n", clean(&m.vm), m.to));
    }
    for s in &view.stayed {
        out.push_str(&format!("stayed {}: {}\n", clean(&s.vm), clean(&s.why)));
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
    let _: api::ShutdownStarted = post(client, "/shutdown", &api::Shutdown { force }, "shutdown answer")?;
    Ok(if force {
        "forced shutdown requested: VMs still here are destroyed\n".into()
    } else {
        "shutdown requested\n".into()
    })
}

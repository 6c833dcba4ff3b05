//! What each client subcommand sends to the daemon and how its answer is printed.
//!
//! Every command returns the text for stdout instead of printing it, so `run_client` owns the
//! output streams and the tests read exactly what a user would see. Requests and answers are
//! the bodies of [`migratory::api`]; a figure an answer lacks is shown as `-`, and `--json`
//! passes the daemon's answer through untouched.

use std::fmt;
use std::thread;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use migratory::api::{self, MigrationStatusView, Phase};
use migratory::format::check_name;
use migratory::units::ByteSize;

use super::client::{path_segment, require_success, ApiClient, ClientError};
use super::{operator, ApiArgs, ClientCommand, CreateVmArgs, MigrateArgs, VmAction};

/// How often `migrate --wait` asks for the migration's status.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The request failed or the daemon refused it.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The API token could not be read.
    #[error(transparent)]
    Token(#[from] super::token::TokenError),
    /// The client's TLS files could not be read.
    #[error(transparent)]
    Tls(#[from] migratory::link::tls::TlsError),
    /// A VM id the daemon would refuse; caught before anything is sent.
    #[error(transparent)]
    InvalidName(#[from] migratory::format::NameError),
    /// A 2xx answer whose JSON does not have the expected shape.
    #[error("unexpected {what} from the daemon")]
    UnexpectedResponse {
        /// What the answer should have been.
        what: &'static str,
        /// How it differs.
        #[source]
        source: serde_json::Error,
    },
    /// `migrate --wait` saw the migration end other than completed.
    #[error("migration {id} ended {status}{}", error_suffix(.error))]
    NotCompleted {
        /// The migration.
        id: u64,
        /// How it ended.
        status: Phase,
        /// The daemon's reason, if it gave one.
        error: Option<String>,
        /// The final status line, still owed to stdout.
        summary: String,
    },
    /// An operator command that did only part of its work.
    #[error("{what}")]
    Incomplete {
        /// What is missing.
        what: String,
        /// What it did, still owed to stdout.
        summary: String,
    },
}

impl CommandError {
    /// Text that belongs on stdout even though the command failed.
    pub fn stdout(&self) -> Option<&str> {
        match self {
            CommandError::NotCompleted { summary, .. } | CommandError::Incomplete { summary, .. } => Some(summary),
            _ => None,
        }
    }
}

fn error_suffix(error: &Option<String>) -> String {
    error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
}

/// Runs `cmd` and returns what to print on stdout.
pub fn execute(cmd: ClientCommand) -> Result<String, CommandError> {
    match cmd {
        ClientCommand::Vm {
            action: VmAction::Create(args),
        } => create_vm(&connect(&args.api)?, &args),
        ClientCommand::Vm {
            action: VmAction::List { json, api },
        } => list_vms(&connect(&api)?, json),
        ClientCommand::Vm {
            action: VmAction::Delete { id, api },
        } => delete_vm(&connect(&api)?, &id),
        ClientCommand::Vm {
            action: VmAction::Resume { id, peer_is_dead, api },
        } => operator::resume(&connect(&api)?, &id, peer_is_dead),
        ClientCommand::Vm {
            action: VmAction::Discard { id, api },
        } => operator::discard(&connect(&api)?, &id),
        ClientCommand::Migrate(args) => migrate(&connect(&args.api)?, &args, POLL_INTERVAL),
        ClientCommand::Status { id, json, api } => status(&connect(&api)?, id, json),
        ClientCommand::Cancel { id, api } => cancel(&connect(&api)?, id),
        ClientCommand::Drain(args) => operator::drain(&connect(&args.api)?, &args, POLL_INTERVAL),
        ClientCommand::Shutdown { force, api } => operator::shutdown(&connect(&api)?, force),
    }
}

fn connect(api: &ApiArgs) -> Result<ApiClient, CommandError> {
    let client = ApiClient::new(&api.base_url())?.with_tls(api.tls()?);
    // Over mutual TLS the client certificate is the credential; a token is sent only when
    // one is configured by name (flag or variable), not from the default file.
    let token = api.token(client.is_unix() || client.is_tls())?;
    Ok(client.with_token(token))
}

pub(super) fn decode<T: DeserializeOwned>(what: &'static str, value: Value) -> Result<T, CommandError> {
    serde_json::from_value(value).map_err(|source| CommandError::UnexpectedResponse { what, source })
}

/// `POST path` with `body`; the 2xx answer decoded as `T`, which `what` names in errors.
pub(super) fn post<T: DeserializeOwned>(
    client: &ApiClient,
    path: &str,
    body: &impl Serialize,
    what: &'static str,
) -> Result<T, CommandError> {
    // The API's bodies are plain structs of strings, numbers and flags, which always encode.
    let body = serde_json::to_value(body).expect("an API request body encodes as JSON");
    decode(what, require_success(client.post(path, Some(&body))?)?)
}

fn create_vm(client: &ApiClient, args: &CreateVmArgs) -> Result<String, CommandError> {
    check_name("VM id", &args.id)?;
    let body = api::CreateVm {
        id: args.id.clone(),
        memory_bytes: args.memory.0,
        vcpus: args.vcpus,
        dirty_rate_bytes_per_sec: args.dirty_rate.0,
        working_set_bytes: args.working_set.0,
        pattern: Some(args.pattern.to_string()),
    };
    let vm: api::Vm = post(client, "/vms", &body, "VM")?;
    Ok(format!(
        "created VM {}: {}, {}, {} vCPUs, layout {}\n",
        clean(&vm.id),
        clean(&vm.state),
        ByteSize(vm.memory_bytes),
        vm.vcpus,
        clean(&vm.layout),
    ))
}

fn list_vms(client: &ApiClient, raw: bool) -> Result<String, CommandError> {
    let value = require_success(client.get("/vms", None)?)?;
    if raw {
        return Ok(format!("{value:#}\n"));
    }
    let vms: Vec<api::Vm> = decode("VM list", value)?;
    if vms.is_empty() {
        return Ok("no VMs\n".to_string());
    }
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            vec![
                clean(&vm.id),
                clean(&vm.state),
                ByteSize(vm.memory_bytes).to_string(),
                vm.vcpus.to_string(),
                clean(&vm.layout),
                opt(vm.writes),
                opt(vm.verify_passes),
                opt(vm.integrity_errors),
            ]
        })
        .collect();
    Ok(render_table(
        &[
            ("id", Align::Left),
            ("state", Align::Left),
            ("memory", Align::Right),
            ("vcpus", Align::Right),
            ("layout", Align::Left),
            ("writes", Align::Right),
            ("verified", Align::Right),
            ("bad pages", Align::Right),
        ],
        &rows,
    ))
}

fn delete_vm(client: &ApiClient, id: &str) -> Result<String, CommandError> {
    check_name("VM id", id)?;
    require_success(client.delete(&format!("/vms/{}", path_segment(id)), None)?)?;
    Ok(format!("deleted VM {}\n", clean(id)))
}

fn migrate(client: &ApiClient, args: &MigrateArgs, poll: Duration) -> Result<String, CommandError> {
    check_name("VM id", &args.vm)?;
    if args.recover {
        let id = operator::recover(client, &args.vm, args.to.as_deref())?;
        if !args.wait {
            return Ok(format!("migration {id} started: recovery of {}\n", clean(&args.vm)));
        }
        return finish_waiting(client, args, id, poll);
    }
    if let Some(addr) = args.to_qemu {
        return migrate_to_qemu(client, args, addr);
    }
    let to = args.to.clone().unwrap_or_default();
    // What the user did not give stays out, so the daemon's own defaults apply.
    let body = api::StartMigration {
        algorithm: Some(args.algorithm.name().to_string()),
        streams: Some(args.streams),
        bandwidth_bytes_per_sec: args.bandwidth.map(|b| b.0),
        downtime_limit_ms: Some(args.downtime_limit_ms),
        verify: args.verify.map(|v| v.name().to_string()),
        recovery_timeout_s: Some(args.recovery_timeout),
        faults: args.fault.clone(),
        compression: args.compression.map(|c| c.name().to_string()),
        xbzrle_cache_bytes: args.xbzrle_cache.map(|size| size.0),
        priority: args.priority.map(|p| p.name().to_string()),
        min_bandwidth_bytes_per_sec: args.min_bandwidth.map(|rate| rate.0),
        announce_rounds: args.announce_rounds,
        announce_initial_ms: args.announce_initial_ms,
        announce_max_ms: args.announce_max_ms,
        announce_step_ms: args.announce_step_ms,
        seed: args.seed,
        deadline_s: args.deadline,
        ..api::StartMigration::new(args.vm.clone(), to.clone())
    };
    let started: api::MigrationStarted = post(client, "/migrations", &body, "migration id")?;
    if !args.wait {
        return Ok(format!(
            "migration {} started: {} -> {} ({})\n",
            started.id,
            clean(&args.vm),
            to,
            args.algorithm
        ));
    }
    finish_waiting(client, args, started.id, poll)
}

/// How long `migrate --to-qemu` waits for the daemon's answer, which comes when the migration
/// has ended.
const TO_QEMU_TIMEOUT: Duration = Duration::from_secs(3600);

/// `--to-qemu`: the daemon moves the VM and answers at the end.
fn migrate_to_qemu(client: &ApiClient, args: &MigrateArgs, addr: std::net::SocketAddr) -> Result<String, CommandError> {
    let body = api::ToQemu {
        addr: addr.to_string(),
        machine: Some(args.qemu_machine.clone()),
        accel: Some(args.qemu_accel.clone()),
        algorithm: Some(args.algorithm.name().to_string()),
        downtime_limit_ms: Some(args.downtime_limit_ms),
    };
    let client = client.clone().with_timeout(TO_QEMU_TIMEOUT);
    let path = format!("/vms/{}/to-qemu", path_segment(&args.vm));
    let leg: api::QemuLeg = post(&client, &path, &body, "QEMU migration report")?;
    if args.json {
        return Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&leg).unwrap_or_else(|_| "null".into())
        ));
    }
    Ok(format!(
        "migrated {} to QEMU at {addr}: {} rounds, {:.1} MB, downtime {:.1} ms, total {:.0} ms\n",
        clean(&args.vm),
        leg.rounds,
        leg.stream_bytes as f64 / 1e6,
        leg.downtime_ms,
        leg.total_ms
    ))
}

/// `--wait`: polls migration `id` to its end and prints its summary (or report).
fn finish_waiting(client: &ApiClient, args: &MigrateArgs, id: u64, poll: Duration) -> Result<String, CommandError> {
    let last = wait_until_finished(client, id, poll)?;
    let summary = if args.json {
        let report = last.report.clone().unwrap_or(Value::Null);
        format!(
            "{}\n",
            serde_json::to_string_pretty(&report).unwrap_or_else(|_| "null".into())
        )
    } else {
        format!("{}\n", summary_line(&last))
    };
    if last.status == Phase::Completed {
        Ok(summary)
    } else {
        Err(CommandError::NotCompleted {
            id: last.id,
            status: last.status,
            error: last.error,
            summary,
        })
    }
}

fn get_status(client: &ApiClient, id: u64) -> Result<MigrationStatusView, CommandError> {
    decode(
        "migration status",
        require_success(client.get(&format!("/migrations/{id}"), None)?)?,
    )
}

/// Polls until the migration is completed, cancelled, aborted or failed. No deadline of its own:
/// a migration may legitimately run for hours, and each request has the client's timeout.
fn wait_until_finished(client: &ApiClient, id: u64, poll: Duration) -> Result<MigrationStatusView, CommandError> {
    let progress = crate::progress::Progress::new();
    loop {
        let status = match get_status(client, id) {
            Ok(s) => s,
            Err(e) => {
                progress.finish();
                return Err(e);
            }
        };
        if !matches!(status.status, Phase::Queued | Phase::Active) {
            progress.finish();
            return Ok(status);
        }
        progress.show(&crate::progress::Snapshot {
            stage: status.stage.clone(),
            round: status.round.map_or(0, u64::from),
            transferred_bytes: status.transferred_bytes.unwrap_or(0),
            remaining_pages: status.remaining_pages.unwrap_or(0),
            throughput_bytes_per_sec: status.throughput_bytes_per_sec.unwrap_or(0.0),
            expected_downtime_s: status.expected_downtime_s.unwrap_or(0.0),
        });
        thread::sleep(poll);
    }
}

/// What the report says of `random`'s pick and of a deadline, for the summary line.
fn qos_summary(report: Option<&Value>) -> String {
    let Some(r) = report else { return String::new() };
    let mut out = String::new();
    if let (Some(seed), Some(algorithm)) = (
        r.get("seed").and_then(Value::as_u64),
        r.get("algorithm").and_then(Value::as_str),
    ) {
        out.push_str(&format!(", random picked {} (seed {seed})", clean(algorithm)));
    }
    if let Some(met) = r.get("deadline_met").and_then(Value::as_bool) {
        let margin = r.get("deadline_margin_s").and_then(Value::as_f64).unwrap_or(0.0);
        out.push_str(&if met {
            format!(", deadline met with {margin:.3} s to spare")
        } else {
            format!(", deadline MISSED by {:.3} s", -margin)
        });
    }
    out
}

/// One line saying how a migration ended, with the report's figures when the daemon sent one.
fn summary_line(s: &MigrationStatusView) -> String {
    let mut line = format!(
        "migration {} {}: {} -> {}",
        s.id,
        s.status,
        opt(s.vm.as_deref()),
        opt(s.to.as_deref())
    );
    if let Some(algorithm) = &s.algorithm {
        line.push_str(&format!(" ({})", clean(algorithm)));
    }
    if let Some(round) = s.round {
        line.push_str(&format!(", {round} round{}", if round == 1 { "" } else { "s" }));
    }
    if let Some(bytes) = s.transferred_bytes {
        line.push_str(&format!(", {} MiB sent", mib(bytes)));
    }
    let report_f64 = |key| s.report.as_ref().and_then(|r| r.get(key)).and_then(Value::as_f64);
    if let Some(downtime_s) = report_f64("downtime_s") {
        line.push_str(&format!(", downtime {:.1} ms", downtime_s * 1e3));
    }
    if let Some(total_s) = report_f64("total_s") {
        line.push_str(&format!(", total {total_s:.3} s"));
    }
    line.push_str(&qos_summary(s.report.as_ref()));
    if let Some(verified) = s
        .report
        .as_ref()
        .and_then(|r| r.get("verified"))
        .and_then(Value::as_bool)
    {
        line.push_str(if verified { ", verified" } else { ", NOT verified" });
    }
    if let Some(error) = &s.error {
        line.push_str(&format!(": {}", clean(error)));
    }
    line
}

fn status(client: &ApiClient, id: Option<u64>, raw: bool) -> Result<String, CommandError> {
    let value = match id {
        Some(id) => require_success(client.get(&format!("/migrations/{id}"), None)?)?,
        None => require_success(client.get("/migrations", None)?)?,
    };
    if raw {
        return Ok(format!("{value:#}\n"));
    }
    let migrations: Vec<MigrationStatusView> = match id {
        Some(_) => vec![decode("migration status", value)?],
        None => decode("migration list", value)?,
    };
    if migrations.is_empty() {
        return Ok("no migrations\n".to_string());
    }
    let rows: Vec<Vec<String>> = migrations
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                opt(m.vm.as_deref()),
                m.status.to_string(),
                opt(m.stage.as_deref()),
                opt(m.round),
                m.transferred_bytes.map_or_else(|| "-".to_string(), mib),
                opt(m.remaining_pages),
                m.throughput_bytes_per_sec
                    .map_or_else(|| "-".to_string(), |b| format!("{:.1}", b / 1e6)),
                m.expected_downtime_s
                    .map_or_else(|| "-".to_string(), |s| format!("{:.1}", s * 1e3)),
            ]
        })
        .collect();
    let mut out = render_table(
        &[
            ("id", Align::Right),
            ("vm", Align::Left),
            ("status", Align::Left),
            ("stage", Align::Left),
            ("round", Align::Right),
            ("sent MiB", Align::Right),
            ("remaining pages", Align::Right),
            ("MB/s", Align::Right),
            ("exp. downtime ms", Align::Right),
        ],
        &rows,
    );
    for m in &migrations {
        if let Some(error) = &m.error {
            out.push_str(&format!("migration {}: {}\n", m.id, clean(error)));
        }
    }
    Ok(out)
}

fn cancel(client: &ApiClient, id: u64) -> Result<String, CommandError> {
    require_success(client.post(&format!("/migrations/{id}/cancel"), None)?)?;
    Ok(format!("cancel requested for migration {id}\n"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

/// Daemon text with control characters blanked, so a hostile or odd name cannot break the table.
pub(super) fn clean(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// The value, or `-` when the daemon sent none.
fn opt<T: fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_string(), |v| clean(&v.to_string()))
}

#[derive(Debug, Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Columns padded to their widest cell, two spaces apart, header first.
fn render_table(columns: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = columns.iter().map(|(name, _)| name.to_string()).collect();
    let mut widths: Vec<usize> = vec![0; columns.len()];
    for row in std::iter::once(&header).chain(rows) {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(columns)
            .zip(&widths)
            .map(|((cell, (_, align)), &width)| match align {
                Align::Left => format!("{cell:<width$}"),
                Align::Right => format!("{cell:>width$}"),
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::client::test_server::{json_response, FakeServer};
    use super::*;
    use migratory::api::Phase as MigrationState;
    use migratory::protocol::Algorithm;
    use migratory::vmm::Pattern;
    use serde_json::json;

    fn api(server: &FakeServer) -> ApiArgs {
        ApiArgs {
            api: Some(server.url()),
            token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
        }
    }

    fn migrate_args(server: &FakeServer, wait: bool) -> MigrateArgs {
        MigrateArgs {
            vm: "vm1".to_string(),
            to: Some("127.0.0.1:7001".to_string()),
            to_qemu: None,
            qemu_machine: "pc-i440fx-7.2".to_string(),
            qemu_accel: "kvm".to_string(),
            recover: false,
            algorithm: Algorithm::Precopy,
            streams: 2,
            bandwidth: None,
            downtime_limit_ms: 300.0,
            verify: None,
            wait,
            json: false,
            fault: None,
            recovery_timeout: 60.0,
            compression: None,
            xbzrle_cache: None,
            priority: None,
            min_bandwidth: None,
            announce_rounds: None,
            announce_initial_ms: None,
            announce_max_ms: None,
            announce_step_ms: None,
            seed: None,
            deadline: None,
            api: api(server),
        }
    }

    fn sent_json(server: &FakeServer) -> (String, Value) {
        let seen = server.next_request();
        let line = seen.head.lines().next().unwrap_or_default().to_string();
        let body = if seen.body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&seen.body).expect("the client sent JSON")
        };
        (line, body)
    }

    const STATUS_ACTIVE: &str = r#"{"id": 3, "vm": "vm1", "to": "127.0.0.1:7001", "algorithm": "precopy",
        "status": "active", "stage": "precopy", "round": 2, "transferred_bytes": 157286400,
        "remaining_pages": 1200, "dirty_pages_per_sec": 10.0, "throughput_bytes_per_sec": 1250000000.0,
        "expected_downtime_s": 0.0123, "error": null, "report": null}"#;

    #[test]
    fn test_vm_create_sends_the_spec_and_prints_the_vm() {
        let server = FakeServer::start(vec![json_response(
            201,
            r#"{"id": "vm1", "state": "running", "memory_bytes": 268435456, "vcpus": 2, "layout": "kvm", "writes": null}"#,
        )]);
        let cmd = ClientCommand::Vm {
            action: VmAction::Create(CreateVmArgs {
                id: "vm1".to_string(),
                memory: ByteSize(256 << 20),
                vcpus: 2,
                dirty_rate: ByteSize(0),
                working_set: ByteSize(64 << 20),
                pattern: Pattern::HotSet,
                api: api(&server),
            }),
        };
        let out = execute(cmd).unwrap();
        assert_eq!(out, "created VM vm1: running, 256.0 MiB, 2 vCPUs, layout kvm\n");
        let (line, body) = sent_json(&server);
        assert_eq!(line, "POST /vms HTTP/1.1");
        assert_eq!(
            body,
            json!({"id": "vm1", "memory_bytes": 268435456, "vcpus": 2, "dirty_rate_bytes_per_sec": 0,
                   "working_set_bytes": 67108864, "pattern": "hot-set"})
        );
    }

    #[test]
    fn test_vm_list_prints_an_aligned_table_or_raw_json() {
        let list = r#"[{"id": "vm1", "state": "running", "memory_bytes": 268435456, "vcpus": 1, "layout": "kvm", "writes": 0, "verify_passes": 12, "integrity_errors": 0},
                       {"id": "big-vm", "state": "paused", "memory_bytes": 4294967296, "vcpus": 16, "layout": "xen-hvm", "writes": 1234567}]"#;
        let server = FakeServer::start(vec![json_response(200, list), json_response(200, list)]);
        let client = ApiClient::new(&server.url()).unwrap();
        assert_eq!(
            list_vms(&client, false).unwrap(),
            "id      state       memory  vcpus  layout    writes  verified  bad pages\n\
             vm1     running  256.0 MiB      1  kvm            0        12          0\n\
             big-vm  paused    4.00 GiB     16  xen-hvm  1234567         -          -\n"
        );
        let raw = list_vms(&client, true).unwrap();
        let parsed: Value = serde_json::from_str(&raw).unwrap();
        assert_eq!(parsed, serde_json::from_str::<Value>(list).unwrap());
    }

    #[test]
    fn test_vm_delete_escapes_the_id_and_accepts_204() {
        let server = FakeServer::start(vec![b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()]);
        let cmd = ClientCommand::Vm {
            action: VmAction::Delete {
                id: "a:b@c".to_string(),
                api: api(&server),
            },
        };
        assert_eq!(execute(cmd).unwrap(), "deleted VM a:b@c\n");
        assert_eq!(sent_json(&server).0, "DELETE /vms/a%3Ab%40c HTTP/1.1");
    }

    #[test]
    fn test_bad_vm_ids_are_refused_before_anything_is_sent() {
        // The server's first connection would be the first request sent; none must come.
        let server = FakeServer::start(vec![json_response(500, r#"{"error": "reached the daemon"}"#)]);
        let long = "v".repeat(65);
        for id in ["a/b", "a\0b", "a\nb", "", long.as_str()] {
            let delete = ClientCommand::Vm {
                action: VmAction::Delete {
                    id: id.to_string(),
                    api: api(&server),
                },
            };
            let mut migrate = migrate_args(&server, false);
            migrate.vm = id.to_string();
            for cmd in [delete, ClientCommand::Migrate(Box::new(migrate))] {
                let err = execute(cmd).unwrap_err();
                assert!(matches!(err, CommandError::InvalidName(_)), "{id:?}: {err:?}");
                assert!(err.to_string().starts_with("VM id"), "{err}");
            }
        }
        assert!(server.requests.try_recv().is_err(), "a request reached the daemon");
    }

    #[test]
    fn test_migrate_sends_the_request_and_prints_the_id() {
        let server = FakeServer::start(vec![json_response(202, r#"{"id": 3}"#)]);
        let mut args = migrate_args(&server, false);
        args.bandwidth = Some(ByteSize(1_000_000_000));
        let out = execute(ClientCommand::Migrate(Box::new(args))).unwrap();
        assert_eq!(out, "migration 3 started: vm1 -> 127.0.0.1:7001 (precopy)\n");
        let (line, body) = sent_json(&server);
        assert_eq!(line, "POST /migrations HTTP/1.1");
        assert_eq!(
            body,
            json!({"vm": "vm1", "to": "127.0.0.1:7001", "algorithm": "precopy", "streams": 2,
                   "bandwidth_bytes_per_sec": 1000000000u64, "downtime_limit_ms": 300.0,
                   "recovery_timeout_s": 60.0})
        );
    }

    #[test]
    fn test_migrate_sends_priority_and_floor_only_when_given() {
        let server = FakeServer::start(vec![json_response(202, r#"{"id": 5}"#)]);
        let mut args = migrate_args(&server, false);
        args.priority = Some(migratory::engine::Priority::High);
        args.min_bandwidth = Some(ByteSize(50_000_000));
        execute(ClientCommand::Migrate(Box::new(args))).unwrap();
        let (_, body) = sent_json(&server);
        assert_eq!(body["priority"], json!("high"));
        assert_eq!(body["min_bandwidth_bytes_per_sec"], json!(50_000_000u64));
    }

    #[test]
    fn test_migrate_sends_compression_only_when_given() {
        let server = FakeServer::start(vec![json_response(202, r#"{"id": 4}"#)]);
        let mut args = migrate_args(&server, false);
        args.compression = Some(migratory::protocol::CompressionChoice::Xbzrle);
        args.xbzrle_cache = Some(ByteSize(32 << 20));
        execute(ClientCommand::Migrate(Box::new(args))).unwrap();
        let (_, body) = sent_json(&server);
        assert_eq!(body["compression"], json!("xbzrle"));
        assert_eq!(body["xbzrle_cache_bytes"], json!(32u64 << 20));
    }

    #[test]
    fn test_migrate_sends_announce_params_only_when_given() {
        let server = FakeServer::start(vec![json_response(202, r#"{"id": 5}"#)]);
        let mut args = migrate_args(&server, false);
        args.announce_rounds = Some(3);
        args.announce_step_ms = Some(25);
        execute(ClientCommand::Migrate(Box::new(args))).unwrap();
        let (_, body) = sent_json(&server);
        assert_eq!(
            (&body["announce_rounds"], &body["announce_step_ms"]),
            (&json!(3), &json!(25))
        );
        assert!(body.get("announce_initial_ms").is_none() && body.get("announce_max_ms").is_none());
    }

    #[test]
    fn test_migrate_sends_the_seed_and_the_deadline_only_when_given() {
        let server = FakeServer::start(vec![json_response(202, r#"{"id": 5}"#)]);
        let mut args = migrate_args(&server, false);
        args.algorithm = Algorithm::Random;
        args.seed = Some(42);
        args.deadline = Some(5.0);
        execute(ClientCommand::Migrate(Box::new(args))).unwrap();
        let (_, body) = sent_json(&server);
        assert_eq!(body["algorithm"], json!("random"));
        assert_eq!(
            (body["seed"].clone(), body["deadline_s"].clone()),
            (json!(42), json!(5.0))
        );
    }

    #[test]
    fn test_the_summary_line_names_the_random_pick_and_the_deadline() {
        let view = |report: serde_json::Value| MigrationStatusView {
            id: 7,
            vm: Some("vm1".into()),
            to: Some("h:1".into()),
            algorithm: Some("random".into()),
            status: MigrationState::Completed,
            stage: None,
            round: None,
            transferred_bytes: None,
            remaining_pages: None,
            dirty_pages_per_sec: None,
            throughput_bytes_per_sec: None,
            expected_downtime_s: None,
            error: None,
            report: Some(report),
        };
        let met = view(json!({"total_s": 1.5, "algorithm": "postcopy", "seed": 42,
                              "deadline_s": 2.0, "deadline_met": true, "deadline_margin_s": 0.5}));
        assert_eq!(
            summary_line(&met),
            "migration 7 completed: vm1 -> h:1 (random), total 1.500 s, random picked postcopy (seed 42), \
             deadline met with 0.500 s to spare"
        );
        let missed = view(json!({"total_s": 2.25, "algorithm": "precopy", "seed": null,
                                 "deadline_met": false, "deadline_margin_s": -0.25}));
        assert!(
            summary_line(&missed).ends_with("total 2.250 s, deadline MISSED by 0.250 s"),
            "{}",
            summary_line(&missed)
        );
    }

    #[test]
    fn test_migrate_wait_polls_until_completed() {
        let done = r#"{"id": 3, "vm": "vm1", "to": "127.0.0.1:7001", "algorithm": "precopy", "status": "completed",
            "stage": "activation", "round": 4, "transferred_bytes": 314572800, "remaining_pages": 0,
            "throughput_bytes_per_sec": null, "expected_downtime_s": null, "error": null,
            "report": {"downtime_s": 0.0125, "total_s": 1.5, "verified": true}}"#;
        let server = FakeServer::start(vec![
            json_response(202, r#"{"id": 3}"#),
            json_response(200, STATUS_ACTIVE),
            json_response(200, done),
        ]);
        let client = ApiClient::new(&server.url()).unwrap();
        let out = migrate(&client, &migrate_args(&server, true), Duration::from_millis(1)).unwrap();
        assert_eq!(
            out,
            "migration 3 completed: vm1 -> 127.0.0.1:7001 (precopy), 4 rounds, 300.0 MiB sent, \
             downtime 12.5 ms, total 1.500 s, verified\n"
        );
        assert_eq!(sent_json(&server).0, "POST /migrations HTTP/1.1");
        assert_eq!(sent_json(&server).0, "GET /migrations/3 HTTP/1.1");
        assert_eq!(sent_json(&server).0, "GET /migrations/3 HTTP/1.1");
    }

    #[test]
    fn test_migrate_wait_fails_unless_completed() {
        let aborted = r#"{"id": 3, "vm": "vm1", "to": "127.0.0.1:7001", "algorithm": "precopy", "status": "aborted",
            "error": "pre-copy stalled"}"#;
        let server = FakeServer::start(vec![json_response(202, r#"{"id": 3}"#), json_response(200, aborted)]);
        let client = ApiClient::new(&server.url()).unwrap();
        let err = migrate(&client, &migrate_args(&server, true), Duration::from_millis(1)).unwrap_err();
        assert!(
            matches!(
                &err,
                CommandError::NotCompleted {
                    id: 3,
                    status: MigrationState::Aborted,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "migration 3 ended aborted: pre-copy stalled");
        assert_eq!(
            err.stdout(),
            Some("migration 3 aborted: vm1 -> 127.0.0.1:7001 (precopy): pre-copy stalled\n")
        );
    }

    #[test]
    fn test_status_of_one_migration_prints_its_figures() {
        let server = FakeServer::start(vec![json_response(200, STATUS_ACTIVE)]);
        let client = ApiClient::new(&server.url()).unwrap();
        assert_eq!(
            status(&client, Some(3), false).unwrap(),
            "id  vm   status  stage    round  sent MiB  remaining pages    MB/s  exp. downtime ms\n\
             \x203  vm1  active  precopy      2     150.0             1200  1250.0              12.3\n"
        );
        assert_eq!(sent_json(&server).0, "GET /migrations/3 HTTP/1.1");
    }

    #[test]
    fn test_status_of_all_shows_nulls_errors_and_empty_lists() {
        let list = r#"[{"id": 1, "vm": "vm1", "status": "failed", "error": "link lost"},
                       {"id": 12, "vm": null, "status": "queued"}]"#;
        let server = FakeServer::start(vec![json_response(200, list), json_response(200, "[]")]);
        let client = ApiClient::new(&server.url()).unwrap();
        assert_eq!(
            status(&client, None, false).unwrap(),
            "id  vm   status  stage  round  sent MiB  remaining pages  MB/s  exp. downtime ms\n\
             \x201  vm1  failed  -          -         -                -     -                 -\n\
             12  -    queued  -          -         -                -     -                 -\n\
             migration 1: link lost\n"
        );
        assert_eq!(sent_json(&server).0, "GET /migrations HTTP/1.1");
        assert_eq!(status(&client, None, false).unwrap(), "no migrations\n");
    }

    #[test]
    fn test_cancel_posts_to_the_cancel_path() {
        let server = FakeServer::start(vec![json_response(200, "{}")]);
        let out = execute(ClientCommand::Cancel {
            id: 7,
            api: api(&server),
        })
        .unwrap();
        assert_eq!(out, "cancel requested for migration 7\n");
        assert_eq!(
            sent_json(&server),
            ("POST /migrations/7/cancel HTTP/1.1".to_string(), Value::Null)
        );
    }

    #[test]
    fn test_refusal_surfaces_the_daemon_error_text() {
        let server = FakeServer::start(vec![json_response(404, r#"{"error": "no migration 9"}"#)]);
        let cmd = ClientCommand::Status {
            id: Some(9),
            json: false,
            api: api(&server),
        };
        let err = execute(cmd).unwrap_err();
        assert_eq!(
            super::super::error_line(&err),
            "migratory: daemon refused: no migration 9"
        );
    }

    #[test]
    fn test_response_of_the_wrong_shape_is_unexpected() {
        let server = FakeServer::start(vec![json_response(200, r#"{"id": 3, "status": "teleporting"}"#)]);
        let client = ApiClient::new(&server.url()).unwrap();
        let err = status(&client, Some(3), false).unwrap_err();
        assert!(
            matches!(
                err,
                CommandError::UnexpectedResponse {
                    what: "migration status",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn test_unreachable_daemon_error_names_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cmd = ClientCommand::Cancel {
            id: 1,
            api: ApiArgs {
                api: Some(format!("http://127.0.0.1:{port}")),
                token_file: None,
                tls_cert: None,
                tls_key: None,
                tls_ca: None,
            },
        };
        let line = super::super::error_line(&execute(cmd).unwrap_err());
        let prefix = format!("migratory: cannot connect to http://127.0.0.1:{port}/migrations/1/cancel: ");
        assert!(line.starts_with(&prefix), "{line}");
    }
}

//! Who may use a daemon's control API, and what reaches its engine: real `migratory serve`
//! processes, called with raw HTTP (to send what the CLI never would) and through the CLI.
//!
//! * over TCP every request needs the bearer token from the token file, which the daemon makes
//!   (0600, in a 0700 directory) at first start; a missing or wrong token gets 401;
//! * over a Unix socket (mode 0600) no token is needed;
//! * `/metrics` is served on its own listener and only there;
//! * fault injection needs `--enable-fault-injection`, and `--allow-peer` limits targets (403);
//! * ids with a NUL, a slash, a newline or 4 KiB of text get 400 and leave the daemon working;
//! * without a cluster key the daemon does not start unless told `--insecure-no-auth`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

#[path = "support/cli.rs"]
mod cli;
#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/serve.rs"]
mod serve;

use cli::{CliHost, PendingRun, TIMEOUT};
use daemon::{Daemon, BIN};
use serve::{path_str, Scratch, TEST_CLUSTER_KEY};

/// One HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// The `error` text of a JSON error body.
    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error text: {self:?}"))
            .to_string()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends one request to `base` (`http://IP:PORT` or `unix:PATH`) with an optional bearer token
/// and JSON body, and reads the whole answer (the connection is closed after it).
fn request(base: &str, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Answer {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method != "GET" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let bytes = [head.as_bytes(), body.as_bytes()].concat();
    let mut raw = Vec::new();
    let mut exchange = |stream: &mut dyn ReadWrite| -> std::io::Result<()> {
        stream.write_all(&bytes)?;
        stream.read_to_end(&mut raw).map(|_| ())
    };
    let result = match base.strip_prefix("unix:") {
        Some(socket) => UnixStream::connect(socket).and_then(|mut s| {
            s.set_read_timeout(Some(TIMEOUT))?;
            exchange(&mut s)
        }),
        None => TcpStream::connect(base.trim_start_matches("http://")).and_then(|mut s| {
            s.set_read_timeout(Some(TIMEOUT))?;
            exchange(&mut s)
        }),
    };
    result.unwrap_or_else(|e| panic!("{method} {path} on {base}: {e}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

fn token_of(d: &Daemon) -> String {
    let path = d.token_file.as_ref().expect("a TCP daemon has a token file");
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn create_body(id: &str) -> String {
    json!({ "id": id, "memory_bytes": 16 << 20 }).to_string()
}

#[test]
fn test_api_needs_the_right_bearer_token() {
    let d = Daemon::start("auth", "kvm", &[]);
    let token = token_of(&d);

    let missing = request(&d.api, "GET", "/vms", None, None);
    assert_eq!(missing.status, 401, "{missing:?}");
    assert!(missing.error().starts_with("missing bearer token"), "{missing:?}");
    assert!(
        missing
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{missing:?}"
    );

    let wrong_token = "0".repeat(64);
    for (sent, expected) in [
        (Some(wrong_token.as_str()), "wrong bearer token"),
        (Some(&token[..63]), "wrong bearer token"),
    ] {
        let wrong = request(&d.api, "POST", "/vms", sent, Some(&create_body("vm1")));
        assert_eq!(wrong.status, 401, "{wrong:?}");
        assert_eq!(wrong.error(), expected);
        assert!(!wrong.body.contains(&token), "the answer leaks the token: {wrong:?}");
        assert!(
            wrong
                .header("www-authenticate")
                .is_some_and(|v| v.starts_with("Bearer")),
            "{wrong:?}"
        );
    }
    // Unknown paths are refused the same way: nothing is learned without the token.
    assert_eq!(request(&d.api, "GET", "/nothing-here", None, None).status, 401);
    assert!(d.vms().is_empty(), "a refused request created a VM");

    let right = request(&d.api, "GET", "/vms", Some(&token), None);
    assert_eq!((right.status, right.json()), (200, json!([])), "{right:?}");
    // The CLI sends it from --token-file; without the token it gets the daemon's refusal.
    d.create_vm("vm1", "16MiB");
    let mut cmd = Command::new(BIN);
    cmd.args(["vm", "list", "--api", &d.api])
        .env("HOME", d.scratch.path("no-home"))
        .env_remove("MIGRATORY_API_TOKEN")
        .env_remove("MIGRATORY_API_TOKEN_FILE");
    let run = PendingRun::spawn(cmd).expect("spawn the CLI").finish();
    assert!(!run.status.success(), "{}", run.describe());
    assert!(run.stderr.contains("missing bearer token"), "{}", run.describe());
}

#[test]
fn test_token_file_is_made_private_at_first_start_and_reused() {
    let home = Scratch::new("home");
    let home_path = path_str(&home.0).to_string();
    let d = Daemon::launch(
        "fresh",
        &["--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"],
        &[("HOME", &home_path)],
    );
    let file = home.0.join(".migratory").join("api-token");
    assert_eq!(d.token_file.as_deref(), Some(file.as_path()));
    let token = token_of(&d);
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    assert_eq!(mode(&file), 0o600);
    assert_eq!(mode(file.parent().expect("parent")), 0o700);
    assert!(
        d.stderr_text().contains("made the API token file"),
        "{}",
        d.stderr_text()
    );
    d.create_vm("vm1", "16MiB");
    drop(d);

    // A second start keeps the token; a file others can read is used, with a warning.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let again = Daemon::launch(
        "again",
        &["--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"],
        &[("HOME", &home_path)],
    );
    assert_eq!(token_of(&again), token);
    let log = again.stderr_text();
    assert!(
        log.contains("warning: the API token file") && log.contains("644"),
        "{log}"
    );
    assert!(!log.contains(&token), "the log shows the token: {log}");
    assert_eq!(request(&again.api, "GET", "/vms", Some(&token), None).status, 200);
}

#[test]
fn test_unix_socket_serves_the_api_without_a_token() {
    let dir = Scratch::new("sock");
    let socket = dir.path("api.sock");
    let api = format!("unix:{}", socket.display());
    let d = Daemon::launch(
        "local",
        &["--listen", "127.0.0.1:0", "--api", &api, "--layout", "kvm"],
        &[],
    );
    assert_eq!(d.api, api);
    assert_eq!(mode(&socket), 0o600);
    // The CLI: `--api unix:PATH` (no token anywhere) ...
    d.create_vm("vm1", "16MiB");
    d.assert_runs("vm1", "kvm");
    // ... and MIGRATORY_API=unix:PATH.
    let mut cmd = Command::new(BIN);
    cmd.args(["vm", "list", "--json"])
        .env("MIGRATORY_API", &api)
        .env_remove("MIGRATORY_API_TOKEN")
        .env_remove("MIGRATORY_API_TOKEN_FILE")
        .env("HOME", dir.path("no-home"));
    let run = PendingRun::spawn(cmd).expect("spawn the CLI").finish();
    run.assert_success();
    assert!(run.stdout.contains("\"vm1\""), "{}", run.describe());
    let raw = request(&api, "GET", "/vms", None, None);
    assert_eq!(raw.status, 200, "{raw:?}");
    drop(d);

    // A socket left by a daemon that died is replaced on the next start.
    assert!(socket.exists(), "the killed daemon's socket is gone already");
    let again = Daemon::launch("local2", &["--listen", "127.0.0.1:0", "--api", &api], &[]);
    assert!(again.vms().is_empty());
}

#[test]
fn test_metrics_are_served_only_on_their_own_listener() {
    let d = Daemon::start("metrics", "kvm", &[]);
    let token = token_of(&d);
    let metrics = d.metrics_url();
    let scrape = request(metrics, "GET", "/metrics", None, None);
    assert_eq!(scrape.status, 200, "{scrape:?}");
    assert!(scrape.body.contains("migratory_"), "{scrape:?}");
    for path in ["/vms", "/migrations"] {
        let other = request(metrics, "GET", path, Some(&token), None);
        assert_eq!(other.status, 404, "{path} on the metrics listener: {other:?}");
    }
    let on_api = request(&d.api, "GET", "/metrics", Some(&token), None);
    assert_eq!(on_api.status, 404, "/metrics on the API: {on_api:?}");
}

#[test]
fn test_fault_injection_needs_its_flag() {
    let target = Daemon::start("ft", "kvm", &[]);
    let plain = Daemon::start("fs", "xen-hvm", &[]);
    plain.create_vm("vm1", "16MiB");
    let to = target.migration_addr.to_string();
    let run = plain.cli(&["migrate", "vm1", "--to", &to, "--fault", "link-drop@precopy"]);
    assert!(!run.status.success(), "{}", run.describe());
    assert!(run.stderr.contains("--enable-fault-injection"), "{}", run.describe());
    let body = json!({ "vm": "vm1", "to": to, "faults": "link-drop@precopy" }).to_string();
    let raw = request(&plain.api, "POST", "/migrations", Some(&token_of(&plain)), Some(&body));
    assert_eq!(raw.status, 403, "{raw:?}");
    plain.assert_runs("vm1", "xen-hvm");

    let testing = Daemon::start("fe", "xen-hvm", &["--enable-fault-injection"]);
    testing.create_vm("vm1", "16MiB");
    let raw = request(
        &testing.api,
        "POST",
        "/migrations",
        Some(&token_of(&testing)),
        Some(&body),
    );
    assert_eq!(raw.status, 202, "{raw:?}");
}

#[test]
fn test_allow_peer_limits_where_vms_go() {
    let allowed = Daemon::start("pb", "kvm", &[]);
    let list = format!("127.0.0.2:7,{}", allowed.migration_addr);
    let a = Daemon::start(
        "pa",
        "xen-hvm",
        &["--allow-peer", &list, "--allow-peer", "localhost:19"],
    );
    a.create_vm("vm1", "16MiB");
    let run = a.cli(&["migrate", "vm1", "--to", "127.0.0.1:9"]);
    assert!(!run.status.success(), "{}", run.describe());
    assert!(run.stderr.contains("--allow-peer"), "{}", run.describe());
    let body = json!({ "vm": "vm1", "to": "127.0.0.3:9" }).to_string();
    let raw = request(&a.api, "POST", "/migrations", Some(&token_of(&a)), Some(&body));
    assert_eq!(raw.status, 403, "{raw:?}");
    // A recovery to a new peer sends the VM's pages there: the same list applies.
    let body = json!({ "to": "127.0.0.3:9" }).to_string();
    let raw = request(&a.api, "POST", "/vms/vm1/recover", Some(&token_of(&a)), Some(&body));
    assert_eq!(raw.status, 403, "{raw:?}");
    a.assert_runs("vm1", "xen-hvm");
    let to = allowed.migration_addr.to_string();
    a.cli(&["migrate", "vm1", "--to", &to, "--wait"]).assert_success();
    allowed.assert_runs("vm1", "kvm");
}

#[test]
fn test_bad_ids_get_400_and_the_daemon_keeps_working() {
    let d = Daemon::start("ids", "kvm", &[]);
    let token = token_of(&d);
    let long = "x".repeat(4096);
    for (what, id) in [
        ("NUL", "a\0b"),
        ("slash", "a/b"),
        ("newline", "a\nb"),
        ("4 KiB", long.as_str()),
    ] {
        let create = request(&d.api, "POST", "/vms", Some(&token), Some(&create_body(id)));
        assert_eq!(create.status, 400, "{what}: {create:?}");
        assert_eq!(create.json()["field"], "id", "{what}: {create:?}");
        assert!(create.error().contains("VM id"), "{what}: {create:?}");
        let migrate = json!({ "vm": id, "to": d.migration_addr.to_string() }).to_string();
        let migrate = request(&d.api, "POST", "/migrations", Some(&token), Some(&migrate));
        assert_eq!(migrate.status, 400, "{what}: {migrate:?}");
        assert_eq!(migrate.json()["field"], "vm", "{what}: {migrate:?}");
    }
    for path in ["/vms/a%00b", "/vms/a%2Fb", "/vms/a%0Ab", &format!("/vms/{long}")] {
        let delete = request(&d.api, "DELETE", path, Some(&token), None);
        assert_eq!(delete.status, 400, "DELETE {:.40}: {delete:?}", path);
    }
    // The CLI refuses them before sending.
    let run = d.cli(&["vm", "create", "a/b"]);
    assert!(!run.status.success(), "{}", run.describe());
    assert!(run.stderr.starts_with("migratory: VM id \"a/b\""), "{}", run.describe());
    // The engine never saw them: it still creates and lists VMs.
    d.create_vm("vm-ok", "16MiB");
    let list = request(&d.api, "GET", "/vms", Some(&token), None);
    assert_eq!(list.status, 200, "{list:?}");
    let ids: Vec<Value> = list
        .json()
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!("vm-ok")]);
}

#[test]
fn test_daemon_without_a_cluster_key_needs_insecure_no_auth() {
    let dir = Scratch::new("nokey");
    let token = dir.path("api-token");
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--name",
        "nokey",
        "--listen",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
    ])
    .args(["--api-token-file", path_str(&token)])
    .env_remove("MIGRATORY_CLUSTER_KEY");
    let run = PendingRun::spawn(cmd).expect("spawn serve").finish();
    assert!(!run.status.success(), "{}", run.describe());
    for needed in [
        "no cluster key",
        "--cluster-key-file",
        "/dev/urandom",
        "--insecure-no-auth",
    ] {
        assert!(run.stderr.contains(needed), "{needed:?} missing: {}", run.describe());
    }

    let insecure = Daemon::start("insecure", "kvm", &["--insecure-no-auth"]);
    assert!(
        insecure
            .stderr_text()
            .contains("--insecure-no-auth: migrations are not authenticated"),
        "{}",
        insecure.stderr_text()
    );
    insecure.create_vm("vm1", "16MiB");

    // The key may come from the environment; the host name is checked like any other name.
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--name",
        "a b",
        "--listen",
        "127.0.0.1:0",
        "--api",
        "127.0.0.1:0",
    ])
    .args(["--api-token-file", path_str(&token)])
    .env("MIGRATORY_CLUSTER_KEY", TEST_CLUSTER_KEY);
    let run = PendingRun::spawn(cmd).expect("spawn serve").finish();
    assert!(!run.status.success(), "{}", run.describe());
    assert!(run.stderr.contains("--name: host name \"a b\""), "{}", run.describe());
}

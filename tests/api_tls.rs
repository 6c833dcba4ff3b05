//! The control API over mutual TLS (`serve --api-tls`): a client whose certificate the cluster
//! CA signed is served without a token; a client with another CA's certificate, or none, or
//! plain HTTP, gets nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/certs.rs"]
mod certs;
#[path = "support/cli.rs"]
mod cli;
#[path = "support/daemon.rs"]
mod daemon;
#[path = "support/serve.rs"]
mod serve;

use certs::{ca, host_identity, Ca};
use daemon::{Daemon, BIN};
use serve::{path_str, Scratch};

/// Writes a certificate signed by `signer` and its key into `dir`; returns (cert, key, ca of
/// `trust`) paths.
fn identity(dir: &Scratch, name: &str, signer: &Ca, trust: &Ca) -> (PathBuf, PathBuf, PathBuf) {
    let (cert, key) = host_identity(signer);
    (
        dir.private_file(&format!("{name}.crt"), &cert),
        dir.private_file(&format!("{name}.key"), &key),
        dir.private_file(&format!("{name}-ca.crt"), &trust.pem),
    )
}

fn cli(api: &str, tls: Option<&(PathBuf, PathBuf, PathBuf)>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).args(["--api", api]);
    if let Some((cert, key, ca)) = tls {
        cmd.args([
            "--tls-cert",
            path_str(cert),
            "--tls-key",
            path_str(key),
            "--tls-ca",
            path_str(ca),
        ]);
    }
    for var in ["MIGRATORY_API", "MIGRATORY_API_TOKEN", "MIGRATORY_API_TOKEN_FILE"] {
        cmd.env_remove(var);
    }
    cmd.output().expect("run the CLI")
}

fn text(o: &std::process::Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn p(path: &Path) -> &str {
    path_str(path)
}

#[test]
fn test_api_over_mutual_tls_serves_only_the_cluster_s_clients() {
    let dir = Scratch::new("api-tls");
    let cluster = ca();
    let stranger = ca();
    let (cert, key, trust) = identity(&dir, "host", &cluster, &cluster);
    let d = Daemon::launch(
        "a",
        &[
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
            "--tls-cert",
            p(&cert),
            "--tls-key",
            p(&key),
            "--tls-ca",
            p(&trust),
            "--api-tls",
        ],
        &[],
    );
    assert!(d.api.starts_with("https://"), "{}", d.api);
    let member = identity(&dir, "operator", &cluster, &cluster);
    let created = cli(&d.api, Some(&member), &["vm", "create", "vm1", "--memory", "16MiB"]);
    assert!(created.status.success(), "{}", text(&created));
    let listed = cli(&d.api, Some(&member), &["vm", "list", "--json"]);
    assert!(listed.status.success(), "{}", text(&listed));
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("\"vm1\""),
        "{}",
        text(&listed)
    );
    // Another CA's certificate: the daemon refuses the handshake.
    let outsider = identity(&dir, "outsider", &stranger, &cluster);
    let refused = cli(&d.api, Some(&outsider), &["vm", "list"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    // No certificate at all: the client says what it needs and sends nothing.
    let bare = cli(&d.api, None, &["vm", "list"]);
    assert!(!bare.status.success(), "{}", text(&bare));
    assert!(
        String::from_utf8_lossy(&bare.stderr).contains("--tls-cert"),
        "{}",
        text(&bare)
    );
    // Plain HTTP to the TLS port gets no answer it could read.
    let plain = d.api.replacen("https://", "http://", 1);
    let cleartext = cli(&plain, None, &["vm", "list"]);
    assert!(!cleartext.status.success(), "{}", text(&cleartext));
}

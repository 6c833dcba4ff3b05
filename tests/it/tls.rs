//! TLS with mutual authentication on every stream: a migration over TLS verifies, and a peer
//! whose certificate another CA signed is refused before anything is reserved.

use migratory::engine::{EngineHandle, HostConfig, MigrationRequest, Outcome, VmSpec};
use migratory::format::NativeLayout;
use migratory::link::tls::TlsSetup;

use crate::common::{self, MIB};
use crate::support_certs::{ca, host_identity, Ca};

/// A host identity signed by `signer`, trusting `trust`.
fn identity(signer: &Ca, trust: &Ca) -> TlsSetup {
    let (cert, key) = host_identity(signer);
    TlsSetup::from_pem(cert.as_bytes(), key.as_bytes(), trust.pem.as_bytes()).expect("tls setup")
}

async fn migrate(
    src_tls: TlsSetup,
    dst_tls: TlsSetup,
) -> (
    Result<migratory::engine::MigrationReport, String>,
    EngineHandle,
    EngineHandle,
) {
    let src = EngineHandle::start().expect("engine");
    src.add_host(HostConfig {
        tls: Some(src_tls),
        ..HostConfig::new("src", NativeLayout::XenHvm)
    })
    .await
    .expect("src");
    let dst = EngineHandle::start().expect("engine");
    dst.add_host(HostConfig {
        tls: Some(dst_tls),
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        ..HostConfig::new("dst", NativeLayout::Kvm)
    })
    .await
    .expect("dst");
    let addr = dst.listen_address("dst").await.expect("ask").expect("listening");
    let spec = VmSpec {
        workload: common::writer(20_000_000, MIB),
        ..VmSpec::new("secret", 8 * MIB)
    };
    src.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new("secret", "src", "dst");
    req.target_addr = Some(addr);
    req.streams = 2;
    let r = src.migrate(req).await.map_err(|e| e.to_string());
    (r, src, dst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_migration_over_mutual_tls_verifies() {
    let authority = ca();
    let (report, src, dst) = migrate(identity(&authority, &authority), identity(&authority, &authority)).await;
    let report = report.expect("migration starts");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified);
    assert!(src.list_vms("src").await.expect("list").is_empty());
    assert_eq!(dst.list_vms("dst").await.expect("list").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_peer_from_another_ca_is_refused() {
    let (ours, theirs) = (ca(), ca());
    // The source's certificate comes from a CA the target does not trust.
    let (result, src, dst) = migrate(identity(&theirs, &ours), identity(&ours, &ours)).await;
    match result {
        Err(e) => assert!(e.contains("cannot connect") || e.contains("link"), "{e}"),
        Ok(report) => assert_ne!(report.result, Outcome::Completed, "an untrusted peer must not migrate"),
    }
    let usage = dst.host_usage("dst").await.expect("usage");
    assert_eq!((usage.vms, usage.committed_bytes), (0, 0), "nothing reserved");
    let info = src.vm_info("src", "secret").await.expect("vm stays on the source");
    assert!(info.state.is_running(), "{}", info.state);
}

//! Cluster authentication: both sides prove the key before anything is reserved.

use migratory::engine::{EngineHandle, HostConfig, MigrationRequest, Outcome, VmLocation, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::auth::ClusterKey;

use crate::common::{self, MIB};

fn key(text: &str) -> Option<ClusterKey> {
    Some(ClusterKey::new(text.as_bytes()).expect("valid key"))
}

async fn setup(src_key: Option<ClusterKey>, dst_key: Option<ClusterKey>) -> EngineHandle {
    let e = EngineHandle::start().expect("engine");
    e.add_host(HostConfig {
        cluster_key: src_key,
        ..HostConfig::new("src", NativeLayout::XenHvm)
    })
    .await
    .expect("src");
    e.add_host(HostConfig {
        cluster_key: dst_key,
        ..HostConfig::new("dst", NativeLayout::Kvm)
    })
    .await
    .expect("dst");
    let spec = VmSpec {
        workload: common::writer(10_000_000, MIB),
        ..VmSpec::new("vm", 4 * MIB)
    };
    e.create_vm("src", spec).await.expect("create");
    e
}

async fn assert_refused(src_key: Option<ClusterKey>, dst_key: Option<ClusterKey>) -> String {
    let e = setup(src_key, dst_key).await;
    let report = e
        .migrate(MigrationRequest::new("vm", "src", "dst"))
        .await
        .expect("report");
    assert_eq!(report.result, Outcome::Aborted, "{:?}", report.error);
    assert_eq!(report.vm_location, VmLocation::Source);
    assert!(report.stage(migratory::engine::Stage::Stopcopy).is_none());
    let usage = e.host_usage("dst").await.expect("usage");
    assert_eq!((usage.vms, usage.committed_bytes), (0, 0), "nothing reserved");
    common::assert_runs_only_on(&e, "src", "dst", "vm").await;
    report.error.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_same_key_migrates() {
    let e = setup(
        key("a shared key of at least 32 bytes"),
        key("a shared key of at least 32 bytes"),
    )
    .await;
    let report = e
        .migrate(MigrationRequest::new("vm", "src", "dst"))
        .await
        .expect("report");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_wrong_key_is_refused() {
    let error = assert_refused(
        key("the source's own key, 32 bytes long"),
        key("the target's other key, 32 bytes long"),
    )
    .await;
    assert!(error.contains("authentication failed"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_missing_key_is_refused_by_a_keyed_target() {
    let error = assert_refused(None, key("the target's only key, 32 bytes long")).await;
    assert!(error.contains("requires a cluster key"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_keyed_source_refuses_an_unkeyed_target() {
    let error = assert_refused(key("the source's only key, 32 bytes long"), None).await;
    assert!(error.contains("target's proof does not match"), "{error}");
}

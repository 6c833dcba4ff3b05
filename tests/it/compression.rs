//! Page compression end to end: every choice migrates and verifies, the counters show the
//! encodings were really used, a peer that offers none interoperates (or refuses an explicit
//! request before anything is reserved), and XBZRLE stays off where streams may reorder.

use migratory::engine::{EngineHandle, HostConfig, MigrationReport, MigrationRequest, Outcome, VmLocation, VmSpec};
use migratory::format::NativeLayout;
use migratory::link::Shaping;
use migratory::protocol::negotiation::AUTO_LZ4_MAX_LINK_BYTES_PER_SEC;
use migratory::protocol::{Algorithm, Compression, CompressionChoice};

use crate::common::{self, MIB};

/// A guest whose hot set is re-dirtied while round 0 is still on a 200 MB/s link, so pre-copy
/// re-sends pages; a fifth of memory starts as zero pages, which compress once written to.
fn spec(vm: &str) -> VmSpec {
    VmSpec {
        workload: common::writer(50_000_000, 4 * MIB),
        ..VmSpec::new(vm, 16 * MIB)
    }
}

fn request(vm: &str, target: &str, choice: CompressionChoice) -> MigrationRequest {
    let mut req = MigrationRequest::new(vm, "src", target);
    req.compression = choice;
    req.shaping = Shaping {
        bandwidth_bytes_per_sec: Some(200_000_000),
        ..Shaping::default()
    };
    req
}

fn assert_moved(report: &MigrationReport, case: &str) {
    assert_eq!(report.result, Outcome::Completed, "{case}: {:?}", report.error);
    assert!(report.verified, "{case}: {:?}", report.mismatched_pages);
    assert_eq!(report.vm_location, VmLocation::Target, "{case}");
    assert!(report.pages.retransmitted > 0, "{case}: nothing was re-sent");
}

async fn check(choice: CompressionChoice, alg: Algorithm) -> MigrationReport {
    check_on(choice, alg, None).await
}

/// Migrates with `choice`, on the default 200 MB/s link or one capped at `link`, and checks
/// that exactly the methods asked for were used.
async fn check_on(choice: CompressionChoice, alg: Algorithm, link: Option<u64>) -> MigrationReport {
    let e = common::engine(NativeLayout::XenHvm, NativeLayout::Kvm).await;
    let vm = format!("c-{choice}-{alg}");
    e.create_vm("src", spec(&vm)).await.expect("create");
    let mut req = request(&vm, "dst", choice).algorithm(alg);
    if link.is_some() {
        req.shaping.bandwidth_bytes_per_sec = link;
    }
    let wanted = choice.wanted(req.shaping.bandwidth_bytes_per_sec);
    if choice == CompressionChoice::Both {
        // 16 slots for 4096 pages: most re-sent pages miss the cache and try LZ4 instead.
        req.xbzrle_cache_bytes = 64 << 10;
    }
    if alg == Algorithm::Hybrid {
        // Straight to post-copy after the first rounds: pages are pushed and pulled too.
        req.policy.downtime_limit = std::time::Duration::ZERO;
    }
    let report = e.migrate(req).await.expect("report");
    let case = format!("{choice} {alg}");
    assert_moved(&report, &case);
    let c = &report.compression;
    assert_eq!(c.requested, choice.name(), "{case}");
    let methods: Vec<&str> = c.methods.iter().map(String::as_str).collect();
    assert_eq!(methods, wanted.names(), "{case}");
    let (lz4, xbzrle) = (wanted.lz4, wanted.xbzrle);
    assert_eq!(c.lz4_pages > 0, lz4, "{case}: {c:?}");
    if alg == Algorithm::Precopy {
        assert_eq!(c.xbzrle_pages > 0, xbzrle, "{case}: {c:?}");
    }
    assert_eq!(
        c.bytes_saved > 0,
        lz4 || (xbzrle && alg == Algorithm::Precopy),
        "{case}: {c:?}"
    );
    if choice == CompressionChoice::Both {
        assert!(c.xbzrle_cache_misses > 0, "{case}: a 16-page cache misses: {c:?}");
    }
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_every_choice_migrates_verified_and_is_used() {
    for choice in CompressionChoice::ALL {
        check(choice, Algorithm::Precopy).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_xbzrle_saves_most_of_the_resent_bytes() {
    let off = check(CompressionChoice::Off, Algorithm::Precopy).await;
    let on = check(CompressionChoice::Xbzrle, Algorithm::Precopy).await;
    let c = &on.compression;
    // The writer stores one word per dirtied page: a delta is a few bytes of a 4 KiB page.
    let resent_bytes = on.pages.retransmitted * 4096;
    assert!(
        c.bytes_saved * 2 > resent_bytes,
        "saved {} of {resent_bytes} re-sent page bytes: {c:?}",
        c.bytes_saved
    );
    let per_resent = |r: &MigrationReport| r.bytes_sent as f64 / (r.pages.normal + r.pages.retransmitted) as f64;
    assert!(per_resent(&on) < per_resent(&off), "fewer bytes per page sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_lz4_pages_survive_post_copy() {
    // Hybrid pushes and pulls pages after activation: LZ4 there, never a delta.
    let report = check(CompressionChoice::Lz4, Algorithm::Hybrid).await;
    assert_eq!(report.compression.xbzrle_pages, 0);
    let report = check(CompressionChoice::Both, Algorithm::Hybrid).await;
    assert!(report.verified);
}

async fn engine_with_old_target() -> EngineHandle {
    let e = EngineHandle::start().expect("engine");
    e.add_host(HostConfig::new("src", NativeLayout::XenHvm))
        .await
        .expect("src");
    // A target built before page compression offers `none` only.
    let old = HostConfig {
        compression: vec![Compression::None],
        ..HostConfig::new("dst", NativeLayout::Kvm)
    };
    e.add_host(old).await.expect("dst");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_target_without_compression_interoperates() {
    let e = engine_with_old_target().await;
    e.create_vm("src", spec("old")).await.expect("create");
    let report = e
        .migrate(request("old", "dst", CompressionChoice::Auto))
        .await
        .expect("report");
    assert_moved(&report, "auto against a target without compression");
    assert!(report.compression.methods.is_empty(), "{:?}", report.compression);
    assert_eq!(report.compression.bytes_saved, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_explicit_compression_the_target_lacks_is_refused_before_reservation() {
    let e = engine_with_old_target().await;
    e.create_vm("src", spec("ask")).await.expect("create");
    let report = e
        .migrate(request("ask", "dst", CompressionChoice::Lz4))
        .await
        .expect("report");
    assert_eq!(report.result, Outcome::Aborted, "{:?}", report.error);
    assert_eq!(report.vm_location, VmLocation::Source);
    assert_eq!(report.stage_names(), vec!["premigration"], "nothing past negotiation");
    let error = report.error.unwrap_or_default();
    assert!(error.contains("target offers [none]"), "{error}");
    let usage = e.host_usage("dst").await.expect("usage");
    assert_eq!((usage.vms, usage.committed_bytes), (0, 0));
    common::assert_runs_only_on(&e, "src", "dst", "ask").await;
}

/// Over TCP, with `streams` data connections: XBZRLE needs batches in order, so only one.
async fn over_tcp(streams: u8) -> MigrationReport {
    let (src, _dst, addr) = common::two_engines().await;
    let vm = format!("tcp-xbzrle-{streams}");
    src.create_vm("src", spec(&vm)).await.expect("create");
    let mut req = request(&vm, &addr.to_string(), CompressionChoice::Both);
    req.target_addr = Some(addr);
    req.streams = streams;
    let report = src.migrate(req).await.expect("report");
    assert_moved(&report, &format!("both over {streams} streams"));
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_xbzrle_only_where_batches_keep_their_order() {
    let one = over_tcp(1).await;
    assert_eq!(one.compression.methods, ["lz4", "xbzrle"]);
    assert!(one.compression.xbzrle_pages > 0, "{:?}", one.compression);
    let two = over_tcp(2).await;
    assert_eq!(two.compression.methods, ["lz4"]);
    assert_eq!(two.compression.xbzrle_pages, 0);
    assert!(two.compression.lz4_pages > 0, "{:?}", two.compression);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_auto_uses_what_won_the_benchmark() {
    // Above 1 Gbit/s: deltas only.
    let report = check(CompressionChoice::Auto, Algorithm::Precopy).await;
    assert_eq!(report.compression.methods, ["xbzrle"]);
    // At 1 Gbit/s LZ4 joins in (a 16 MiB guest still moves in a fraction of a second).
    let slow = Some(AUTO_LZ4_MAX_LINK_BYTES_PER_SEC);
    let report = check_on(CompressionChoice::Auto, Algorithm::Precopy, slow).await;
    assert_eq!(report.compression.methods, ["lz4", "xbzrle"]);
}

//! Migrations over real TCP on loopback: every algorithm with 1 and 4 data streams, between
//! two engines (two actor systems, as two daemons would be), and a listener that shrugs off
//! hostile connections.

use std::io::Write;

use migratory::engine::{EngineHandle, HostConfig, MigrationRequest, Outcome, VmLocation, VmSpec};
use migratory::format::NativeLayout;
use migratory::protocol::Algorithm;

use crate::common::{self, MIB};

async fn check(alg: Algorithm, streams: u8) {
    let (src, dst, addr) = common::two_engines().await;
    let vm = format!("tcp-{alg}-{streams}");
    let spec = VmSpec {
        workload: common::writer(40_000_000, 2 * MIB),
        ..VmSpec::new(vm.clone(), 16 * MIB)
    };
    src.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new(vm.clone(), "src", addr.to_string()).algorithm(alg);
    req.target_addr = Some(addr);
    req.streams = streams;
    if alg == Algorithm::Hybrid {
        req.policy.downtime_limit = std::time::Duration::ZERO;
    }
    let report = src.migrate(req).await.expect("report");
    let case = format!("{alg} over {streams} streams");
    assert_eq!(report.result, Outcome::Completed, "{case}: {:?}", report.error);
    assert!(report.verified, "{case}: {:?}", report.mismatched_pages);
    assert_eq!(report.vm_location, VmLocation::Target);
    assert!(
        src.list_vms("src").await.expect("list").is_empty(),
        "{case}: source copy freed"
    );
    let moved = dst.vm_info("dst", &vm).await.expect("vm on target");
    assert!(moved.state.is_running(), "{case}: {}", moved.state);
    assert_eq!(moved.layout, NativeLayout::Kvm);
}

macro_rules! tcp_matrix {
    ($($name:ident: $alg:expr, $streams:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                check($alg, $streams).await;
            }
        )*
    };
}

tcp_matrix! {
    test_tcp_stop_and_copy_1_stream: Algorithm::StopAndCopy, 1;
    test_tcp_stop_and_copy_4_streams: Algorithm::StopAndCopy, 4;
    test_tcp_precopy_1_stream: Algorithm::Precopy, 1;
    test_tcp_precopy_4_streams: Algorithm::Precopy, 4;
    test_tcp_postcopy_1_stream: Algorithm::Postcopy, 1;
    test_tcp_postcopy_4_streams: Algorithm::Postcopy, 4;
    test_tcp_hybrid_1_stream: Algorithm::Hybrid, 1;
    test_tcp_hybrid_4_streams: Algorithm::Hybrid, 4;
    test_tcp_auto_1_stream: Algorithm::Auto, 1;
    test_tcp_auto_4_streams: Algorithm::Auto, 4;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_tcp_postcopy_pulls_take_the_pull_connection_while_the_push_runs() {
    let (src, dst, addr) = common::two_engines().await;
    let (opened, asked) = (
        migratory::link::pull_connections_opened(),
        migratory::link::pull_requests_received(),
    );
    // Writes all over memory: the guest faults on pages the push has not reached.
    let spec = VmSpec {
        workload: migratory::vmm::WorkloadSpec {
            pattern: migratory::vmm::Pattern::Uniform,
            ..common::writer(40_000_000, 32 * MIB)
        },
        ..VmSpec::new("pulls", 32 * MIB)
    };
    src.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new("pulls", "src", addr.to_string()).algorithm(Algorithm::Postcopy);
    req.target_addr = Some(addr);
    let report = src.migrate(req).await.expect("report");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified, "{:?}", report.mismatched_pages);
    assert!(report.postcopy_faults > 0, "the guest faulted");
    assert!(report.pages.pulled > 0, "pages were pulled");
    assert!(migratory::link::pull_connections_opened() > opened, "a pull connection");
    assert!(
        migratory::link::pull_requests_received() > asked,
        "the requests came on the pull connection"
    );
    let moved = dst.vm_info("dst", "pulls").await.expect("vm on target");
    assert!(moved.state.is_running(), "{}", moved.state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_listener_survives_hostile_connections_then_migrates() {
    let (src, dst, addr) = common::two_engines().await;
    let hostile: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0xff; 64],
        b"MIGRLINK".to_vec(), // truncated preamble, then silence
        // A valid control preamble, then a frame claiming 4 GiB.
        [
            b"MIGRLINK".as_slice(),
            &[1],
            &7u64.to_be_bytes(),
            &[0, 1],
            &[0xff, 0xff, 0xff, 0xff],
        ]
        .concat(),
        // A valid control preamble, then a frame of garbage msgpack.
        [
            b"MIGRLINK".as_slice(),
            &[1],
            &8u64.to_be_bytes(),
            &[0, 1],
            &[0, 0, 0, 3, b'C', 0xc1, 0xc1],
        ]
        .concat(),
        // A data stream preamble whose role exceeds its stream count.
        [b"MIGRLINK".as_slice(), &[1], &9u64.to_be_bytes(), &[5, 1]].concat(),
    ];
    let blocking = tokio::task::spawn_blocking(move || {
        for round in 0..20 {
            for bytes in &hostile {
                if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                    let _ = s.write_all(bytes);
                    if round % 2 == 0 {
                        drop(s); // disconnect mid-frame
                    }
                }
            }
        }
    });
    blocking.await.expect("hostile client");
    let spec = VmSpec {
        workload: common::writer(20_000_000, MIB),
        ..VmSpec::new("after-hostile", 8 * MIB)
    };
    src.create_vm("src", spec).await.expect("create");
    let mut req = MigrationRequest::new("after-hostile", "src", "dst");
    req.target_addr = Some(addr);
    let report = src.migrate(req).await.expect("report");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified);
    let usage = dst.host_usage("dst").await.expect("usage");
    assert_eq!(usage.vms, 1, "only the real migration holds memory");
    assert!(usage.rejected_connections > 0, "hostile preambles were refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_unreachable_target_keeps_vm_on_source() {
    let src = EngineHandle::start().expect("engine");
    src.add_host(HostConfig::new("src", NativeLayout::Kvm))
        .await
        .expect("src");
    let spec = VmSpec {
        workload: common::writer(10_000_000, MIB),
        ..VmSpec::new("stay", 4 * MIB)
    };
    src.create_vm("src", spec).await.expect("create");
    // A port nobody listens on: bind, learn it, close it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let mut req = MigrationRequest::new("stay", "src", "nowhere");
    req.target_addr = Some(addr);
    let err = src.start_migration(req).await.expect_err("refused");
    assert!(err.to_string().contains("cannot connect"), "{err}");
    let info = src.vm_info("src", "stay").await.expect("vm");
    assert!(info.state.is_running(), "{}", info.state);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_incoming_beyond_the_cap_waits_for_a_slot() {
    let src = EngineHandle::start().expect("engine");
    src.add_host(HostConfig::new("src", NativeLayout::XenHvm))
        .await
        .expect("src");
    let dst = EngineHandle::start().expect("engine");
    dst.add_host(HostConfig {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        max_incoming: 1,
        ..HostConfig::new("dst", NativeLayout::Kvm)
    })
    .await
    .expect("dst");
    let addr = dst.listen_address("dst").await.expect("ask").expect("listening");
    let mut ids = Vec::new();
    for i in 0..2 {
        let vm = format!("q{i}");
        let spec = VmSpec {
            workload: common::writer(10_000_000, MIB),
            ..VmSpec::new(vm.clone(), 16 * MIB)
        };
        src.create_vm("src", spec).await.expect("create");
        let mut req = MigrationRequest::new(vm, "src", "dst");
        req.target_addr = Some(addr);
        // About a second each, so the second one arrives while the first holds the slot.
        req.shaping.bandwidth_bytes_per_sec = Some(16_000_000);
        ids.push(src.start_migration(req).await.expect("start").id);
    }
    let deadline = tokio::time::Instant::now() + common::TIMEOUT;
    let mut saw_queue = false;
    while !saw_queue {
        let usage = dst.host_usage("dst").await.expect("usage");
        saw_queue = usage.queued_incoming == 1 && usage.vms == 1;
        if src.status(ids[0]).await.expect("status").report.is_some() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no queue seen");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(saw_queue, "the second migration waited behind the cap");
    for id in ids {
        let r = src.report(id).await.expect("report");
        assert_eq!(r.result, Outcome::Completed, "{:?}", r.error);
        assert!(r.verified);
    }
    assert_eq!(dst.list_vms("dst").await.expect("list").len(), 2);
}

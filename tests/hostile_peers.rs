//! Hostile peers against a keyed migration listener: a wrong key, a relay that changes or
//! replays a frame after the handshake, unauthenticated peers that announce huge frames, and
//! a crowd of idle connections while a migration runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use migratory::engine::{EngineHandle, HostConfig, MigrationRequest, Outcome, VmLocation, VmSpec};
use migratory::format::NativeLayout;
use migratory::link::tcp::raise_nofile_limit;
use migratory::protocol::auth::ClusterKey;
use migratory::vmm::{Pattern, WorkloadSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The one bound every wait in these tests uses.
const TIMEOUT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

fn key(byte: u8) -> ClusterKey {
    ClusterKey::new(&[byte; 32]).expect("key")
}

fn writer() -> WorkloadSpec {
    WorkloadSpec {
        rate_bytes_per_sec: 20_000_000,
        working_set_bytes: MIB,
        pattern: Pattern::HotSet,
        zero_fraction: 0.2,
        seed: 7,
    }
}

/// A source engine and a target engine listening on loopback, with these keys.
async fn engines(src_key: Option<ClusterKey>, dst_key: Option<ClusterKey>) -> (EngineHandle, EngineHandle, SocketAddr) {
    let src = EngineHandle::start().expect("engine");
    src.add_host(HostConfig {
        cluster_key: src_key,
        ..HostConfig::new("src", NativeLayout::XenHvm)
    })
    .await
    .expect("src");
    let dst = EngineHandle::start().expect("engine");
    dst.add_host(HostConfig {
        cluster_key: dst_key,
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        ..HostConfig::new("dst", NativeLayout::Kvm)
    })
    .await
    .expect("dst");
    let addr = dst.listen_address("dst").await.expect("ask").expect("listening");
    (src, dst, addr)
}

async fn create(src: &EngineHandle, vm: &str, bytes: u64) {
    let spec = VmSpec {
        workload: writer(),
        ..VmSpec::new(vm, bytes)
    };
    src.create_vm("src", spec).await.expect("create");
}

fn request(vm: &str, addr: SocketAddr) -> MigrationRequest {
    let mut req = MigrationRequest::new(vm, "src", "dst");
    req.target_addr = Some(addr);
    req
}

/// The VM runs on the source, makes progress there, and the target holds nothing.
async fn assert_stays_on_source(src: &EngineHandle, dst: &EngineHandle, vm: &str) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    // The target lets go of its reservation once its side of the link has failed.
    loop {
        let usage = dst.host_usage("dst").await.expect("usage");
        if (usage.vms, usage.committed_bytes) == (0, 0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "target keeps {usage:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = src.vm_info("src", vm).await.expect("vm on source");
    assert!(before.state.is_running(), "{}", before.state);
    loop {
        let now = src.vm_info("src", vm).await.expect("vm on source").stats.writes;
        if now > before.stats.writes {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{vm} makes no progress on the source"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Resident memory of this process, in bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// Preamble of protocol version 2: magic, version, link id, role, streams.
fn preamble(link_id: u64, role: u8, streams: u8) -> Vec<u8> {
    [b"MIGRLINK".as_slice(), &[2], &link_id.to_be_bytes(), &[role, streams]].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_wrong_key_refused_before_anything_is_reserved() {
    let (src, dst, addr) = engines(Some(key(1)), Some(key(2))).await;
    create(&src, "vm", 4 * MIB).await;
    let err = src.migrate(request("vm", addr)).await.expect_err("refused");
    assert!(err.to_string().contains("authentication failed"), "{err}");
    // A raw peer that answers the challenge with a guess is closed, and nothing is reserved.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut hello = preamble(99, 0, 1);
    hello.push(1);
    hello.extend_from_slice(&[7; 32]);
    s.write_all(&hello).await.expect("hello");
    let mut answer = [0u8; 65];
    s.read_exact(&mut answer).await.expect("server hello");
    assert_eq!(answer[0], 1, "the listener demands a key");
    s.write_all(&[0x42; 32]).await.expect("guess");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut rest))
        .await
        .expect("closed");
    assert!(rest.is_empty(), "no confirmation for a wrong proof");
    let usage = dst.host_usage("dst").await.expect("usage");
    assert_eq!((usage.vms, usage.committed_bytes), (0, 0), "nothing reserved");
    assert!(usage.rejected_connections >= 2, "{usage:?}");
    let info = src.vm_info("src", "vm").await.expect("vm");
    assert!(info.state.is_running());
}

/// What a relay does to the client's bytes of one connection once the handshake is past.
#[derive(Debug, Clone, Copy)]
enum Tamper {
    /// Flip one bit in the first control frame.
    ControlBit,
    /// Send the first control frame twice.
    ControlReplay,
    /// Flip one bit in the first page batch of data connection 1.
    DataBit,
}

/// Bytes the client sends on the control connection before its first frame: preamble,
/// hello (mode, nonce), proof.
const CONTROL_HANDSHAKE: usize = 19 + 33 + 32;
/// ... and on a data connection: preamble, proof.
const DATA_HANDSHAKE: usize = 19 + 32;
const TAG: usize = 16;

/// A relay on the path from source to target that forwards everything, but tampers with one
/// frame as `tamper` says.
async fn relay(target: SocketAddr, tamper: Tamper) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let _ = forward_tampered(&mut cr, &mut sw, tamper).await;
            });
        }
    });
    addr
}

async fn forward_tampered(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    tamper: Tamper,
) -> std::io::Result<()> {
    let mut pre = [0u8; 19];
    from.read_exact(&mut pre).await?;
    to.write_all(&pre).await?;
    let role = pre[17];
    let target_role = match tamper {
        Tamper::ControlBit | Tamper::ControlReplay => 0,
        Tamper::DataBit => 1,
    };
    if role == target_role {
        let skip = if role == 0 { CONTROL_HANDSHAKE } else { DATA_HANDSHAKE } - 19;
        // Piece by piece: the client's proof follows only the server's answer to its hello.
        for piece in if role == 0 { [33, skip - 33] } else { [skip, 0] } {
            let mut hs = vec![0u8; piece];
            from.read_exact(&mut hs).await?;
            to.write_all(&hs).await?;
        }
        let mut len = [0u8; 4];
        from.read_exact(&mut len).await?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize + TAG];
        from.read_exact(&mut body).await?;
        let mut frame = [len.as_slice(), &body].concat();
        match tamper {
            Tamper::ControlBit | Tamper::DataBit => {
                frame[4 + 3] ^= 0x10;
                to.write_all(&frame).await?;
            }
            Tamper::ControlReplay => {
                to.write_all(&frame).await?;
                to.write_all(&frame).await?;
            }
        }
    }
    tokio::io::copy(from, to).await?;
    Ok(())
}

async fn check_tampering_aborts(tamper: Tamper) {
    let (src, dst, addr) = engines(Some(key(5)), Some(key(5))).await;
    let vm = format!("{tamper:?}").to_lowercase();
    create(&src, &vm, 8 * MIB).await;
    let via = relay(addr, tamper).await;
    let report = tokio::time::timeout(TIMEOUT, src.migrate(request(&vm, via)))
        .await
        .expect("migration ends in time")
        .expect("report");
    println!(
        "{tamper:?}: {:?} at {:?}: {:?}",
        report.result, report.vm_location, report.error
    );
    // The source only sees its link go: a link failure, before commitment.
    assert!(
        matches!(report.result, Outcome::Failed | Outcome::Aborted),
        "{tamper:?}: {:?}",
        report.error
    );
    assert_eq!(report.vm_location, VmLocation::Source, "{tamper:?}");
    assert_stays_on_source(&src, &dst, &vm).await;
    println!("{tamper:?}: {}", report.error.unwrap_or_default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_relay_flipping_a_control_bit_closes_the_link() {
    let before = migratory::link::secure::rejected_frames();
    check_tampering_aborts(Tamper::ControlBit).await;
    assert!(
        migratory::link::secure::rejected_frames() > before,
        "the bad MAC is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_relay_replaying_a_control_frame_closes_the_link() {
    check_tampering_aborts(Tamper::ControlReplay).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_relay_flipping_a_page_batch_bit_closes_the_link() {
    check_tampering_aborts(Tamper::DataBit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_keyed_migration_over_three_streams_completes() {
    let (src, dst, addr) = engines(Some(key(6)), Some(key(6))).await;
    create(&src, "honest", 8 * MIB).await;
    let mut req = request("honest", addr);
    req.streams = 3;
    let report = src.migrate(req).await.expect("report");
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified);
    assert!(dst.vm_info("dst", "honest").await.expect("moved").state.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_unauthenticated_huge_frames_do_not_grow_memory() {
    let (_src, dst, addr) = engines(None, Some(key(3))).await;
    let chunk: Arc<[u8]> = vec![0x5a; MIB as usize].into();
    let before = rss_bytes();
    let mut peers = Vec::new();
    for i in 0..64u64 {
        let chunk = Arc::clone(&chunk);
        peers.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return;
            };
            // A keyed hello, then instead of a proof a 32 MiB frame and its bytes.
            let mut hello = preamble(1000 + i, 0, 1);
            hello.push(1);
            hello.extend_from_slice(&[9; 32]);
            hello.extend_from_slice(&(32u32 << 20).to_be_bytes());
            if s.write_all(&hello).await.is_err() {
                return;
            }
            for _ in 0..32 {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        }));
    }
    for p in peers {
        tokio::time::timeout(TIMEOUT, p)
            .await
            .expect("peer ends")
            .expect("peer task");
    }
    let grown = rss_bytes().saturating_sub(before);
    println!(
        "resident memory grew by {:.1} MiB for 64 peers of 32 MiB frames",
        grown as f64 / MIB as f64
    );
    assert!(grown < 64 * MIB, "grew by {grown} bytes");
    let usage = dst.host_usage("dst").await.expect("usage");
    assert_eq!(usage.vms, 0);
    assert!(usage.rejected_connections >= 64, "{usage:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_ten_thousand_idle_connections_do_not_stop_a_migration() {
    let (soft, hard) = raise_nofile_limit().expect("rlimit");
    println!("RLIMIT_NOFILE {soft}/{hard}");
    let (src, dst, addr) = engines(Some(key(4)), Some(key(4))).await;
    create(&src, "busy", 16 * MIB).await;
    let mut req = request("busy", addr);
    // About a second of transfer, so the crowd arrives while it runs.
    req.shaping.bandwidth_bytes_per_sec = Some(16_000_000);
    let id = src.start_migration(req).await.expect("start").id;
    let before = rss_bytes();
    // The crowd comes from another loopback address, as another host would.
    let crowd = tokio::time::timeout(TIMEOUT, async {
        let mut held = Vec::with_capacity(10_000);
        for _ in 0..10_000 {
            let Ok(sock) = tokio::net::TcpSocket::new_v4() else {
                break;
            };
            if sock.bind("127.0.0.2:0".parse().expect("addr")).is_err() {
                break;
            }
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), sock.connect(addr)).await {
                held.push(s);
            }
        }
        held
    })
    .await
    .expect("the crowd connects in time");
    let report = tokio::time::timeout(TIMEOUT, src.report(id))
        .await
        .expect("migration ends in time")
        .expect("report");
    let grown = rss_bytes().saturating_sub(before);
    println!(
        "{} idle connections opened; resident memory grew by {:.1} MiB",
        crowd.len(),
        grown as f64 / MIB as f64
    );
    assert_eq!(report.result, Outcome::Completed, "{:?}", report.error);
    assert!(report.verified);
    let usage = dst.host_usage("dst").await.expect("usage");
    assert!(
        usage.rejected_connections >= (crowd.len() as u64).saturating_sub(64),
        "the crowd was closed at accept: {usage:?}"
    );
    drop(crowd);
}

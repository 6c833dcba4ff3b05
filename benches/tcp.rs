//! Loopback TCP migration throughput with 1, 2 and 4 data streams, each as a ratio to a plain
//! TCP copy of the same bytes measured in the same run (DESIGN.md target: >= 0.8).
//!
//! `cargo bench --bench tcp` (MIGRATORY_BENCH_MIB sets the VM size, default 1024). Source and
//! target are two engines (two actor systems) in this process, joined by real loopback sockets;
//! the baseline is one writer thread and one reader thread on a loopback socket.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use migratory::engine::{EngineHandle, HostConfig, MigrationRequest, Outcome, VmSpec};
use migratory::format::NativeLayout;
use migratory::link::tls::TlsSetup;
use migratory::protocol::Algorithm;
use migratory::vmm::WorkloadSpec;

fn plain_tcp_bytes_per_sec(bytes: u64) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
        got
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        s.write_all(&chunk[..n]).expect("write");
        sent += n as u64;
    }
    drop(s);
    let got = reader.join().expect("reader");
    got as f64 / t.elapsed().as_secs_f64()
}

/// Two host identities signed by one fresh CA (certificates made at run time).
fn tls_pair() -> (Option<TlsSetup>, Option<TlsSetup>) {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca_key = KeyPair::generate().expect("key");
    let ca_pem = ca.self_signed(&ca_key).expect("ca").pem();
    let issuer = Issuer::new(ca, ca_key);
    let one = || {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("key");
        let cert = p.signed_by(&key, &issuer).expect("cert");
        TlsSetup::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), ca_pem.as_bytes()).ok()
    };
    (one(), one())
}

fn main() {
    let mib: u64 = std::env::var("MIGRATORY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let bytes = mib << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("{mib} MiB idle VM, stop-and-copy over loopback TCP");
    println!("{:<22} {:>12} {:>8}", "", "MB/s", "ratio");
    for (streams, tls) in [(1u8, false), (2, false), (4, false), (2, true)] {
        let baseline = plain_tcp_bytes_per_sec(bytes);
        let report = rt.block_on(async {
            let (src_tls, dst_tls) = if tls { tls_pair() } else { (None, None) };
            let src = EngineHandle::start().expect("engine");
            src.add_host(HostConfig {
                tls: src_tls,
                ..HostConfig::new("a", NativeLayout::XenHvm)
            })
            .await
            .expect("host");
            let dst = EngineHandle::start().expect("engine");
            dst.add_host(HostConfig {
                listen: Some("127.0.0.1:0".parse().expect("addr")),
                tls: dst_tls,
                ..HostConfig::new("b", NativeLayout::Kvm)
            })
            .await
            .expect("host");
            let addr = dst.listen_address("b").await.expect("ask").expect("listening");
            let spec = VmSpec {
                workload: WorkloadSpec {
                    zero_fraction: 0.0,
                    ..WorkloadSpec::idle()
                },
                ..VmSpec::new("bench", bytes)
            };
            src.create_vm("a", spec).await.expect("create");
            let mut req = MigrationRequest::new("bench", "a", "b").algorithm(Algorithm::StopAndCopy);
            req.target_addr = Some(addr);
            req.streams = streams;
            src.migrate(req).await.expect("migrate")
        });
        assert_eq!(report.result, Outcome::Completed);
        let stage = report
            .stages
            .iter()
            .find(|s| s.name == "stopcopy")
            .map(|s| s.duration_s)
            .unwrap_or(report.total_s);
        let mig = report.bytes_sent as f64 / stage;
        println!(
            "{:<22} {:>12.1} {:>8}",
            format!("plain TCP copy"),
            baseline / 1e6,
            "1.00"
        );
        println!(
            "{:<22} {:>12.1} {:>8.2}   (target >= 0.80; verified {})",
            format!("migration, {streams} stream(s){}", if tls { ", TLS" } else { "" }),
            mig / 1e6,
            mig / baseline,
            report.verified
        );
    }
}

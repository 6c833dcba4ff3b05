//! Live migration between this engine's kvm backend and a real QEMU, in QEMU's own migration
//! stream, both ways, with QEMU on TCG and on KVM: the self-checking guest writes 100 MB/s all
//! along and must find nothing wrong; a page flipped in the stream is caught; a stream with a
//! device this engine does not carry is refused by the device's name while QEMU keeps its VM.
//! Each test prints SKIPPED and returns where /dev/kvm or `qemu-system-x86_64` is missing.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use migratory::engine::qemu::{FromQemuOptions, QemuLegError, DEFAULT_MACHINE};
use migratory::engine::{EngineHandle, HostConfig, VmSpec};
use migratory::qemu::interop;
use migratory::qemu::round_trip::{round_trip, RoundTrip, RoundTripOptions};
use migratory::qemu::{find_qemu, Accel, Qemu, QemuConfig};
use migratory::vmm::kvm::kvm_available;
use migratory::vmm::kvm::program::STATE_ADDR;
use migratory::vmm::{BackendSpec, Pattern, WorkloadSpec};

/// The guest of these tests: 128 MiB, 32 MiB written at 100 MB/s.
const RAM: u64 = 128 << 20;
const RATE: u64 = 100_000_000;
const WORKING_SET: u64 = 32 << 20;
/// The guest's state header: its first word is the progress counter, which the guest checks
/// against the sum of its ledger in every verify pass, so a flipped bit there is always seen.
const HEADER_PAGE: u64 = STATE_ADDR / 4096;

/// These tests run one at a time. Six round trips at once on this project's 2-core machines made
/// the TCG trip fail 2 times in 4: pages came back unlike the paused QEMU source's and the guest
/// counted an integrity error (the checks caught it; nothing passed silently). One at a time it
/// passed every run. The cause is not found yet; see the closing note of issue 18.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn needs(test: &str, accel: Accel) -> Option<PathBuf> {
    if !kvm_available() {
        println!("SKIPPED: {test}: /dev/kvm is not available (the kvm backend runs the guest)");
        return None;
    }
    let Some(qemu) = find_qemu() else {
        println!("SKIPPED: {test}: qemu-system-x86_64 is not installed");
        return None;
    };
    if accel == Accel::Kvm && Accel::detect() != Accel::Kvm {
        println!("SKIPPED: {test}: QEMU cannot use /dev/kvm here");
        return None;
    }
    Some(qemu)
}

async fn engine_with_guest() -> EngineHandle {
    let engine = EngineHandle::start().expect("engine");
    engine
        .add_host(HostConfig::with_backend("kvm", BackendSpec::Kvm))
        .await
        .expect("kvm host");
    let spec = VmSpec {
        workload: WorkloadSpec {
            rate_bytes_per_sec: RATE,
            working_set_bytes: WORKING_SET,
            pattern: Pattern::HotSet,
            zero_fraction: 0.0,
            seed: 7,
        },
        vcpus: 1,
        ..VmSpec::new("vm", RAM)
    };
    engine.create_vm("kvm", spec).await.expect("guest boots");
    engine
}

async fn trip(binary: PathBuf, accel: Accel, tweak: impl FnOnce(&mut RoundTripOptions)) -> RoundTrip {
    let engine = engine_with_guest().await;
    let mut options = RoundTripOptions::new(binary, accel);
    tweak(&mut options);
    let trip = round_trip(&engine, "kvm", "vm", &options).await.expect("the trip runs");
    println!("{}", serde_json::to_string_pretty(&trip).expect("json"));
    trip
}

fn assert_intact(t: &RoundTrip) {
    assert_eq!(t.legs.len(), 2, "{t:?}");
    for leg in &t.legs {
        assert_eq!(leg.result, "completed", "{leg:?}");
        // Every page written is sent at least once (the zero ones as fill records).
        assert!(leg.bytes >= WORKING_SET, "a leg moved the RAM: {leg:?}");
    }
    assert!(t.intact, "{t:?}");
    assert_eq!(t.integrity_errors, 0);
    assert!(t.ram_mismatched_pages.is_empty());
    assert_eq!(t.vm_on, "kvm");
    // The guest ran and checked itself on every host.
    assert_eq!(t.progress.len(), 3);
    for p in &t.progress {
        assert!(p.pages_written > 0 && p.verify_passes > 0, "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_busy_guest_goes_to_qemu_tcg_and_back_intact() {
    let _one_at_a_time = SERIAL.lock().await;
    let Some(qemu) = needs("test_a_busy_guest_goes_to_qemu_tcg_and_back_intact", Accel::Tcg) else {
        return;
    };
    let t = trip(qemu, Accel::Tcg, |_| {}).await;
    assert_intact(&t);
    assert_eq!(t.through, "qemu-tcg");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_busy_guest_goes_to_qemu_kvm_and_back_intact() {
    let _one_at_a_time = SERIAL.lock().await;
    let Some(qemu) = needs("test_a_busy_guest_goes_to_qemu_kvm_and_back_intact", Accel::Kvm) else {
        return;
    };
    let t = trip(qemu, Accel::Kvm, |_| {}).await;
    assert_intact(&t);
    assert_eq!(t.through, "qemu-kvm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_byte_flipped_in_the_stream_from_qemu_is_caught() {
    let _one_at_a_time = SERIAL.lock().await;
    let Some(qemu) = needs("test_a_byte_flipped_in_the_stream_from_qemu_is_caught", Accel::Tcg) else {
        return;
    };
    let t = trip(qemu, Accel::Tcg, |o| o.flip_page_back = Some(HEADER_PAGE)).await;
    assert!(t.legs.iter().all(|l| l.result == "completed"), "{t:?}");
    // From outside: the page that came back is not the paused source's, and it is named.
    assert_eq!(t.ram_mismatched_pages, vec![HEADER_PAGE]);
    // From inside: the guest's own ledger check saw it too.
    assert!(t.integrity_errors >= 1, "{t:?}");
    assert!(!t.intact);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_byte_flipped_in_the_stream_to_qemu_is_caught_by_the_guest() {
    let _one_at_a_time = SERIAL.lock().await;
    let Some(qemu) = needs(
        "test_a_byte_flipped_in_the_stream_to_qemu_is_caught_by_the_guest",
        Accel::Tcg,
    ) else {
        return;
    };
    let t = trip(qemu, Accel::Tcg, |o| o.flip_page_there = Some(HEADER_PAGE)).await;
    assert!(t.legs.iter().all(|l| l.result == "completed"), "{t:?}");
    // QEMU loaded what it was sent; the guest, running there, found the damage.
    assert!(t.integrity_errors >= 1, "{t:?}");
    assert!(t.ram_mismatched_pages.is_empty(), "the way back was clean: {t:?}");
    assert!(!t.intact);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_stream_with_an_unknown_device_is_refused_by_name_and_qemu_keeps_the_vm() {
    let _one_at_a_time = SERIAL.lock().await;
    let test = "test_a_stream_with_an_unknown_device_is_refused_by_name_and_qemu_keeps_the_vm";
    let Some(binary) = needs(test, Accel::Tcg) else {
        return;
    };
    let engine = EngineHandle::start().expect("engine");
    engine
        .add_host(HostConfig::with_backend("kvm", BackendSpec::Kvm))
        .await
        .expect("kvm host");
    // A QEMU running its own firmware with one device more than this engine carries.
    let config = QemuConfig {
        binary,
        accel: Accel::Tcg,
        memory_mib: 64,
        incoming: false,
        machine: DEFAULT_MACHINE.to_string(),
        extra_args: vec!["-device".into(), UNKNOWN_DEVICE.into()],
    };
    let mut qemu = tokio::task::spawn_blocking(move || Qemu::start(&config, None))
        .await
        .expect("thread")
        .expect("QEMU starts");
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("addr");
    let accept = tokio::task::spawn_blocking(move || listener.accept().map(|(s, _)| s));
    let mut qemu = tokio::task::spawn_blocking(move || {
        interop::send_to(&mut qemu, addr, 10_000_000_000).expect("QEMU migrates");
        qemu
    })
    .await
    .expect("thread");
    let stream = accept.await.expect("thread").expect("QEMU connects");
    let refused = engine
        .receive_from_qemu("kvm", stream, FromQemuOptions::default())
        .await
        .expect_err("refused");
    let text = refused.to_string();
    assert!(matches!(refused, QemuLegError::Stream(_)), "{refused:?}");
    assert!(text.contains(UNKNOWN_SECTION), "the error names the device: {text}");
    // Nothing stays here, and QEMU, told of the failure, runs its VM again.
    assert!(engine.list_vms("kvm").await.expect("list").is_empty());
    tokio::task::spawn_blocking(move || {
        let failed = interop::wait_for_end(&mut qemu, Duration::from_secs(30));
        assert!(
            matches!(failed, Err(interop::InteropError::Failed { .. })),
            "{failed:?}"
        );
        interop::wait_for_state(&mut qemu, "running", Duration::from_secs(30)).expect("QEMU resumed its VM");
    })
    .await
    .expect("thread");
}

/// A device with migration state that the pc machine does not have by default.
const UNKNOWN_DEVICE: &str = "ib700";
/// Its section's name in the stream.
const UNKNOWN_SECTION: &str = "ib700_wdt";

/// A destination that reads the whole stream and then hangs up without a word, as QEMU 7.2
/// does when a load fails after the last byte (or as a lost answer would look): the VM may run
/// there, so the source copy must be held paused, and come back only when the operator says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_destination_silent_after_the_whole_stream_leaves_the_vm_held_not_resumed() {
    let _one_at_a_time = SERIAL.lock().await;
    if !kvm_available() {
        println!("SKIPPED: test_a_destination_silent_after_the_whole_stream_leaves_the_vm_held_not_resumed: /dev/kvm is not available");
        return;
    }
    use migratory::qemu::stream::reader::{Record, StreamReader};
    use migratory::vm::HeldReason;

    let engine = engine_with_guest().await;
    let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("addr");
    let silent = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("the source connects");
        let mut reader = StreamReader::new(std::io::BufReader::new(stream));
        reader.read_header().expect("header");
        loop {
            match reader.next_record().expect("a record") {
                Record::Devices(_) => break,
                _ => continue,
            }
        }
        // The whole stream read, vCPU included: hang up without SHUT.
    });
    let mut options = migratory::engine::qemu::ToQemuOptions::new(addr);
    options.confirm_timeout = Duration::from_secs(5);
    let err = engine
        .migrate_to_qemu("kvm", "vm", options)
        .await
        .expect_err("nothing confirmed it");
    silent.join().expect("the fake destination read the stream");
    assert!(matches!(err, QemuLegError::Unconfirmed { .. }), "{err:?}");
    let held = engine.vm_info("kvm", "vm").await.expect("the copy is still here");
    assert_eq!(
        held.held.as_ref().map(|h| h.reason),
        Some(HeldReason::CommittedUnconfirmed),
        "{held:?}"
    );
    assert!(
        !held.state.is_running(),
        "never resumed behind the operator's back: {held:?}"
    );
    // Without the operator's word there is no one to ask: refused.
    assert!(engine.resume_held("kvm", "vm", false).await.is_err());
    let back = engine
        .resume_held("kvm", "vm", true)
        .await
        .expect("the operator resumes it");
    assert!(back.state.is_running());
    let before = back.stats.writes;
    let mut now = back;
    for _ in 0..200 {
        now = engine.vm_info("kvm", "vm").await.expect("vm");
        if now.stats.writes > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(now.stats.writes > before, "the guest runs again: {now:?}");
    assert_eq!(now.stats.integrity_errors, 0);
}

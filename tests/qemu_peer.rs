//! QEMU as a peer (`migratory::qemu`): the project's guest boots under real QEMU and reports on
//! debugcon, a QEMU-to-QEMU migration driven by our QMP client completes with QEMU's figures,
//! and the QMP client refuses what a QEMU would never send. The tests with QEMU print SKIPPED
//! and return where `qemu-system-x86_64` is not installed; they use KVM where /dev/kvm opens and
//! TCG elsewhere.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use migratory::qemu::guest::{PASS_PREFIX, READY_LINE};
use migratory::qemu::{
    build_image, find_qemu, host_tsc_hz, migrate, Accel, GuestSpec, MigrateOptions, Qemu, QemuConfig, QmpClient,
    QmpError,
};

/// A bound on every wait for the guest: TCG on a loaded machine boots slowly.
const TIMEOUT: Duration = Duration::from_secs(60);

fn qemu_or_skip(test: &str) -> Option<PathBuf> {
    let found = find_qemu();
    if found.is_none() {
        println!("SKIPPED: {test}: qemu-system-x86_64 is not installed");
    }
    found
}

/// The small guest of these tests: 64 MiB, a hot set of 8 MiB at 100 MB/s.
fn small_guest() -> (GuestSpec, Vec<u8>) {
    // Under TCG too the guest's TSC counts at the host's rate, so one measurement paces both.
    let spec = GuestSpec::busy(64 << 20, 8 << 20, 100_000_000, host_tsc_hz());
    let image = build_image(&spec).expect("fake QEMU setup");
    (spec, image)
}

fn config(binary: PathBuf, accel: Accel, spec: &GuestSpec, incoming: bool) -> QemuConfig {
    QemuConfig {
        binary,
        accel,
        memory_mib: spec.memory_mib(),
        incoming,
        machine: "pc".into(),
        extra_args: Vec::new(),
    }
}

#[test]
fn test_guest_boots_and_reports_progress_on_debugcon() {
    let Some(binary) = qemu_or_skip("test_guest_boots_and_reports_progress_on_debugcon") else {
        return;
    };
    let accel = Accel::detect();
    let (spec, image) = small_guest();
    let qemu = Qemu::start(&config(binary, accel, &spec, false), Some(&image)).unwrap();
    qemu.wait_for_output(READY_LINE, TIMEOUT).unwrap();
    // Two passes over the hot set: the loop runs and reports.
    qemu.wait_for_output(&format!("{PASS_PREFIX}00000002"), TIMEOUT)
        .unwrap();
    println!("guest under QEMU ({}): {:?}", accel.name(), qemu.debug_output());
}

#[test]
fn test_qemu_to_qemu_migration_completes_with_a_downtime() {
    let Some(binary) = qemu_or_skip("test_qemu_to_qemu_migration_completes_with_a_downtime") else {
        return;
    };
    let accel = Accel::detect();
    let (spec, image) = small_guest();
    let mut source = Qemu::start(&config(binary.clone(), accel, &spec, false), Some(&image)).unwrap();
    source.wait_for_output(READY_LINE, TIMEOUT).unwrap();
    let mut target = Qemu::start(&config(binary, accel, &spec, true), Some(&image)).unwrap();
    let moved = migrate(&mut source, &mut target, &MigrateOptions::default()).unwrap();
    let info = source.qmp().query_migrate().unwrap();
    assert_eq!(info.status.as_deref(), Some("completed"));
    assert!(info.downtime.is_some(), "{info:?}");
    assert!(moved.transferred_bytes > 0);
    assert_eq!(target.qmp().run_state().unwrap(), "running");
    // The guest keeps going on the target: a pass it had not reported before the move.
    let before = target.debug_output().matches(PASS_PREFIX).count();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while target.debug_output().matches(PASS_PREFIX).count() <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest made no progress on the target: {:?}",
            target.debug_output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "QEMU ({}) migration: downtime {} ms, total {} ms, {} bytes",
        accel.name(),
        moved.downtime_ms,
        moved.total_time_ms,
        moved.transferred_bytes
    );
}

/// A fake QEMU: the greeting, the answer to `qmp_capabilities`, then `answer` (with the id of
/// the command it answers substituted for `ID`) to the next command.
fn fake_qemu(answer: &'static str) -> (tempdir::Dir, std::thread::JoinHandle<()>) {
    let dir = tempdir::Dir::new();
    let listener = UnixListener::bind(dir.path.join("qmp.sock")).expect("fake QEMU setup");
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("fake QEMU setup");
        let mut writer = stream.try_clone().expect("fake QEMU setup");
        let mut lines = BufReader::new(stream).lines();
        writeln!(
            writer,
            r#"{{"QMP": {{"version": {{"qemu": {{"major": 7, "minor": 2, "micro": 0}}}}, "capabilities": []}}}}"#
        )
        .expect("fake QEMU setup");
        let id =
            |line: &str| serde_json::from_str::<serde_json::Value>(line).expect("fake QEMU setup")["id"].to_string();
        let first = lines.next().expect("a line").expect("readable");
        writeln!(writer, r#"{{"return": {{}}, "id": {}}}"#, id(&first)).expect("fake QEMU setup");
        let second = lines.next().expect("a line").expect("readable");
        writeln!(writer, "{}", answer.replace("ID", &id(&second))).expect("fake QEMU setup");
        // Hold the socket open until the client has read the answer and hung up.
        let _ = lines.next();
    });
    (dir, server)
}

fn ask_fake(answer: &'static str) -> Result<serde_json::Value, QmpError> {
    let (dir, server) = fake_qemu(answer);
    let path = dir.path.join("qmp.sock");
    let stream = UnixStream::connect(&path).expect("fake QEMU setup");
    let mut client = QmpClient::over(stream, &path).expect("fake QEMU setup");
    assert_eq!(client.version(), "7.2.0");
    let result = client.execute("query-migrate", None);
    drop(client);
    server.join().expect("fake QEMU setup");
    result
}

#[test]
fn test_qmp_client_refuses_error_and_malformed_answers() {
    assert!(matches!(
        ask_fake(r#"{"return": {"status": "completed"}, "id": ID}"#),
        Ok(v) if v["status"] == "completed"
    ));
    let err = ask_fake(r#"{"error": {"class": "GenericError", "desc": "no migration"}, "id": ID}"#).unwrap_err();
    assert!(
        matches!(&err, QmpError::Command { class, desc, .. } if class == "GenericError" && desc == "no migration"),
        "{err:?}"
    );
    assert!(matches!(ask_fake("this is not json"), Err(QmpError::Malformed { .. })));
    assert!(matches!(ask_fake(r#"{"id": ID}"#), Err(QmpError::Malformed { .. })));
    assert!(matches!(
        ask_fake(r#"{"return": {}, "id": 999999}"#),
        Err(QmpError::WrongId { expected: 2, .. })
    ));
    assert!(matches!(ask_fake(""), Err(QmpError::Malformed { .. })));
}

#[test]
fn test_qmp_client_refuses_a_peer_without_greeting() {
    let dir = tempdir::Dir::new();
    let path = dir.path.join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        writeln!(stream, r#"{{"hello": "not qemu"}}"#).unwrap();
    });
    let stream = UnixStream::connect(&path).unwrap();
    let err = QmpClient::over(stream, &path).unwrap_err();
    server.join().unwrap();
    assert!(matches!(err, QmpError::Greeting { .. }), "{err:?}");
}

/// A private scratch directory removed on drop.
mod tempdir {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};

    static NEXT: AtomicU64 = AtomicU64::new(0);

    pub struct Dir {
        pub path: PathBuf,
    }

    impl Dir {
        pub fn new() -> Self {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("migratory-qmp-test-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir(&path).expect("fake QEMU setup");
            Self { path }
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

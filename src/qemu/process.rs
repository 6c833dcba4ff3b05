//! One `qemu-system-x86_64` process running the project's guest ([`super::guest`]), with its QMP
//! socket, its debugcon output, its stderr and its kernel image in a private scratch directory.
//! Dropping a [`Qemu`] kills (SIGKILL) and reaps the process and removes the directory.
//!
//! The command line (the source; the target adds `-incoming defer`; a QEMU that will only
//! receive a migration runs without `-kernel`):
//!
//! ```text
//! qemu-system-x86_64 -machine MACHINE,accel=kvm|tcg -cpu qemu64 -m MIB -nographic -nodefaults
//!   -kernel DIR/guest.img -qmp unix:DIR/qmp.sock,server=on,wait=off
//!   -chardev file,id=debugcon,path=DIR/debugcon.log -device isa-debugcon,iobase=0xe9,chardev=debugcon
//! ```

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::guest::DEBUGCON_PORT;
use super::qmp::{QmpClient, QmpError};

/// The executable looked for on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// How long QEMU may take to open its QMP socket.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The most debugcon output read back.
pub const MAX_DEBUG_OUTPUT: u64 = 1 << 20;

/// Hardware virtualization or emulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM, through /dev/kvm.
    Kvm,
    /// TCG, QEMU's pure software emulation.
    Tcg,
}

impl Accel {
    /// KVM when /dev/kvm opens for reading and writing, else TCG.
    pub fn detect() -> Accel {
        let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
        if kvm.is_ok() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    /// `kvm` or `tcg`, as `-machine accel=` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// `qemu-system-x86_64` on `PATH`, if there is one.
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(QEMU_BINARY))
        .find(|candidate| candidate.is_file())
}

/// Why a QEMU could not be started or watched.
#[derive(Debug, Error)]
pub enum ProcessError {
    /// The scratch directory or a file in it.
    #[error("QEMU scratch file {path}")]
    Scratch {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The executable could not be run.
    #[error("cannot run {binary}")]
    Spawn {
        /// The executable.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU exited, or did not open its QMP socket in time.
    #[error("QEMU did not start ({why}); stderr: {stderr}")]
    NotReady {
        /// What happened.
        why: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// The QMP session.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// The guest did not print what was waited for.
    #[error("guest did not print {wanted:?} within {waited:?}; it printed: {printed}")]
    GuestSilent {
        /// The text waited for.
        wanted: String,
        /// How long.
        waited: Duration,
        /// The end of its output.
        printed: String,
    },
}

/// How to start one QEMU.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// The executable.
    pub binary: PathBuf,
    /// KVM or TCG.
    pub accel: Accel,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Wait for an incoming migration (`-incoming defer`) instead of booting the guest.
    pub incoming: bool,
    /// The machine type: `pc` (QEMU's current i440FX machine), or a versioned one such as
    /// `pc-i440fx-7.2`, which a migration stream names and the receiving QEMU must match.
    pub machine: String,
    /// More arguments, appended as given (an extra `-device`, for instance).
    pub extra_args: Vec<String>,
}

/// A running QEMU; killed on drop.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    dir: PathBuf,
    qmp: QmpClient,
    accel: Accel,
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

impl Qemu {
    /// Starts QEMU with `image` as its `-kernel` and connects to its QMP socket.
    pub fn start(config: &QemuConfig, image: Option<&[u8]>) -> Result<Qemu, ProcessError> {
        let dir = scratch_dir()?;
        let scratch = |path: PathBuf| move |source| ProcessError::Scratch { path, source };
        let kernel = dir.join("guest.img");
        if let Some(image) = image {
            if let Err(e) = std::fs::write(&kernel, image) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(scratch(kernel)(e));
            }
        }
        let stderr_path = dir.join("stderr.log");
        let stderr = match File::create(&stderr_path) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(scratch(stderr_path)(e));
            }
        };
        let qmp_path = dir.join("qmp.sock");
        let mut cmd = Command::new(&config.binary);
        cmd.args(["-machine", &format!("{},accel={}", config.machine, config.accel.name())])
            .args(["-cpu", "qemu64", "-m", &config.memory_mib.to_string()])
            .args(["-nographic", "-nodefaults"]);
        if image.is_some() {
            cmd.arg("-kernel").arg(&kernel);
        }
        cmd.arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
            .arg("-chardev")
            .arg(format!("file,id=debugcon,path={}", dir.join("debugcon.log").display()))
            .args([
                "-device",
                &format!("isa-debugcon,iobase={DEBUGCON_PORT:#x},chardev=debugcon"),
            ]);
        if config.incoming {
            cmd.args(["-incoming", "defer"]);
        }
        cmd.args(&config.extra_args);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(ProcessError::Spawn {
                    binary: config.binary.clone(),
                    source,
                });
            }
        };
        // From here the guard kills and cleans up on every error.
        let mut guard = Guard {
            child: Some(child),
            dir: dir.clone(),
        };
        let qmp = connect_qmp(&mut guard, &qmp_path)?;
        let child = guard.child.take().ok_or_else(|| ProcessError::NotReady {
            why: "lost its process".into(),
            stderr: String::new(),
        })?;
        Ok(Qemu {
            child,
            dir,
            qmp,
            accel: config.accel,
        })
    }

    /// Its QMP session.
    pub fn qmp(&mut self) -> &mut QmpClient {
        &mut self.qmp
    }

    /// KVM or TCG.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// A path in this QEMU's private scratch directory, removed with it.
    pub fn scratch_file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// What the guest printed on debugcon so far (at most [`MAX_DEBUG_OUTPUT`] bytes).
    pub fn debug_output(&self) -> String {
        read_bounded(&self.dir.join("debugcon.log"))
    }

    /// The end of QEMU's stderr.
    pub fn stderr_tail(&self) -> String {
        tail(&read_bounded(&self.dir.join("stderr.log")))
    }

    /// Waits until the guest has printed `wanted` (checked every 20 ms), at most `timeout`.
    pub fn wait_for_output(&self, wanted: &str, timeout: Duration) -> Result<(), ProcessError> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.debug_output();
            if out.contains(wanted) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::GuestSilent {
                    wanted: wanted.to_string(),
                    waited: timeout,
                    printed: tail(&out),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills and cleans up a QEMU that did not finish starting.
struct Guard {
    child: Option<Child>,
    dir: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Connects once the socket exists, polling (QEMU gives no other sign), until it exits or
/// [`START_TIMEOUT`] passes.
fn connect_qmp(guard: &mut Guard, path: &Path) -> Result<QmpClient, ProcessError> {
    let deadline = Instant::now() + START_TIMEOUT;
    let stderr = |dir: &Path| tail(&read_bounded(&dir.join("stderr.log")));
    loop {
        if let Some(child) = guard.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ProcessError::NotReady {
                    why: format!("it exited with {status}"),
                    stderr: stderr(&guard.dir),
                });
            }
        }
        if path.exists() {
            match QmpClient::connect(path) {
                Ok(client) => return Ok(client),
                Err(QmpError::Io { .. }) if Instant::now() < deadline => {}
                Err(e) => return Err(e.into()),
            }
        }
        if Instant::now() >= deadline {
            return Err(ProcessError::NotReady {
                why: format!("no QMP socket in {:?}", START_TIMEOUT),
                stderr: stderr(&guard.dir),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn scratch_dir() -> Result<PathBuf, ProcessError> {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("migratory-qemu-{}-{nanos}-{n}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|source| ProcessError::Scratch {
            path: dir.clone(),
            source,
        })?;
    Ok(dir)
}

fn read_bounded(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(MAX_DEBUG_OUTPUT).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last 400 characters.
fn tail(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    chars[chars.len().saturating_sub(400)..].iter().collect()
}

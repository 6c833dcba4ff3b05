//! Post-copy demand paging with userfaultfd: a guest touch of a page that has not arrived yet
//! blocks the touching thread (a vCPU, or KVM on its behalf) until the VMM installs the page.
//!
//! # How to use it
//!
//! 1. [`Userfault::new`] opens the descriptor and does the API handshake.
//! 2. [`Userfault::register`] the guest RAM, then [`discard`] every page that has not arrived
//!    yet. In the other order, a touch between the two would map a zero page that never faults.
//! 3. A fault-reader thread loops on [`Userfault::wait_fault`] and asks the source for each
//!    address it returns; installer threads put pages in with [`Userfault::copy`] (or
//!    [`Userfault::zero`] for zero-page markers), which also wakes the blocked threads. The
//!    background push installs pages the same way; whichever install comes second gets
//!    [`Install::AlreadyPresent`] and changes nothing.
//! 4. When every page is present, [`Userfault::unregister`] (or drop the `Userfault`).
//!
//! ```no_run
//! use migratory::vmm::kvm::uffd::{discard, Install, Userfault};
//! use std::time::Duration;
//!
//! # fn demo(ram: *mut u8, ram_len: usize, fetch: impl Fn(u64) -> Vec<u8>) -> Result<(), Box<dyn std::error::Error>> {
//! let uffd = Userfault::new()?;
//! // SAFETY: `ram` is a private anonymous mapping of `ram_len` bytes that this VMM owns for as
//! // long as the registration lasts, and nothing holds a Rust reference into it.
//! unsafe {
//!     uffd.register(ram, ram_len)?;
//!     discard(ram, ram_len)?;
//! }
//! while let Some(addr) = uffd.wait_fault(Duration::from_secs(1))? {
//!     let page = fetch(addr);
//!     // SAFETY: `addr` is a page of the registered range; `page` lives outside it.
//!     let _: Install = unsafe { uffd.copy(addr as *mut u8, &page)? };
//! }
//! uffd.unregister(ram, ram_len)?;
//! # Ok(())
//! # }
//! ```
//!
//! # Kernel behaviour worth knowing
//!
//! * **MISSING mode faults only on pages with no page-table entry.** A page that was ever
//!   touched (or prefaulted by `MAP_POPULATE`) is present and is served from memory without a
//!   fault. To demand-page over a mapping that already holds pages (a reservation maps its RAM
//!   populated), [`discard`] the pages still to come first; afterwards their first touch faults.
//! * **Installs must go through [`Userfault::copy`] or [`Userfault::zero`].** A plain store into
//!   a registered missing page is itself a fault: the storing thread blocks like any guest
//!   thread, and if it is the fault reader, nobody is left to wake it. For the same reason the
//!   source buffer of a copy must not lie in a registered range.
//! * **An install never overwrites.** If the page is already present the kernel answers
//!   `EEXIST`, reported as [`Install::AlreadyPresent`], and the page keeps the content that
//!   arrived first. A page installed by [`Userfault::zero`] is the shared zero page: it reads
//!   as zero without a fault and a later write is an ordinary copy-on-write, not a fault.
//! * **Unregistering (or dropping the descriptor) ends demand paging.** The kernel wakes every
//!   blocked thread in the range; their retried access, and every later one, finds an ordinary
//!   anonymous mapping in which the pages never installed read as zero.
//! * **A fault may be resolved before it is read.** `poll` reporting readable does not promise
//!   that `read` finds a message (another install may have woken the thread first); the
//!   descriptor is non-blocking, and on a blocking one `poll` returns `POLLERR`. One thread can
//!   also fault twice on the same page (a signal interrupts the wait and it retries), so the
//!   same address can be reported twice; the second install then reports `AlreadyPresent`.
//! * **A range belongs to one userfaultfd.** Registering it with a second one fails with
//!   `EBUSY`; an install outside every registered range fails with `ENOENT`.
//! * **Privilege.** `userfaultfd(2)` needs `CAP_SYS_PTRACE` unless `vm.unprivileged_userfaultfd`
//!   is 1, and an unprivileged descriptor may only handle faults from user mode. Faults taken
//!   by KVM on the guest's behalf are kernel-mode faults, so when the system call is refused
//!   with `EPERM`, [`Userfault::new`] asks `/dev/userfaultfd` (its file mode decides who may
//!   use it), which hands out descriptors that handle both.
//! * Only the features of API 0xAA with no optional feature bits are used: the reader sees
//!   page-fault events only, and addresses are reported page-aligned.

use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::units::PAGE_SIZE;

// The ABI of linux/userfaultfd.h, written out here so that the crate needs nothing but libc.

/// `UFFD_API`: the only API version the kernel accepts in the handshake.
const UFFD_API: u64 = 0xAA;
/// `UFFDIO`: the ioctl type byte shared by every userfaultfd ioctl.
const UFFDIO: u32 = 0xAA;
/// `USERFAULTFD_IOC`: the ioctl type byte of `/dev/userfaultfd`.
const USERFAULTFD_IOC: u32 = 0xAA;

/// `_UFFDIO_*` command numbers; each also names its bit in the `ioctls` masks the kernel
/// returns.
const NR_REGISTER: u32 = 0x00;
const NR_UNREGISTER: u32 = 0x01;
const NR_WAKE: u32 = 0x02;
const NR_COPY: u32 = 0x03;
const NR_ZEROPAGE: u32 = 0x04;
const NR_API: u32 = 0x3F;

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

/// The range ioctls this module uses; registering a range that lacks one (hugetlbfs lacks
/// ZEROPAGE) is refused rather than failing later at the first install.
const NEEDED_RANGE_IOCTLS: u64 = (1 << NR_WAKE) | (1 << NR_COPY) | (1 << NR_ZEROPAGE);

/// How often an install that makes no progress is retried on `EAGAIN`. The kernel says `EAGAIN`
/// without progress while the address space is changing under a non-cooperative event; with
/// no event features enabled that window is short, so a few yields are enough, and a hard
/// bound turns a kernel that keeps refusing into an error instead of a hang.
const MAX_STALLED_RETRIES: u32 = 64;

// ioctl request numbers use the asm-generic encoding (x86-64 uses it unchanged):
//   bits 0..8 command number, bits 8..16 type byte, bits 16..30 argument size,
//   bits 30..32 direction, where write (user to kernel) is 1 and read (kernel to user) is 2.
// `_IOWR` is both directions (3), `_IOR` is read only (2), `_IO` has no argument (0).
// The unit test `test_ioctl_numbers_match_the_uapi_header` pins each value to what a C program
// including <linux/userfaultfd.h> prints.
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, ty: u32, nr: u32, size: usize) -> u32 {
    assert!(size < (1 << 14), "ioctl argument too large for the size field");
    (dir << 30) | ((size as u32) << 16) | (ty << 8) | nr
}

const fn iowr<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size_of::<T>())
}

const fn ior<T>(ty: u32, nr: u32) -> u32 {
    ioc(IOC_READ, ty, nr, size_of::<T>())
}

const UFFDIO_API: u32 = iowr::<UffdioApi>(UFFDIO, NR_API);
const UFFDIO_REGISTER: u32 = iowr::<UffdioRegister>(UFFDIO, NR_REGISTER);
// The kernel header declares these two as _IOR although the argument only goes to the
// kernel; the number, not the direction, is what matters, so follow the header.
const UFFDIO_UNREGISTER: u32 = ior::<UffdioRange>(UFFDIO, NR_UNREGISTER);
const UFFDIO_WAKE: u32 = ior::<UffdioRange>(UFFDIO, NR_WAKE);
const UFFDIO_COPY: u32 = iowr::<UffdioCopy>(UFFDIO, NR_COPY);
const UFFDIO_ZEROPAGE: u32 = iowr::<UffdioZeropage>(UFFDIO, NR_ZEROPAGE);
const USERFAULTFD_IOC_NEW: u32 = ioc(IOC_NONE, USERFAULTFD_IOC, 0x00, 0);

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy`; `copy` comes back as bytes copied or a negative errno.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`; `zeropage` comes back as bytes mapped or a negative errno.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// The `pagefault` member of `uffd_msg.arg`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdPagefault {
    flags: u64,
    address: u64,
    /// `feat.ptid`, filled only with `UFFD_FEATURE_THREAD_ID`.
    ptid: u32,
}

/// `uffd_msg.arg`: only the page-fault variant is read; `reserved` gives the union the
/// kernel's size for every other event.
#[repr(C)]
#[derive(Clone, Copy)]
union UffdMsgArg {
    pagefault: UffdPagefault,
    reserved: [u64; 3],
}

/// `struct uffd_msg`. The C struct is `__packed`, but its fields fall on their natural
/// alignment, so `repr(C)` gives the same 32-byte layout (checked below).
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: UffdMsgArg,
}

const _: () = {
    assert!(size_of::<UffdioApi>() == 24);
    assert!(size_of::<UffdioRange>() == 16);
    assert!(size_of::<UffdioRegister>() == 32);
    assert!(size_of::<UffdioCopy>() == 40);
    assert!(size_of::<UffdioZeropage>() == 32);
    assert!(size_of::<UffdMsg>() == 32);
    assert!(offset_of!(UffdMsg, arg) == 8);
    assert!(offset_of!(UffdPagefault, address) == 8);
};

/// Errors of userfaultfd operations. Each names the operation, the range it was given and the
/// errno the kernel returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UffdError {
    /// The `userfaultfd(2)` system call failed.
    #[error("userfaultfd(2) failed: {}", errno_text(*errno))]
    Open {
        /// The errno.
        errno: i32,
    },
    /// `userfaultfd(2)` was refused with `EPERM`, and `/dev/userfaultfd` failed too.
    #[error("userfaultfd(2) refused with EPERM and /dev/userfaultfd failed: {}", errno_text(*errno))]
    OpenDevice {
        /// The errno of opening `/dev/userfaultfd` or of its `USERFAULTFD_IOC_NEW`.
        errno: i32,
    },
    /// The `UFFDIO_API` handshake failed.
    #[error("UFFDIO_API handshake failed: {}", errno_text(*errno))]
    Api {
        /// The errno.
        errno: i32,
    },
    /// An address or length is not page-aligned, or the length is zero.
    #[error("{op}: range {addr:#x}+{len:#x} is not a non-empty whole number of {PAGE_SIZE}-byte pages")]
    Misaligned {
        /// The operation refused.
        op: &'static str,
        /// The start address given.
        addr: u64,
        /// The length given.
        len: usize,
    },
    /// `UFFDIO_REGISTER` failed.
    #[error("UFFDIO_REGISTER of {addr:#x}+{len:#x} failed: {}", errno_text(*errno))]
    Register {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: usize,
        /// The errno.
        errno: i32,
    },
    /// The range registered, but it does not support copy, zero-page and wake (e.g. hugetlbfs),
    /// so it was unregistered again.
    #[error("range {addr:#x}+{len:#x} supports ioctls {ioctls:#x}, not COPY, ZEROPAGE and WAKE")]
    Unsupported {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: usize,
        /// The ioctl mask the kernel offered for the range.
        ioctls: u64,
    },
    /// `UFFDIO_UNREGISTER` failed.
    #[error("UFFDIO_UNREGISTER of {addr:#x}+{len:#x} failed: {}", errno_text(*errno))]
    Unregister {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: usize,
        /// The errno.
        errno: i32,
    },
    /// `poll` on the descriptor failed.
    #[error("poll on the userfaultfd failed: {}", errno_text(*errno))]
    Poll {
        /// The errno.
        errno: i32,
    },
    /// `read` of a fault message failed.
    #[error("read of a userfaultfd message failed: {}", errno_text(*errno))]
    Read {
        /// The errno.
        errno: i32,
    },
    /// `read` returned a partial message, which the kernel never does.
    #[error("read of a userfaultfd message returned {bytes} bytes, not {}", size_of::<UffdMsg>())]
    ShortRead {
        /// Bytes returned.
        bytes: usize,
    },
    /// `UFFDIO_COPY` failed (`EAGAIN` once the bounded retries are spent).
    #[error("UFFDIO_COPY to {dst:#x}+{len:#x} failed: {}", errno_text(*errno))]
    Copy {
        /// Destination of the failing ioctl (past the pages already installed).
        dst: u64,
        /// Length of the failing ioctl.
        len: usize,
        /// The errno.
        errno: i32,
    },
    /// `UFFDIO_ZEROPAGE` failed (`EAGAIN` once the bounded retries are spent).
    #[error("UFFDIO_ZEROPAGE of {dst:#x}+{len:#x} failed: {}", errno_text(*errno))]
    Zero {
        /// Destination of the failing ioctl (past the pages already installed).
        dst: u64,
        /// Length of the failing ioctl.
        len: usize,
        /// The errno.
        errno: i32,
    },
    /// `UFFDIO_WAKE` failed.
    #[error("UFFDIO_WAKE of {addr:#x}+{len:#x} failed: {}", errno_text(*errno))]
    Wake {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: usize,
        /// The errno.
        errno: i32,
    },
    /// `madvise(MADV_DONTNEED)` failed.
    #[error("madvise(MADV_DONTNEED) of {addr:#x}+{len:#x} failed: {}", errno_text(*errno))]
    Discard {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: usize,
        /// The errno.
        errno: i32,
    },
}

impl UffdError {
    /// The errno the kernel returned, if the error came from the kernel. A caller can test
    /// [`UffdError::Open`] and [`UffdError::OpenDevice`] for `EPERM` or `ENOSYS` to fall back
    /// to a backend without post-copy.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Open { errno }
            | Self::OpenDevice { errno }
            | Self::Api { errno }
            | Self::Register { errno, .. }
            | Self::Unregister { errno, .. }
            | Self::Poll { errno }
            | Self::Read { errno }
            | Self::Copy { errno, .. }
            | Self::Zero { errno, .. }
            | Self::Wake { errno, .. }
            | Self::Discard { errno, .. } => Some(*errno),
            Self::Misaligned { .. } | Self::Unsupported { .. } | Self::ShortRead { .. } => None,
        }
    }
}

fn errno_text(errno: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(errno)
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// What an install did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Every page of the range was installed by this call, and its waiters woken.
    Installed,
    /// At least one page was present already and kept its content (another install won the
    /// race); every other page of the range was installed by this call.
    AlreadyPresent,
}

/// Which fill ioctl an install runs.
#[derive(Clone, Copy)]
enum Fill<'a> {
    Copy(&'a [u8]),
    Zero,
}

/// A userfaultfd: the registrations of guest RAM for demand paging, the queue of faults on
/// them, and the ioctls that resolve those faults.
///
/// `Send + Sync`: the fault reader and any number of installers share one `Userfault` (e.g.
/// through an `Arc`). The ioctls may run concurrently: two installs of one page race
/// harmlessly (the loser gets `EEXIST`), and each read takes a message off the queue, so a
/// fault goes to one reader.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
}

// The fault reader and the installers run on different threads; keep that possible.
const _: fn() = || {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<Userfault>();
};

impl Userfault {
    /// Opens a non-blocking, close-on-exec userfaultfd and does the `UFFDIO_API` handshake
    /// with no optional features. Falls back to `/dev/userfaultfd` when the system call is
    /// refused with `EPERM` (see the module doc on privilege).
    pub fn new() -> Result<Self, UffdError> {
        let fd = match open_syscall() {
            Err(UffdError::Open { errno: libc::EPERM }) => open_device()?,
            other => other?,
        };
        Self::handshake(fd)
    }

    /// Turns a fresh descriptor into a usable one; until `UFFDIO_API` succeeds the kernel
    /// refuses every other ioctl on it.
    fn handshake(fd: OwnedFd) -> Result<Self, UffdError> {
        let mut api = UffdioApi {
            api: UFFD_API,
            ..UffdioApi::default()
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `uffdio_api`, whose layout `api`
        // matches; the pointer is valid for the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as libc::Ioctl, &mut api) };
        if rc < 0 {
            return Err(UffdError::Api { errno: last_errno() });
        }
        Ok(Self { fd })
    }

    /// Registers `addr..addr + len` in MISSING mode: from now on, a touch of a page in the
    /// range that has no page-table entry blocks and is reported by [`Self::wait_fault`].
    /// Present pages are unaffected; [`discard`] them first to have them demand-paged too.
    ///
    /// # Safety
    ///
    /// * The range is a private anonymous mapping owned by the caller for as long as the
    ///   registration lasts (until [`Self::unregister`], unmapping, or dropping `self`).
    /// * The caller accepts that any thread touching a missing page of the range, including
    ///   its own, blocks until an install or unregister resolves the fault.
    pub unsafe fn register(&self, addr: *mut u8, len: usize) -> Result<(), UffdError> {
        let range = page_range("UFFDIO_REGISTER", addr, len)?;
        let mut reg = UffdioRegister {
            range,
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`, laid out as `reg`.
        // It changes how faults on the range are handled, never the memory itself; the caller
        // vouches for owning the mapping.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as libc::Ioctl, &mut reg) };
        if rc < 0 {
            return Err(UffdError::Register {
                addr: addr as u64,
                len,
                errno: last_errno(),
            });
        }
        if reg.ioctls & NEEDED_RANGE_IOCTLS != NEEDED_RANGE_IOCTLS {
            // Best effort: the range is unusable either way, and the caller learns why from
            // the error below rather than from a failed unregister.
            let _ = self.unregister(addr, len);
            return Err(UffdError::Unsupported {
                addr: addr as u64,
                len,
                ioctls: reg.ioctls,
            });
        }
        Ok(())
    }

    /// Ends the registration of `addr..addr + len`. Threads blocked on a fault in the range
    /// are woken, and from now on its missing pages fault in as zero like any anonymous
    /// memory.
    pub fn unregister(&self, addr: *mut u8, len: usize) -> Result<(), UffdError> {
        let mut range = page_range("UFFDIO_UNREGISTER", addr, len)?;
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range`, laid out as `range`. It only
        // changes fault handling; a missing page becomes an ordinary zero-fill page, which is
        // valid memory for anyone who then reads it.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as libc::Ioctl, &mut range) };
        if rc < 0 {
            return Err(UffdError::Unregister {
                addr: addr as u64,
                len,
                errno: last_errno(),
            });
        }
        Ok(())
    }

    /// Waits up to `timeout` for a page fault in a registered range and returns the faulting
    /// address rounded down to its page, or `None` if none came in time. Events other than
    /// page faults are skipped. With several readers, each fault goes to one of them.
    ///
    /// A fault can be resolved before it is read (see the module doc), so a returned address
    /// may already be present; installing it then reports [`Install::AlreadyPresent`].
    pub fn wait_fault(&self, timeout: Duration) -> Result<Option<u64>, UffdError> {
        // A timeout too large for `Instant` means "forever".
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let wait_ms = match deadline {
                // Round up so that poll never returns before the deadline; cap at poll's range.
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let ms = left.as_nanos().div_ceil(1_000_000);
                    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
                }
                None => -1,
            };
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, counted as one, alive for the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if ready < 0 {
                match last_errno() {
                    libc::EINTR => continue,
                    errno => return Err(UffdError::Poll { errno }),
                }
            }
            if ready == 0 {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(None);
                }
                continue;
            }
            match self.read_msg()? {
                Some(msg) if msg.event == UFFD_EVENT_PAGEFAULT => {
                    // SAFETY: the kernel fills `arg.pagefault` for UFFD_EVENT_PAGEFAULT, and
                    // every bit pattern is a valid `UffdPagefault` anyway.
                    let address = unsafe { msg.arg.pagefault.address };
                    return Ok(Some(address & !(PAGE_SIZE as u64 - 1)));
                }
                // Another event, or the fault was resolved (or taken by another reader) between
                // poll and read: wait again for the time left.
                _ => {}
            }
        }
    }

    /// Reads one message, or `None` if the queue was empty after all.
    fn read_msg(&self) -> Result<Option<UffdMsg>, UffdError> {
        let mut msg = std::mem::MaybeUninit::<UffdMsg>::uninit();
        loop {
            // SAFETY: the buffer is writable for `size_of::<UffdMsg>()` bytes, and the kernel
            // writes whole messages only.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msg.as_mut_ptr().cast::<libc::c_void>(),
                    size_of::<UffdMsg>(),
                )
            };
            if n < 0 {
                match last_errno() {
                    libc::EINTR => continue,
                    libc::EAGAIN => return Ok(None),
                    errno => return Err(UffdError::Read { errno }),
                }
            }
            if n as usize != size_of::<UffdMsg>() {
                return Err(UffdError::ShortRead { bytes: n as usize });
            }
            // SAFETY: the read filled all of `msg`, and any bit pattern is a valid `UffdMsg`
            // (integers and a union of integers).
            return Ok(Some(unsafe { msg.assume_init() }));
        }
    }

    /// Installs `src` at `dst` with `UFFDIO_COPY` and wakes the threads waiting on those
    /// pages. `src.len()` is a non-zero multiple of the page size and `dst` is page-aligned.
    ///
    /// Pages already present keep their content and make the result
    /// [`Install::AlreadyPresent`]; the other pages are still installed. A partial copy
    /// (`EAGAIN` with progress) resumes where the kernel stopped; `EAGAIN` without progress is
    /// retried a bounded number of times, then reported as [`UffdError::Copy`].
    ///
    /// # Safety
    ///
    /// * `dst..dst + src.len()` lies in a range registered with `self`.
    /// * No Rust reference to the destination bytes is live: their content changes from
    ///   under any such reference (from missing to `src`).
    /// * `src` does not lie in a registered range with missing pages: reading it would fault,
    ///   and the calling thread would wait for an install that only it can do.
    pub unsafe fn copy(&self, dst: *mut u8, src: &[u8]) -> Result<Install, UffdError> {
        // SAFETY: the caller's contract is the one `fill` needs.
        unsafe { self.fill(Fill::Copy(src), dst, src.len()) }
    }

    /// Installs `len` bytes of zero pages at `dst` with `UFFDIO_ZEROPAGE` and wakes their
    /// waiters; results and retries as for [`Self::copy`]. The pages map the shared zero page:
    /// reads cost no memory, and the first write copies the page as for any anonymous memory.
    ///
    /// # Safety
    ///
    /// * `dst..dst + len` lies in a range registered with `self`.
    /// * No Rust reference to the destination bytes is live.
    pub unsafe fn zero(&self, dst: *mut u8, len: usize) -> Result<Install, UffdError> {
        // SAFETY: the caller's contract is the one `fill` needs.
        unsafe { self.fill(Fill::Zero, dst, len) }
    }

    /// Runs the fill ioctl over `dst..dst + len` until every page is present.
    ///
    /// # Safety
    ///
    /// As for [`Self::copy`].
    unsafe fn fill(&self, fill: Fill<'_>, dst: *mut u8, len: usize) -> Result<Install, UffdError> {
        let op = match fill {
            Fill::Copy(_) => "UFFDIO_COPY",
            Fill::Zero => "UFFDIO_ZEROPAGE",
        };
        page_range(op, dst, len)?;
        let mut outcome = Install::Installed;
        let mut done = 0usize;
        let mut stalled = 0u32;
        while done < len {
            let at = dst as u64 + done as u64;
            let left = len - done;
            // SAFETY: `at..at + left` is within the caller's destination; the argument
            // structs match the kernel's layout and live for the call; for a copy, the kernel
            // reads `left` bytes of `src` from `done`, inside the slice.
            let (rc, progress) = unsafe {
                match fill {
                    Fill::Copy(src) => {
                        let mut arg = UffdioCopy {
                            dst: at,
                            src: src.as_ptr().add(done) as u64,
                            len: left as u64,
                            mode: 0,
                            copy: 0,
                        };
                        let rc = libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as libc::Ioctl, &mut arg);
                        (rc, arg.copy)
                    }
                    Fill::Zero => {
                        let mut arg = UffdioZeropage {
                            range: UffdioRange {
                                start: at,
                                len: left as u64,
                            },
                            mode: 0,
                            zeropage: 0,
                        };
                        let rc = libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as libc::Ioctl, &mut arg);
                        (rc, arg.zeropage)
                    }
                }
            };
            if rc == 0 {
                return Ok(outcome);
            }
            let errno = last_errno();
            match errno {
                // The kernel stops at the first page it cannot fill and reports what it did as
                // EAGAIN with positive progress (already woken); an already present page ends
                // such a run and, met first, fails the call with EEXIST.
                libc::EAGAIN if progress > 0 => {
                    done += progress as usize;
                    stalled = 0;
                }
                libc::EAGAIN if stalled < MAX_STALLED_RETRIES => {
                    stalled += 1;
                    std::thread::yield_now();
                }
                libc::EEXIST => {
                    outcome = Install::AlreadyPresent;
                    done += PAGE_SIZE;
                    stalled = 0;
                }
                _ => {
                    return Err(match fill {
                        Fill::Copy(_) => UffdError::Copy {
                            dst: at,
                            len: left,
                            errno,
                        },
                        Fill::Zero => UffdError::Zero {
                            dst: at,
                            len: left,
                            errno,
                        },
                    })
                }
            }
        }
        Ok(outcome)
    }

    /// Wakes the threads blocked on faults in `addr..addr + len` without installing anything:
    /// each retries its access and, if the page is still missing, faults (and is reported)
    /// again. [`Self::copy`] and [`Self::zero`] wake by themselves; this is for pages made
    /// present some other way.
    pub fn wake(&self, addr: *mut u8, len: usize) -> Result<(), UffdError> {
        let mut range = page_range("UFFDIO_WAKE", addr, len)?;
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range`, laid out as `range`, and only wakes
        // threads, which retry their access; no memory changes.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as libc::Ioctl, &mut range) };
        if rc < 0 {
            return Err(UffdError::Wake {
                addr: addr as u64,
                len,
                errno: last_errno(),
            });
        }
        Ok(())
    }
}

/// Drops the pages of `addr..addr + len` (`madvise(MADV_DONTNEED)`), so that in a range
/// registered in MISSING mode their next touch faults again; outside a registration they
/// read as zero. This is how pages that a populated mapping already holds become "missing"
/// for post-copy.
///
/// # Safety
///
/// * The range is a private anonymous mapping owned by the caller, whose content there may
///   be thrown away.
/// * No Rust reference to the range is live: its bytes change (to missing, or zero).
pub unsafe fn discard(addr: *mut u8, len: usize) -> Result<(), UffdError> {
    page_range("madvise(MADV_DONTNEED)", addr, len)?;
    // SAFETY: the caller owns the private anonymous range and gives up its content; dropping
    // pages there leaves valid (missing or zero-fill) memory behind.
    let rc = unsafe { libc::madvise(addr.cast::<libc::c_void>(), len, libc::MADV_DONTNEED) };
    if rc < 0 {
        return Err(UffdError::Discard {
            addr: addr as u64,
            len,
            errno: last_errno(),
        });
    }
    Ok(())
}

/// Checks a range the kernel would otherwise refuse with a bare `EINVAL`.
fn page_range(op: &'static str, addr: *mut u8, len: usize) -> Result<UffdioRange, UffdError> {
    let start = addr as u64;
    if len == 0 || start % PAGE_SIZE as u64 != 0 || len % PAGE_SIZE != 0 {
        return Err(UffdError::Misaligned { op, addr: start, len });
    }
    Ok(UffdioRange { start, len: len as u64 })
}

fn open_syscall() -> Result<OwnedFd, UffdError> {
    // SAFETY: userfaultfd(2) takes one flags argument and creates a descriptor; it touches no
    // memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(UffdError::Open { errno: last_errno() });
    }
    // SAFETY: the kernel just created this descriptor for us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn open_device() -> Result<OwnedFd, UffdError> {
    let device_err = || UffdError::OpenDevice { errno: last_errno() };
    // SAFETY: a NUL-terminated path and plain flags; the result is checked before use.
    let dev = unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return Err(device_err());
    }
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let dev = unsafe { OwnedFd::from_raw_fd(dev) };
    // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags by value and returns it.
    let fd = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            USERFAULTFD_IOC_NEW as libc::Ioctl,
            libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(device_err());
    }
    // SAFETY: the ioctl just created this descriptor and nothing else owns it; the device
    // descriptor is not needed once it exists.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};

    /// Bound on every wait that should succeed; generous for a loaded, nested host.
    const TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a wait that should find nothing gets before concluding nothing came.
    const QUIET: Duration = Duration::from_millis(100);
    const PAGES: usize = 16;

    /// A private anonymous mapping, unmapped on drop.
    struct Region {
        base: *mut u8,
        len: usize,
    }

    impl Region {
        fn new(pages: usize) -> Self {
            let len = pages * PAGE_SIZE;
            // SAFETY: with a null hint and no MAP_FIXED, mmap only creates a new mapping and
            // never replaces one; MAP_FAILED is checked below.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
            Self { base: ptr.cast(), len }
        }

        fn page(&self, index: usize) -> *mut u8 {
            assert!(index * PAGE_SIZE < self.len);
            // SAFETY: `index * PAGE_SIZE < len`, checked above, so the offset stays in the
            // mapping.
            unsafe { self.base.add(index * PAGE_SIZE) }
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: the mapping was created by `new` and nothing refers to it any more.
            unsafe { libc::munmap(self.base.cast(), self.len) };
        }
    }

    /// The descriptor, or `None` after saying why the test cannot run here.
    fn available(opened: Result<Userfault, UffdError>) -> Option<Userfault> {
        match opened {
            Ok(uffd) => Some(uffd),
            Err(err @ (UffdError::Open { errno } | UffdError::OpenDevice { errno }))
                if [libc::EPERM, libc::ENOSYS, libc::EACCES, libc::ENOENT].contains(&errno) =>
            {
                println!("SKIPPED: userfaultfd not available: {err}");
                None
            }
            Err(err) => panic!("{err}"),
        }
    }

    fn uffd_or_skip() -> Option<Userfault> {
        available(Userfault::new())
    }

    /// Reads one byte at `addr` on a thread of its own, since the read may block on a fault;
    /// the byte arrives on the returned channel once the read completes.
    fn touch(addr: *mut u8) -> mpsc::Receiver<u8> {
        let addr = addr as usize;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: the test's Region outlives every touch it waits for; a missing page
            // blocks here until installed or unregistered, which is what the tests observe.
            let byte = unsafe { std::ptr::read_volatile(addr as *const u8) };
            let _ = tx.send(byte);
        });
        rx
    }

    /// Asserts that nothing faulted in the meantime.
    fn assert_quiet(uffd: &Userfault) {
        assert_eq!(uffd.wait_fault(QUIET).unwrap(), None, "unexpected fault");
    }

    fn check_fault_then_copy(uffd: Userfault) {
        let region = Region::new(PAGES);
        // SAFETY: the region is ours and no reference into it exists.
        unsafe { uffd.register(region.base, region.len) }.unwrap();

        let reader = touch(region.page(5).wrapping_add(123));
        assert_eq!(uffd.wait_fault(TIMEOUT).unwrap(), Some(region.page(5) as u64));
        // The toucher stays blocked until the page is installed.
        assert!(reader.recv_timeout(QUIET).is_err());

        let page = vec![0xAB; PAGE_SIZE];
        // SAFETY: page 5 is registered, `page` is heap memory outside the region.
        assert_eq!(unsafe { uffd.copy(region.page(5), &page) }.unwrap(), Install::Installed);
        assert_eq!(reader.recv_timeout(TIMEOUT).unwrap(), 0xAB);

        let other = vec![0xCD; PAGE_SIZE];
        assert_eq!(
            // SAFETY: page 5 is registered and unreferenced; `other` is heap memory outside it.
            unsafe { uffd.copy(region.page(5), &other) }.unwrap(),
            Install::AlreadyPresent
        );
        assert_eq!(
            touch(region.page(5)).recv_timeout(TIMEOUT).unwrap(),
            0xAB,
            "first install wins"
        );
        assert_quiet(&uffd);
        uffd.unregister(region.base, region.len).unwrap();
    }

    #[test]
    fn test_fault_is_reported_and_resolved_by_copy() {
        let Some(uffd) = uffd_or_skip() else { return };
        check_fault_then_copy(uffd);
    }

    #[test]
    fn test_device_fallback_gives_a_working_descriptor() {
        let Some(uffd) = available(open_device().and_then(Userfault::handshake)) else {
            return;
        };
        check_fault_then_copy(uffd);
    }

    #[test]
    fn test_zero_installs_a_page_that_reads_without_a_fault() {
        let Some(uffd) = uffd_or_skip() else { return };
        let region = Region::new(PAGES);
        // SAFETY: the region is ours and no reference into it exists.
        unsafe { uffd.register(region.base, region.len) }.unwrap();

        assert_eq!(
            // SAFETY: page 7 is registered, and no Rust reference points into the region.
            unsafe { uffd.zero(region.page(7), PAGE_SIZE) }.unwrap(),
            Install::Installed
        );
        assert_eq!(touch(region.page(7).wrapping_add(9)).recv_timeout(TIMEOUT).unwrap(), 0);
        assert_quiet(&uffd);
        assert_eq!(
            // SAFETY: page 7 is still registered and unreferenced; it only reads as zero now.
            unsafe { uffd.zero(region.page(7), PAGE_SIZE) }.unwrap(),
            Install::AlreadyPresent
        );
    }

    #[test]
    fn test_copy_over_a_partly_present_range_installs_the_rest() {
        let Some(uffd) = uffd_or_skip() else { return };
        let region = Region::new(PAGES);
        // SAFETY: the region is ours and no reference into it exists.
        unsafe { uffd.register(region.base, region.len) }.unwrap();
        // SAFETY: page 12 is registered and unreferenced.
        unsafe { uffd.zero(region.page(12), PAGE_SIZE) }.unwrap();

        let src: Vec<u8> = (10..14u8).flat_map(|i| [i; PAGE_SIZE]).collect();
        assert_eq!(
            // SAFETY: pages 10..14 are registered and unreferenced; `src` is outside the region.
            unsafe { uffd.copy(region.page(10), &src) }.unwrap(),
            Install::AlreadyPresent
        );
        for (index, want) in [(10, 10), (11, 11), (12, 0), (13, 13)] {
            assert_eq!(
                touch(region.page(index)).recv_timeout(TIMEOUT).unwrap(),
                want,
                "page {index}"
            );
        }
        assert_quiet(&uffd);
    }

    #[test]
    fn test_discard_makes_a_present_page_fault_again() {
        let Some(uffd) = uffd_or_skip() else { return };
        let region = Region::new(PAGES);
        // SAFETY: page 3 is ours, not registered yet, and unreferenced.
        unsafe { region.page(3).write_volatile(0x11) };
        // SAFETY: the region is ours and no reference into it exists.
        unsafe { uffd.register(region.base, region.len) }.unwrap();

        // MISSING mode leaves the page populated before registration alone.
        assert_eq!(touch(region.page(3)).recv_timeout(TIMEOUT).unwrap(), 0x11);
        assert_quiet(&uffd);

        // SAFETY: page 3 is ours, its content may go, and nothing references it.
        unsafe { discard(region.page(3), PAGE_SIZE) }.unwrap();
        let reader = touch(region.page(3));
        assert_eq!(uffd.wait_fault(TIMEOUT).unwrap(), Some(region.page(3) as u64));
        // SAFETY: page 3 is registered and missing again; the source is outside the region.
        unsafe { uffd.copy(region.page(3), &[0x77; PAGE_SIZE]) }.unwrap();
        assert_eq!(reader.recv_timeout(TIMEOUT).unwrap(), 0x77);
    }

    #[test]
    fn test_wait_fault_times_out_when_nothing_is_pending() {
        let Some(uffd) = uffd_or_skip() else { return };
        let start = Instant::now();
        assert_eq!(uffd.wait_fault(QUIET).unwrap(), None);
        assert!(start.elapsed() >= QUIET, "returned after {:?}", start.elapsed());
        assert_eq!(uffd.wait_fault(Duration::ZERO).unwrap(), None);
    }

    #[test]
    fn test_unregister_wakes_waiters_and_missing_pages_read_zero() {
        let Some(uffd) = uffd_or_skip() else { return };
        let region = Region::new(PAGES);
        // SAFETY: the region is ours and no reference into it exists.
        unsafe { uffd.register(region.base, region.len) }.unwrap();

        let reader = touch(region.page(9));
        assert_eq!(uffd.wait_fault(TIMEOUT).unwrap(), Some(region.page(9) as u64));
        uffd.unregister(region.base, region.len).unwrap();
        assert_eq!(reader.recv_timeout(TIMEOUT).unwrap(), 0);
        assert_eq!(touch(region.page(10)).recv_timeout(TIMEOUT).unwrap(), 0);
    }

    #[test]
    fn test_wake_makes_a_still_missing_page_fault_again() {
        let Some(uffd) = uffd_or_skip() else { return };
        let region = Region::new(PAGES);
        // SAFETY: the region is ours and no reference into it exists.
        unsafe { uffd.register(region.base, region.len) }.unwrap();

        let reader = touch(region.page(2));
        assert_eq!(uffd.wait_fault(TIMEOUT).unwrap(), Some(region.page(2) as u64));
        uffd.wake(region.page(2), PAGE_SIZE).unwrap();
        assert_eq!(uffd.wait_fault(TIMEOUT).unwrap(), Some(region.page(2) as u64));
        // SAFETY: page 2 is registered and missing; the source is outside the region.
        unsafe { uffd.copy(region.page(2), &[0x42; PAGE_SIZE]) }.unwrap();
        assert_eq!(reader.recv_timeout(TIMEOUT).unwrap(), 0x42);
    }

    #[test]
    fn test_one_reader_and_several_installers_share_the_descriptor() {
        let Some(uffd) = uffd_or_skip() else { return };
        let uffd = Arc::new(uffd);
        let region = Region::new(PAGES);
        // SAFETY: the region is ours and no reference into it exists.
        unsafe { uffd.register(region.base, region.len) }.unwrap();
        let base = region.base as u64;

        let stop = Arc::new(AtomicBool::new(false));
        let (fault_tx, fault_rx) = crossbeam::channel::unbounded::<u64>();
        let reader = {
            let (uffd, stop) = (Arc::clone(&uffd), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(addr) = uffd.wait_fault(QUIET).unwrap() {
                        fault_tx.send(addr).unwrap();
                    }
                }
            })
        };
        let installers: Vec<_> = (0..2)
            .map(|_| {
                let (uffd, faults) = (Arc::clone(&uffd), fault_rx.clone());
                std::thread::spawn(move || {
                    for addr in faults {
                        let index = ((addr - base) / PAGE_SIZE as u64) as u8;
                        // SAFETY: `addr` is a page of the registered region, reported missing;
                        // the source is on the heap.
                        unsafe { uffd.copy(addr as *mut u8, &vec![index + 1; PAGE_SIZE]) }.unwrap();
                    }
                })
            })
            .collect();
        drop(fault_rx);

        let readers: Vec<_> = (0..PAGES).map(|i| (i, touch(region.page(i).wrapping_add(i)))).collect();
        for (index, reader) in readers {
            assert_eq!(reader.recv_timeout(TIMEOUT).unwrap(), index as u8 + 1, "page {index}");
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        for installer in installers {
            installer.join().unwrap();
        }
    }

    #[test]
    fn test_misaligned_ranges_are_refused_before_the_kernel() {
        let Some(uffd) = uffd_or_skip() else { return };
        let region = Region::new(PAGES);
        // SAFETY: the misaligned range is refused before any ioctl, so nothing is registered.
        let err = unsafe { uffd.register(region.base.wrapping_add(1), PAGE_SIZE) }.unwrap_err();
        assert!(
            matches!(
                err,
                UffdError::Misaligned {
                    op: "UFFDIO_REGISTER",
                    ..
                }
            ),
            "{err}"
        );
        // SAFETY: the region is ours and no reference into it exists.
        unsafe { uffd.register(region.base, region.len) }.unwrap();
        // SAFETY: a 100-byte source is refused before any ioctl, so nothing is written.
        let err = unsafe { uffd.copy(region.page(1), &[0; 100]) }.unwrap_err();
        assert!(
            matches!(
                err,
                UffdError::Misaligned {
                    op: "UFFDIO_COPY",
                    len: 100,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(uffd.wake(region.base, 0), Err(UffdError::Misaligned { .. })));
        assert_eq!(err.errno(), None);
    }

    #[test]
    fn test_ioctl_numbers_match_the_uapi_header() {
        // Printed by a C program including <sys/ioctl.h> and <linux/userfaultfd.h>.
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_COPY, 0xC028_AA03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xC020_AA04);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xAA00);
    }
}

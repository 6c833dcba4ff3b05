//! QEMU's migration stream (QEMU 7.2, precopy, one channel): our own reader of what
//! `migrate tcp:` sends, following docs/devel/migration.rst, migration/savevm.c,
//! migration/ram.c and migration/vmstate.c.
//!
//! The stream, as the reader sees it:
//!
//! ```text
//! "QEVM" be32(3)  CONFIGURATION(0x07) be32 len, machine name, [subsections 0x05 ...]
//! COMMAND(0x08) be16 cmd, be16 len, data          OPEN_RETURN_PATH, PING
//! SECTION_START(0x01) id "ram" instance version   MEM_SIZE + block list, EOS, footer
//! SECTION_PART(0x02) id                           pages (ZERO/PAGE, CONTINUE), EOS, footer
//! SECTION_END(0x03) id                            the last pages, the VM paused; EOS, footer
//! SECTION_FULL(0x04) id idstr instance version    device state, footer        (one per device)
//! EOF(0x00)  VMDESCRIPTION(0x06) be32 len, JSON   the layout of every FULL section
//! ```
//!
//! The FULL sections carry no layout of their own, so the reader keeps their bytes (bounded)
//! until the JSON description QEMU appends after EOF has arrived, then parses them with it
//! ([`sections`]), the way scripts/analyze-migration.py does. QEMU keeps the socket open after
//! the description when the return path is on (it waits for our answer), so the reader stops
//! right after the JSON instead of reading to the end.
//!
//! * [`reader`]: [`StreamReader`], the records in stream order, pages borrowed;
//! * [`vmdesc`]: the JSON description, typed and bounded;
//! * [`sections`]: the device sections parsed into named field trees, RAM block and device
//!   classification;
//! * [`read_cpu`]: `cpu_common`, `cpu` and `apic` sections into [`QemuCpu`](crate::format::native::qemu::QemuCpu).

pub mod cpu_msrs;
pub mod read_cpu;
pub mod reader;
pub mod return_path;
pub mod sections;
pub mod vmdesc;
pub mod write_cpu;
pub mod writer;

use thiserror::Error;

pub use read_cpu::cpus_from_sections;
pub use reader::{Command, Header, PageData, Record, StreamReader};
pub use sections::{classify_block, BlockKind, DeviceSection, DeviceSections, Fields, Value};

/// The page size of the stream (x86 `TARGET_PAGE_SIZE`).
pub const PAGE_SIZE: usize = 4096;

/// `QEVM`.
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
/// The only stream version QEMU has written since 2.x.
pub const QEMU_VM_FILE_VERSION: u32 = 3;

/// Record types (migration/savevm.h).
pub mod kind {
    /// End of the device sections.
    pub const EOF: u8 = 0x00;
    /// First section of an iterable device (ram).
    pub const SECTION_START: u8 = 0x01;
    /// A middle section of an iterable device.
    pub const SECTION_PART: u8 = 0x02;
    /// The last section of an iterable device.
    pub const SECTION_END: u8 = 0x03;
    /// A whole non-iterable device.
    pub const SECTION_FULL: u8 = 0x04;
    /// A subsection inside a section's state.
    pub const SUBSECTION: u8 = 0x05;
    /// The JSON description after EOF.
    pub const VMDESCRIPTION: u8 = 0x06;
    /// The configuration after the header.
    pub const CONFIGURATION: u8 = 0x07;
    /// A command (return path, ping, postcopy, ...).
    pub const COMMAND: u8 = 0x08;
    /// The footer closing every section.
    pub const SECTION_FOOTER: u8 = 0x7e;
}

/// `MIG_CMD_*` numbers (migration/savevm.c `enum qemu_vm_cmd`).
pub mod command {
    /// Open the return path.
    pub const OPEN_RETURN_PATH: u16 = 1;
    /// Ask for a PONG on the return path.
    pub const PING: u16 = 2;

    /// The name of a command number, for errors.
    pub fn name(cmd: u16) -> &'static str {
        match cmd {
            0 => "INVALID",
            1 => "OPEN_RETURN_PATH",
            2 => "PING",
            3 => "POSTCOPY_ADVISE",
            4 => "POSTCOPY_LISTEN",
            5 => "POSTCOPY_RUN",
            6 => "POSTCOPY_RAM_DISCARD",
            7 => "POSTCOPY_RESUME",
            8 => "PACKAGED",
            9 => "RECV_BITMAP",
            10 => "ENABLE_COLO",
            _ => "unknown",
        }
    }
}

/// `RAM_SAVE_FLAG_*` (migration/ram.c, QEMU 7.2), in the low bits of each RAM record's be64.
pub mod ram_flag {
    /// Obsolete whole-RAM flag.
    pub const FULL: u64 = 0x01;
    /// A page whose bytes all equal one fill byte.
    pub const ZERO: u64 = 0x02;
    /// The block list.
    pub const MEM_SIZE: u64 = 0x04;
    /// A whole page.
    pub const PAGE: u64 = 0x08;
    /// End of the section's RAM records.
    pub const EOS: u64 = 0x10;
    /// Same block as the previous record: no block name follows.
    pub const CONTINUE: u64 = 0x20;
    /// An XBZRLE-encoded page.
    pub const XBZRLE: u64 = 0x40;
    /// An RDMA hook.
    pub const HOOK: u64 = 0x80;
    /// A zlib-compressed page.
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// A multifd flush (QEMU 8.x).
    pub const MULTIFD_FLUSH: u64 = 0x200;

    /// The names of the bits set in `flags`, `|`-separated; unknown bits as hex.
    pub fn names(flags: u64) -> String {
        const NAMED: [(u64, &str); 10] = [
            (FULL, "FULL"),
            (ZERO, "ZERO"),
            (MEM_SIZE, "MEM_SIZE"),
            (PAGE, "PAGE"),
            (EOS, "EOS"),
            (CONTINUE, "CONTINUE"),
            (XBZRLE, "XBZRLE"),
            (HOOK, "HOOK"),
            (COMPRESS_PAGE, "COMPRESS_PAGE"),
            (MULTIFD_FLUSH, "MULTIFD_FLUSH"),
        ];
        let mut out: Vec<String> = Vec::new();
        let mut rest = flags;
        for (bit, name) in NAMED {
            if flags & bit != 0 {
                out.push(name.to_string());
                rest &= !bit;
            }
        }
        if rest != 0 {
            out.push(format!("{rest:#x}"));
        }
        out.join("|")
    }
}

/// Why a stream was refused. Every variant names what it refused and, where the reader knows
/// it, the stream offset.
#[derive(Debug, Error)]
pub enum StreamError {
    /// The transport.
    #[error("stream I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended before a record was whole.
    #[error("stream truncated at byte {at}: {what}")]
    Truncated {
        /// Stream offset where more bytes were needed.
        at: u64,
        /// What was being read.
        what: String,
    },
    /// Not a QEMU migration stream.
    #[error("not a QEMU stream: magic {found:#010x}")]
    BadMagic {
        /// The first four bytes.
        found: u32,
    },
    /// A stream version other than 3.
    #[error("QEMU stream version {found} is not supported (3 is)")]
    UnsupportedVersion {
        /// The version read.
        found: u32,
    },
    /// A section (device) the reader does not handle.
    #[error("QEMU section {name:?} is not supported")]
    UnsupportedSection {
        /// Its idstr.
        name: String,
    },
    /// A subsection the reader does not handle.
    #[error("QEMU subsection {name:?} is not supported")]
    UnsupportedSubsection {
        /// Its name.
        name: String,
    },
    /// A RAM record with flags the reader does not handle.
    #[error("QEMU RAM flags {flags:#x} ({names}) are not supported")]
    UnsupportedRamFlags {
        /// The flag bits.
        flags: u64,
        /// Their names.
        names: String,
    },
    /// A command other than OPEN_RETURN_PATH and PING.
    #[error("QEMU command {command} ({}) is not supported", command::name(*command))]
    UnsupportedCommand {
        /// The `MIG_CMD_*` number.
        command: u16,
    },
    /// A migration capability that changes the stream in a way the reader does not follow.
    #[error("QEMU migration capability {name:?} is not supported")]
    UnsupportedCapability {
        /// Its name, as the configuration section carries it.
        name: String,
    },
    /// Guest state the common format cannot carry (e.g. a nested guest running).
    #[error("QEMU state not supported: {what}")]
    UnsupportedState {
        /// What, with its value.
        what: String,
    },
    /// A page for a block the block list did not name.
    #[error("QEMU RAM block {name:?} is not in the block list")]
    UnknownRamBlock {
        /// The name.
        name: String,
    },
    /// A RAM block that is neither guest RAM nor firmware.
    #[error("QEMU RAM block {name:?} is not supported")]
    UnsupportedRamBlock {
        /// The name.
        name: String,
    },
    /// A count or size over its bound.
    #[error("{what} {value} is over the limit {limit}")]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The bound.
        limit: u64,
    },
    /// Bytes that do not follow the format.
    #[error("malformed QEMU stream at byte {at}: {what}")]
    Malformed {
        /// Stream offset (for device sections: offset in the stream of the byte concerned).
        at: u64,
        /// What was wrong.
        what: String,
    },
    /// A section or field the reader needs is absent.
    #[error("QEMU stream lacks {name}")]
    MissingSection {
        /// The section, subsection or field path.
        name: String,
    },
    /// A vCPU MSR that no field or subsection of QEMU's `cpu` section carries.
    #[error("MSR {index:#x} has no place in QEMU's cpu section")]
    UnsupportedMsr {
        /// The MSR index.
        index: u32,
    },
    /// A writer call out of the stream's order (e.g. a page outside a ram section).
    #[error("{call} is not allowed {state}")]
    OutOfOrder {
        /// The method called.
        call: &'static str,
        /// Where the writer was.
        state: &'static str,
    },
    /// A page of another length than [`PAGE_SIZE`].
    #[error("a page of {len} bytes, not {PAGE_SIZE}")]
    PageLength {
        /// The length given.
        len: usize,
    },
    /// A block index that the ram setup did not declare.
    #[error("ram block index {index}, but {count} blocks were declared")]
    NoSuchBlock {
        /// The index given.
        index: usize,
        /// How many blocks the setup declared.
        count: usize,
    },
    /// A page offset that is not page-aligned or not inside its block.
    #[error("page offset {offset:#x} in ram block {block} of {length:#x} bytes")]
    PageOffset {
        /// The block's name.
        block: String,
        /// The offset given.
        offset: u64,
        /// The block's length.
        length: u64,
    },
    /// A ram block whose length is not a whole number of pages.
    #[error("ram block {name} of {length:#x} bytes is not a whole number of pages")]
    UnalignedRamBlock {
        /// The block's name.
        name: String,
        /// Its length.
        length: u64,
    },
    /// The destination reported that it failed to load the stream (`MIG_RP_MSG_SHUT` with 1).
    #[error("the destination failed to load the stream (MIG_RP_MSG_SHUT {value})")]
    DestinationFailed {
        /// The value SHUT carried.
        value: u32,
    },
    /// The return path ended before the destination said it was done.
    #[error("the return path closed before MIG_RP_MSG_SHUT: {reason}")]
    ReturnPathClosed {
        /// End of stream, or the socket error.
        reason: String,
    },
    /// A return-path message that breaks its format.
    #[error("return-path message type {kind} with {len} bytes: {what}")]
    BadReturnMessage {
        /// The message type.
        kind: u16,
        /// Its length field.
        len: u16,
        /// What is wrong.
        what: &'static str,
    },
    /// The stream ended, or its tail grew past its bound, without a JSON device description.
    #[error("QEMU stream has no device description (vmdesc) after its EOF")]
    NoDeviceDescription,
    /// `next_record` after the stream's end.
    #[error("QEMU stream already read to its device sections")]
    Finished,
}

/// One RAM block of the MEM_SIZE record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamBlock {
    /// Its idstr (`pc.ram`, `pc.bios`, `/rom@etc/acpi/tables`, ...).
    pub name: String,
    /// Its used length, bytes.
    pub length: u64,
}

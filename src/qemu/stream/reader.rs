//! [`StreamReader`]: QEMU's precopy stream as records, in stream order. Pages are handed out
//! borrowed from the reader's buffer (valid until the next call), so reading a page allocates
//! nothing. After the ram END section, the device sections are kept (at most
//! [`MAX_TAIL_BYTES`]) until QEMU_VM_EOF and the JSON description that follows it have
//! arrived and the description parses every kept byte (see [`super::sections`]); then the
//! reader is done, without waiting for the end of the stream QEMU keeps open.

use std::io::{ErrorKind, Read};
use std::ops::Range;

use super::sections::{check_known_sections, classify_block, parse_full_sections, DeviceSections};
use super::{
    command, kind, ram_flag, vmdesc, RamBlock, StreamError, PAGE_SIZE, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION,
};

/// The most RAM blocks a MEM_SIZE record may list.
pub const MAX_RAM_BLOCKS: usize = 64;
/// The most RAM a stream may announce (1 TiB).
pub const MAX_RAM_BYTES: u64 = 1 << 40;
/// The most bytes kept between the ram END section and the end of the JSON description.
pub const MAX_TAIL_BYTES: usize = 16 << 20;
/// The longest JSON description accepted.
pub const MAX_VMDESC_BYTES: usize = 8 << 20;
/// The longest machine name in the configuration section.
pub const MAX_MACHINE_NAME: u32 = 256;
/// The most capabilities the configuration may list.
pub const MAX_CAPABILITIES: u32 = 64;
/// The version of the ram section QEMU 2.x to 9.x writes.
pub const RAM_SECTION_VERSION: u32 = 4;
/// The reader's buffer: a page and its record header fit many times over.
const BUF_BYTES: usize = 256 << 10;
/// How much the tail grows per read.
const TAIL_CHUNK: usize = 64 << 10;

/// The stream's header and configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The stream version (3).
    pub version: u32,
    /// The machine type of the configuration section (`pc-i440fx-7.2`).
    pub machine: String,
}

/// A QEMU_VM_COMMAND the reader accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// MIG_CMD_OPEN_RETURN_PATH: the source listens for return-path messages.
    OpenReturnPath,
    /// MIG_CMD_PING with its value: the source wants a PONG with it.
    Ping(u32),
}

/// The content of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageData<'a> {
    /// Every byte is this one (RAM_SAVE_FLAG_ZERO).
    Fill(u8),
    /// The page's [`PAGE_SIZE`] bytes.
    Bytes(&'a [u8]),
}

/// One record of the stream.
#[derive(Debug)]
pub enum Record<'a> {
    /// A command.
    Command(Command),
    /// The ram SECTION_START's block list (MEM_SIZE).
    RamBlocks(Vec<RamBlock>),
    /// One page.
    Page {
        /// Index into the [`Record::RamBlocks`] list.
        block: usize,
        /// Offset in the block, page-aligned, the page inside the block.
        offset: u64,
        /// Its content.
        data: PageData<'a>,
    },
    /// The EOS closing a ram PART section (one chunk of a pre-copy round).
    RoundEnd,
    /// The EOS closing the ram END section: the VM is paused on the source.
    LastPagesEnd,
    /// Every FULL section, parsed with the JSON description; the end of the reader's work.
    Devices(DeviceSections),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Header,
    Records,
    Done,
}

/// What one step of the record loop produced, without a borrow of the buffer (`Again`: a
/// record that yields nothing, like the EOS of the ram SECTION_START).
enum Step {
    Again,
    Record(Record<'static>),
    /// A page: its fill byte, or the range of its bytes in the buffer.
    Page {
        block: usize,
        offset: u64,
        data: Result<u8, Range<usize>>,
    },
}

/// Reads QEMU's precopy stream from `R`.
#[derive(Debug)]
pub struct StreamReader<R: Read> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    offset: u64,
    state: State,
    capabilities: Vec<String>,
    blocks: Vec<RamBlock>,
    last_block: Option<usize>,
    ram_section_id: Option<u32>,
    /// The ram section being read: its type and id.
    section: Option<(u8, u32)>,
    ram_ended: bool,
}

impl<R: Read> StreamReader<R> {
    /// A reader at the start of a stream.
    pub fn new(r: R) -> Self {
        Self {
            inner: r,
            buf: vec![0; BUF_BYTES],
            start: 0,
            end: 0,
            offset: 0,
            state: State::Header,
            capabilities: Vec::new(),
            blocks: Vec::new(),
            last_block: None,
            ram_section_id: None,
            section: None,
            ram_ended: false,
        }
    }

    /// Stream bytes consumed so far.
    pub fn bytes_read(&self) -> u64 {
        self.offset
    }

    /// The migration capabilities the configuration section listed (those QEMU validates
    /// on both sides; usually none).
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    /// The RAM blocks of the ram SECTION_START, once read.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Magic, version 3 and the QEMU_VM_CONFIGURATION section with its subsections.
    pub fn read_header(&mut self) -> Result<Header, StreamError> {
        if self.state != State::Header {
            return Err(self.malformed("the header was already read".into()));
        }
        let magic = self.be32("magic")?;
        if magic != QEMU_VM_FILE_MAGIC {
            return Err(StreamError::BadMagic { found: magic });
        }
        let version = self.be32("version")?;
        if version != QEMU_VM_FILE_VERSION {
            return Err(StreamError::UnsupportedVersion { found: version });
        }
        let at = self.offset;
        let ty = self.u8("configuration")?;
        if ty != kind::CONFIGURATION {
            return Err(StreamError::Malformed {
                at,
                what: format!("record type {ty:#x} where the configuration section (0x07) belongs"),
            });
        }
        let len = self.be32("machine name length")?;
        if len > MAX_MACHINE_NAME {
            return Err(StreamError::TooLarge {
                what: "machine name length",
                value: u64::from(len),
                limit: u64::from(MAX_MACHINE_NAME),
            });
        }
        let machine = self.string(len as usize, "machine name")?;
        while self.peek("configuration subsection")? == kind::SUBSECTION {
            self.configuration_subsection()?;
        }
        self.state = State::Records;
        Ok(Header { version, machine })
    }

    /// `configuration/*` subsections (migration/savevm.c `vmstate_configuration`).
    fn configuration_subsection(&mut self) -> Result<(), StreamError> {
        self.u8("subsection marker")?;
        let len = self.u8("subsection name length")?;
        let name = self.string(usize::from(len), "subsection name")?;
        let at = self.offset;
        let version = self.be32("subsection version")?;
        match name.as_str() {
            "configuration/target-page-bits" => {
                let bits = self.be32("target page bits")?;
                if bits != 12 {
                    return Err(StreamError::Malformed {
                        at: at + 4,
                        what: format!("target page bits {bits}, x86 has 12"),
                    });
                }
            }
            "configuration/capabilities" => {
                let count = self.be32("capability count")?;
                if count > MAX_CAPABILITIES {
                    return Err(StreamError::TooLarge {
                        what: "capability count",
                        value: u64::from(count),
                        limit: u64::from(MAX_CAPABILITIES),
                    });
                }
                for _ in 0..count {
                    let len = self.u8("capability length")?;
                    let cap = self.string(usize::from(len), "capability")?;
                    // Shared RAM is not sent at all: the destination would lack it.
                    if cap == "x-ignore-shared" {
                        return Err(StreamError::UnsupportedCapability { name: cap });
                    }
                    self.capabilities.push(cap);
                }
            }
            // The source's UUID, for QEMU's own check; no guest state.
            "configuration/uuid" => {
                self.take(16, "uuid")?;
            }
            _ => return Err(StreamError::UnsupportedSubsection { name }),
        }
        if version != 1 {
            return Err(StreamError::Malformed {
                at,
                what: format!("subsection {name:?} version {version}"),
            });
        }
        Ok(())
    }

    /// The next record. After [`Record::Devices`] the stream is done: [`StreamError::Finished`].
    pub fn next_record(&mut self) -> Result<Record<'_>, StreamError> {
        match self.state {
            State::Header => return Err(self.malformed("records before the header".into())),
            State::Done => return Err(StreamError::Finished),
            State::Records => {}
        }
        loop {
            match self.step() {
                Ok(Step::Again) => {}
                Ok(Step::Record(r)) => return Ok(r),
                Ok(Step::Page { block, offset, data }) => {
                    let data = match data {
                        Ok(fill) => PageData::Fill(fill),
                        Err(range) => PageData::Bytes(&self.buf[range]),
                    };
                    return Ok(Record::Page { block, offset, data });
                }
                Err(e) => {
                    // A refused record ends the stream: where the next one starts is unknown.
                    self.state = State::Done;
                    return Err(e);
                }
            }
        }
    }

    fn step(&mut self) -> Result<Step, StreamError> {
        if let Some((ty, id)) = self.section {
            return self.ram_record(ty, id);
        }
        if self.ram_ended {
            let devices = self.read_devices()?;
            self.state = State::Done;
            return Ok(Step::Record(Record::Devices(devices)));
        }
        let at = self.offset;
        let ty = self.u8("record type")?;
        match ty {
            kind::COMMAND => self.command(at).map(|c| Step::Record(Record::Command(c))),
            kind::SECTION_START => {
                let id = self.be32("section id")?;
                let len = self.u8("idstr length")?;
                let idstr = self.string(usize::from(len), "idstr")?;
                let instance = self.be32("instance id")?;
                let version = self.be32("version id")?;
                if idstr != "ram" {
                    return Err(StreamError::UnsupportedSection { name: idstr });
                }
                if instance != 0 {
                    return Err(StreamError::Malformed {
                        at,
                        what: format!("ram section instance {instance}, QEMU has one (0)"),
                    });
                }
                if self.ram_section_id.is_some() {
                    return Err(StreamError::Malformed {
                        at,
                        what: "a second ram SECTION_START".into(),
                    });
                }
                if version != RAM_SECTION_VERSION {
                    return Err(StreamError::Malformed {
                        at,
                        what: format!("ram section version {version}, {RAM_SECTION_VERSION} expected"),
                    });
                }
                self.ram_section_id = Some(id);
                self.section = Some((ty, id));
                Ok(Step::Again)
            }
            kind::SECTION_PART | kind::SECTION_END => {
                let id = self.be32("section id")?;
                if self.ram_section_id != Some(id) || self.blocks.is_empty() {
                    return Err(StreamError::Malformed {
                        at,
                        what: format!("section {ty:#x} with id {id}, not the started ram section"),
                    });
                }
                self.section = Some((ty, id));
                Ok(Step::Again)
            }
            kind::SECTION_FULL => {
                // A device before the ram END section: without the description (after EOF)
                // its bytes cannot be delimited.
                let _id = self.be32("section id")?;
                let len = self.u8("idstr length")?;
                let idstr = self.string(usize::from(len), "idstr")?;
                Err(StreamError::UnsupportedSection { name: idstr })
            }
            kind::EOF => Err(StreamError::Malformed {
                at,
                what: "QEMU_VM_EOF before the ram END section".into(),
            }),
            _ => Err(StreamError::Malformed {
                at,
                what: format!("unknown record type {ty:#x}"),
            }),
        }
    }

    fn command(&mut self, at: u64) -> Result<Command, StreamError> {
        let cmd = self.be16("command")?;
        let len = self.be16("command length")?;
        let wrong_len = |want: u16| StreamError::Malformed {
            at,
            what: format!("command {} with length {len}, {want} expected", command::name(cmd)),
        };
        match cmd {
            command::OPEN_RETURN_PATH if len == 0 => Ok(Command::OpenReturnPath),
            command::OPEN_RETURN_PATH => Err(wrong_len(0)),
            command::PING if len == 4 => Ok(Command::Ping(self.be32("ping value")?)),
            command::PING => Err(wrong_len(4)),
            _ => Err(StreamError::UnsupportedCommand { command: cmd }),
        }
    }

    /// One record inside the ram section `ty` (START, PART or END) with id `id`.
    fn ram_record(&mut self, ty: u8, id: u32) -> Result<Step, StreamError> {
        let at = self.offset;
        let word = self.be64("ram record")?;
        let flags = word & (PAGE_SIZE as u64 - 1);
        let addr = word & !(PAGE_SIZE as u64 - 1);
        let known = ram_flag::ZERO | ram_flag::MEM_SIZE | ram_flag::PAGE | ram_flag::EOS | ram_flag::CONTINUE;
        if flags & !known != 0 {
            return Err(StreamError::UnsupportedRamFlags {
                flags,
                names: ram_flag::names(flags),
            });
        }
        let bad = |what: String| StreamError::Malformed { at, what };
        match flags & !ram_flag::CONTINUE {
            ram_flag::MEM_SIZE
                if ty == kind::SECTION_START && self.blocks.is_empty() && flags == ram_flag::MEM_SIZE =>
            {
                self.read_blocks(addr, at)?;
                Ok(Step::Record(Record::RamBlocks(self.blocks.clone())))
            }
            ram_flag::ZERO | ram_flag::PAGE => {
                let block = if flags & ram_flag::CONTINUE != 0 {
                    self.last_block
                        .ok_or_else(|| bad("CONTINUE page without a previous block".into()))?
                } else {
                    let len = self.u8("block name length")?;
                    let name = self.string(usize::from(len), "block name")?;
                    self.blocks
                        .iter()
                        .position(|b| b.name == name)
                        .ok_or(StreamError::UnknownRamBlock { name })?
                };
                let b = &self.blocks[block];
                if addr.checked_add(PAGE_SIZE as u64).is_none_or(|e| e > b.length) {
                    return Err(bad(format!(
                        "page at {addr:#x} outside block {:?} of {:#x} bytes",
                        b.name, b.length
                    )));
                }
                self.last_block = Some(block);
                let data = if flags & ram_flag::ZERO != 0 {
                    Ok(self.u8("fill byte")?)
                } else {
                    Err(self.take(PAGE_SIZE, "page")?)
                };
                Ok(Step::Page {
                    block,
                    offset: addr,
                    data,
                })
            }
            // QEMU writes EOS with no address; one with an address is not QEMU's.
            ram_flag::EOS if flags == ram_flag::EOS && addr == 0 => {
                let fat = self.offset;
                let marker = self.u8("section footer")?;
                let fid = self.be32("section footer id")?;
                if marker != kind::SECTION_FOOTER || fid != id {
                    return Err(StreamError::Malformed {
                        at: fat,
                        what: format!("footer {marker:#x} {fid} where 0x7e {id} closes the ram section"),
                    });
                }
                self.section = None;
                match ty {
                    kind::SECTION_START if self.blocks.is_empty() => {
                        Err(bad("ram SECTION_START without its block list".into()))
                    }
                    kind::SECTION_START => Ok(Step::Again),
                    kind::SECTION_PART => Ok(Step::Record(Record::RoundEnd)),
                    _ => {
                        self.ram_ended = true;
                        Ok(Step::Record(Record::LastPagesEnd))
                    }
                }
            }
            _ => Err(bad(format!(
                "ram record flags {flags:#x} ({}) in section {ty:#x}",
                ram_flag::names(flags)
            ))),
        }
    }

    /// The MEM_SIZE block list: `total` bytes of blocks, each `u8 len, name, be64 used_length`.
    fn read_blocks(&mut self, total: u64, at: u64) -> Result<(), StreamError> {
        if total > MAX_RAM_BYTES {
            return Err(StreamError::TooLarge {
                what: "RAM bytes",
                value: total,
                limit: MAX_RAM_BYTES,
            });
        }
        let mut left = total;
        let mut blocks: Vec<RamBlock> = Vec::new();
        while left > 0 {
            if blocks.len() == MAX_RAM_BLOCKS {
                return Err(StreamError::TooLarge {
                    what: "RAM block count",
                    value: blocks.len() as u64 + 1,
                    limit: MAX_RAM_BLOCKS as u64,
                });
            }
            let bat = self.offset;
            let len = self.u8("block name length")?;
            let name = self.string(usize::from(len), "block name")?;
            let length = self.be64("block length")?;
            // Postcopy (its page size field) is announced by POSTCOPY_ADVISE, refused
            // before this record; ignore-shared (its address field) by a capability refused
            // in the configuration. So only name and length follow.
            classify_block(&name)?;
            if length == 0 || length > left || length % PAGE_SIZE as u64 != 0 {
                return Err(StreamError::Malformed {
                    at: bat,
                    what: format!("block {name:?} of {length:#x} bytes ({left:#x} of {total:#x} left)"),
                });
            }
            if blocks.iter().any(|b| b.name == name) {
                return Err(StreamError::Malformed {
                    at: bat,
                    what: format!("block {name:?} listed twice"),
                });
            }
            left -= length;
            blocks.push(RamBlock { name, length });
        }
        if blocks.is_empty() {
            return Err(StreamError::Malformed {
                at,
                what: "MEM_SIZE with no RAM".into(),
            });
        }
        self.blocks = blocks;
        Ok(())
    }

    /// Keeps the bytes after the ram END section until a QEMU_VM_EOF, VMDESCRIPTION, be32 len
    /// and JSON is found whose description parses exactly the bytes before it. Candidates
    /// whose JSON is not whole yet wait while others are tried, so a false one (the bytes
    /// `00 06` inside a device's state) never blocks the read.
    fn read_devices(&mut self) -> Result<DeviceSections, StreamError> {
        let base = self.offset;
        let mut tail: Vec<u8> = self.buf[self.start..self.end].to_vec();
        self.start = self.end;
        let mut scanned = 0usize;
        let mut pending: Vec<(usize, usize)> = Vec::new();
        let mut first_error: Option<StreamError> = None;
        loop {
            while scanned + 6 <= tail.len() {
                let p = scanned;
                scanned += 1;
                if tail[p] == kind::EOF && tail[p + 1] == kind::VMDESCRIPTION {
                    let len = u32::from_be_bytes([tail[p + 2], tail[p + 3], tail[p + 4], tail[p + 5]]) as usize;
                    if (2..=MAX_VMDESC_BYTES).contains(&len) {
                        pending.push((p, p + 6 + len));
                    }
                }
            }
            let mut i = 0;
            while i < pending.len() {
                let (p, end) = pending[i];
                if end > tail.len() {
                    i += 1;
                    continue;
                }
                pending.remove(i);
                match try_candidate(&tail, base, p, end) {
                    Ok(Some(devices)) => {
                        // Whatever followed the JSON is not ours to read.
                        self.offset = base + end as u64;
                        check_known_sections(&devices)?;
                        return Ok(devices);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if tail.len() >= MAX_TAIL_BYTES {
                return Err(first_error.unwrap_or(StreamError::TooLarge {
                    what: "device sections and vmdesc bytes",
                    value: tail.len() as u64,
                    limit: MAX_TAIL_BYTES as u64,
                }));
            }
            let len = tail.len();
            let want = TAIL_CHUNK.min(MAX_TAIL_BYTES - len);
            tail.resize(len + want, 0);
            let n = loop {
                match self.inner.read(&mut tail[len..]) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            };
            tail.truncate(len + n);
            self.offset = base + tail.len() as u64;
            if n == 0 {
                if let Some(e) = first_error {
                    return Err(e);
                }
                if let Some(&(p, end)) = pending.iter().find(|&&(p, _)| tail.get(p + 6) == Some(&b'{')) {
                    return Err(StreamError::Truncated {
                        at: base + tail.len() as u64,
                        what: format!("vmdesc of {} bytes at byte {}", end - p - 6, base + p as u64),
                    });
                }
                return Err(StreamError::NoDeviceDescription);
            }
        }
    }

    fn malformed(&self, what: String) -> StreamError {
        StreamError::Malformed { at: self.offset, what }
    }

    /// Makes `n` (at most the buffer's size) bytes available at `start`.
    fn fill(&mut self, n: usize, what: &str) -> Result<(), StreamError> {
        if self.end - self.start >= n {
            return Ok(());
        }
        if self.start + n > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end - self.start < n {
            match self.inner.read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    return Err(StreamError::Truncated {
                        at: self.offset + (self.end - self.start) as u64,
                        what: format!("{what} ({n} bytes at byte {})", self.offset),
                    })
                }
                Ok(k) => self.end += k,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn take(&mut self, n: usize, what: &str) -> Result<Range<usize>, StreamError> {
        self.fill(n, what)?;
        let r = self.start..self.start + n;
        self.start += n;
        self.offset += n as u64;
        Ok(r)
    }

    fn peek(&mut self, what: &str) -> Result<u8, StreamError> {
        self.fill(1, what)?;
        Ok(self.buf[self.start])
    }

    fn u8(&mut self, what: &str) -> Result<u8, StreamError> {
        let r = self.take(1, what)?;
        Ok(self.buf[r.start])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], StreamError> {
        let r = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(&self.buf[r]);
        Ok(a)
    }

    fn be16(&mut self, what: &str) -> Result<u16, StreamError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn be32(&mut self, what: &str) -> Result<u32, StreamError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn be64(&mut self, what: &str) -> Result<u64, StreamError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn string(&mut self, len: usize, what: &str) -> Result<String, StreamError> {
        let at = self.offset;
        let r = self.take(len, what)?;
        String::from_utf8(self.buf[r].to_vec()).map_err(|_| StreamError::Malformed {
            at,
            what: format!("{what} is not UTF-8"),
        })
    }
}

/// `Ok(None)`: not a description at all; `Err`: a description that does not fit the bytes.
fn try_candidate(tail: &[u8], base: u64, p: usize, end: usize) -> Result<Option<DeviceSections>, StreamError> {
    let json = &tail[p + 6..end];
    if json.first() != Some(&b'{') || json.last() != Some(&b'}') {
        return Ok(None);
    }
    let Ok(desc) = vmdesc::parse(json, base + p as u64 + 6) else {
        return Ok(None);
    };
    parse_full_sections(&tail[..p], base, &desc).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream built by hand, piece by piece.
    #[derive(Default)]
    struct B(Vec<u8>);

    impl B {
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn be16(mut self, v: u16) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn be32(mut self, v: u32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn be64(mut self, v: u64) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn name(mut self, s: &str) -> Self {
            self.0.push(s.len() as u8);
            self.0.extend(s.as_bytes());
            self
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend(b);
            self
        }
        fn header(self) -> Self {
            self.be32(QEMU_VM_FILE_MAGIC)
                .be32(3)
                .u8(kind::CONFIGURATION)
                .be32(13)
                .raw(b"pc-i440fx-7.2")
        }
        fn ram_start(self) -> Self {
            self.u8(kind::SECTION_START)
                .be32(2)
                .name("ram")
                .be32(0)
                .be32(4)
                .be64((3 * 4096) | ram_flag::MEM_SIZE)
                .name("pc.ram")
                .be64(2 * 4096)
                .name("pc.bios")
                .be64(4096)
                .be64(ram_flag::EOS)
                .u8(kind::SECTION_FOOTER)
                .be32(2)
        }
        fn footer(self, id: u32) -> Self {
            self.be64(ram_flag::EOS).u8(kind::SECTION_FOOTER).be32(id)
        }
        /// One `timer` FULL section whose 6-byte buffer holds a false `00 06 len` candidate,
        /// then EOF and its description.
        fn devices(self, idstr: &str) -> Self {
            let json = format!(
                r#"{{"page_size": 4096, "devices": [{{"name": "{idstr}", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": [{{"name": "b", "type": "buffer", "size": 6}}, {{"name": "t", "type": "int64", "size": 8}}]}}]}}"#
            );
            self.u8(kind::SECTION_FULL)
                .be32(3)
                .name(idstr)
                .be32(0)
                .be32(2)
                .raw(&[0, 6, 0, 0, 0, 2])
                .be64(-5i64 as u64)
                .u8(kind::SECTION_FOOTER)
                .be32(3)
                .u8(kind::EOF)
                .u8(kind::VMDESCRIPTION)
                .be32(json.len() as u32)
                .raw(json.as_bytes())
        }
        fn full(self) -> Self {
            self.header()
                .u8(kind::COMMAND)
                .be16(command::OPEN_RETURN_PATH)
                .be16(0)
                .u8(kind::COMMAND)
                .be16(command::PING)
                .be16(4)
                .be32(7)
                .ram_start()
                .u8(kind::SECTION_PART)
                .be32(2)
                .be64(ram_flag::PAGE)
                .name("pc.ram")
                .raw(&[0xab; PAGE_SIZE])
                .be64(4096 | ram_flag::ZERO | ram_flag::CONTINUE)
                .u8(0)
                .footer(2)
                .u8(kind::SECTION_END)
                .be32(2)
                .be64(ram_flag::ZERO)
                .name("pc.bios")
                .u8(0x5a)
                .footer(2)
                .devices("timer")
        }
    }

    /// A transport that fails any read past its bytes, like QEMU's socket that stays open.
    struct Open<'a>(&'a [u8]);

    impl Read for Open<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                return Err(std::io::Error::other("read past the bytes QEMU sent"));
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    /// Everything the stream yields, as text, or the first error.
    fn read_all(bytes: &[u8]) -> Result<Vec<String>, StreamError> {
        let mut r = StreamReader::new(bytes);
        let mut out = vec![format!("{:?}", r.read_header()?)];
        loop {
            match r.next_record()? {
                Record::Page { block, offset, data } => {
                    let d = match data {
                        PageData::Fill(b) => format!("fill {b}"),
                        PageData::Bytes(b) => format!(
                            "{} bytes, fnv {:#x}",
                            b.len(),
                            b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ u64::from(x))
                                .wrapping_mul(0x100_0000_01b3))
                        ),
                    };
                    out.push(format!("page {block} {offset:#x} {d}"));
                }
                Record::Devices(d) => {
                    out.push(format!("{d:?}"));
                    return Ok(out);
                }
                other => out.push(format!("{other:?}")),
            }
        }
    }

    #[test]
    fn test_synthetic_stream_yields_its_records_in_order_and_stops_after_the_vmdesc() {
        let bytes = B::default().full().0;
        let mut r = StreamReader::new(Open(&bytes));
        let h = r.read_header().unwrap();
        assert_eq!((h.version, h.machine.as_str()), (3, "pc-i440fx-7.2"));
        assert!(matches!(
            r.next_record().unwrap(),
            Record::Command(Command::OpenReturnPath)
        ));
        assert!(matches!(r.next_record().unwrap(), Record::Command(Command::Ping(7))));
        match r.next_record().unwrap() {
            Record::RamBlocks(b) => assert_eq!(
                b,
                vec![
                    RamBlock {
                        name: "pc.ram".into(),
                        length: 8192
                    },
                    RamBlock {
                        name: "pc.bios".into(),
                        length: 4096
                    }
                ]
            ),
            other => panic!("{other:?}"),
        }
        match r.next_record().unwrap() {
            Record::Page {
                block: 0,
                offset: 0,
                data: PageData::Bytes(b),
            } => {
                assert_eq!(b.len(), PAGE_SIZE);
                assert!(b.iter().all(|&x| x == 0xab));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            r.next_record().unwrap(),
            Record::Page {
                block: 0,
                offset: 4096,
                data: PageData::Fill(0)
            }
        ));
        assert!(matches!(r.next_record().unwrap(), Record::RoundEnd));
        assert!(matches!(
            r.next_record().unwrap(),
            Record::Page {
                block: 1,
                offset: 0,
                data: PageData::Fill(0x5a)
            }
        ));
        assert!(matches!(r.next_record().unwrap(), Record::LastPagesEnd));
        // The false `00 06` candidate inside the timer's buffer is passed over, and the
        // transport is never read past the description.
        match r.next_record().unwrap() {
            Record::Devices(d) => {
                assert_eq!(d.sections.len(), 1);
                assert_eq!(d.sections[0].fields.i64("t").unwrap(), -5);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.bytes_read(), bytes.len() as u64);
        assert!(matches!(r.next_record(), Err(StreamError::Finished)));
    }

    #[test]
    fn test_unsupported_commands_flags_sections_and_blocks_are_refused_by_name() {
        let postcopy = B::default().header().u8(kind::COMMAND).be16(3).be16(0).0;
        let e = read_all(&postcopy).unwrap_err();
        assert!(matches!(e, StreamError::UnsupportedCommand { command: 3 }), "{e}");
        assert!(e.to_string().contains("POSTCOPY_ADVISE"));

        for (flag, name) in [
            (ram_flag::XBZRLE, "XBZRLE"),
            (ram_flag::COMPRESS_PAGE, "COMPRESS_PAGE"),
            (ram_flag::HOOK, "HOOK"),
            (ram_flag::MULTIFD_FLUSH, "MULTIFD_FLUSH"),
            (0x800, "0x800"),
        ] {
            let s = B::default()
                .header()
                .ram_start()
                .u8(kind::SECTION_PART)
                .be32(2)
                .be64(flag)
                .0;
            match read_all(&s) {
                Err(StreamError::UnsupportedRamFlags { flags, names }) => {
                    assert_eq!(flags, flag);
                    assert!(names.contains(name), "{names}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }

        let block = B::default()
            .header()
            .u8(kind::SECTION_START)
            .be32(1)
            .name("block")
            .be32(0)
            .be32(1)
            .0;
        assert!(matches!(read_all(&block), Err(StreamError::UnsupportedSection { name }) if name == "block"));

        let vram = B::default()
            .header()
            .u8(kind::SECTION_START)
            .be32(2)
            .name("ram")
            .be32(0)
            .be32(4)
            .be64(4096 | ram_flag::MEM_SIZE)
            .name("vga.vram")
            .be64(4096)
            .0;
        assert!(matches!(read_all(&vram), Err(StreamError::UnsupportedRamBlock { name }) if name == "vga.vram"));

        let unknown = B::default()
            .header()
            .ram_start()
            .u8(kind::SECTION_PART)
            .be32(2)
            .be64(ram_flag::ZERO)
            .name("pc.rom")
            .0;
        assert!(matches!(read_all(&unknown), Err(StreamError::UnknownRamBlock { name }) if name == "pc.rom"));

        let device = B::default()
            .header()
            .ram_start()
            .u8(kind::SECTION_END)
            .be32(2)
            .footer(2)
            .devices("pvpanic")
            .0;
        assert!(matches!(read_all(&device), Err(StreamError::UnsupportedSection { name }) if name == "pvpanic"));
    }

    #[test]
    fn test_pages_outside_their_block_bad_footers_and_missing_vmdesc_are_refused() {
        let outside = B::default()
            .header()
            .ram_start()
            .u8(kind::SECTION_PART)
            .be32(2)
            .be64((2 * 4096) | ram_flag::ZERO)
            .name("pc.ram")
            .u8(0)
            .0;
        let e = read_all(&outside).unwrap_err();
        assert!(
            matches!(e, StreamError::Malformed { .. }) && e.to_string().contains("outside"),
            "{e}"
        );

        let footer = B::default()
            .header()
            .ram_start()
            .u8(kind::SECTION_PART)
            .be32(2)
            .be64(ram_flag::EOS)
            .u8(0x7e)
            .be32(9)
            .0;
        assert!(matches!(read_all(&footer), Err(StreamError::Malformed { .. })));

        let no_desc = B::default()
            .header()
            .ram_start()
            .u8(kind::SECTION_END)
            .be32(2)
            .footer(2)
            .u8(kind::EOF)
            .0;
        assert!(matches!(read_all(&no_desc), Err(StreamError::NoDeviceDescription)));

        let early_eof = B::default().header().ram_start().u8(kind::EOF).0;
        assert!(matches!(read_all(&early_eof), Err(StreamError::Malformed { .. })));

        let bad_magic = B::default().be32(0x5145_564e).0;
        assert!(matches!(
            read_all(&bad_magic),
            Err(StreamError::BadMagic { found: 0x5145_564e })
        ));
        let v2 = B::default().be32(QEMU_VM_FILE_MAGIC).be32(2).0;
        assert!(matches!(
            read_all(&v2),
            Err(StreamError::UnsupportedVersion { found: 2 })
        ));
    }

    #[test]
    fn test_block_counts_and_ram_sizes_are_bounded() {
        let mut many = B::default()
            .header()
            .u8(kind::SECTION_START)
            .be32(2)
            .name("ram")
            .be32(0)
            .be32(4)
            .be64((65 * 4096) | ram_flag::MEM_SIZE);
        for i in 0..65 {
            many = many.name(&format!("/rom@etc/{i}")).be64(4096);
        }
        assert!(matches!(
            read_all(&many.0),
            Err(StreamError::TooLarge {
                what: "RAM block count",
                ..
            })
        ));
        let huge = B::default()
            .header()
            .u8(kind::SECTION_START)
            .be32(2)
            .name("ram")
            .be32(0)
            .be32(4)
            .be64((2u64 << 40) | ram_flag::MEM_SIZE)
            .0;
        assert!(matches!(
            read_all(&huge),
            Err(StreamError::TooLarge { what: "RAM bytes", .. })
        ));
    }

    #[test]
    fn test_every_truncation_and_header_flip_of_a_synthetic_stream_errors_or_differs() {
        let bytes = B::default().full().0;
        let whole = read_all(&bytes).unwrap();
        for n in 0..bytes.len() {
            assert!(read_all(&bytes[..n]).is_err(), "truncated to {n} bytes");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x41;
            if let Ok(got) = read_all(&b) {
                assert_ne!(got, whole, "flipped byte {i}");
            }
        }
    }
}

//! [`StreamWriter`]: a migration stream QEMU 7.2 loads with `-incoming` (`migration/savevm.c`'s
//! `qemu_loadvm_state`, `migration/ram.c`'s `ram_load_precopy`).
//!
//! The stream, in the order the methods write it:
//!
//! ```text
//! be32 "QEVM"  be32 3                                         header()
//! 0x07 be32 len machine-name                                  (kind::CONFIGURATION)
//! 0x08 be16 1 be16 0                                          open_return_path()
//! 0x01 be32 id u8 len "ram" be32 0 be32 4                     ram_setup(): SECTION_START
//!      be64 (total | MEM_SIZE) { u8 len name be64 length }*  EOS  0x7e be32 id
//! 0x02 be32 id  { page record }*  EOS  0x7e be32 id           begin_round() page()* end_pages()
//! 0x03 be32 id  { page record }*  EOS  0x7e be32 id           begin_last_pages() page()* end_pages()
//! 0x04 be32 id u8 len idstr be32 instance be32 version body 0x7e be32 id   cpu(), per section
//! 0x00  0x06 be32 len JSON                                    finish(): EOF, description
//! ```
//!
//! A page record is `be64 (offset | flags)`, the block's `u8 len name` unless `CONTINUE` says it
//! is the previous record's block, then either one fill byte (`ZERO`, for a page of one repeated
//! byte) or the page's 4096 bytes (`PAGE`).
//!
//! Writes go through a buffer of [`BUFFER_BYTES`] that is flushed to the inner writer at the end
//! of each section and whenever it fills; a page is copied into it, never allocated.

use std::io::Write;

use serde_json::{json, Value};

use super::write_cpu::encode_cpu;
use super::{command, kind, ram_flag, RamBlock, StreamError, PAGE_SIZE, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION};
use crate::format::native::qemu::QemuCpu;

/// The first section id used. Not 0: QEMU 7.2 finds the entry a PART or END section continues
/// by the section id its START recorded (`load_section_id`), and every entry not loaded yet
/// holds 0, so a ram section with id 0 is taken for the first registered device (`timer`).
pub const FIRST_SECTION_ID: u32 = 1;

/// The machine type QEMU 7.2's `-machine pc` resolves to; the configuration must name it
/// exactly (the alias `pc` is refused).
pub const PC_I440FX_7_2: &str = "pc-i440fx-7.2";
/// `ram`'s section version; QEMU refuses any other.
pub const RAM_SECTION_VERSION: u32 = 4;
/// How much the writer buffers before writing to its inner writer.
pub const BUFFER_BYTES: usize = 256 * 1024;
/// The longest machine name written (QEMU's are about 20 bytes).
pub const MAX_MACHINE_NAME: usize = 256;

/// Where the writer is in the stream; each method checks it, so that a call out of order is an
/// error rather than a stream QEMU fails on much later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    New,
    /// Header written; commands may follow.
    Header,
    /// Ram declared; no ram section open.
    Ram,
    /// A PART (`last` false) or END section open for pages.
    Pages {
        last: bool,
    },
    /// The END section closed, or device sections written.
    Devices,
    Finished,
    /// A write failed: the stream is cut somewhere unknown.
    Broken,
}

impl State {
    fn describe(self) -> &'static str {
        match self {
            State::New => "before the header",
            State::Header => "after the header",
            State::Ram => "between ram sections",
            State::Pages { last: false } => "inside a ram PART section",
            State::Pages { last: true } => "inside the ram END section",
            State::Devices => "after the last pages",
            State::Finished => "after finish",
            State::Broken => "after a failed write",
        }
    }
}

/// Writes one QEMU migration stream to `W`; see the module docs for the order of calls.
pub struct StreamWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    written: u64,
    state: State,
    blocks: Vec<RamBlock>,
    ram_section_id: u32,
    next_section_id: u32,
    /// The block of the previous page record in the open section.
    last_block: Option<usize>,
    /// Description entries of the device sections written, for [`StreamWriter::finish`].
    devices: Vec<Value>,
}

impl<W: Write> std::fmt::Debug for StreamWriter<W> {
    // Without the buffer's bytes (up to BUFFER_BYTES) or the inner writer.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("state", &self.state)
            .field("written", &self.written)
            .field("buffered", &self.buf.len())
            .field("blocks", &self.blocks)
            .field("ram_section_id", &self.ram_section_id)
            .field("devices", &self.devices.len())
            .finish()
    }
}

impl<W: Write> StreamWriter<W> {
    /// A writer that has written nothing yet.
    pub fn new(w: W) -> Self {
        StreamWriter {
            inner: w,
            buf: Vec::with_capacity(BUFFER_BYTES),
            written: 0,
            state: State::New,
            blocks: Vec::new(),
            ram_section_id: FIRST_SECTION_ID,
            next_section_id: FIRST_SECTION_ID,
            last_block: None,
            devices: Vec::new(),
        }
    }

    /// Magic, version and `kind::CONFIGURATION` naming `machine`, which must be the
    /// destination's machine type exactly (e.g. [`PC_I440FX_7_2`]). Flushed.
    pub fn header(&mut self, machine: &str) -> Result<(), StreamError> {
        self.require_state("header", |s| s == State::New)?;
        if machine.len() > MAX_MACHINE_NAME {
            return Err(StreamError::TooLarge {
                what: "machine name length",
                value: machine.len() as u64,
                limit: MAX_MACHINE_NAME as u64,
            });
        }
        self.guarded(|w| {
            w.put(&QEMU_VM_FILE_MAGIC.to_be_bytes())?;
            w.put(&QEMU_VM_FILE_VERSION.to_be_bytes())?;
            // vmstate_configuration: u32 len, the name; no subsection is needed for x86 (fixed
            // target page bits, no validated capabilities, no UUID check by default).
            w.put(&[kind::CONFIGURATION])?;
            w.put(&(machine.len() as u32).to_be_bytes())?;
            w.put(machine.as_bytes())?;
            w.flush_all()
        })?;
        self.state = State::Header;
        Ok(())
    }

    /// `command::OPEN_RETURN_PATH`: the destination then answers on the same connection (see
    /// [`super::return_path`]). Right after the header, as QEMU sends it. Flushed.
    pub fn open_return_path(&mut self) -> Result<(), StreamError> {
        self.require_state("open_return_path", |s| s == State::Header)?;
        self.guarded(|w| {
            w.command(command::OPEN_RETURN_PATH, &[])?;
            w.flush_all()
        })
    }

    /// `command::PING`: a destination with an open return path answers `MIG_RP_MSG_PONG` with
    /// `value` once it has loaded everything before it. Between sections only. Flushed.
    pub fn ping(&mut self, value: u32) -> Result<(), StreamError> {
        self.require_state("ping", |s| matches!(s, State::Header | State::Ram | State::Devices))?;
        self.guarded(|w| {
            w.command(command::PING, &value.to_be_bytes())?;
            w.flush_all()
        })
    }

    /// The `ram` SECTION_START: the total size and every block's name and length. The
    /// destination must have each block with exactly this length; blocks it has and the list
    /// omits (firmware) keep its own contents. Flushed.
    pub fn ram_setup(&mut self, blocks: &[RamBlock]) -> Result<(), StreamError> {
        self.require_state("ram_setup", |s| s == State::Header)?;
        let mut total: u64 = 0;
        for b in blocks {
            if b.name.len() > usize::from(u8::MAX) {
                return Err(StreamError::TooLarge {
                    what: "ram block name length",
                    value: b.name.len() as u64,
                    limit: u64::from(u8::MAX),
                });
            }
            if b.length % PAGE_SIZE as u64 != 0 {
                return Err(StreamError::UnalignedRamBlock {
                    name: b.name.clone(),
                    length: b.length,
                });
            }
            // Offsets share the be64 with the flags, which need the low 12 bits.
            total = total
                .checked_add(b.length)
                .filter(|t| *t < 1 << 63)
                .ok_or(StreamError::TooLarge {
                    what: "total ram bytes",
                    value: b.length,
                    limit: 1 << 63,
                })?;
        }
        self.blocks = blocks.to_vec();
        self.ram_section_id = self.new_section_id();
        let id = self.ram_section_id;
        self.guarded(|w| {
            w.section_start(kind::SECTION_START, id, "ram", 0, RAM_SECTION_VERSION)?;
            w.put(&(total | ram_flag::MEM_SIZE).to_be_bytes())?;
            for b in blocks {
                w.put(&[b.name.len() as u8])?;
                w.put(b.name.as_bytes())?;
                w.put(&b.length.to_be_bytes())?;
            }
            w.put(&ram_flag::EOS.to_be_bytes())?;
            w.footer(id)?;
            w.flush_all()
        })?;
        self.state = State::Ram;
        Ok(())
    }

    /// Opens a ram SECTION_PART: one chunk of a pre-copy round.
    pub fn begin_round(&mut self) -> Result<(), StreamError> {
        self.begin_pages("begin_round", kind::SECTION_PART, false)
    }

    /// Opens the ram SECTION_END: the pages sent once the source is paused.
    pub fn begin_last_pages(&mut self) -> Result<(), StreamError> {
        self.begin_pages("begin_last_pages", kind::SECTION_END, true)
    }

    fn begin_pages(&mut self, call: &'static str, kind: u8, last: bool) -> Result<(), StreamError> {
        self.require_state(call, |s| s == State::Ram)?;
        let id = self.ram_section_id;
        self.guarded(|w| {
            w.put(&[kind])?;
            w.put(&id.to_be_bytes())
        })?;
        // The loader remembers the last block across sections too, but naming it again at each
        // section costs a few bytes and keeps every section self-contained.
        self.last_block = None;
        self.state = State::Pages { last };
        Ok(())
    }

    /// One page of block `block` (an index into the [`StreamWriter::ram_setup`] list) at
    /// `offset`: `data` must be [`PAGE_SIZE`] bytes, `offset` page-aligned and inside the block.
    /// A page of one repeated byte is sent as that byte (`ZERO` record).
    pub fn page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), StreamError> {
        self.require_state("page", |s| matches!(s, State::Pages { .. }))?;
        if data.len() != PAGE_SIZE {
            return Err(StreamError::PageLength { len: data.len() });
        }
        let b = self.blocks.get(block).ok_or(StreamError::NoSuchBlock {
            index: block,
            count: self.blocks.len(),
        })?;
        let in_block = offset.checked_add(PAGE_SIZE as u64).is_some_and(|end| end <= b.length);
        if offset % PAGE_SIZE as u64 != 0 || !in_block {
            return Err(StreamError::PageOffset {
                block: b.name.clone(),
                offset,
                length: b.length,
            });
        }
        let fill = uniform_byte(data);
        let mut flags = if fill.is_some() { ram_flag::ZERO } else { ram_flag::PAGE };
        let same_block = self.last_block == Some(block);
        if same_block {
            flags |= ram_flag::CONTINUE;
        }
        self.guarded(|w| {
            w.put(&(offset | flags).to_be_bytes())?;
            if !same_block {
                w.put_block_name(block)?;
            }
            match fill {
                Some(byte) => w.put(&[byte]),
                None => w.put(data),
            }
        })?;
        self.last_block = Some(block);
        Ok(())
    }

    /// Closes the open PART or END section: EOS, then the section footer. Flushed.
    pub fn end_pages(&mut self) -> Result<(), StreamError> {
        let State::Pages { last } = self.state else {
            return Err(self.out_of_order("end_pages"));
        };
        let id = self.ram_section_id;
        self.guarded(|w| {
            w.put(&ram_flag::EOS.to_be_bytes())?;
            w.footer(id)?;
            w.flush_all()
        })?;
        self.state = if last { State::Devices } else { State::Ram };
        Ok(())
    }

    /// vCPU `index`'s `cpu_common`, `cpu` and `apic` FULL sections (see
    /// [`super::write_cpu`]). After the last pages, or right after the header for a stream
    /// without RAM. Flushed.
    pub fn cpu(&mut self, index: u32, cpu: &QemuCpu) -> Result<(), StreamError> {
        self.require_state("cpu", |s| matches!(s, State::Header | State::Devices))?;
        let sections = encode_cpu(index, cpu)?;
        for s in sections {
            let id = self.new_section_id();
            self.guarded(|w| {
                w.section_start(kind::SECTION_FULL, id, s.idstr, s.instance_id, s.version_id)?;
                w.put(&s.body)?;
                w.footer(id)
            })?;
            self.devices.push(s.description);
        }
        self.guarded(|w| w.flush_all())?;
        self.state = State::Devices;
        Ok(())
    }

    /// `kind::EOF`, then `kind::VMDESCRIPTION` with the JSON description of the device
    /// sections written (QEMU's loader reads it after EOF and would wait for it otherwise).
    /// Flushes everything; the writer accepts nothing more.
    pub fn finish(&mut self) -> Result<(), StreamError> {
        self.require_state("finish", |s| matches!(s, State::Header | State::Devices))?;
        let description = json!({ "page_size": PAGE_SIZE, "devices": self.devices });
        let text = description.to_string();
        let len = u32::try_from(text.len()).map_err(|_| StreamError::TooLarge {
            what: "device description bytes",
            value: text.len() as u64,
            limit: u64::from(u32::MAX),
        })?;
        self.guarded(|w| {
            w.put(&[kind::EOF, kind::VMDESCRIPTION])?;
            w.put(&len.to_be_bytes())?;
            w.put(text.as_bytes())?;
            w.flush_all()
        })?;
        self.state = State::Finished;
        Ok(())
    }

    /// Bytes of stream produced so far, buffered ones included.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// The inner writer. Between sections everything is flushed to it; inside a ram section
    /// some bytes may still be buffered.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    fn require_state(&self, call: &'static str, ok: impl Fn(State) -> bool) -> Result<(), StreamError> {
        if ok(self.state) {
            Ok(())
        } else {
            Err(self.out_of_order(call))
        }
    }

    fn out_of_order(&self, call: &'static str) -> StreamError {
        StreamError::OutOfOrder {
            call,
            state: self.state.describe(),
        }
    }

    /// Runs a write; on failure the writer is broken (the stream is cut at an unknown point).
    fn guarded(&mut self, write: impl FnOnce(&mut Self) -> Result<(), StreamError>) -> Result<(), StreamError> {
        let result = write(self);
        if result.is_err() {
            self.state = State::Broken;
        }
        result
    }

    fn new_section_id(&mut self) -> u32 {
        let id = self.next_section_id;
        self.next_section_id += 1;
        id
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        put_into(&mut self.buf, &mut self.inner, &mut self.written, bytes)
    }

    /// The block's `u8 len name`; `block` is checked by the caller.
    fn put_block_name(&mut self, block: usize) -> Result<(), StreamError> {
        // Split borrows: the name lives in `blocks`, the bytes go to the buffer.
        let StreamWriter {
            blocks,
            buf,
            inner,
            written,
            ..
        } = self;
        let name = blocks[block].name.as_bytes();
        put_into(buf, inner, written, &[name.len() as u8])?;
        put_into(buf, inner, written, name)
    }

    fn command(&mut self, command: u16, data: &[u8]) -> Result<(), StreamError> {
        self.put(&[kind::COMMAND])?;
        self.put(&command.to_be_bytes())?;
        // Command payloads here are a few bytes.
        self.put(&(data.len() as u16).to_be_bytes())?;
        self.put(data)
    }

    fn section_start(
        &mut self,
        kind: u8,
        id: u32,
        idstr: &str,
        instance: u32,
        version: u32,
    ) -> Result<(), StreamError> {
        self.put(&[kind])?;
        self.put(&id.to_be_bytes())?;
        // idstrs here are "ram" and the cpu section names.
        self.put(&[idstr.len() as u8])?;
        self.put(idstr.as_bytes())?;
        self.put(&instance.to_be_bytes())?;
        self.put(&version.to_be_bytes())
    }

    fn footer(&mut self, id: u32) -> Result<(), StreamError> {
        self.put(&[kind::SECTION_FOOTER])?;
        self.put(&id.to_be_bytes())
    }

    fn flush_all(&mut self) -> Result<(), StreamError> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf)?;
            self.buf.clear();
        }
        self.inner.flush()?;
        Ok(())
    }
}

/// Appends `bytes` to the stream: into `buf` while it fits in [`BUFFER_BYTES`], else after
/// writing out what `buf` holds (and straight through for a piece as large as the buffer).
fn put_into<W: Write>(buf: &mut Vec<u8>, inner: &mut W, written: &mut u64, bytes: &[u8]) -> Result<(), StreamError> {
    if buf.len() + bytes.len() > BUFFER_BYTES {
        inner.write_all(buf)?;
        buf.clear();
    }
    if bytes.len() >= BUFFER_BYTES {
        inner.write_all(bytes)?;
    } else {
        buf.extend_from_slice(bytes);
    }
    *written += bytes.len() as u64;
    Ok(())
}

/// The byte a page consists of, if it is one byte repeated.
fn uniform_byte(page: &[u8]) -> Option<u8> {
    let first = *page.first()?;
    // Whole cache lines per comparison (vectorised by the compiler), stopping at the first
    // that differs: data pages differ early, fill pages are scanned at memory speed.
    let pattern = [first; 64];
    let lines = page.chunks_exact(64);
    let uniform = lines.remainder().iter().all(|b| *b == first) && lines.into_iter().all(|line| line == pattern);
    uniform.then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pc_ram(mib: u64) -> Vec<RamBlock> {
        vec![RamBlock {
            name: "pc.ram".into(),
            length: mib << 20,
        }]
    }

    #[test]
    fn test_header_and_ram_setup_bytes() {
        let mut w = StreamWriter::new(Vec::new());
        w.header(PC_I440FX_7_2).unwrap();
        w.open_return_path().unwrap();
        w.ram_setup(&pc_ram(64)).unwrap();
        let mut want = b"QEVM\0\0\0\x03\x07\0\0\0\x0dpc-i440fx-7.2".to_vec();
        want.extend_from_slice(&[8, 0, 1, 0, 0]);
        want.extend_from_slice(&[1, 0, 0, 0, 1, 3]);
        want.extend_from_slice(b"ram\0\0\0\0\0\0\0\x04");
        want.extend_from_slice(&((64u64 << 20) | 4).to_be_bytes());
        want.extend_from_slice(b"\x06pc.ram");
        want.extend_from_slice(&(64u64 << 20).to_be_bytes());
        want.extend_from_slice(&0x10u64.to_be_bytes());
        want.extend_from_slice(&[0x7e, 0, 0, 0, 1]);
        assert_eq!(w.get_mut(), &want);
        assert_eq!(w.bytes_written(), want.len() as u64);
    }

    #[test]
    fn test_pages_use_fill_and_continue() {
        let mut w = StreamWriter::new(Vec::new());
        w.header(PC_I440FX_7_2).unwrap();
        w.ram_setup(&pc_ram(1)).unwrap();
        let start = w.get_mut().len();
        w.begin_round().unwrap();
        let mut page = vec![0xabu8; PAGE_SIZE];
        w.page(0, 0x1000, &page).unwrap();
        page[17] = 1;
        w.page(0, 0x2000, &page).unwrap();
        w.end_pages().unwrap();
        let out = &w.get_mut()[start..];
        let mut want = vec![2, 0, 0, 0, 1];
        want.extend_from_slice(&(0x1000u64 | 0x02).to_be_bytes());
        want.extend_from_slice(b"\x06pc.ram\xab");
        want.extend_from_slice(&(0x2000u64 | 0x08 | 0x20).to_be_bytes());
        want.extend_from_slice(&page);
        want.extend_from_slice(&0x10u64.to_be_bytes());
        want.extend_from_slice(&[0x7e, 0, 0, 0, 1]);
        assert_eq!(out, &want[..]);
    }

    #[test]
    fn test_bad_pages_are_refused() {
        let mut w = StreamWriter::new(Vec::new());
        w.header(PC_I440FX_7_2).unwrap();
        w.ram_setup(&pc_ram(1)).unwrap();
        assert!(matches!(
            w.page(0, 0, &[0; PAGE_SIZE]),
            Err(StreamError::OutOfOrder { call: "page", .. })
        ));
        w.begin_last_pages().unwrap();
        assert!(matches!(
            w.page(0, 0, &[0; 100]),
            Err(StreamError::PageLength { len: 100 })
        ));
        assert!(matches!(
            w.page(1, 0, &[0; PAGE_SIZE]),
            Err(StreamError::NoSuchBlock { index: 1, count: 1 })
        ));
        assert!(matches!(
            w.page(0, 0x10, &[0; PAGE_SIZE]),
            Err(StreamError::PageOffset { offset: 0x10, .. })
        ));
        assert!(matches!(
            w.page(0, 1 << 20, &[0; PAGE_SIZE]),
            Err(StreamError::PageOffset { .. })
        ));
        w.page(0, (1 << 20) - PAGE_SIZE as u64, &[0; PAGE_SIZE]).unwrap();
        w.end_pages().unwrap();
        assert!(matches!(w.begin_round(), Err(StreamError::OutOfOrder { .. })));
    }

    #[test]
    fn test_finish_writes_eof_and_description() {
        let mut w = StreamWriter::new(Vec::new());
        w.header(PC_I440FX_7_2).unwrap();
        let start = w.get_mut().len();
        w.finish().unwrap();
        let out = &w.get_mut()[start..];
        assert_eq!(&out[..2], &[0, 6]);
        let len = u32::from_be_bytes(out[2..6].try_into().unwrap()) as usize;
        let desc: Value = serde_json::from_slice(&out[6..]).unwrap();
        assert_eq!(out.len(), 6 + len);
        assert_eq!(desc["page_size"], 4096);
        assert!(matches!(w.finish(), Err(StreamError::OutOfOrder { .. })));
    }

    #[test]
    fn test_uniform_byte() {
        assert_eq!(uniform_byte(&[7; PAGE_SIZE]), Some(7));
        let mut p = [7u8; PAGE_SIZE];
        p[PAGE_SIZE - 1] = 0;
        assert_eq!(uniform_byte(&p), None);
    }

    #[test]
    fn test_large_rounds_stay_within_the_buffer() {
        let mut w = StreamWriter::new(Vec::new());
        w.header(PC_I440FX_7_2).unwrap();
        w.ram_setup(&pc_ram(4)).unwrap();
        w.begin_round().unwrap();
        let mut page = [0u8; PAGE_SIZE];
        for (i, offset) in (0..4u64 << 20).step_by(PAGE_SIZE).enumerate() {
            page[0] = i as u8;
            page[1] = 1;
            w.page(0, offset, &page).unwrap();
            assert!(w.buf.len() <= BUFFER_BYTES);
        }
        w.end_pages().unwrap();
        assert_eq!(w.bytes_written(), w.get_mut().len() as u64);
    }
}

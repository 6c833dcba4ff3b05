//! The device (FULL) sections of a stream, parsed with the JSON description into named field
//! trees; which RAM blocks and which devices a pc-i440fx stream may carry.
//!
//! A section's bytes follow its description field by field (migration/vmstate.c
//! `vmstate_save_state_v`): each element of a leaf is `size` bytes, big-endian for QEMU's
//! integer types; a struct element is its own fields then its own subsections; a tmp's fields
//! are inline; after the fields come the subsections that were sent, each as
//! `0x05, u8 len, name, be32 version` and its state; the section ends with the footer
//! `0x7e, be32 section id`. The parse checks each struct element against the size the
//! description gives it, so a description that does not belong to the bytes is caught.

use super::vmdesc::{FieldDesc, FieldKind, VmDesc, VmsdDesc, MAX_DEPTH};
use super::{kind, StreamError};

/// Every FULL section of the stream, in stream order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSections {
    /// The sections.
    pub sections: Vec<DeviceSection>,
}

/// One FULL section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSection {
    /// Its idstr (`cpu`, `apic`, `0000:00:01.1/ide`, ...).
    pub idstr: String,
    /// Its instance id (the vCPU index for `cpu`).
    pub instance_id: u32,
    /// The version its state was written in.
    pub version_id: u32,
    /// Its state.
    pub fields: Fields,
}

impl DeviceSections {
    /// The section `idstr` with `instance_id`.
    pub fn find(&self, idstr: &str, instance_id: u32) -> Option<&DeviceSection> {
        self.sections
            .iter()
            .find(|s| s.idstr == idstr && s.instance_id == instance_id)
    }
}

/// The fields of one state description (a section, a struct, a tmp or a subsection) by name,
/// with the subsections that were sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fields {
    name: String,
    version: u32,
    entries: Vec<(String, Value)>,
    subsections: Vec<Fields>,
}

/// One field's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// The bytes of one leaf element, as the stream has them.
    Leaf {
        /// QEMU's type name (`uint32`, `int32 le`, `buffer`, ...).
        ty: String,
        /// The bytes.
        bytes: Vec<u8>,
        /// Their stream offset.
        at: u64,
    },
    /// A struct (or tmp) element.
    Struct(Fields),
    /// The elements of an array field (`array_len` or `index` entries).
    Array(Vec<Value>),
}

impl Value {
    /// The value of an integer or bool leaf, zero-extended; `None` for other values.
    pub fn as_u64(&self) -> Option<u64> {
        let Value::Leaf { ty, bytes, .. } = self else {
            return None;
        };
        let base = ty.strip_suffix(" equal").unwrap_or(ty);
        let little = base.ends_with(" le");
        let base = base.strip_suffix(" le").unwrap_or(base);
        let numeric = base.starts_with("uint") || base.starts_with("int") || base == "bool" || base == "timer";
        if !numeric || !matches!(bytes.len(), 1 | 2 | 4 | 8) {
            return None;
        }
        let fold = |acc: u64, b: &u8| (acc << 8) | u64::from(*b);
        Some(if little {
            bytes.iter().rev().fold(0, fold)
        } else {
            bytes.iter().fold(0, fold)
        })
    }

    /// The value of an integer leaf, sign-extended from its size.
    pub fn as_i64(&self) -> Option<i64> {
        let v = self.as_u64()?;
        let Value::Leaf { bytes, .. } = self else {
            return None;
        };
        let shift = 64 - 8 * bytes.len() as u32;
        Some(((v << shift) as i64) >> shift)
    }

    /// The elements of an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }

    /// The fields of a struct element.
    pub fn as_struct(&self) -> Option<&Fields> {
        match self {
            Value::Struct(f) => Some(f),
            _ => None,
        }
    }

    /// The stream offset of a leaf (of the first leaf inside, for others).
    pub fn offset(&self) -> u64 {
        match self {
            Value::Leaf { at, .. } => *at,
            Value::Struct(f) => f.entries.first().map_or(0, |(_, v)| v.offset()),
            Value::Array(v) => v.first().map_or(0, Value::offset),
        }
    }
}

impl Fields {
    /// The description's name (`cpu`, `segment`, `cpu/tsc_khz`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The description's version as written.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The fields, in stream order.
    pub fn entries(&self) -> &[(String, Value)] {
        &self.entries
    }

    /// The subsections that were sent, in stream order.
    pub fn subsections(&self) -> &[Fields] {
        &self.subsections
    }

    /// The subsection `name` (`cpu/tsc_khz`), if it was sent.
    pub fn subsection(&self, name: &str) -> Option<&Fields> {
        self.subsections.iter().find(|s| s.name == name)
    }

    /// The field `name` (QEMU's field name: `env.regs`, `env.cr[0]`).
    pub fn get(&self, name: &str) -> Result<&Value, StreamError> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| StreamError::MissingSection {
                name: format!("field {name:?} of {:?}", self.name),
            })
    }

    /// An integer field, zero-extended.
    pub fn u64(&self, name: &str) -> Result<u64, StreamError> {
        let v = self.get(name)?;
        v.as_u64().ok_or_else(|| self.not(name, v, "an integer"))
    }

    /// An integer field, sign-extended.
    pub fn i64(&self, name: &str) -> Result<i64, StreamError> {
        let v = self.get(name)?;
        v.as_i64().ok_or_else(|| self.not(name, v, "an integer"))
    }

    /// An integer field that must fit `T` (e.g. u16 for a uint16 field).
    pub fn uint<T: TryFrom<u64>>(&self, name: &str) -> Result<T, StreamError> {
        let v = self.get(name)?;
        v.as_u64()
            .and_then(|x| T::try_from(x).ok())
            .ok_or_else(|| self.not(name, v, "an integer of its width"))
    }

    /// An array of integers (`array_len` or `index` entries).
    pub fn u64_array(&self, name: &str) -> Result<Vec<u64>, StreamError> {
        let v = self.get(name)?;
        let elems = v.as_array().ok_or_else(|| self.not(name, v, "an array"))?;
        elems
            .iter()
            .map(|e| e.as_u64().ok_or_else(|| self.not(name, e, "an integer array")))
            .collect()
    }

    /// An array of structs.
    pub fn struct_array(&self, name: &str) -> Result<Vec<&Fields>, StreamError> {
        let v = self.get(name)?;
        let elems = v.as_array().ok_or_else(|| self.not(name, v, "an array"))?;
        elems
            .iter()
            .map(|e| e.as_struct().ok_or_else(|| self.not(name, e, "a struct array")))
            .collect()
    }

    /// A struct field.
    pub fn structure(&self, name: &str) -> Result<&Fields, StreamError> {
        let v = self.get(name)?;
        v.as_struct().ok_or_else(|| self.not(name, v, "a struct"))
    }

    fn not(&self, name: &str, v: &Value, wanted: &str) -> StreamError {
        StreamError::Malformed {
            at: v.offset(),
            what: format!("field {name:?} of {:?} is not {wanted}", self.name),
        }
    }
}

/// The bytes of the FULL sections (everything between the ram END section and QEMU_VM_EOF)
/// parsed with `desc`; `base` is the stream offset of `bytes[0]`. Every byte must be consumed
/// and every described device found, in order.
pub fn parse_full_sections(bytes: &[u8], base: u64, desc: &VmDesc) -> Result<DeviceSections, StreamError> {
    let mut c = Cursor { bytes, pos: 0, base };
    let mut sections = Vec::with_capacity(desc.devices.len());
    for dev in &desc.devices {
        let at = c.at();
        let ty = c.u8("section type")?;
        if ty != kind::SECTION_FULL {
            return Err(c.bad_at(
                at,
                format!("section type {ty:#x} where FULL {:?} is described", dev.name),
            ));
        }
        let section_id = c.be32("section id")?;
        let len = usize::from(c.u8("idstr length")?);
        let idstr = c.string(len, "idstr")?;
        let instance_id = c.be32("instance id")?;
        let version_id = c.be32("version id")?;
        if idstr != dev.name || instance_id != dev.instance_id || version_id != dev.vmsd.version {
            return Err(c.bad_at(
                at,
                format!(
                    "section {idstr:?} instance {instance_id} version {version_id} where the vmdesc has {:?} {} {}",
                    dev.name, dev.instance_id, dev.vmsd.version
                ),
            ));
        }
        let fields = parse_vmsd(&mut c, &dev.vmsd, 0)?;
        footer(&mut c, section_id)?;
        sections.push(DeviceSection {
            idstr,
            instance_id,
            version_id,
            fields,
        });
    }
    if c.pos != bytes.len() {
        return Err(c.bad(format!(
            "{} bytes after the last described section",
            bytes.len() - c.pos
        )));
    }
    Ok(DeviceSections { sections })
}

/// Checks the footer `0x7e, be32 section_id` at the cursor.
fn footer(c: &mut Cursor<'_>, section_id: u32) -> Result<(), StreamError> {
    let at = c.at();
    let marker = c.u8("section footer")?;
    let id = c.be32("section footer id")?;
    if marker != kind::SECTION_FOOTER || id != section_id {
        return Err(c.bad_at(
            at,
            format!("footer {marker:#x} {id} where 0x7e {section_id} closes the section"),
        ));
    }
    Ok(())
}

fn parse_vmsd(c: &mut Cursor<'_>, d: &VmsdDesc, depth: usize) -> Result<Fields, StreamError> {
    if depth > MAX_DEPTH {
        return Err(c.bad(format!("{:?} nested deeper than {MAX_DEPTH}", d.name)));
    }
    let mut entries: Vec<(String, Value)> = Vec::with_capacity(d.fields.len());
    for f in &d.fields {
        match (f.array_len, f.index) {
            (Some(n), _) => {
                let mut elems = Vec::new();
                for _ in 0..n {
                    elems.push(element(c, f, depth)?);
                }
                entries.push((f.name.clone(), Value::Array(elems)));
            }
            (None, Some(i)) => {
                let e = element(c, f, depth)?;
                let existing = entries.iter_mut().rev().find(|(n, _)| *n == f.name);
                match existing {
                    Some((_, Value::Array(elems))) if elems.len() as u64 == i => elems.push(e),
                    None if i == 0 => entries.push((f.name.clone(), Value::Array(vec![e]))),
                    _ => return Err(c.bad(format!("field {:?} index {i} out of order", f.name))),
                }
            }
            (None, None) => {
                let e = element(c, f, depth)?;
                entries.push((f.name.clone(), e));
            }
        }
    }
    let mut subsections = Vec::with_capacity(d.subsections.len());
    for sub in &d.subsections {
        let at = c.at();
        let marker = c.u8("subsection marker")?;
        let len = usize::from(c.u8("subsection name length")?);
        let name = c.string(len, "subsection name")?;
        let version = c.be32("subsection version")?;
        if marker != kind::SUBSECTION || name != sub.name || version != sub.version {
            return Err(c.bad_at(
                at,
                format!(
                    "subsection {marker:#x} {name:?} v{version} where the vmdesc has {:?} v{}",
                    sub.name, sub.version
                ),
            ));
        }
        subsections.push(parse_vmsd(c, sub, depth + 1)?);
    }
    Ok(Fields {
        name: d.name.clone(),
        version: d.version,
        entries,
        subsections,
    })
}

fn element(c: &mut Cursor<'_>, f: &FieldDesc, depth: usize) -> Result<Value, StreamError> {
    let start = c.pos;
    let v = match &f.kind {
        FieldKind::Leaf(ty) => {
            let at = c.at();
            let size = usize::try_from(f.size).map_err(|_| c.bad(format!("field {:?} size {}", f.name, f.size)))?;
            let bytes = c.take(size, &f.name)?.to_vec();
            Value::Leaf {
                ty: ty.clone(),
                bytes,
                at,
            }
        }
        FieldKind::Struct(d) | FieldKind::Tmp(d) => Value::Struct(parse_vmsd(c, d, depth + 1)?),
    };
    let used = (c.pos - start) as u64;
    if used != f.size {
        return Err(c.bad_at(
            c.base + start as u64,
            format!("field {:?} took {used} bytes where the vmdesc says {}", f.name, f.size),
        ));
    }
    Ok(v)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    base: u64,
}

impl<'a> Cursor<'a> {
    fn at(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn bad(&self, what: String) -> StreamError {
        self.bad_at(self.at(), what)
    }

    fn bad_at(&self, at: u64, what: String) -> StreamError {
        StreamError::Malformed { at, what }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StreamError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(self.bad(format!("{what}: {n} bytes past the device sections' end")));
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8, StreamError> {
        Ok(self.take(1, what)?[0])
    }

    fn be32(&mut self, what: &str) -> Result<u32, StreamError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self, len: usize, what: &str) -> Result<String, StreamError> {
        let at = self.at();
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.bad_at(at, format!("{what} is not UTF-8")))
    }
}

/// What a RAM block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    /// The guest's RAM (`pc.ram`).
    GuestRam,
    /// Firmware and its tables (`pc.bios`, `pc.rom`, `/rom@etc/...`, option ROMs); the
    /// destination rebuilds its own.
    Firmware,
}

/// The kind of the RAM block `name`; others are refused.
pub fn classify_block(name: &str) -> Result<BlockKind, StreamError> {
    if name == "pc.ram" {
        Ok(BlockKind::GuestRam)
    } else if name == "pc.bios" || name == "pc.rom" || name.starts_with("/rom@etc/") || name.ends_with(".rom") {
        Ok(BlockKind::Firmware)
    } else {
        Err(StreamError::UnsupportedRamBlock { name: name.to_string() })
    }
}

/// The sections the vCPU state comes from.
pub const CPU_SECTIONS: [&str; 3] = ["cpu_common", "cpu", "apic"];

/// The pc-i440fx platform devices (QEMU 7.2, `-nodefaults`, TCG and KVM) whose state is known
/// and deliberately not carried: the destination keeps its own at reset state, since the
/// guest uses no device but ports with interrupts off.
pub const PLATFORM_SECTIONS: [&str; 26] = [
    "timer",
    "kvm-tpr-opt",
    "kvmclock",
    "fw_cfg",
    "PCIHost",
    "PCIBUS",
    "0000:00:00.0/I440FX",
    "dma",
    "0000:00:01.0/PIIX3",
    "i8259",
    "ioapic",
    "hpet",
    "mc146818rtc",
    "i8254",
    "pcspk",
    "fdc",
    "ps2kbd",
    "ps2mouse",
    "pckbd",
    "vmmouse",
    "port92",
    "0000:00:01.1/ide",
    "i2c_bus",
    "0000:00:01.3/piix4_pm",
    "acpi_build",
    "globalstate",
];

/// Refuses the first section that is neither a vCPU section nor a known platform device.
pub fn check_known_sections(d: &DeviceSections) -> Result<(), StreamError> {
    match d
        .sections
        .iter()
        .find(|s| !CPU_SECTIONS.contains(&s.idstr.as_str()) && !PLATFORM_SECTIONS.contains(&s.idstr.as_str()))
    {
        Some(s) => Err(StreamError::UnsupportedSection { name: s.idstr.clone() }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::vmdesc;
    use super::*;

    const DESC: &[u8] = br#"{"page_size":4096,"devices":[{"name":"dev","instance_id":1,"vmsd_name":"dev","version":2,
      "fields":[{"name":"a","type":"uint16","size":2},{"name":"arr","array_len":2,"type":"int32","size":4},
        {"name":"s","type":"struct","size":3,"struct":{"vmsd_name":"inner","version":1,
          "fields":[{"name":"x","type":"uint8","size":1}],
          "subsections":[{"vmsd_name":"inner/y","version":1,"fields":[]}]}},
        {"name":"i","index":0,"type":"uint8","size":1},{"name":"i","index":1,"type":"uint8","size":1},
        {"name":"le","type":"int32 le","size":4}],
      "subsections":[{"vmsd_name":"dev/sub","version":3,"fields":[{"name":"z","type":"uint64","size":8}]}]}]}"#;

    fn bytes() -> Vec<u8> {
        let mut b = vec![
            kind::SECTION_FULL,
            0,
            0,
            0,
            9,
            3,
            b'd',
            b'e',
            b'v',
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            2,
        ];
        b.extend([0x12, 0x34]);
        b.extend([0xff, 0xff, 0xff, 0xfe, 0, 0, 0, 5]);
        // The struct: x, then its empty subsection (1 + 1 + 7 + 4 bytes).
        b.extend([7]);
        b.extend([kind::SUBSECTION, 7]);
        b.extend(b"inner/y");
        b.extend([0, 0, 0, 1]);
        b.extend([1, 2]);
        b.extend([0x78, 0x56, 0x34, 0x12]);
        b.extend([kind::SUBSECTION, 7]);
        b.extend(b"dev/sub");
        b.extend([0, 0, 0, 3]);
        b.extend(42u64.to_be_bytes());
        b.extend([kind::SECTION_FOOTER, 0, 0, 0, 9]);
        b
    }

    #[test]
    fn test_full_section_parses_into_a_named_tree_and_checks_struct_sizes() {
        let desc = vmdesc::parse(DESC, 0).unwrap();
        // The description says the struct took 3 bytes; it took 14: refused.
        let err = parse_full_sections(&bytes(), 100, &desc).unwrap_err();
        assert!(err.to_string().contains("\"s\" took 14"), "{err}");
        let fixed = String::from_utf8(DESC.to_vec())
            .unwrap()
            .replace("\"size\":3", "\"size\":14");
        let desc = vmdesc::parse(fixed.as_bytes(), 0).unwrap();
        let d = parse_full_sections(&bytes(), 100, &desc).unwrap();
        let s = &d.sections[0];
        assert_eq!((s.idstr.as_str(), s.instance_id, s.version_id), ("dev", 1, 2));
        assert_eq!(s.fields.u64("a").unwrap(), 0x1234);
        let arr = s.fields.get("arr").unwrap().as_array().unwrap();
        assert_eq!(arr[0].as_i64(), Some(-2));
        assert_eq!(s.fields.u64_array("i").unwrap(), vec![1, 2]);
        assert_eq!(s.fields.u64("le").unwrap(), 0x1234_5678);
        assert_eq!(s.fields.structure("s").unwrap().u64("x").unwrap(), 7);
        assert!(s.fields.structure("s").unwrap().subsection("inner/y").is_some());
        assert_eq!(s.fields.subsection("dev/sub").unwrap().u64("z").unwrap(), 42);
        assert!(matches!(s.fields.u64("nope"), Err(StreamError::MissingSection { .. })));
        // A missing byte, an extra byte and a wrong footer are refused.
        let b = bytes();
        assert!(parse_full_sections(&b[..b.len() - 1], 0, &desc).is_err());
        let mut extra = b.clone();
        extra.push(0);
        assert!(parse_full_sections(&extra, 0, &desc).is_err());
        let mut foot = b.clone();
        let n = foot.len();
        foot[n - 1] = 8;
        assert!(parse_full_sections(&foot, 0, &desc).is_err());
    }

    #[test]
    fn test_blocks_and_sections_are_classified_or_refused_by_name() {
        assert_eq!(classify_block("pc.ram").unwrap(), BlockKind::GuestRam);
        for fw in ["pc.bios", "pc.rom", "/rom@etc/acpi/tables", "kvmvapic.rom"] {
            assert_eq!(classify_block(fw).unwrap(), BlockKind::Firmware);
        }
        assert!(
            matches!(classify_block("vga.vram"), Err(StreamError::UnsupportedRamBlock { name }) if name == "vga.vram")
        );
        let mk = |idstr: &str| DeviceSection {
            idstr: idstr.into(),
            instance_id: 0,
            version_id: 1,
            fields: Fields {
                name: idstr.into(),
                version: 1,
                entries: vec![],
                subsections: vec![],
            },
        };
        let ok = DeviceSections {
            sections: vec![mk("cpu"), mk("timer")],
        };
        check_known_sections(&ok).unwrap();
        let bad = DeviceSections {
            sections: vec![mk("cpu"), mk("pvpanic")],
        };
        assert!(
            matches!(check_known_sections(&bad), Err(StreamError::UnsupportedSection { name }) if name == "pvpanic")
        );
    }
}

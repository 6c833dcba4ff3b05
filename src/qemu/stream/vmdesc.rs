//! The JSON device description QEMU appends after QEMU_VM_EOF (`QEMU_VM_VMDESCRIPTION`), typed
//! and bounded. QEMU writes it while it writes the FULL sections (migration/vmstate.c,
//! `vmsd_desc_field_start`/`_end`), so it describes exactly what the stream holds:
//!
//! ```text
//! { "page_size": 4096, "devices": [ { "name": idstr, "instance_id": n, "vmsd_name": .., "version": v,
//!     "fields": [ { "name", "type", "size", ["array_len" | "index"], ["struct": {vmsd}] | tmp fields } ],
//!     "subsections": [ {vmsd} ] } ] }
//! ```
//!
//! A field's `size` is the bytes one element took; `array_len` says the elements that follow
//! are alike (a "compressed" array); `index` marks one element of an array QEMU could not
//! compress, each with its own entry. Fields a `field_exists` test left out and subsections
//! that were not needed are absent from both the stream and the description.

use serde_json::Value as Json;

use super::StreamError;

/// The deepest nesting of structs, tmps and subsections accepted (QEMU's deepest is about 5).
pub const MAX_DEPTH: usize = 16;
/// The most elements of one array field.
pub const MAX_ARRAY_LEN: u64 = 1 << 20;
/// The most bytes one field element may take.
pub const MAX_FIELD_SIZE: u64 = 16 << 20;

/// The whole description.
#[derive(Clone, Debug, PartialEq)]
pub struct VmDesc {
    /// `page_size`.
    pub page_size: u64,
    /// One entry per FULL section, in stream order.
    pub devices: Vec<DeviceDesc>,
}

/// One FULL section.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceDesc {
    /// The section's idstr.
    pub name: String,
    /// Its instance id.
    pub instance_id: u32,
    /// Its state description.
    pub vmsd: VmsdDesc,
}

/// One `VMStateDescription` as it was written: a section, a struct, a tmp or a subsection.
#[derive(Clone, Debug, PartialEq)]
pub struct VmsdDesc {
    /// `vmsd_name`.
    pub name: String,
    /// `version`.
    pub version: u32,
    /// The fields, in stream order.
    pub fields: Vec<FieldDesc>,
    /// The subsections that were sent, in stream order.
    pub subsections: Vec<VmsdDesc>,
}

/// One field entry.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldDesc {
    /// `name` (QEMU's, e.g. `env.regs`, `env.cr[0]`).
    pub name: String,
    /// `array_len`: so many alike elements follow.
    pub array_len: Option<u64>,
    /// `index`: this entry is element `index` of an uncompressed array.
    pub index: Option<u64>,
    /// `size`: bytes of one element.
    pub size: u64,
    /// What an element is.
    pub kind: FieldKind,
}

/// What one field element is.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldKind {
    /// `size` bytes of the named type (`uint32`, `int64`, `bool`, `buffer`, `pci config`, ...).
    Leaf(String),
    /// A nested `VMStateDescription` (`"type": "struct"`).
    Struct(VmsdDesc),
    /// `VMSTATE_WITH_TMP`: a description of a temporary whose fields are inline.
    Tmp(VmsdDesc),
}

/// Parses the JSON bytes. Errors are [`StreamError::Malformed`] at `at` (the JSON's stream
/// offset), naming the entry.
pub fn parse(bytes: &[u8], at: u64) -> Result<VmDesc, StreamError> {
    let json: Json = serde_json::from_slice(bytes).map_err(|e| StreamError::Malformed {
        at,
        what: format!("vmdesc JSON: {e}"),
    })?;
    let bad = |what: String| StreamError::Malformed { at, what };
    let page_size = json
        .get("page_size")
        .and_then(Json::as_u64)
        .ok_or_else(|| bad("vmdesc without page_size".into()))?;
    let devices = json
        .get("devices")
        .and_then(Json::as_array)
        .ok_or_else(|| bad("vmdesc without devices".into()))?;
    let devices = devices
        .iter()
        .map(|d| {
            let name = str_of(d, "name").ok_or_else(|| bad(format!("vmdesc device without name: {}", short(d))))?;
            let instance_id =
                u32_of(d, "instance_id").ok_or_else(|| bad(format!("vmdesc device {name:?} without instance_id")))?;
            let vmsd = vmsd(d, 0).map_err(|what| bad(format!("vmdesc device {name:?}: {what}")))?;
            Ok(DeviceDesc {
                name,
                instance_id,
                vmsd,
            })
        })
        .collect::<Result<Vec<_>, StreamError>>()?;
    Ok(VmDesc { page_size, devices })
}

fn vmsd(j: &Json, depth: usize) -> Result<VmsdDesc, String> {
    if depth > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH}"));
    }
    let name = str_of(j, "vmsd_name").unwrap_or_default();
    let version = u32_of(j, "version").ok_or_else(|| format!("{name:?} without a version"))?;
    let fields = match j.get("fields") {
        None => Vec::new(),
        Some(f) => f
            .as_array()
            .ok_or_else(|| format!("{name:?}: fields is not a list"))?
            .iter()
            .map(|f| field(f, depth))
            .collect::<Result<Vec<_>, String>>()?,
    };
    let subsections = match j.get("subsections") {
        None => Vec::new(),
        Some(s) => s
            .as_array()
            .ok_or_else(|| format!("{name:?}: subsections is not a list"))?
            .iter()
            .map(|s| vmsd(s, depth + 1))
            .collect::<Result<Vec<_>, String>>()?,
    };
    Ok(VmsdDesc {
        name,
        version,
        fields,
        subsections,
    })
}

fn field(j: &Json, depth: usize) -> Result<FieldDesc, String> {
    let name = str_of(j, "name").ok_or_else(|| format!("field without a name: {}", short(j)))?;
    let ty = str_of(j, "type").ok_or_else(|| format!("field {name:?} without a type"))?;
    let size = j
        .get("size")
        .and_then(Json::as_u64)
        .ok_or_else(|| format!("field {name:?} without a size"))?;
    if size > MAX_FIELD_SIZE {
        return Err(format!("field {name:?} size {size} over {MAX_FIELD_SIZE}"));
    }
    let array_len = j
        .get("array_len")
        .map(|v| v.as_u64().ok_or_else(|| format!("field {name:?}: array_len {v}")));
    let array_len = array_len.transpose()?;
    if let Some(n) = array_len {
        if n > MAX_ARRAY_LEN {
            return Err(format!("field {name:?} array_len {n} over {MAX_ARRAY_LEN}"));
        }
    }
    let index = j
        .get("index")
        .map(|v| v.as_u64().ok_or_else(|| format!("field {name:?}: index {v}")));
    let index = index.transpose()?;
    if let Some(i) = index {
        if i >= MAX_ARRAY_LEN {
            return Err(format!("field {name:?} index {i} over {MAX_ARRAY_LEN}"));
        }
    }
    let kind = match ty.as_str() {
        "struct" => {
            let s = j
                .get("struct")
                .ok_or_else(|| format!("struct field {name:?} without its struct"))?;
            FieldKind::Struct(vmsd(s, depth + 1).map_err(|e| format!("{name:?}: {e}"))?)
        }
        "tmp" => FieldKind::Tmp(vmsd(j, depth + 1).map_err(|e| format!("{name:?}: {e}"))?),
        _ => FieldKind::Leaf(ty),
    };
    Ok(FieldDesc {
        name,
        array_len,
        index,
        size,
        kind,
    })
}

fn str_of(j: &Json, key: &str) -> Option<String> {
    j.get(key).and_then(Json::as_str).map(str::to_string)
}

fn u32_of(j: &Json, key: &str) -> Option<u32> {
    j.get(key).and_then(Json::as_u64).and_then(|v| u32::try_from(v).ok())
}

/// The start of a JSON value, for an error message.
fn short(j: &Json) -> String {
    let s = j.to_string();
    s.chars().take(120).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_vmdesc_parses_fields_arrays_structs_tmp_and_subsections() {
        let json = br#"{"page_size":4096,"devices":[{"name":"cpu","instance_id":0,"vmsd_name":"cpu","version":12,
          "fields":[{"name":"env.regs","array_len":16,"type":"uint64","size":8},
            {"name":"env.fpregs","array_len":8,"type":"struct","size":10,"struct":{"vmsd_name":"fpreg","version":0,
              "fields":[{"name":"tmp","type":"tmp","vmsd_name":"fpreg_tmp","version":0,"size":10,
                "fields":[{"name":"tmp_mant","type":"uint64","size":8},{"name":"tmp_exp","type":"uint16","size":2}]}]}},
            {"name":"st","index":0,"type":"uint32","size":4}],
          "subsections":[{"vmsd_name":"cpu/tsc_khz","version":1,"fields":[{"name":"env.tsc_khz","type":"int64","size":8}]}]}]}"#;
        let d = parse(json, 0).unwrap();
        assert_eq!(d.page_size, 4096);
        let cpu = &d.devices[0];
        assert_eq!((cpu.name.as_str(), cpu.instance_id, cpu.vmsd.version), ("cpu", 0, 12));
        assert_eq!(cpu.vmsd.fields[0].array_len, Some(16));
        let FieldKind::Struct(fpreg) = &cpu.vmsd.fields[1].kind else {
            panic!("not a struct")
        };
        assert!(matches!(&fpreg.fields[0].kind, FieldKind::Tmp(t) if t.fields.len() == 2));
        assert_eq!(cpu.vmsd.fields[2].index, Some(0));
        assert_eq!(cpu.vmsd.subsections[0].name, "cpu/tsc_khz");
    }

    #[test]
    fn test_vmdesc_refuses_missing_sizes_huge_arrays_and_deep_nesting() {
        let no_size = br#"{"page_size":4096,"devices":[{"name":"x","instance_id":0,"version":1,"fields":[{"name":"a","type":"uint8"}]}]}"#;
        assert!(matches!(parse(no_size, 7), Err(StreamError::Malformed { at: 7, .. })));
        let huge = br#"{"page_size":4096,"devices":[{"name":"x","instance_id":0,"version":1,"fields":[{"name":"a","type":"uint8","size":1,"array_len":99999999999}]}]}"#;
        assert!(parse(huge, 0).is_err());
        let mut deep =
            String::from(r#"{"page_size":4096,"devices":[{"name":"x","instance_id":0,"version":1,"subsections":["#);
        for _ in 0..40 {
            deep.push_str(r#"{"vmsd_name":"s","version":1,"subsections":["#);
        }
        deep.push_str(&"]}".repeat(40));
        deep.push_str("]}]}");
        let err = parse(deep.as_bytes(), 0).unwrap_err();
        assert!(err.to_string().contains("deeper"), "{err}");
        assert!(parse(b"{", 0).is_err());
    }
}

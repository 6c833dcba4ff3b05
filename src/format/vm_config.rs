//! What a VM is, independent of where it runs: identity, size, vCPU count and NICs.
//!
//! A [`VmConfig`] is agreed on during reservation, before any state moves, so that the target
//! can refuse a VM it cannot hold. [`VmConfig::validate`] holds the limits every side enforces.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::FormatError;

/// The only guest page size the engine supports.
pub const PAGE_SIZE: u32 = 4096;

/// Largest guest RAM accepted: 1 TiB.
pub const MAX_VM_MEMORY_BYTES: u64 = 1 << 40;

/// Most vCPUs a VM may have; vCPU ids are `0..MAX_VCPUS`.
pub const MAX_VCPUS: u32 = 256;

/// Most NICs a VM may have.
pub const MAX_NICS: usize = 16;

/// Stable identifier of a VM, unique within a deployment and kept across migrations.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmId(pub String);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An Ethernet MAC address, displayed as `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Bit 1 of the first octet: the address is locally administered, so it cannot clash with
    /// a vendor-assigned one.
    const LOCAL_BIT: u8 = 0x02;
    /// Bit 0 of the first octet: the address is a group (multicast) address.
    const GROUP_BIT: u8 = 0x01;

    /// A deterministic locally administered unicast address derived from `seed`.
    ///
    /// The low 46 bits of the seed are placed in the address as they are (the two flag bits of
    /// the first octet take the other two places), so distinct seeds below 2^46 give distinct
    /// addresses and the address can be read back by eye in tests: seed 1 gives
    /// `02:00:00:00:00:01`.
    pub fn local_from_seed(seed: u64) -> MacAddr {
        let b = seed.to_be_bytes();
        // Seed bits 40..46 go above the two flag bits of octet 0.
        let first = ((b[2] & 0x3f) << 2) | Self::LOCAL_BIT;
        MacAddr([first, b[3], b[4], b[5], b[6], b[7]])
    }

    /// True for a locally administered address (not a vendor's).
    pub fn is_local(&self) -> bool {
        self.0[0] & Self::LOCAL_BIT != 0
    }

    /// True for a unicast address, the only kind a NIC may own.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & Self::GROUP_BIT == 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = FormatError;

    /// Parses six hex octets of one or two digits separated by `:`, in either case.
    fn from_str(s: &str) -> Result<MacAddr, FormatError> {
        let bad = || FormatError::InvalidMacAddr { input: s.to_owned() };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for octet in out.iter_mut() {
            let part = parts.next().ok_or_else(bad)?;
            // from_str_radix alone would accept a leading '+'.
            if part.is_empty() || part.len() > 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

/// One virtual NIC of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    /// Name of the NIC within its VM, e.g. `net0`; unique per VM.
    pub id: String,
    /// Its MAC address, announced on the target at activation so the network follows the VM.
    pub mac: MacAddr,
}

/// The static description of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Identity, kept across migrations.
    pub id: VmId,
    /// Human-readable name; free text.
    pub name: String,
    /// Number of vCPUs, `1..=MAX_VCPUS`.
    pub vcpus: u32,
    /// Guest RAM in bytes, a non-zero multiple of `page_size`, at most [`MAX_VM_MEMORY_BYTES`].
    pub memory_bytes: u64,
    /// Guest page size in bytes; must be [`PAGE_SIZE`].
    pub page_size: u32,
    /// NICs, at most [`MAX_NICS`], ids unique.
    pub nics: Vec<NicConfig>,
}

impl VmConfig {
    /// Number of guest pages; 0 for a config whose page size is 0 (which `validate` refuses).
    pub fn page_count(&self) -> u64 {
        self.memory_bytes.checked_div(u64::from(self.page_size)).unwrap_or(0)
    }

    /// Checks every limit; the error names the first offending field and its value.
    pub fn validate(&self) -> Result<(), FormatError> {
        fn invalid(field: &'static str, value: impl ToString) -> FormatError {
            FormatError::InvalidConfig {
                field,
                value: value.to_string(),
            }
        }
        // Ids reach thread names, logs, paths and peers: the same rule at every entry.
        if let Err(e) = super::check_name("VM id", &self.id.0) {
            return Err(invalid("id", e));
        }
        if self.page_size != PAGE_SIZE {
            return Err(invalid("page_size", self.page_size));
        }
        if self.memory_bytes == 0
            || self.memory_bytes % u64::from(self.page_size) != 0
            || self.memory_bytes > MAX_VM_MEMORY_BYTES
        {
            return Err(invalid("memory_bytes", self.memory_bytes));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(invalid("vcpus", self.vcpus));
        }
        if self.nics.len() > MAX_NICS {
            return Err(invalid("nics", format!("{} NICs", self.nics.len())));
        }
        for (i, nic) in self.nics.iter().enumerate() {
            if nic.id.is_empty() || self.nics[..i].iter().any(|n| n.id == nic.id) {
                return Err(invalid("nics.id", format!("{:?}", nic.id)));
            }
            if !nic.mac.is_unicast() {
                return Err(invalid("nics.mac", nic.mac));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            id: VmId("vm-1".into()),
            name: "test".into(),
            vcpus: 2,
            memory_bytes: 64 << 20,
            page_size: PAGE_SIZE,
            nics: vec![NicConfig {
                id: "net0".into(),
                mac: MacAddr::local_from_seed(1),
            }],
        }
    }

    fn field_of(c: &VmConfig) -> Option<&'static str> {
        match c.validate() {
            Err(FormatError::InvalidConfig { field, .. }) => Some(field),
            _ => None,
        }
    }

    #[test]
    fn test_valid_config_passes_and_counts_pages() {
        let c = config();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.page_count(), (64 << 20) / 4096);
    }

    #[test]
    fn test_each_limit_names_its_field() {
        type Mutation = Box<dyn Fn(&mut VmConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("id", Box::new(|c| c.id = VmId(String::new()))),
            ("page_size", Box::new(|c| c.page_size = 2 << 20)),
            ("memory_bytes", Box::new(|c| c.memory_bytes = 0)),
            ("memory_bytes", Box::new(|c| c.memory_bytes = 4097)),
            (
                "memory_bytes",
                Box::new(|c| c.memory_bytes = MAX_VM_MEMORY_BYTES + 4096),
            ),
            ("vcpus", Box::new(|c| c.vcpus = 0)),
            ("vcpus", Box::new(|c| c.vcpus = MAX_VCPUS + 1)),
            ("nics", Box::new(|c| c.nics = vec![c.nics[0].clone(); 17])),
            (
                "nics.id",
                Box::new(|c| {
                    let mut second = c.nics[0].clone();
                    second.mac = MacAddr::local_from_seed(2);
                    c.nics.push(second);
                }),
            ),
            ("nics.mac", Box::new(|c| c.nics[0].mac = MacAddr([1; 6]))),
        ];
        for (field, mutate) in cases {
            let mut c = config();
            mutate(&mut c);
            assert_eq!(field_of(&c), Some(field), "{c:?}");
        }
    }

    #[test]
    fn test_invalid_config_carries_value() {
        let mut c = config();
        c.page_size = 8192;
        assert_eq!(
            c.validate(),
            Err(FormatError::InvalidConfig {
                field: "page_size",
                value: "8192".into()
            })
        );
    }

    #[test]
    fn test_page_count_with_zero_page_size_does_not_panic() {
        let mut c = config();
        c.page_size = 0;
        assert_eq!(c.page_count(), 0);
    }

    #[test]
    fn test_mac_display_and_parse_round_trip() {
        let mac = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(mac.to_string(), "52:54:00:12:34:56");
        assert_eq!("52:54:00:12:34:56".parse::<MacAddr>(), Ok(mac));
        assert_eq!("52:54:0:12:34:56".parse::<MacAddr>(), Ok(mac));
        assert_eq!("52:54:00:12:34:56".to_uppercase().parse::<MacAddr>(), Ok(mac));
    }

    #[test]
    fn test_mac_parse_rejects_malformed_input() {
        for input in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5g",
            "52:54:00:12:34:+5",
            "52:54:00:12:34:",
            "052:54:00:12:34:56",
            "52-54-00-12-34-56",
        ] {
            assert_eq!(
                input.parse::<MacAddr>(),
                Err(FormatError::InvalidMacAddr { input: input.into() }),
                "{input}"
            );
        }
    }

    #[test]
    fn test_local_from_seed_is_local_unicast_and_distinct() {
        let macs: Vec<MacAddr> = [0u64, 1, 2, 255, 1 << 40, (1 << 46) - 1, u64::MAX]
            .iter()
            .map(|&s| MacAddr::local_from_seed(s))
            .collect();
        for mac in &macs {
            assert!(mac.is_local() && mac.is_unicast(), "{mac}");
        }
        assert_eq!(macs[1].to_string(), "02:00:00:00:00:01");
        // All seeds below 2^46 map to distinct addresses.
        for (i, a) in macs[..6].iter().enumerate() {
            assert!(!macs[..i].contains(a), "{a}");
        }
    }

    #[test]
    fn test_vm_id_displays_its_string() {
        assert_eq!(VmId("web-7".into()).to_string(), "web-7");
    }
}

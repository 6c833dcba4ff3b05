//! Reading the guest's parameters back from its state header (layout in [`super`]'s docs), for
//! a guest that arrives without the VMM's own description of it: from QEMU, for instance.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{
    data_base, ProgramPattern, ProgramSpec, BATCH_PAGES_OFFSET, HEADER_MAGIC, MAGIC_OFFSET, MAX_RATE_BYTES_PER_SEC,
    MAX_TSC_TICKS_PER_BATCH, MAX_WORKING_SET_PAGES, PAGE_SIZE, PATTERN_OFFSET, PATTERN_RANDOM, PATTERN_SEQUENTIAL,
    RATE_BYTES_PER_SEC_OFFSET, STATE_ADDR, TSC_TICKS_PER_BATCH_OFFSET, VERIFY_EVERY_BATCHES_OFFSET,
    WORKING_SET_PAGES_OFFSET,
};

/// The program's parameters as its header records them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderParams {
    /// The workload's rate, bytes per second.
    pub rate_bytes_per_sec: u64,
    /// Pages in the working set.
    pub working_set_pages: u64,
    /// Pages per batch.
    pub batch_pages: u32,
    /// Batches between verify passes.
    pub verify_every_batches: u32,
    /// [`PATTERN_SEQUENTIAL`] or [`PATTERN_RANDOM`].
    pub pattern: u64,
    /// TSC ticks per batch of self-pacing (0: off).
    pub tsc_ticks_per_batch: u64,
}

/// Why a guest's header does not describe a program this module could have written.
#[derive(Debug, Error)]
pub enum HeaderError {
    /// Guest memory does not hold the header.
    #[error("guest memory does not hold the header field at {addr:#x}")]
    Unreadable {
        /// Guest-physical address of the field.
        addr: u64,
    },
    /// The magic is missing: not this program, or it has not booted yet.
    #[error("header magic is {found:#018x}, not the program's")]
    BadMagic {
        /// What the magic field holds.
        found: u64,
    },
    /// A field holds a value the program never writes.
    #[error("header field {field} holds {value}, out of range")]
    Field {
        /// The field's name.
        field: &'static str,
        /// What it holds.
        value: u64,
    },
    /// The working set ends beyond guest memory.
    #[error("a working set of {pages} pages does not fit in guest memory")]
    BeyondMemory {
        /// The working set the header claims.
        pages: u64,
    },
}

/// Reads and checks the parameters the program wrote into its header when it booted.
pub fn read_header_params(mem: &GuestMemoryMmap<()>) -> Result<HeaderParams, HeaderError> {
    let field = |offset: u64| {
        let addr = STATE_ADDR + offset;
        mem.read_obj::<u64>(GuestAddress(addr))
            .map_err(|_| HeaderError::Unreadable { addr })
    };
    let magic = field(MAGIC_OFFSET)?;
    if magic != HEADER_MAGIC {
        return Err(HeaderError::BadMagic { found: magic });
    }
    let in_range = |name: &'static str, value: u64, range: std::ops::RangeInclusive<u64>| {
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(HeaderError::Field { field: name, value })
        }
    };
    let small = |name: &'static str, value: u64| in_range(name, value, 1..=u64::from(u32::MAX)).map(|v| v as u32);
    let params = HeaderParams {
        rate_bytes_per_sec: in_range(
            "rate_bytes_per_sec",
            field(RATE_BYTES_PER_SEC_OFFSET)?,
            0..=MAX_RATE_BYTES_PER_SEC,
        )?,
        working_set_pages: in_range(
            "working_set_pages",
            field(WORKING_SET_PAGES_OFFSET)?,
            1..=MAX_WORKING_SET_PAGES,
        )?,
        batch_pages: small("batch_pages", field(BATCH_PAGES_OFFSET)?)?,
        verify_every_batches: small("verify_every_batches", field(VERIFY_EVERY_BATCHES_OFFSET)?)?,
        pattern: in_range("pattern", field(PATTERN_OFFSET)?, PATTERN_SEQUENTIAL..=PATTERN_RANDOM)?,
        tsc_ticks_per_batch: in_range(
            "tsc_ticks_per_batch",
            field(TSC_TICKS_PER_BATCH_OFFSET)?,
            0..=MAX_TSC_TICKS_PER_BATCH,
        )?,
    };
    let shape = ProgramSpec {
        working_set_pages: params.working_set_pages,
        batch_pages: params.batch_pages,
        verify_every_batches: params.verify_every_batches,
        pattern: ProgramPattern::Sequential,
        rate_bytes_per_sec: params.rate_bytes_per_sec,
        tsc_ticks_per_batch: params.tsc_ticks_per_batch,
    };
    let last_byte = data_base(&shape) + params.working_set_pages * PAGE_SIZE - 1;
    if !mem.address_in_range(GuestAddress(last_byte)) {
        return Err(HeaderError::BeyondMemory {
            pages: params.working_set_pages,
        });
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn header(mem: &GuestMemoryMmap<()>, fields: &[(u64, u64)]) {
        for &(offset, value) in fields {
            mem.write_obj(value, GuestAddress(STATE_ADDR + offset)).unwrap();
        }
    }

    fn good() -> Vec<(u64, u64)> {
        vec![
            (RATE_BYTES_PER_SEC_OFFSET, 40 << 20),
            (WORKING_SET_PAGES_OFFSET, 1024),
            (BATCH_PAGES_OFFSET, 16),
            (VERIFY_EVERY_BATCHES_OFFSET, 100),
            (PATTERN_OFFSET, PATTERN_RANDOM),
            (TSC_TICKS_PER_BATCH_OFFSET, 1_000_000),
            (MAGIC_OFFSET, HEADER_MAGIC),
        ]
    }

    #[test]
    fn test_header_params_read_back_and_nonsense_is_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * MIB)]).unwrap();
        assert!(matches!(
            read_header_params(&mem),
            Err(HeaderError::BadMagic { found: 0 })
        ));
        header(&mem, &good());
        assert_eq!(
            read_header_params(&mem).unwrap(),
            HeaderParams {
                rate_bytes_per_sec: 40 << 20,
                working_set_pages: 1024,
                batch_pages: 16,
                verify_every_batches: 100,
                pattern: PATTERN_RANDOM,
                tsc_ticks_per_batch: 1_000_000,
            }
        );
        let refused = [
            (BATCH_PAGES_OFFSET, 0, "batch_pages"),
            (BATCH_PAGES_OFFSET, 1 << 32, "batch_pages"),
            (VERIFY_EVERY_BATCHES_OFFSET, 0, "verify_every_batches"),
            (PATTERN_OFFSET, 2, "pattern"),
            (WORKING_SET_PAGES_OFFSET, 0, "working_set_pages"),
            (RATE_BYTES_PER_SEC_OFFSET, u64::MAX, "rate_bytes_per_sec"),
            (TSC_TICKS_PER_BATCH_OFFSET, u64::MAX, "tsc_ticks_per_batch"),
        ];
        for (offset, value, name) in refused {
            header(&mem, &good());
            header(&mem, &[(offset, value)]);
            let error = read_header_params(&mem).unwrap_err();
            assert!(
                matches!(error, HeaderError::Field { field, value: v } if field == name && v == value),
                "{error:?}"
            );
        }
        // 16 MiB hold data from 4 MiB: 3072 pages, not 3073.
        header(&mem, &good());
        header(&mem, &[(WORKING_SET_PAGES_OFFSET, 3072)]);
        assert!(read_header_params(&mem).is_ok());
        header(&mem, &[(WORKING_SET_PAGES_OFFSET, 3073)]);
        assert!(matches!(
            read_header_params(&mem),
            Err(HeaderError::BeyondMemory { pages: 3073 })
        ));
    }

    #[test]
    fn test_memory_without_the_header_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MIB)]).unwrap();
        assert!(matches!(read_header_params(&mem), Err(HeaderError::Unreadable { .. })));
    }
}

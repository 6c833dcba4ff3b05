//! A zlib stream (RFC 1950) around one deflate block with the fixed Huffman codes (RFC 1951),
//! for the PNG encoder.
//!
//! Stored blocks would be simpler but leave a 1000 by 560 chart at 1.7 MB. A chart repeats
//! itself at two distances (the pixel before, the row above), so a greedy matcher that looks
//! only at distances the caller names finds nearly every repeat a general LZ77 search would,
//! in linear time and without a hash table, and the fixed codes make the block header free.

/// Match lengths deflate can express.
const MIN_MATCH: usize = 3;
const MAX_MATCH: usize = 258;
/// The window deflate allows.
const MAX_DISTANCE: usize = 32_768;

/// Base length of length symbols 257..=285, and their extra bits.
const LENGTH_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258,
];
const LENGTH_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
/// Base distance of distance codes 0..=29, and their extra bits.
const DISTANCE_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145,
    8193, 12289, 16385, 24577,
];
const DISTANCE_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13,
];
/// The end-of-block symbol.
const END_OF_BLOCK: u16 = 256;

/// `data` as a zlib stream. `distances` are where repeats are looked for (for an image: the
/// bytes of one pixel, the bytes of one row); those beyond deflate's window are ignored.
pub fn zlib(data: &[u8], distances: &[usize]) -> Vec<u8> {
    let mut out = BitWriter::default();
    // CMF: deflate with a 32 KiB window; FLG: no dictionary, and CMF*256+FLG divisible by 31.
    out.bytes.extend_from_slice(&[0x78, 0x01]);
    out.bits(1, 1); // BFINAL: the only block
    out.bits(1, 2); // BTYPE 01: fixed codes
    let distances: Vec<usize> = distances
        .iter()
        .copied()
        .filter(|&d| (1..=MAX_DISTANCE).contains(&d))
        .collect();
    let mut i = 0;
    while i < data.len() {
        let best = distances
            .iter()
            .filter(|&&d| d <= i)
            .map(|&d| (match_len(data, i, d), d))
            .max_by_key(|&(len, d)| (len, std::cmp::Reverse(d)));
        match best {
            Some((len, d)) if len >= MIN_MATCH => {
                out.length(len);
                out.distance(d);
                i += len;
            }
            _ => {
                out.symbol(u16::from(data[i]));
                i += 1;
            }
        }
    }
    out.symbol(END_OF_BLOCK);
    out.flush();
    out.bytes.extend_from_slice(&adler32(data).to_be_bytes());
    out.bytes
}

/// How many bytes from `at` repeat those `distance` before, up to deflate's longest match.
fn match_len(data: &[u8], at: usize, distance: usize) -> usize {
    let end = (at + MAX_MATCH).min(data.len());
    (at..end).take_while(|&j| data[j] == data[j - distance]).count()
}

/// zlib's checksum of the uncompressed data.
pub fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65_521;
    // 5552 bytes is the most that can be summed before `b` could overflow a u32.
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &byte in chunk {
            a += u32::from(byte);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// Deflate's bit order: values least significant bit first, Huffman codes most significant
/// bit first.
#[derive(Debug, Default)]
struct BitWriter {
    bytes: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    fn bits(&mut self, value: u32, count: u32) {
        self.acc |= u64::from(value) << self.n;
        self.n += count;
        while self.n >= 8 {
            self.bytes.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn code(&mut self, code: u32, len: u32) {
        self.bits(code.reverse_bits() >> (32 - len), len);
    }

    /// A literal/length symbol in the fixed code.
    fn symbol(&mut self, s: u16) {
        let s = u32::from(s);
        match s {
            0..=143 => self.code(0x30 + s, 8),
            144..=255 => self.code(0x190 + s - 144, 9),
            256..=279 => self.code(s - 256, 7),
            _ => self.code(0xc0 + s - 280, 8),
        }
    }

    fn length(&mut self, len: usize) {
        let i = LENGTH_BASE.partition_point(|&b| usize::from(b) <= len) - 1;
        self.symbol(257 + i as u16);
        self.bits((len - usize::from(LENGTH_BASE[i])) as u32, u32::from(LENGTH_EXTRA[i]));
    }

    fn distance(&mut self, d: usize) {
        let i = DISTANCE_BASE.partition_point(|&b| usize::from(b) <= d) - 1;
        self.code(i as u32, 5);
        self.bits((d - usize::from(DISTANCE_BASE[i])) as u32, u32::from(DISTANCE_EXTRA[i]));
    }

    fn flush(&mut self) {
        if self.n > 0 {
            self.bytes.push(self.acc as u8);
            self.acc = 0;
            self.n = 0;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An inflater for what [`zlib`] writes (one final fixed-code block), whose tables are
    /// derived from RFC 1951's rules rather than copied from the encoder's.
    pub(crate) fn inflate_zlib(stream: &[u8]) -> Vec<u8> {
        assert_eq!(stream[0] & 0x0f, 8, "deflate");
        assert_eq!(
            (u32::from(stream[0]) * 256 + u32::from(stream[1])) % 31,
            0,
            "header check"
        );
        let mut r = BitReader {
            data: &stream[2..],
            pos: 0,
        };
        assert_eq!(r.bits(1), 1, "final block");
        assert_eq!(r.bits(2), 1, "fixed codes");
        let (mut len_base, mut len_extra) = (vec![3u32], vec![0u32]);
        for i in 1..28 {
            let extra = if i < 8 { 0 } else { (i as u32 - 4) / 4 };
            len_base.push(len_base[i - 1] + (1 << len_extra[i - 1]));
            len_extra.push(extra);
        }
        len_base.push(258);
        len_extra.push(0);
        let (mut dist_base, mut dist_extra) = (vec![1u32], vec![0u32]);
        for i in 1..30 {
            let extra = if i < 4 { 0 } else { (i as u32 - 2) / 2 };
            dist_base.push(dist_base[i - 1] + (1 << dist_extra[i - 1]));
            dist_extra.push(extra);
        }
        let mut out: Vec<u8> = Vec::new();
        loop {
            let sym = r.symbol();
            match sym {
                0..=255 => out.push(sym as u8),
                256 => break,
                _ => {
                    let i = (sym - 257) as usize;
                    let len = len_base[i] + r.bits(len_extra[i]);
                    let d = r.code(5) as usize;
                    let dist = (dist_base[d] + r.bits(dist_extra[d])) as usize;
                    for _ in 0..len {
                        out.push(out[out.len() - dist]);
                    }
                }
            }
        }
        let tail = r.pos.div_ceil(8) + 2;
        let checksum = u32::from_be_bytes(stream[tail..tail + 4].try_into().unwrap());
        assert_eq!(checksum, adler32(&out), "adler-32");
        assert_eq!(tail + 4, stream.len(), "nothing after the checksum");
        out
    }

    struct BitReader<'a> {
        data: &'a [u8],
        pos: usize,
    }

    impl BitReader<'_> {
        fn bit(&mut self) -> u32 {
            let b = (self.data[self.pos / 8] >> (self.pos % 8)) & 1;
            self.pos += 1;
            u32::from(b)
        }

        fn bits(&mut self, n: u32) -> u32 {
            (0..n).fold(0, |acc, i| acc | (self.bit() << i))
        }

        fn code(&mut self, n: u32) -> u32 {
            (0..n).fold(0, |acc, _| (acc << 1) | self.bit())
        }

        fn symbol(&mut self) -> u32 {
            let c = self.code(7);
            if c <= 0x17 {
                return 256 + c;
            }
            let c = (c << 1) | self.bit();
            match c {
                0x30..=0xbf => c - 0x30,
                0xc0..=0xc7 => 280 + c - 0xc0,
                _ => 144 + ((c << 1) | self.bit()) - 0x190,
            }
        }
    }

    #[test]
    fn test_adler32_of_known_strings() {
        assert_eq!(adler32(b""), 1);
        // The example of the Adler-32 literature.
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    }

    #[test]
    fn test_adler32_survives_long_input_without_overflow() {
        let data = vec![0xffu8; 1 << 20];
        // Reference by the definition, reducing at every byte.
        let (mut a, mut b) = (1u64, 0u64);
        for &x in &data {
            a = (a + u64::from(x)) % 65_521;
            b = (b + a) % 65_521;
        }
        assert_eq!(u64::from(adler32(&data)), (b << 16) | a);
    }

    #[test]
    fn test_round_trips_literals_runs_and_rows() {
        let mut data: Vec<u8> = (0..=255u8).collect(); // every literal, both code lengths
        data.extend(std::iter::repeat_n(7u8, 1000)); // runs past the longest match
        let row: Vec<u8> = (0..300).map(|i| (i * 7 % 251) as u8).collect();
        for _ in 0..5 {
            data.extend_from_slice(&row); // repeats at a long distance
        }
        data.extend_from_slice(&[1, 2, 3, 1, 2, 3, 1, 2]);
        let z = zlib(&data, &[1, 3, 300, 100_000]);
        assert_eq!(inflate_zlib(&z), data);
        assert!(z.len() < data.len() / 3, "{} of {}", z.len(), data.len());
    }

    /// `d` distinct-ish bytes, then `len` bytes repeating them from `d` back.
    fn repeat_at(d: usize, len: usize) -> Vec<u8> {
        let mut data: Vec<u8> = (0..d).map(|i| (i % 253) as u8).collect();
        for _ in 0..len {
            data.push(data[data.len() - d]);
        }
        data
    }

    #[test]
    fn test_every_match_length_and_distance_code_round_trips() {
        for len in MIN_MATCH..=MAX_MATCH {
            let data = repeat_at(5, len);
            assert_eq!(inflate_zlib(&zlib(&data, &[5])), data, "length {len}");
        }
        // The first and last distance of every distance code.
        let bounds = DISTANCE_BASE
            .iter()
            .zip(DISTANCE_EXTRA)
            .map(|(&b, e)| (usize::from(b), (1usize << e) - 1));
        for d in bounds.flat_map(|(b, extra)| [b, b + extra]) {
            let data = repeat_at(d, MAX_MATCH);
            assert_eq!(inflate_zlib(&zlib(&data, &[d])), data, "distance {d}");
        }
    }

    #[test]
    fn test_empty_input_is_a_valid_stream() {
        assert_eq!(inflate_zlib(&zlib(&[], &[3])), Vec::<u8>::new());
    }
}

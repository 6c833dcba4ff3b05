//! PNG encoding of a [`Bitmap`]: 8-bit RGB, no interlace, every row with filter 0, the image
//! data one zlib stream ([`super::deflate`]).

use super::raster::Bitmap;

/// The eight bytes every PNG starts with.
pub const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// The file.
pub fn encode(image: &Bitmap) -> Vec<u8> {
    let row_bytes = image.width as usize * 3;
    let mut raw = Vec::with_capacity((row_bytes + 1) * image.height as usize);
    for row in image.rgb.chunks_exact(row_bytes.max(1)).take(image.height as usize) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&image.width.to_be_bytes());
    ihdr.extend_from_slice(&image.height.to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);

    let mut out = SIGNATURE.to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    // The previous pixel and the pixel above: where a chart repeats itself.
    chunk(&mut out, b"IDAT", &super::deflate::zlib(&raw, &[3, row_bytes + 1]));
    chunk(&mut out, b"IEND", &[]);
    out
}

/// Length, type, data, and the CRC of type and data.
fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    // The encoder's images are far below 2^31 bytes per chunk, PNG's limit.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&[kind.as_slice(), data]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// The CRC-32 of ISO 3309 (reflected polynomial 0xedb88320), over the parts in order.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        c = CRC_TABLE[((c ^ u32::from(*byte)) & 0xff) as usize] ^ (c >> 8);
    }
    c ^ 0xffff_ffff
}

const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::deflate::tests::inflate_zlib;
    use super::*;

    /// One chunk as read back: its type and data, after checking its CRC bit by bit.
    pub(crate) fn read_chunks(png: &[u8]) -> Vec<([u8; 4], Vec<u8>)> {
        assert_eq!(png[..8], SIGNATURE, "signature");
        let mut chunks = Vec::new();
        let mut at = 8;
        while at < png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let kind: [u8; 4] = png[at + 4..at + 8].try_into().unwrap();
            let data = png[at + 8..at + 8 + len].to_vec();
            let crc = u32::from_be_bytes(png[at + 8 + len..at + 12 + len].try_into().unwrap());
            assert_eq!(crc, bitwise_crc(&png[at + 4..at + 8 + len]), "CRC of {:?}", kind);
            chunks.push((kind, data));
            at += 12 + len;
        }
        assert_eq!(at, png.len(), "no trailing bytes");
        chunks
    }

    /// The CRC straight from its definition, one bit at a time: independent of the table.
    fn bitwise_crc(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 { (c >> 1) ^ 0xedb8_8320 } else { c >> 1 };
            }
        }
        !c
    }

    /// The pixels of a PNG this module wrote, checked chunk by chunk.
    pub(crate) fn decode(png: &[u8]) -> Bitmap {
        let chunks = read_chunks(png);
        let kinds: Vec<&[u8; 4]> = chunks.iter().map(|(k, _)| k).collect();
        assert_eq!(kinds, [b"IHDR", b"IDAT", b"IEND"]);
        let ihdr = &chunks[0].1;
        let width = u32::from_be_bytes(ihdr[0..4].try_into().unwrap());
        let height = u32::from_be_bytes(ihdr[4..8].try_into().unwrap());
        assert_eq!(ihdr[8..], [8, 2, 0, 0, 0], "8-bit RGB, no interlace");
        let raw = inflate_zlib(&chunks[1].1);
        let row = width as usize * 3 + 1;
        assert_eq!(raw.len(), row * height as usize);
        let mut rgb = Vec::new();
        for r in raw.chunks_exact(row) {
            assert_eq!(r[0], 0, "filter none");
            rgb.extend_from_slice(&r[1..]);
        }
        Bitmap { width, height, rgb }
    }

    #[test]
    fn test_crc32_of_the_check_string() {
        assert_eq!(crc32(&[b"123456789"]), 0xcbf4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xcbf4_3926);
    }

    #[test]
    fn test_encoded_image_decodes_to_the_same_pixels() {
        let mut image = Bitmap::new(37, 11, [250, 250, 250]);
        for (i, px) in image.rgb.chunks_exact_mut(3).enumerate() {
            if i % 5 == 0 {
                px.copy_from_slice(&[(i % 256) as u8, 3, 200]);
            }
        }
        let png = encode(&image);
        assert_eq!(decode(&png), image);
    }

    #[test]
    fn test_a_flat_image_compresses_well() {
        let image = Bitmap::new(1000, 560, [255, 255, 255]);
        let png = encode(&image);
        assert!(png.len() < 30_000, "{} bytes", png.len());
        assert_eq!(decode(&png), image);
    }
}

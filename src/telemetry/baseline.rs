//! Physical baselines that benchmarks divide their figures by, measured in the same run.

use std::time::Instant;

/// Bytes per second of the best of three single-thread memcpys of `bytes` (pages faulted in
/// beforehand, as a migration's reservation does).
pub fn memcpy_bytes_per_sec(bytes: usize) -> f64 {
    let src: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8 | 1).collect();
    let mut dst = vec![0u8; bytes];
    dst.copy_from_slice(&src);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    bytes as f64 / best
}

//! Micro benchmarks of the hot paths under a migration: the zero-page scan, the dirty-bitmap
//! fetch and scan, page-batch encode and decode, the per-page digest, and one actor round trip.
//!
//! `cargo bench --bench micro` (about a minute); `cargo bench --bench micro -- --test` runs each
//! once as a smoke test. Only the crate's public API is used, so a figure here is what an
//! embedder or the engine itself would see.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use migratory::dirty::{AtomicBitmap, CollectDirtyPages, DirtyLogSource, DirtyTracker, PageSet, StartDirtyLog};
use migratory::link::FramePool;
use migratory::memory::{GuestMemory, SplitMix64};
use migratory::protocol::frame::frame_body;
use migratory::protocol::pages::PageBatchBuilder;
use migratory::protocol::{PageBatch, BATCH_PAGES};
use migratory::units::{PageIndex, PAGE_SIZE};
use xxhash_rust::xxh3::xxh3_64;

const MIB: u64 = 1 << 20;
/// Pages in 1 GiB: the dirty bitmap of a 1 GiB guest.
const GIB_PAGES: u64 = (1 << 30) / PAGE_SIZE as u64;

/// Short runs: the figures are stable to a few percent at this size, and the whole file stays
/// near a minute on a shared two-core machine.
fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

/// Guest memory with about `zero_fraction` zero pages, the rest pseudo-random. With `commit`,
/// zero pages are written too, so each has its own physical page, as in a guest that zeroed
/// them; without it they are never touched and all map the kernel's one shared zero page, as in
/// a fresh sim guest, which makes scanning them a cache-hot read.
fn guest(bytes: u64, zero_fraction: f64, commit: bool) -> GuestMemory {
    let memory = GuestMemory::new(bytes).expect("map guest memory");
    memory.fill_pseudo_random(42, zero_fraction).expect("fill");
    if commit {
        for i in 0..memory.page_count() {
            let page = PageIndex(i);
            if memory.page_is_zero(page).expect("in range") {
                memory.zero_page(page).expect("in range");
            }
        }
    }
    memory
}

fn zero_scan(c: &mut Criterion) {
    let bytes = 64 * MIB;
    let mut group = c.benchmark_group("zero_scan_64MiB");
    group.throughput(Throughput::Bytes(bytes));
    for (name, commit) in [("half_zero", true), ("half_zero_untouched", false)] {
        let memory = guest(bytes, 0.5, commit);
        group.bench_function(name, |b| {
            b.iter(|| {
                (0..memory.page_count())
                    .filter(|&i| memory.page_is_zero(PageIndex(i)).expect("in range"))
                    .count()
            })
        });
    }
    group.finish();
}

/// A set over a 1 GiB guest with about `percent` of its pages, spread pseudo-randomly.
fn dirty_pattern(percent: u64) -> PageSet {
    let mut rng = SplitMix64::new(percent);
    let mut set = PageSet::empty(GIB_PAGES);
    for i in 0..GIB_PAGES {
        if rng.next() % 100 < percent {
            set.insert(i);
        }
    }
    set
}

fn dirty_bitmap(c: &mut Criterion) {
    let mut group = c.benchmark_group("dirty_bitmap_1GiB");
    // Pages covered per second: every benchmark here walks the whole 1 GiB bitmap.
    group.throughput(Throughput::Elements(GIB_PAGES));
    for percent in [1, 50] {
        let pattern = dirty_pattern(percent);
        let bitmap = AtomicBitmap::new(GIB_PAGES);
        let label = format!("{percent}%");
        // drain() clears the bitmap, so each iteration refills it first, outside the timing.
        group.bench_with_input(BenchmarkId::new("drain", &label), &pattern, |b, p| {
            b.iter_batched(|| bitmap.set_from(p), |()| bitmap.drain(), BatchSize::PerIteration)
        });
        group.bench_with_input(BenchmarkId::new("iterate", &label), &pattern, |b, p| {
            b.iter(|| p.iter().fold(0u64, |acc, page| acc ^ page))
        });
        group.bench_with_input(BenchmarkId::new("drain_and_iterate", &label), &pattern, |b, p| {
            b.iter_batched(
                || bitmap.set_from(p),
                |()| bitmap.drain().iter().fold(0u64, |acc, page| acc ^ page),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// Builds one batch of `BATCH_PAGES` pages from `memory` in a pooled buffer, as the source's
/// data plane does.
fn encode(memory: &GuestMemory, pool: &FramePool) -> Bytes {
    let mut batch = PageBatchBuilder::with_buffer(pool.take(), 0, 0);
    for i in 0..BATCH_PAGES as u64 {
        batch.add_from(memory, i).expect("in range");
    }
    batch.finish()
}

fn page_batch(c: &mut Criterion) {
    let batch_bytes = (BATCH_PAGES * PAGE_SIZE) as u64;
    // Every page full, so the frame carries the whole 1 MiB.
    let source = guest(batch_bytes, 0.0, false);
    let target = GuestMemory::new_populated(batch_bytes).expect("map target");
    let pool = FramePool::new();
    let mut group = c.benchmark_group("page_batch_1MiB");
    group.throughput(Throughput::Bytes(batch_bytes));
    // Buffers go back to the pool, so the figure is the copy and digests, not page faults on a
    // fresh 1 MiB buffer.
    group.bench_function("encode", |b| b.iter(|| pool.give(encode(&source, &pool))));
    let frame = encode(&source, &pool);
    // Parsing only: page bytes stay slices of the frame.
    group.bench_function("decode", |b| {
        b.iter(|| {
            let batch = PageBatch::decode(frame_body(&frame).expect("frame")).expect("batch");
            batch.pages().fold(0u64, |acc, (page, _, digest)| acc ^ page ^ digest)
        })
    });
    // What the target's data plane does with a batch: parse, check each page's digest, write it.
    group.bench_function("decode_and_apply", |b| {
        b.iter(|| {
            let batch = PageBatch::decode(frame_body(&frame).expect("frame")).expect("batch");
            for (page, data, digest) in batch.pages() {
                match data {
                    Some(bytes) => {
                        assert_eq!(xxh3_64(bytes), digest, "page {page} corrupted");
                        target.write_page(PageIndex(page), bytes).expect("in range");
                    }
                    None => target.zero_page(PageIndex(page)).expect("in range"),
                }
            }
        })
    });
    group.finish();
}

fn page_digest(c: &mut Criterion) {
    let memory = guest(PAGE_SIZE as u64, 0.0, false);
    let mut group = c.benchmark_group("page_digest");
    group.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    group.bench_function("xxh3_4KiB", |b| {
        b.iter(|| {
            memory
                .page_digest(std::hint::black_box(PageIndex(0)))
                .expect("in range")
        })
    });
    group.finish();
}

/// The smallest dirty-log source: a 64-page bitmap nobody writes, so a collect is the message
/// cost plus a one-word drain.
struct TinyLog(AtomicBitmap);

impl DirtyLogSource for TinyLog {
    fn dirty_bitmap(&self) -> &AtomicBitmap {
        &self.0
    }
}

fn tracker() -> DirtyTracker {
    DirtyTracker::new(Arc::new(TinyLog(AtomicBitmap::new(64))))
}

/// `CollectDirtyPages` on the engine's real DirtyTracker actor, one round trip per iteration.
fn actor_round_trip(c: &mut Criterion) {
    let mut group = c.benchmark_group("actor_round_trip");
    group.throughput(Throughput::Elements(1));

    // Caller and actor on one actix System thread: the mailbox and the wake-ups, no thread hop.
    let system = System::new();
    let addr = system.block_on(async {
        let addr = tracker().start();
        addr.send(StartDirtyLog).await.expect("mailbox").expect("start");
        addr
    });
    group.bench_function("collect_dirty_pages/same_thread", |b| {
        b.iter_custom(|iters| {
            system.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    addr.send(CollectDirtyPages).await.expect("mailbox").expect("collect");
                }
                t.elapsed()
            })
        })
    });
    drop(addr);
    drop(system);

    // The actor on its own System thread, the caller on a tokio runtime: how the engine's
    // actors are reached through an EngineHandle.
    let (tx, rx) = std::sync::mpsc::channel();
    let actors = std::thread::spawn(move || {
        let system = System::new();
        let addr = system.block_on(async {
            let addr = tracker().start();
            addr.send(StartDirtyLog).await.expect("mailbox").expect("start");
            addr
        });
        tx.send((addr, System::current())).expect("bench thread waits");
        system.run().expect("actor system");
    });
    let (addr, remote) = rx.recv().expect("actor thread");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    group.bench_function("collect_dirty_pages/cross_thread", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let t = Instant::now();
                for _ in 0..iters {
                    addr.send(CollectDirtyPages).await.expect("mailbox").expect("collect");
                }
                t.elapsed()
            })
        })
    });
    group.finish();
    remote.stop();
    actors.join().expect("actor thread");
}

criterion_group! {
    name = micro;
    config = config();
    targets = zero_scan, dirty_bitmap, page_batch, page_digest, actor_round_trip
}
criterion_main!(micro);

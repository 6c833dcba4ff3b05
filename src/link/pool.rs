//! Recycled frame buffers.
//!
//! A fresh 1 MiB buffer per batch costs a page fault per 4 KiB the first time it is written,
//! which on a fast link costs more than the copy itself. Page frames are taken from a pool and
//! given back once applied. The two ends of an in-process link share one pool (frames cross
//! it); a socket transport keeps one per side.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use crossbeam::queue::ArrayQueue;

use crate::protocol::pages::{FRAME_BUFFER_CAPACITY, FRAME_CAPACITY};

/// Buffers kept: enough for every frame in flight on a link plus the two being built/applied.
const POOL_BUFFERS: usize = super::DATA_CHANNEL_FRAMES + 4;

/// A bounded pool of frame buffers, shared by clones.
#[derive(Debug, Clone)]
pub struct FramePool {
    free: Arc<ArrayQueue<BytesMut>>,
}

impl Default for FramePool {
    fn default() -> Self {
        Self::new()
    }
}

impl FramePool {
    /// An empty pool; buffers are made on demand up to its bound.
    pub fn new() -> Self {
        Self {
            free: Arc::new(ArrayQueue::new(POOL_BUFFERS)),
        }
    }

    /// A buffer with room for a full frame.
    pub fn take(&self) -> BytesMut {
        self.free
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(FRAME_BUFFER_CAPACITY))
    }

    /// Gives a frame back once nothing else refers to it; a full pool or a shared frame just
    /// drops it.
    pub fn give(&self, frame: Bytes) {
        if let Ok(mut buf) = frame.try_into_mut() {
            if buf.capacity() >= FRAME_CAPACITY {
                buf.clear();
                let _ = self.free.push(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_buffers_come_back_only_when_unshared() {
        let pool = FramePool::new();
        let mut b = pool.take();
        b.extend_from_slice(b"frame");
        let frame = b.freeze();
        let alias = frame.slice(1..);
        pool.give(frame);
        assert_eq!(pool.free.len(), 0, "a sliced frame is still in use");
        drop(alias);
        let mut c = pool.take();
        c.extend_from_slice(&[0; 8]);
        pool.give(c.freeze());
        assert_eq!(pool.free.len(), 1);
    }
}

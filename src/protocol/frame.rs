//! Length-prefixed frames.
//!
//! A frame is a 4-byte big-endian body length, then the body: one tag byte and the payload.
//! Lengths are checked against [`MAX_FRAME_LEN`] before anything is allocated.

use bytes::{BufMut, Bytes, BytesMut};

use super::message::ControlMessage;

/// Largest frame body accepted: a page batch of [`super::BATCH_PAGES`] pages with its header
/// fits many times over; a digest list of a 1 TiB VM does not, and is sent in parts.
pub const MAX_FRAME_LEN: usize = 32 << 20;

/// Tag of a control frame (MessagePack body).
pub const TAG_CONTROL: u8 = b'C';
/// Tag of a page batch frame.
pub const TAG_PAGES: u8 = b'P';
/// Tag of a post-copy page request on a link's pull lane (`crate::link::encode_request`).
pub const TAG_PULL_REQUEST: u8 = b'R';

/// Errors of framing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// A frame longer than the limit.
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Length the frame claimed.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Fewer bytes than the header or the length promised.
    #[error("truncated frame: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes there.
        have: usize,
    },
    /// An empty body or an unknown tag.
    #[error("unknown frame tag {tag:#04x}")]
    UnknownTag {
        /// The tag byte.
        tag: u8,
    },
    /// A control body that is not a valid message.
    #[error("malformed control message: {0}")]
    Malformed(String),
    /// A message that could not be encoded.
    #[error("cannot encode control message: {0}")]
    Encode(String),
}

/// Encodes a control message as a whole frame (length, tag, MessagePack with named fields).
pub fn encode_control(msg: &ControlMessage) -> Result<Bytes, FrameError> {
    let body = rmp_serde::to_vec_named(msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = body.len() + 1;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            limit: MAX_FRAME_LEN,
        });
    }
    let mut out = BytesMut::with_capacity(4 + len);
    out.put_u32(len as u32);
    out.put_u8(TAG_CONTROL);
    out.extend_from_slice(&body);
    Ok(out.freeze())
}

/// Decodes a control message from a frame body (tag included).
pub fn decode_control(body: &[u8]) -> Result<ControlMessage, FrameError> {
    match body.first() {
        Some(&TAG_CONTROL) => rmp_serde::from_slice(&body[1..]).map_err(|e| FrameError::Malformed(e.to_string())),
        Some(&tag) => Err(FrameError::UnknownTag { tag }),
        None => Err(FrameError::Truncated { needed: 1, have: 0 }),
    }
}

/// Splits one whole frame into its body, checking the length prefix.
pub fn frame_body(frame: &Bytes) -> Result<Bytes, FrameError> {
    if frame.len() < 4 {
        return Err(FrameError::Truncated {
            needed: 4,
            have: frame.len(),
        });
    }
    let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            limit: MAX_FRAME_LEN,
        });
    }
    if frame.len() != 4 + len {
        return Err(FrameError::Truncated {
            needed: 4 + len,
            have: frame.len(),
        });
    }
    Ok(frame.slice(4..))
}

/// Incremental decoder for a byte stream (a TCP socket): feed bytes, take whole frame bodies.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame body, `Ok(None)` if more bytes are needed. The length is checked
    /// before the body is waited for, so a hostile prefix never makes us buffer 4 GiB.
    pub fn next_body(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len,
                limit: MAX_FRAME_LEN,
            });
        }
        if len == 0 {
            return Err(FrameError::Truncated { needed: 1, have: 0 });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(4 + len);
        Ok(Some(frame.split_off(4).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_control_round_trip_through_stream_decoder() {
        let f = encode_control(&ControlMessage::Ping { seq: 7 }).expect("encode");
        let mut d = FrameDecoder::new();
        d.feed(&f[..3]);
        assert_eq!(d.next_body(), Ok(None));
        d.feed(&f[3..]);
        let body = d.next_body().expect("ok").expect("frame");
        assert_eq!(decode_control(&body), Ok(ControlMessage::Ping { seq: 7 }));
        assert_eq!(
            frame_body(&f).map(|b| decode_control(&b)),
            Ok(Ok(ControlMessage::Ping { seq: 7 }))
        );
    }

    #[test]
    fn test_hostile_length_rejected_before_allocation() {
        let mut d = FrameDecoder::new();
        d.feed(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            d.next_body(),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                limit: MAX_FRAME_LEN
            })
        );
        assert!(matches!(
            decode_control(&[TAG_CONTROL, 0xc1]),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(decode_control(&[9]), Err(FrameError::UnknownTag { tag: 9 }));
        assert!(matches!(
            frame_body(&Bytes::from_static(&[0, 0, 0, 9, 1])),
            Err(FrameError::Truncated { .. })
        ));
    }
}

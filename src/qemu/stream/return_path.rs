//! The return path: the messages a destination sends back on the migration connection once the
//! source asked for it with `MIG_CMD_OPEN_RETURN_PATH` (`migration/migration.c`,
//! `migrate_send_rp_message`): `be16 type, be16 len, len bytes`.
//!
//! QEMU's destination sends `MIG_RP_MSG_SHUT` with 0 once it has loaded the stream and started
//! the VM, and answers each `MIG_CMD_PING` with `MIG_RP_MSG_PONG`. When loading fails it exits
//! (QEMU 7.2 does not send SHUT 1 then), so a closed connection means failure too.
//! [`wait_for_shut`] turns both into typed errors.

use std::io::{ErrorKind, Read, Write};

use super::StreamError;

/// `MIG_RP_MSG_SHUT`: `be32`, 0 for success.
pub const MIG_RP_MSG_SHUT: u16 = 1;
/// `MIG_RP_MSG_PONG`: `be32`, the PING's value.
pub const MIG_RP_MSG_PONG: u16 = 2;
/// The longest message accepted: QEMU's own reader takes at most this much (a page request
/// with a block name is the longest it sends).
pub const MAX_RETURN_MESSAGE: u16 = 512;
/// How many other messages [`wait_for_shut`] skips before giving up.
pub const MAX_SKIPPED_MESSAGES: usize = 1024;

/// One return-path message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnMessage {
    /// `MIG_RP_MSG_SHUT`: the destination is done; `failed` for a non-zero value.
    Shut {
        /// The destination failed.
        failed: bool,
    },
    /// `MIG_RP_MSG_PONG` with the PING's value.
    Pong(u32),
    /// Any other type (post-copy page requests, ...), payload skipped.
    Other {
        /// Its type.
        kind: u16,
    },
}

/// Reads one message. A payload over [`MAX_RETURN_MESSAGE`] or of the wrong length for its type
/// is [`StreamError::BadReturnMessage`]; an end of stream before a whole message is
/// [`StreamError::ReturnPathClosed`].
pub fn read_return_message<R: Read>(r: &mut R) -> Result<ReturnMessage, StreamError> {
    Ok(match read_raw(r)? {
        Raw::Shut(value) => ReturnMessage::Shut { failed: value != 0 },
        Raw::Pong(value) => ReturnMessage::Pong(value),
        Raw::Other(kind) => ReturnMessage::Other { kind },
    })
}

/// Reads messages until SHUT: `Ok` for SHUT 0, [`StreamError::DestinationFailed`] for another
/// value, [`StreamError::ReturnPathClosed`] when the connection ends first (how QEMU 7.2 reports
/// a failed load: it exits). PONGs and other messages are skipped, at most
/// [`MAX_SKIPPED_MESSAGES`].
pub fn wait_for_shut<R: Read>(r: &mut R) -> Result<(), StreamError> {
    for _ in 0..=MAX_SKIPPED_MESSAGES {
        match read_raw(r)? {
            Raw::Shut(0) => return Ok(()),
            Raw::Shut(value) => return Err(StreamError::DestinationFailed { value }),
            Raw::Pong(_) | Raw::Other(_) => {}
        }
    }
    Err(StreamError::TooLarge {
        what: "return-path messages before SHUT",
        value: MAX_SKIPPED_MESSAGES as u64 + 1,
        limit: MAX_SKIPPED_MESSAGES as u64,
    })
}

/// A message with the values the typed one drops.
enum Raw {
    Shut(u32),
    Pong(u32),
    Other(u16),
}

fn read_raw<R: Read>(r: &mut R) -> Result<Raw, StreamError> {
    let mut header = [0u8; 4];
    r.read_exact(&mut header).map_err(closed)?;
    let kind = u16::from_be_bytes([header[0], header[1]]);
    let len = u16::from_be_bytes([header[2], header[3]]);
    if len > MAX_RETURN_MESSAGE {
        return Err(StreamError::BadReturnMessage {
            kind,
            len,
            what: "longer than any message QEMU sends",
        });
    }
    let mut payload = [0u8; MAX_RETURN_MESSAGE as usize];
    let payload = &mut payload[..usize::from(len)];
    r.read_exact(payload).map_err(closed)?;
    let be32 = || -> Result<u32, StreamError> {
        <[u8; 4]>::try_from(&payload[..])
            .map(u32::from_be_bytes)
            .map_err(|_| StreamError::BadReturnMessage {
                kind,
                len,
                what: "not the 4 bytes of a be32",
            })
    };
    Ok(match kind {
        MIG_RP_MSG_SHUT => Raw::Shut(be32()?),
        MIG_RP_MSG_PONG => Raw::Pong(be32()?),
        kind => Raw::Other(kind),
    })
}

/// Writes `MIG_RP_MSG_SHUT`: 0, or 1 when `failed`. Flushed.
pub fn write_shut<W: Write>(w: &mut W, failed: bool) -> Result<(), StreamError> {
    write_message(w, MIG_RP_MSG_SHUT, &u32::from(failed).to_be_bytes())
}

/// Writes `MIG_RP_MSG_PONG` with `value`. Flushed.
pub fn write_pong<W: Write>(w: &mut W, value: u32) -> Result<(), StreamError> {
    write_message(w, MIG_RP_MSG_PONG, &value.to_be_bytes())
}

fn write_message<W: Write>(w: &mut W, kind: u16, payload: &[u8; 4]) -> Result<(), StreamError> {
    let mut msg = [0u8; 8];
    msg[..2].copy_from_slice(&kind.to_be_bytes());
    msg[2..4].copy_from_slice(&4u16.to_be_bytes());
    msg[4..].copy_from_slice(payload);
    w.write_all(&msg)?;
    w.flush()?;
    Ok(())
}

/// End of stream and a reset connection both mean the destination went away.
fn closed(e: std::io::Error) -> StreamError {
    match e.kind() {
        ErrorKind::UnexpectedEof => StreamError::ReturnPathClosed {
            reason: "end of stream".into(),
        },
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            StreamError::ReturnPathClosed { reason: e.to_string() }
        }
        _ => StreamError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_shut_and_pong_round_trip() {
        let mut buf = Vec::new();
        write_pong(&mut buf, 7).unwrap();
        write_shut(&mut buf, true).unwrap();
        write_shut(&mut buf, false).unwrap();
        assert_eq!(&buf[..8], &[0, 2, 0, 4, 0, 0, 0, 7]);
        let mut r = &buf[..];
        assert_eq!(read_return_message(&mut r).unwrap(), ReturnMessage::Pong(7));
        assert_eq!(
            read_return_message(&mut r).unwrap(),
            ReturnMessage::Shut { failed: true }
        );
        assert_eq!(
            read_return_message(&mut r).unwrap(),
            ReturnMessage::Shut { failed: false }
        );
        assert!(matches!(
            read_return_message(&mut r),
            Err(StreamError::ReturnPathClosed { .. })
        ));
    }

    #[test]
    fn test_wait_for_shut_reports_failure_and_close() {
        let mut buf = Vec::new();
        write_pong(&mut buf, 1).unwrap();
        write_shut(&mut buf, false).unwrap();
        wait_for_shut(&mut &buf[..]).unwrap();
        let mut failed = Vec::new();
        write_shut(&mut failed, true).unwrap();
        assert!(matches!(
            wait_for_shut(&mut &failed[..]),
            Err(StreamError::DestinationFailed { value: 1 })
        ));
        assert!(matches!(
            wait_for_shut(&mut &buf[..8]),
            Err(StreamError::ReturnPathClosed { .. })
        ));
    }

    #[test]
    fn test_oversized_and_malformed_messages_are_refused() {
        let long = [0u8, 4, 0x02, 0x01];
        assert!(matches!(
            read_return_message(&mut &long[..]),
            Err(StreamError::BadReturnMessage { kind: 4, len: 513, .. })
        ));
        let short_shut = [0u8, 1, 0, 2, 0, 0];
        assert!(matches!(
            read_return_message(&mut &short_shut[..]),
            Err(StreamError::BadReturnMessage { kind: 1, len: 2, .. })
        ));
        let other = [0u8, 4, 0, 3, 1, 2, 3];
        assert_eq!(
            read_return_message(&mut &other[..]).unwrap(),
            ReturnMessage::Other { kind: 4 }
        );
    }
}

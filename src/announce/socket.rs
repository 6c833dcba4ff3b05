//! An AF_PACKET socket that puts whole Ethernet frames on one interface.
//!
//! The socket is bound to the interface with protocol 0, so the kernel queues nothing to it:
//! it only sends. Opening one needs CAP_NET_RAW in the interface's network namespace; the
//! namespace is the opening thread's.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::AnnounceError;

/// The longest interface name Linux takes (IFNAMSIZ less its NUL).
pub const MAX_INTERFACE_NAME: usize = 15;

/// A raw packet socket bound to one interface.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    interface: String,
    ifindex: libc::c_int,
}

/// Checks `name` the way Linux's `dev_valid_name` does, before it reaches a system call.
pub fn check_interface_name(name: &str) -> Result<(), AnnounceError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_INTERFACE_NAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b == b':' || b.is_ascii_whitespace());
    if valid {
        Ok(())
    } else {
        Err(AnnounceError::InterfaceName { name: name.to_string() })
    }
}

impl PacketSocket {
    /// Opens a packet socket on `interface`, in the calling thread's network namespace.
    pub fn open(interface: &str) -> Result<Self, AnnounceError> {
        check_interface_name(interface)?;
        let c_name = CString::new(interface).map_err(|_| AnnounceError::InterfaceName {
            name: interface.to_string(),
        })?;
        // SAFETY: `c_name` is a NUL-terminated string that outlives the call, which only reads it.
        let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        if index == 0 {
            return Err(AnnounceError::NoInterface {
                interface: interface.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let ifindex = libc::c_int::try_from(index).map_err(|_| AnnounceError::NoInterface {
            interface: interface.to_string(),
            source: io::Error::from(io::ErrorKind::InvalidData),
        })?;
        // SAFETY: plain socket(2) with constant arguments; it touches no memory of ours.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(AnnounceError::Socket {
                interface: interface.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a descriptor socket(2) just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let socket = Self {
            fd,
            interface: interface.to_string(),
            ifindex,
        };
        // Protocol 0: bound to the interface, yet the kernel hands this socket no frames.
        let addr = socket.address(0);
        // SAFETY: `addr` is a valid sockaddr_ll that lives across the call, and the length
        // passed is its size; the descriptor is open (owned by `socket`).
        let rc = unsafe {
            libc::bind(
                socket.fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                sockaddr_ll_len(),
            )
        };
        if rc < 0 {
            return Err(AnnounceError::Bind {
                interface: interface.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(socket)
    }

    /// The interface this socket sends on.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Sends one whole Ethernet frame (header included, FCS left to the interface).
    pub fn send(&self, frame: &[u8]) -> Result<(), AnnounceError> {
        let ethertype = match frame.get(12..14) {
            Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]),
            _ => {
                return Err(AnnounceError::ShortSend {
                    interface: self.interface.clone(),
                    sent: 0,
                    len: frame.len(),
                })
            }
        };
        let addr = self.address(ethertype);
        loop {
            // SAFETY: `frame` is valid for `frame.len()` bytes and `addr` is a valid
            // sockaddr_ll, both alive across the call, which only reads them; the length
            // passed is the address's size.
            let sent = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast::<libc::c_void>(),
                    frame.len(),
                    0,
                    std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
                    sockaddr_ll_len(),
                )
            };
            if sent < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(AnnounceError::Send {
                    interface: self.interface.clone(),
                    source: e,
                });
            }
            // A packet socket sends a frame whole or not at all; anything else is reported.
            return match usize::try_from(sent) {
                Ok(n) if n == frame.len() => Ok(()),
                _ => Err(AnnounceError::ShortSend {
                    interface: self.interface.clone(),
                    sent: usize::try_from(sent).unwrap_or(0),
                    len: frame.len(),
                }),
            };
        }
    }

    /// This interface's link-layer address for frames of `ethertype`.
    fn address(&self, ethertype: u16) -> libc::sockaddr_ll {
        libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as libc::c_ushort,
            sll_protocol: ethertype.to_be(),
            sll_ifindex: self.ifindex,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        }
    }
}

fn sockaddr_ll_len() -> libc::socklen_t {
    // The struct is 20 bytes: the cast cannot truncate.
    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_bad_interface_names_are_refused_before_any_system_call() {
        for bad in ["", ".", "..", "a/b", "a b", "eth0:1", "a\0b", "sixteen-chars-xx"] {
            assert!(
                matches!(PacketSocket::open(bad), Err(AnnounceError::InterfaceName { .. })),
                "{bad:?}"
            );
        }
        assert!(check_interface_name("fifteen-chars-x").is_ok());
    }

    #[test]
    fn test_a_missing_interface_is_named_in_the_error() {
        let err = PacketSocket::open("no-such-if0").expect_err("no such interface");
        assert!(matches!(err, AnnounceError::NoInterface { .. }), "{err:?}");
        assert!(err.to_string().contains("no-such-if0"), "{err}");
    }
}

//! The Ethernet frames that tell a network where a MAC address now lives.
//!
//! Two kinds, both broadcast, both with the VM's MAC as the Ethernet source, which is what a
//! learning switch or bridge remembers:
//!
//! * **RARP** "request reverse" (ethertype 0x8035, opcode 3), laid out as QEMU's
//!   `qemu_announce_self` sends it: the MAC is both the sender's and the target's hardware
//!   address, and both protocol addresses are 0.0.0.0.
//! * **Gratuitous ARP** (ethertype 0x0806, opcode 1, request), whose sender and target
//!   protocol addresses are equal. The engine does not know a guest's IP address (a NIC is only
//!   an id and a MAC), so it puts 0.0.0.0 in both: switches learn the port from the source MAC
//!   all the same, and no host rewrites an ARP cache entry for an address the VM may not own.
//!   A caller that knows the address passes it instead, and neighbours then update their caches
//!   too.
//!
//! Both are padded to 60 bytes, Ethernet's minimum frame without its checksum (which the
//! interface adds).

use std::net::Ipv4Addr;

use crate::format::MacAddr;
use crate::telemetry::metric::announce_kind;

/// Bytes of every announce frame: Ethernet's minimum frame, its FCS left to the hardware.
pub const FRAME_LEN: usize = 60;
/// Ethertype of RARP.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// ARP's hardware type for Ethernet.
const HTYPE_ETHERNET: u16 = 1;
/// ARP's protocol type for IPv4.
const PTYPE_IPV4: u16 = 0x0800;
/// ARP opcode: request.
const OP_REQUEST: u16 = 1;
/// RARP opcode: request reverse (RFC 903).
const OP_REQUEST_REVERSE: u16 = 3;
/// The Ethernet broadcast address.
const BROADCAST: [u8; 6] = [0xff; 6];

/// Which kind of announce frame; its name is the `kind` label of
/// [`crate::telemetry::metric::ANNOUNCE_FRAMES_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// RARP request reverse.
    Rarp,
    /// Gratuitous ARP.
    Garp,
}

impl FrameKind {
    /// Both kinds, in the order a round sends them.
    pub const ALL: [FrameKind; 2] = [FrameKind::Rarp, FrameKind::Garp];

    /// The metric label: `rarp` or `garp`.
    pub fn label(self) -> &'static str {
        match self {
            FrameKind::Rarp => announce_kind::RARP,
            FrameKind::Garp => announce_kind::GARP,
        }
    }

    /// The frame of this kind announcing `mac` (a gratuitous ARP for 0.0.0.0, see the module
    /// doc).
    pub fn frame(self, mac: MacAddr) -> [u8; FRAME_LEN] {
        match self {
            FrameKind::Rarp => rarp_frame(mac),
            FrameKind::Garp => garp_frame(mac, Ipv4Addr::UNSPECIFIED),
        }
    }

    /// The kind of a received frame from its ethertype (bytes 12 and 13) and opcode (bytes 20
    /// and 21), `None` for any other frame.
    pub fn of(frame: &[u8]) -> Option<FrameKind> {
        let be16 = |at: usize| frame.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        match (be16(12)?, be16(20)?) {
            (ETHERTYPE_RARP, OP_REQUEST_REVERSE) => Some(FrameKind::Rarp),
            (ETHERTYPE_ARP, OP_REQUEST) => Some(FrameKind::Garp),
            _ => None,
        }
    }
}

/// A RARP "request reverse" for `mac`, broadcast from `mac`.
pub fn rarp_frame(mac: MacAddr) -> [u8; FRAME_LEN] {
    let unspecified = Ipv4Addr::UNSPECIFIED.octets();
    arp_like(ETHERTYPE_RARP, OP_REQUEST_REVERSE, mac, unspecified, mac.0, unspecified)
}

/// A gratuitous ARP request broadcast from `mac`, claiming `ip` (sender and target protocol
/// address both `ip`; the target hardware address is zero, as in a request).
pub fn garp_frame(mac: MacAddr, ip: Ipv4Addr) -> [u8; FRAME_LEN] {
    arp_like(ETHERTYPE_ARP, OP_REQUEST, mac, ip.octets(), [0; 6], ip.octets())
}

/// Ethernet header (broadcast destination, `sender` source) and an ARP-shaped body for
/// Ethernet and IPv4, zero-padded to [`FRAME_LEN`].
fn arp_like(
    ethertype: u16,
    opcode: u16,
    sender: MacAddr,
    sender_ip: [u8; 4],
    target_hw: [u8; 6],
    target_ip: [u8; 4],
) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&sender.0);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    f[14..16].copy_from_slice(&HTYPE_ETHERNET.to_be_bytes());
    f[16..18].copy_from_slice(&PTYPE_IPV4.to_be_bytes());
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&opcode.to_be_bytes());
    f[22..28].copy_from_slice(&sender.0);
    f[28..32].copy_from_slice(&sender_ip);
    f[32..38].copy_from_slice(&target_hw);
    f[38..42].copy_from_slice(&target_ip);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    #[test]
    fn test_rarp_frame_is_byte_for_byte_a_request_reverse() {
        #[rustfmt::skip]
        let expected: [u8; FRAME_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,     // broadcast
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,     // from the VM's MAC
            0x80, 0x35,                             // RARP
            0x00, 0x01, 0x08, 0x00, 6, 4,           // Ethernet, IPv4, address lengths
            0x00, 0x03,                             // request reverse
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,     // sender hardware address
            0, 0, 0, 0,                             // sender protocol address
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,     // target hardware address
            0, 0, 0, 0,                             // target protocol address
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // padding to 60
        ];
        assert_eq!(rarp_frame(MAC), expected);
    }

    #[test]
    fn test_garp_frame_is_byte_for_byte_a_gratuitous_request() {
        #[rustfmt::skip]
        let expected: [u8; FRAME_LEN] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff,     // broadcast
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,     // from the VM's MAC
            0x08, 0x06,                             // ARP
            0x00, 0x01, 0x08, 0x00, 6, 4,           // Ethernet, IPv4, address lengths
            0x00, 0x01,                             // request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56,     // sender hardware address
            10, 1, 2, 3,                            // sender protocol address
            0, 0, 0, 0, 0, 0,                       // target hardware address
            10, 1, 2, 3,                            // target protocol address: the same
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // padding to 60
        ];
        assert_eq!(garp_frame(MAC, Ipv4Addr::new(10, 1, 2, 3)), expected);
    }

    #[test]
    fn test_without_a_known_address_the_garp_claims_0_0_0_0() {
        let f = FrameKind::Garp.frame(MAC);
        assert_eq!(f, garp_frame(MAC, Ipv4Addr::UNSPECIFIED));
        assert_eq!((&f[28..32], &f[38..42]), (&[0u8; 4][..], &[0u8; 4][..]));
    }

    #[test]
    fn test_kind_labels_are_the_ones_registered_at_zero() {
        assert_eq!(FrameKind::ALL.map(FrameKind::label), announce_kind::ALL);
    }

    #[test]
    fn test_a_frame_is_recognised_as_its_kind_and_nothing_else_is() {
        for kind in FrameKind::ALL {
            assert_eq!(FrameKind::of(&kind.frame(MAC)), Some(kind));
        }
        let mut ipv6 = rarp_frame(MAC);
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(FrameKind::of(&ipv6), None);
        let mut reply = garp_frame(MAC, Ipv4Addr::UNSPECIFIED);
        reply[21] = 2;
        assert_eq!(FrameKind::of(&reply), None);
        assert_eq!(FrameKind::of(&[0u8; 14]), None);
    }
}

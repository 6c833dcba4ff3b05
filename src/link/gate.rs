//! Admission of connections before they authenticate: an optional allow-list, a cap on
//! connections not yet authenticated in total and per remote address, and the descriptor
//! limit the process needs to hold them.
//!
//! A connection holds a [`Ticket`] from accept until it has proved the cluster key (or failed,
//! or timed out); beyond the caps it is closed at once. The per-address cap keeps one noisy
//! address from taking every slot; a crowd of addresses can still fill the total, which is why
//! the total is far below the descriptor limit and why a deployment should pass an allow-list.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Caps on connections that have not authenticated yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptLimits {
    /// In total.
    pub unauthenticated: usize,
    /// From one remote address.
    pub per_address: usize,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            unauthenticated: 256,
            per_address: 32,
        }
    }
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address is not on the allow-list.
    NotAllowed,
    /// Too many unauthenticated connections in total.
    Total,
    /// Too many unauthenticated connections from its address.
    PerAddress,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_addr: HashMap<IpAddr, usize>,
}

/// The admission state of one listener.
#[derive(Debug, Clone)]
pub struct Gate {
    limits: AcceptLimits,
    allowed: Option<Arc<[IpAddr]>>,
    counts: Arc<Mutex<Counts>>,
}

/// A slot held by one unauthenticated connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Ticket {
    addr: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_addr.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                c.by_addr.remove(&self.addr);
            }
        }
    }
}

/// An IPv4 peer may arrive as an IPv4-mapped IPv6 address on a dual-stack listener.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Gate {
    /// A gate with these caps and, if given, only these peers.
    pub fn new(limits: AcceptLimits, allowed: Option<Vec<IpAddr>>) -> Self {
        Self {
            limits,
            allowed: allowed.map(|a| a.into_iter().map(canonical).collect()),
            counts: Default::default(),
        }
    }

    /// A slot for a connection from `addr`, or why there is none.
    pub fn admit(&self, addr: IpAddr) -> Result<Ticket, Refusal> {
        let addr = canonical(addr);
        if let Some(allowed) = &self.allowed {
            if !allowed.contains(&addr) {
                return Err(Refusal::NotAllowed);
            }
        }
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.limits.unauthenticated {
            return Err(Refusal::Total);
        }
        let n = c.by_addr.entry(addr).or_insert(0);
        if *n >= self.limits.per_address {
            return Err(Refusal::PerAddress);
        }
        *n += 1;
        c.total += 1;
        Ok(Ticket {
            addr,
            counts: Arc::clone(&self.counts),
        })
    }

    /// Connections holding a slot now.
    pub fn unauthenticated(&self) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

/// Raises the soft limit on open descriptors (`RLIMIT_NOFILE`) to the hard limit, so that the
/// listener's caps, not the descriptor table, decide what is refused. Returns the limits
/// (soft, hard) after the call.
pub fn raise_nofile_limit() -> Result<(u64, u64), io::Error> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_caps_per_address_total_and_allow_list() {
        let gate = Gate::new(
            AcceptLimits {
                unauthenticated: 3,
                per_address: 2,
            },
            None,
        );
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
            "10.0.0.3".parse().expect("ip"),
        );
        let t1 = gate.admit(a).expect("first");
        let _t2 = gate.admit(a).expect("second");
        assert_eq!(gate.admit(a).err(), Some(Refusal::PerAddress));
        let _t3 = gate.admit(b).expect("other address");
        assert_eq!(gate.admit(c).err(), Some(Refusal::Total));
        drop(t1);
        assert_eq!(gate.unauthenticated(), 2);
        assert!(gate.admit(c).is_ok(), "a freed slot is reusable");

        let listed = Gate::new(AcceptLimits::default(), Some(vec![a]));
        assert_eq!(listed.admit(b).err(), Some(Refusal::NotAllowed));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert!(listed.admit(mapped).is_ok(), "IPv4-mapped address matches");
    }

    #[test]
    fn test_raise_nofile_limit_reaches_hard_limit() {
        let (soft, hard) = raise_nofile_limit().expect("rlimit");
        assert_eq!(soft, hard);
    }
}

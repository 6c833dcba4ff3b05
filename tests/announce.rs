//! Issue 17's announce frames, end to end, in network namespaces.
//!
//! Two namespaces joined by a veth pair: the engine runs in one (its thread was started from a
//! thread that entered it, and the threads it starts inherit it), and the target host sends on
//! its end of the veth (`HostConfig::announce_via`); a packet socket in the other namespace
//! captures what arrives, with the kernel's receive timestamps. The checks: each frame's source
//! MAC and kind, their count (rounds x NICs x 2), and the gaps between rounds (never shorter
//! than the schedule's, and late by no more than the machine's noise allows).
//!
//! Needs root (or CAP_NET_ADMIN and CAP_NET_RAW) and iproute2's `ip`; each test prints
//! `SKIPPED: <why>` and passes without them.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use migratory::announce::{AnnounceParams, FrameKind};
use migratory::engine::{EngineHandle, HostConfig, MigrationEvent, MigrationRequest, VmSpec};
use migratory::format::{MacAddr, NativeLayout};

/// The one bound on every wait for the engine.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How much later than its schedule a round may arrive: thread wake-up noise on a busy
/// machine. The test's schedule keeps every gap at least 100 ms from the ones a wrong schedule
/// would give, so this still tells them apart.
const LATE_TOLERANCE: Duration = Duration::from_millis(60);
/// How long the capture keeps listening after the last frame it expects, to see any extra.
const LINGER: Duration = Duration::from_millis(500);

/// Two namespaces and the veth pair between them; deleted on drop, even after a failed check
/// (deleting a namespace deletes its end of the pair, and with it the other end).
struct Netns {
    send_ns: String,
    capture_ns: String,
    send_if: String,
    capture_if: String,
}

impl Netns {
    /// Fresh names for this process and call, so tests running at once never meet.
    fn create() -> Result<Netns, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let n = Netns {
            send_ns: format!("mgr-ann-s{tag}"),
            capture_ns: format!("mgr-ann-c{tag}"),
            send_if: format!("mas{tag}"),
            capture_if: format!("mac{tag}"),
        };
        for ns in [&n.send_ns, &n.capture_ns] {
            ip(&["netns", "add", ns])?;
        }
        ip(&[
            "link",
            "add",
            &n.send_if,
            "netns",
            &n.send_ns,
            "type",
            "veth",
            "peer",
            "name",
            &n.capture_if,
            "netns",
            &n.capture_ns,
        ])?;
        ip(&["-n", &n.send_ns, "link", "set", &n.send_if, "up"])?;
        ip(&["-n", &n.capture_ns, "link", "set", &n.capture_if, "up"])?;
        Ok(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.send_ns, &self.capture_ns] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespaces, or why this machine cannot have them (the test is then skipped).
fn namespaces() -> Option<Netns> {
    if Command::new("ip").arg("-V").output().is_err() {
        println!("SKIPPED: iproute2's `ip` is not installed");
        return None;
    }
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: network namespaces need root");
        return None;
    }
    match Netns::create() {
        Ok(n) => Some(n),
        Err(e) => {
            println!("SKIPPED: cannot make network namespaces here: {e}");
            None
        }
    }
}

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) -> io::Result<()> {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
    // SAFETY: the descriptor is open for the call; setns changes only this thread's namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An engine whose threads live in network namespace `ns`.
fn engine_in(ns: &str) -> EngineHandle {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns).expect("enter the sending namespace");
        EngineHandle::start().expect("engine starts")
    })
    .join()
    .expect("engine thread")
}

/// One frame as captured.
#[derive(Debug)]
struct Captured {
    bytes: Vec<u8>,
    /// The kernel's receive time (CLOCK_REALTIME).
    at: Duration,
}

/// A packet socket receiving every frame that arrives on one interface.
struct Capture {
    fd: OwnedFd,
}

impl Capture {
    /// Opens it on `iface` in namespace `ns` (a socket stays in the namespace it was made in).
    fn open(ns: &str, iface: &str) -> Capture {
        let (ns, iface) = (ns.to_string(), iface.to_string());
        std::thread::spawn(move || {
            enter(&ns).expect("enter the capture namespace");
            Capture::open_here(&iface).expect("capture socket")
        })
        .join()
        .expect("capture thread")
    }

    fn open_here(iface: &str) -> io::Result<Capture> {
        let name = std::ffi::CString::new(iface).map_err(io::Error::other)?;
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(all)) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by socket(2) and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: all,
            sll_ifindex: index as i32,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        // SAFETY: `addr` is a valid sockaddr_ll alive across the call, with its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let on: libc::c_int = 1;
        let wait = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        for (opt, value, len) in [
            (
                libc::SO_TIMESTAMPNS,
                std::ptr::from_ref(&on).cast::<libc::c_void>(),
                std::mem::size_of_val(&on),
            ),
            (
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&wait).cast::<libc::c_void>(),
                std::mem::size_of_val(&wait),
            ),
        ] {
            // SAFETY: `value` points at `len` readable bytes alive across the call.
            let rc = unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, opt, value, len as libc::socklen_t) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Capture { fd })
    }

    /// The next frame that arrived (not one this end sent), or `None` after 100 ms of quiet.
    fn recv(&self) -> Option<Captured> {
        let mut buf = [0u8; 2048];
        let mut control = [0u64; 16];
        // SAFETY: an all-zero sockaddr_ll is a valid value of this plain C struct.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid value of this plain C struct; its pointers are
        // set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = std::ptr::from_mut(&mut from).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        loop {
            // SAFETY: every buffer `msg` points at is alive and as long as it says.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return None,
                    _ => panic!("capture: {e}"),
                }
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                msg.msg_controllen = std::mem::size_of_val(&control);
                continue;
            }
            let mut at = None;
            // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk its control buffer
            // within `msg_controllen`, and the timestamp is read unaligned from a header of
            // its type.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                        let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                        at = Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            let at = at.expect("the kernel timestamps every frame (SO_TIMESTAMPNS)");
            return Some(Captured {
                bytes: buf[..n as usize].to_vec(),
                at,
            });
        }
    }

    /// Announce frames that arrive until `expected` have come and `LINGER` has passed quietly
    /// after them, or until `until`.
    fn announce_frames(&self, expected: usize, until: Instant) -> Vec<Captured> {
        let mut got = Vec::new();
        let mut quiet_until = None;
        while Instant::now() < quiet_until.unwrap_or(until) {
            if let Some(f) = self.recv() {
                if FrameKind::of(&f.bytes).is_some() {
                    got.push(f);
                    if got.len() == expected {
                        quiet_until = Some(Instant::now() + LINGER);
                    }
                }
            }
        }
        got
    }
}

/// An engine in `net.send_ns` with a source host and a target host (announcing on the veth
/// when `announce`), a 2-NIC VM on the source, and its migration to the target with
/// `params`. Returns the `NetworkAnnounced` events.
async fn migrate_two_nic_vm(net: &Netns, announce: bool, params: AnnounceParams) -> Vec<(String, Option<String>, u64)> {
    let engine = engine_in(&net.send_ns);
    engine
        .add_host(HostConfig::new("source", NativeLayout::XenHvm))
        .await
        .expect("source host");
    let target = HostConfig {
        announce_via: announce.then(|| net.send_if.clone()),
        ..HostConfig::new("target", NativeLayout::Kvm)
    };
    engine.add_host(target).await.expect("target host");
    let vm = VmSpec {
        nics: 2,
        ..VmSpec::new("vm", 8 << 20)
    };
    engine.create_vm("source", vm).await.expect("vm");
    let mut req = MigrationRequest::new("vm", "source", "target");
    req.announce = params;
    let mut started = engine.start_migration(req).await.expect("started");
    let mut announced = Vec::new();
    let mut finished = false;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    // The target announces after `Activated`, so its events may follow `Finished`.
    while !finished || announced.len() < 2 {
        let ev = tokio::time::timeout_at(deadline, started.events.recv())
            .await
            .expect("events in time")
            .expect("event stream open");
        match ev {
            MigrationEvent::NetworkAnnounced { mac, via, frames, .. } => announced.push((mac, via, frames)),
            MigrationEvent::Finished(report) => {
                assert!(report.result.succeeded(), "{:?}", report.error);
                finished = true;
            }
            _ => {}
        }
    }
    announced
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_an_activated_vm_is_announced_on_the_veth_in_rounds() {
    let Some(net) = namespaces() else { return };
    let capture = Capture::open(&net.capture_ns, &net.capture_if);
    // Gaps of 100, 250 and 300 ms (250 + 150 capped at max): each at least 100 ms from what
    // a schedule without the step or without the cap would give.
    let params = AnnounceParams {
        initial_ms: 100,
        max_ms: 300,
        rounds: 4,
        step_ms: 150,
    };
    let expected = params.frame_count(2) as usize;
    let capturing = std::thread::spawn(move || capture.announce_frames(expected, Instant::now() + TIMEOUT));

    let announced = migrate_two_nic_vm(&net, true, params).await;
    let frames = capturing.join().expect("capture thread");

    for (_, via, count) in &announced {
        assert_eq!(via.as_deref(), Some(net.send_if.as_str()));
        assert_eq!(*count, u64::from(params.rounds) * 2);
    }
    let macs: Vec<MacAddr> = announced
        .iter()
        .map(|(mac, ..)| MacAddr::from_str(mac).expect("a MAC"))
        .collect();
    assert_eq!(macs.iter().collect::<BTreeSet<_>>().len(), 2, "two NICs, two MACs");
    assert_eq!(frames.len(), expected, "rounds x NICs x 2 frames, no more");

    // Each round: a RARP then a gratuitous ARP per NIC, broadcast from the NIC's MAC.
    let per_round = macs.len() * 2;
    let mut seen = BTreeSet::new();
    for (i, f) in frames.iter().enumerate() {
        let kind = FrameKind::of(&f.bytes).expect("an announce frame");
        let source = MacAddr(f.bytes[6..12].try_into().expect("six bytes"));
        assert_eq!(&f.bytes[0..6], &[0xff; 6], "frame {i}: broadcast");
        assert_eq!(&f.bytes[22..28], &source.0, "frame {i}: sender hardware address");
        assert!(macs.contains(&source), "frame {i} from {source}, not a NIC of the VM");
        let slot = i % per_round;
        assert_eq!(kind, FrameKind::ALL[slot % 2], "frame {i}");
        if kind == FrameKind::Garp {
            assert_eq!(
                &f.bytes[28..32],
                &f.bytes[38..42],
                "frame {i}: sender and target IP equal"
            );
        }
        seen.insert((source.0, kind.label()));
    }
    assert_eq!(seen.len(), per_round, "both kinds for both MACs");

    // Spacing: round r's first frame follows round r-1's by the schedule's gap.
    let starts: Vec<Duration> = frames.chunks(per_round).map(|round| round[0].at).collect();
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
    let want: Vec<Duration> = params.delays().skip(1).collect();
    println!("round gaps: measured {gaps:?}, schedule {want:?}");
    for (r, (got, want)) in gaps.iter().zip(&want).enumerate() {
        assert!(
            *got + Duration::from_millis(1) >= *want && *got <= *want + LATE_TOLERANCE,
            "gap before round {}: {got:?}, schedule {want:?}",
            r + 1
        );
    }
    for (r, round) in frames.chunks(per_round).enumerate() {
        let spread = round[per_round - 1].at.saturating_sub(round[0].at);
        assert!(spread < LATE_TOLERANCE, "round {r} spread over {spread:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_host_without_an_interface_sends_nothing_and_still_publishes_the_event() {
    let Some(net) = namespaces() else { return };
    let capture = Capture::open(&net.capture_ns, &net.capture_if);
    let params = AnnounceParams::default();
    let announced = migrate_two_nic_vm(&net, false, params).await;
    assert_eq!(announced.len(), 2, "one event per NIC");
    for (_, via, frames) in &announced {
        assert_eq!((via, *frames), (&None, 0));
    }
    // Listen past the end of the default schedule (800 ms) for any frame at all.
    let window = params.send_offsets().last().copied().unwrap_or_default() + LINGER;
    let frames = capture.announce_frames(1, Instant::now() + window);
    assert!(frames.is_empty(), "{} announce frames arrived", frames.len());
}

#[test]
fn test_serve_refuses_to_start_without_its_announce_interface() {
    let dir = std::env::temp_dir().join(format!("migratory-announce-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_migratory"))
        .args([
            "serve",
            "--insecure-no-auth",
            "--listen",
            "127.0.0.1:0",
            "--announce-via",
            "no-such-if0",
        ])
        .arg("--api")
        .arg(format!("unix:{}", dir.join("api.sock").display()))
        .output()
        .expect("runs");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(stderr.contains("--announce-via: no interface no-such-if0"), "{stderr}");
}

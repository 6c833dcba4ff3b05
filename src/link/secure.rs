//! Transport authentication of TCP links: the cluster-key handshake on the control
//! connection, the session proof of each data connection, and the MAC on every frame after.
//!
//! The engine's own `Hello`/`Welcome`/`Authenticate` proofs (see [`crate::protocol::auth`])
//! run inside a link; this module makes sure that nothing of a peer that cannot prove the key
//! reaches the engine at all, and that nobody on the path can change, drop, replay or reorder
//! a frame once the link is up.
//!
//! ```text
//! client (connects)                                   server (accepts)
//!   preamble(link, role 0, streams) ‖ mode_c ‖ n_c ──▶  reads exactly 19 + 33 bytes
//!                 ◀── mode_s ‖ n_s ‖ proof_s = HMAC(K, "server" ‖ link ‖ n_c ‖ n_s ‖ binding)
//!   checks proof_s
//!   proof_c = HMAC(K, "client" ‖ link ‖ n_s ‖ n_c ‖ binding)  ──▶  checks proof_c
//!                 ◀── ACCEPTED (1 byte)                 link registered as authenticated
//!   for role r in 1..=streams, a new connection:
//!   preamble(link, role r, streams) ‖ HMAC(k_c2s, "data" ‖ link ‖ r ‖ binding_r) ──▶
//!                                                       joins the link only if it verifies
//! then every control frame, each direction:   frame ‖ GMAC(k_dir, nonce = 0 ‖ seq, frame)
//! and every page frame on data connection c:  len ‖ AES-GCM(k_dir, nonce = c ‖ seq, aad = len, body) ‖ tag
//! ```
//! `K` is the cluster key, `n_c`/`n_s` fresh 32-byte nonces, and `k_c2s`/`k_s2c` =
//! `HMAC(K, "c2s"/"s2c" ‖ link ‖ n_c ‖ n_s ‖ binding)` the session keys, one per direction.
//! Each proof covers the other side's fresh nonce (no replay), and the labels keep a proof from
//! being reflected. `seq` is implicit: it counts frames per connection and direction from 0, so
//! a frame replayed, dropped or moved fails the next MAC and closes the link
//! ([`super::LinkError::Tampered`]).
//!
//! Frames are sealed with AES-256-GCM (`ring`, already linked for rustls). Control frames are
//! small and only authenticated (GMAC: the frame as associated data). Page frames are
//! encrypted as well, because that is the fast path: on this project's machines ring seals
//! 1 MiB of data at about 7.4 GB/s but authenticates associated data alone at 1.7 GB/s, and
//! HMAC-SHA256 (the first version) at 1.4 GB/s, which cost half of a stream's throughput. Page
//! contents are private on the wire as a side effect. The 96-bit nonce is the connection and
//! the sequence number: unique under each session key, which lives for one link only.
//!
//! Under TLS the same handshake runs inside the TLS stream, with `binding` the TLS exporter
//! of that connection (RFC 5705/8446 keying material), so a proof cannot be lifted into another
//! TLS session. Frames then carry no MAC of their own: TLS already authenticates every record
//! with its AEAD, in order, and a second MAC would only cost throughput. Without TLS `binding`
//! is empty.
//!
//! Without a key both sides send mode 0 and zero nonces and proofs; a keyed side refuses a
//! keyless peer (no silent downgrade), with an error that says which side lacks the key. The
//! bounds before authentication hold either way: fixed-size messages only, 5 s from accept,
//! capped accepts (see [`super::tcp::serve`]).

use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM};

use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::LinkError;
use crate::protocol::auth::{self, keyed, AuthError, ClusterKey, NONCE_LEN};

/// Bytes of the MAC that follows each frame (HMAC-SHA256 truncated; 128 bits are plenty for
/// a tag an attacker must forge online, one try per link).
pub const TAG_LEN: usize = 16;
/// Bytes of a proof (a full HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// Bytes the client sends after its control preamble: mode, nonce.
pub const CLIENT_HELLO_LEN: usize = 1 + NONCE_LEN;
/// Bytes of the server's answer: mode, nonce, proof.
pub const SERVER_HELLO_LEN: usize = 1 + NONCE_LEN + PROOF_LEN;

const MODE_OPEN: u8 = 0;
const MODE_KEYED: u8 = 1;
const ACCEPTED: u8 = 0xA5;

const SERVER_PROOF: &[u8] = b"migratory-link-server-v1";
const CLIENT_PROOF: &[u8] = b"migratory-link-client-v1";
const C2S: &[u8] = b"migratory-link-c2s-v1";
const S2C: &[u8] = b"migratory-link-s2c-v1";
const DATA_PROOF: &[u8] = b"migratory-link-data-v1";
/// Label of the TLS exporter used as channel binding.
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-migratory-link-v1";

/// Frames refused for a bad MAC since the process started (also the
/// `migratory_link_frames_rejected_total` counter).
static REJECTED_FRAMES: AtomicU64 = AtomicU64::new(0);

/// Frames this process refused because their MAC did not verify.
pub fn rejected_frames() -> u64 {
    REJECTED_FRAMES.load(Ordering::Relaxed)
}

/// Errors of the link handshake.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The socket failed or closed mid-handshake.
    #[error("handshake: {0}")]
    Io(#[from] std::io::Error),
    /// The peer requires a cluster key and this side has none.
    #[error("authentication failed: the peer requires a cluster key and none is configured here")]
    KeyRequired,
    /// This side has a key and the peer offers no authentication.
    #[error("authentication failed: the peer has no cluster key; refusing an unauthenticated link")]
    PeerUnauthenticated,
    /// An unknown mode byte.
    #[error("bad handshake mode {0:#04x}")]
    BadMode(u8),
    /// A proof that does not match: another key, or someone in between.
    #[error("authentication failed: the {side}'s proof does not match the cluster key")]
    BadProof {
        /// Whose proof: "server", "client" or "data connection".
        side: &'static str,
    },
    /// The server did not confirm.
    #[error("authentication failed: the server refused our proof")]
    Refused,
    /// No randomness.
    #[error(transparent)]
    Random(#[from] AuthError),
}

/// What a control handshake establishes: the keys of both directions (if keyed).
#[derive(Clone)]
pub struct Session {
    link_id: u64,
    /// (client to server, server to client); `None` without a key.
    keys: Option<([u8; 32], [u8; 32])>,
    /// Frames need their own MAC (keyed, and not under TLS).
    mac_frames: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("link_id", &self.link_id)
            .field("keyed", &self.keys.is_some())
            .field("mac_frames", &self.mac_frames)
            .finish()
    }
}

/// Which end of a link: the side that connected or the side that accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Connected (the migration's source, or a recovery link's opener).
    Client,
    /// Accepted.
    Server,
}

fn hmac32(m: Hmac<Sha256>) -> [u8; 32] {
    m.finalize().into_bytes().into()
}

fn labelled(key: &ClusterKey, label: &[u8], link_id: u64, first: &[u8], second: &[u8], binding: &[u8]) -> Hmac<Sha256> {
    let mut m = key.hmac();
    m.update(label);
    m.update(&link_id.to_be_bytes());
    m.update(first);
    m.update(second);
    m.update(&(binding.len() as u32).to_be_bytes());
    m.update(binding);
    m
}

impl Session {
    fn new(key: Option<&ClusterKey>, link_id: u64, n_c: &[u8], n_s: &[u8], binding: &[u8], tls: bool) -> Self {
        let keys = key.map(|k| {
            (
                hmac32(labelled(k, C2S, link_id, n_c, n_s, binding)),
                hmac32(labelled(k, S2C, link_id, n_c, n_s, binding)),
            )
        });
        Self {
            link_id,
            mac_frames: keys.is_some() && !tls,
            keys,
        }
    }

    /// True if the link was authenticated with a cluster key.
    pub fn is_keyed(&self) -> bool {
        self.keys.is_some()
    }

    fn data_proof(&self, role: u8, binding: &[u8]) -> [u8; PROOF_LEN] {
        match &self.keys {
            Some((c2s, _)) => {
                let mut m = keyed(c2s);
                m.update(DATA_PROOF);
                m.update(&self.link_id.to_be_bytes());
                m.update(&[role]);
                m.update(binding);
                hmac32(m)
            }
            None => [0; PROOF_LEN],
        }
    }

    /// The proof a client sends on data connection `role` (zeros without a key).
    pub fn prove_data(&self, role: u8, binding: &[u8]) -> [u8; PROOF_LEN] {
        self.data_proof(role, binding)
    }

    /// Checks a data connection's proof in constant time.
    pub fn verify_data(&self, role: u8, binding: &[u8], proof: &[u8; PROOF_LEN]) -> Result<(), SecureError> {
        let Some((c2s, _)) = &self.keys else { return Ok(()) };
        let mut m = keyed(c2s);
        m.update(DATA_PROOF);
        m.update(&self.link_id.to_be_bytes());
        m.update(&[role]);
        m.update(binding);
        m.verify_slice(proof).map_err(|_| SecureError::BadProof {
            side: "data connection",
        })
    }

    /// The sealer for frames `side` writes on connection `conn` (0 control, 1.. data), and the
    /// opener for frames it reads there; `None` when frames carry no MAC.
    pub fn frame_macs(&self, side: Side, conn: u8) -> Option<(FrameMac, FrameMac)> {
        if !self.mac_frames {
            return None;
        }
        let (c2s, s2c) = self.keys.as_ref()?;
        let (out, inn) = match side {
            Side::Client => (c2s, s2c),
            Side::Server => (s2c, c2s),
        };
        Some((FrameMac::new(out, conn), FrameMac::new(inn, conn)))
    }
}

/// The MAC of one direction of one connection: a GMAC key and the next sequence number.
pub struct FrameMac {
    key: LessSafeKey,
    /// The key's bytes, for a clone (ring's key schedule is not `Clone`).
    raw: [u8; 32],
    conn: u8,
    seq: u64,
}

impl Clone for FrameMac {
    fn clone(&self) -> Self {
        Self {
            seq: self.seq,
            ..Self::new(&self.raw, self.conn)
        }
    }
}

impl std::fmt::Debug for FrameMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrameMac(conn {}, seq {})", self.conn, self.seq)
    }
}

impl FrameMac {
    fn new(key: &[u8; 32], conn: u8) -> Self {
        // A 32-byte key is exactly what AES-256 takes; `new` fails only on a wrong length.
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is an AES-256 key");
        Self {
            key: LessSafeKey::new(unbound),
            raw: *key,
            conn,
            seq: 0,
        }
    }

    /// The nonce of the next frame in this direction, advancing the sequence number.
    fn nonce(&mut self) -> Nonce {
        let mut nonce = [0u8; NONCE_LEN_GCM];
        nonce[0] = self.conn;
        nonce[4..].copy_from_slice(&self.seq.to_be_bytes());
        self.seq += 1;
        Nonce::assume_unique_for_key(nonce)
    }

    /// The tag of the next frame in this direction, advancing the sequence number.
    fn next(&mut self, frame: &[u8]) -> Tag {
        let nonce = self.nonce();
        self.key
            .seal_in_place_separate_tag(nonce, Aad::from(frame), &mut [])
            // Sealing nothing fails only past GCM's length limit (64 GiB of data), far above
            // any frame this crate builds.
            .expect("GMAC of a frame within GCM's limits")
    }

    /// Seals the next page frame: `body` is encrypted in place and `header` (the length
    /// prefix) is authenticated with it. Encrypting is the fast path here: ring's AES-GCM runs
    /// its stitched AES and GHASH code over data it encrypts (about 7 GB/s on this project's
    /// machines) but hashes associated data alone at about 1.7 GB/s, barely ahead of HMAC.
    pub fn seal_data(&mut self, header: &[u8], body: &mut [u8]) -> [u8; TAG_LEN] {
        let nonce = self.nonce();
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .expect("a page frame is within GCM's limits");
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Opens the next page frame in place: `body` is decrypted if, and only if, `header`,
    /// `body` and `tag` are exactly what the peer sealed at this position.
    pub fn open_data(&mut self, header: &[u8], body: &mut [u8], tag: &[u8]) -> Result<(), LinkError> {
        let (conn, seq) = (self.conn, self.seq);
        let nonce = self.nonce();
        let opened = <[u8; TAG_LEN]>::try_from(tag).ok().and_then(|t| {
            self.key
                .open_in_place_separate_tag(nonce, Aad::from(header), Tag::from(t), body, 0..)
                .ok()
        });
        if opened.is_some() {
            return Ok(());
        }
        REJECTED_FRAMES.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::metric::LINK_FRAMES_REJECTED_TOTAL).increment(1);
        Err(LinkError::Tampered { conn, seq })
    }

    /// The tag of the next frame sent.
    pub fn seal(&mut self, frame: &[u8]) -> [u8; TAG_LEN] {
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(self.next(frame).as_ref());
        tag
    }

    /// Checks the tag of the next frame received; a mismatch is counted and typed.
    pub fn open(&mut self, frame: &[u8], tag: &[u8]) -> Result<(), LinkError> {
        let (conn, seq) = (self.conn, self.seq);
        let expected = self.next(frame);
        if tag.len() == TAG_LEN && constant_time_eq(expected.as_ref(), tag) {
            return Ok(());
        }
        REJECTED_FRAMES.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::metric::LINK_FRAMES_REJECTED_TOTAL).increment(1);
        Err(LinkError::Tampered { conn, seq })
    }
}

/// Compares two tags without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// GCM's nonce: 96 bits.
const NONCE_LEN_GCM: usize = 12;

fn fresh_nonce(key: Option<&ClusterKey>) -> Result<Vec<u8>, SecureError> {
    Ok(match key {
        Some(_) => auth::nonce()?,
        None => vec![0; NONCE_LEN],
    })
}

/// The client's half of the control handshake; `preamble` goes out in the same write as the
/// client's hello. `binding` is the TLS exporter of this connection, empty on plain TCP.
pub async fn client_handshake<S>(
    s: &mut S,
    preamble: &[u8],
    link_id: u64,
    key: Option<&ClusterKey>,
    binding: &[u8],
    tls: bool,
) -> Result<Session, SecureError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let n_c = fresh_nonce(key)?;
    let mut hello = Vec::with_capacity(preamble.len() + CLIENT_HELLO_LEN);
    hello.extend_from_slice(preamble);
    hello.push(if key.is_some() { MODE_KEYED } else { MODE_OPEN });
    hello.extend_from_slice(&n_c);
    s.write_all(&hello).await?;
    s.flush().await?;
    let mut answer = [0u8; SERVER_HELLO_LEN];
    s.read_exact(&mut answer).await?;
    let (mode, n_s, proof_s) = (answer[0], &answer[1..1 + NONCE_LEN], &answer[1 + NONCE_LEN..]);
    match (mode, key) {
        (MODE_OPEN, None) => return Ok(Session::new(None, link_id, &n_c, n_s, binding, tls)),
        (MODE_OPEN, Some(_)) => return Err(SecureError::PeerUnauthenticated),
        (MODE_KEYED, None) => return Err(SecureError::KeyRequired),
        (MODE_KEYED, Some(_)) => {}
        (m, _) => return Err(SecureError::BadMode(m)),
    }
    let Some(key) = key else {
        return Err(SecureError::KeyRequired);
    };
    labelled(key, SERVER_PROOF, link_id, &n_c, n_s, binding)
        .verify_slice(proof_s)
        .map_err(|_| SecureError::BadProof { side: "server" })?;
    let proof_c = hmac32(labelled(key, CLIENT_PROOF, link_id, n_s, &n_c, binding));
    s.write_all(&proof_c).await?;
    s.flush().await?;
    let mut ok = [0u8; 1];
    match s.read_exact(&mut ok).await {
        Ok(_) if ok[0] == ACCEPTED => Ok(Session::new(Some(key), link_id, &n_c, n_s, binding, tls)),
        Ok(_) => Err(SecureError::Refused),
        // The server closes on a bad proof.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(SecureError::Refused),
        Err(e) => Err(e.into()),
    }
}

/// A server's handshake in progress: the client proved the key (or neither side has one);
/// [`ServerHandshake::confirm`] tells the client, once the link is registered so that its data
/// connections find it (they are opened only after the client hears it).
#[derive(Debug)]
pub struct ServerHandshake {
    /// The session.
    pub session: Session,
    /// What tells the client to go on: the confirmation, or without a key the whole answer.
    confirmation: Vec<u8>,
}

impl ServerHandshake {
    /// Tells the client it may open its data connections.
    pub async fn confirm<S: AsyncWrite + Unpin>(&self, s: &mut S) -> Result<(), SecureError> {
        s.write_all(&self.confirmation).await?;
        s.flush().await?;
        Ok(())
    }
}

/// The server's half of the control handshake, after the preamble: reads the client's hello,
/// answers, checks the client's proof. Every read is of a fixed, small size.
pub async fn server_handshake<S>(
    s: &mut S,
    link_id: u64,
    key: Option<&ClusterKey>,
    binding: &[u8],
    tls: bool,
) -> Result<ServerHandshake, SecureError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = [0u8; CLIENT_HELLO_LEN];
    s.read_exact(&mut hello).await?;
    let (mode, n_c) = (hello[0], &hello[1..]);
    let n_s = fresh_nonce(key)?;
    let mut answer = Vec::with_capacity(SERVER_HELLO_LEN);
    answer.push(if key.is_some() { MODE_KEYED } else { MODE_OPEN });
    answer.extend_from_slice(&n_s);
    match (mode, key) {
        (MODE_OPEN, None) => {
            // The answer is all the client waits for: it goes out with `confirm`.
            answer.extend_from_slice(&[0; PROOF_LEN]);
            return Ok(ServerHandshake {
                session: Session::new(None, link_id, n_c, &n_s, binding, tls),
                confirmation: answer,
            });
        }
        (MODE_KEYED, None) | (MODE_OPEN, Some(_)) => {
            // Say which mode this side speaks, so that the client's error is clear; then hang up.
            answer.extend_from_slice(&[0; PROOF_LEN]);
            let _ = s.write_all(&answer).await;
            let _ = s.flush().await;
            return Err(if key.is_some() {
                SecureError::PeerUnauthenticated
            } else {
                SecureError::KeyRequired
            });
        }
        (MODE_KEYED, Some(_)) => {}
        (m, _) => return Err(SecureError::BadMode(m)),
    }
    let Some(key) = key else {
        return Err(SecureError::KeyRequired);
    };
    answer.extend_from_slice(&hmac32(labelled(key, SERVER_PROOF, link_id, n_c, &n_s, binding)));
    s.write_all(&answer).await?;
    s.flush().await?;
    let mut proof_c = [0u8; PROOF_LEN];
    s.read_exact(&mut proof_c).await?;
    labelled(key, CLIENT_PROOF, link_id, &n_s, n_c, binding)
        .verify_slice(&proof_c)
        .map_err(|_| SecureError::BadProof { side: "client" })?;
    Ok(ServerHandshake {
        session: Session::new(Some(key), link_id, n_c, &n_s, binding, tls),
        confirmation: vec![ACCEPTED],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::new(&[b; 32]).expect("key")
    }

    async fn run(
        client_key: Option<ClusterKey>,
        server_key: Option<ClusterKey>,
    ) -> (Result<Session, SecureError>, Result<ServerHandshake, SecureError>) {
        let (mut c, mut s) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let mut pre = [0u8; 4];
            s.read_exact(&mut pre).await?;
            let h = server_handshake(&mut s, 9, server_key.as_ref(), b"", false).await?;
            h.confirm(&mut s).await?;
            Ok::<_, SecureError>(h)
        });
        let client = client_handshake(&mut c, b"PREA", 9, client_key.as_ref(), b"", false).await;
        // A client that gave up hangs up, as its socket would.
        drop(c);
        (client, server.await.expect("server task"))
    }

    #[tokio::test]
    async fn test_same_key_agrees_on_session_keys() {
        let (c, s) = run(Some(key(1)), Some(key(1))).await;
        let (c, s) = (c.expect("client"), s.expect("server").session);
        let (mut c_out, mut c_in) = c.frame_macs(Side::Client, 0).expect("macs");
        let (mut s_out, mut s_in) = s.frame_macs(Side::Server, 0).expect("macs");
        let tag = c_out.seal(b"frame one");
        assert_eq!(s_in.open(b"frame one", &tag), Ok(()));
        let tag = s_out.seal(b"answer");
        assert_eq!(c_in.open(b"answer", &tag), Ok(()));
        assert!(s.verify_data(2, b"", &c.prove_data(2, b"")).is_ok());
        assert!(s.verify_data(3, b"", &c.prove_data(2, b"")).is_err(), "role is bound");
    }

    #[tokio::test]
    async fn test_wrong_or_missing_key_refused() {
        let (c, s) = run(Some(key(1)), Some(key(2))).await;
        assert!(matches!(c, Err(SecureError::BadProof { side: "server" })), "{c:?}");
        assert!(s.is_err());
        let (c, s) = run(None, Some(key(2))).await;
        assert!(matches!(c, Err(SecureError::KeyRequired)), "{c:?}");
        assert!(s.is_err());
        let (c, _) = run(Some(key(1)), None).await;
        assert!(matches!(c, Err(SecureError::PeerUnauthenticated)), "{c:?}");
        let (c, s) = run(None, None).await;
        assert!(c.is_ok() && s.is_ok());
        assert!(c.expect("open").frame_macs(Side::Client, 0).is_none());
    }

    #[test]
    fn test_page_frames_are_encrypted_and_refused_when_changed_or_moved() {
        let s = Session::new(Some(&key(5)), 7, &[3; 32], &[4; 32], b"", false);
        let (mut out, _) = s.frame_macs(Side::Client, 1).expect("macs");
        let (_, mut inn) = s.frame_macs(Side::Server, 1).expect("macs");
        let plain = vec![0xAB; 4096];
        let header = [0, 0, 16, 0];
        let mut first = plain.clone();
        let t0 = out.seal_data(&header, &mut first);
        assert_ne!(first, plain, "the body travels encrypted");
        let mut second = plain.clone();
        let t1 = out.seal_data(&header, &mut second);
        assert_ne!(first, second, "each frame has its own nonce");
        // A flipped bit, a changed length, or the frames swapped: refused.
        let mut probe = inn.clone();
        let mut flipped = first.clone();
        flipped[100] ^= 1;
        assert!(probe.open_data(&header, &mut flipped, &t0).is_err());
        let mut probe = inn.clone();
        assert!(probe.open_data(&[0, 0, 16, 1], &mut first.clone(), &t0).is_err());
        let mut probe = inn.clone();
        assert!(probe.open_data(&header, &mut second.clone(), &t1).is_err(), "reordered");
        // In order and intact: the bytes come back.
        assert_eq!(inn.open_data(&header, &mut first, &t0), Ok(()));
        assert_eq!(first, plain);
        assert_eq!(inn.open_data(&header, &mut second, &t1), Ok(()));
        assert_eq!(second, plain);
    }

    #[test]
    fn test_frame_mac_refuses_flip_replay_and_reorder() {
        let s = Session::new(Some(&key(4)), 1, &[1; 32], &[2; 32], b"", false);
        let (mut out, _) = s.frame_macs(Side::Client, 1).expect("macs");
        let (_, mut inn) = s.frame_macs(Side::Server, 1).expect("macs");
        let (t0, t1, t2) = (out.seal(b"a"), out.seal(b"b"), out.seal(b"c"));
        assert_eq!(inn.open(b"a", &t0), Ok(()));
        // Replaying frame 0 at position 1 fails, and so does a bit flip.
        let mut probe = inn.clone();
        assert_eq!(probe.open(b"a", &t0), Err(LinkError::Tampered { conn: 1, seq: 1 }));
        let mut probe = inn.clone();
        assert!(probe.open(b"B", &t1).is_err());
        let mut probe = inn.clone();
        assert!(probe.open(b"c", &t2).is_err(), "reordered");
        assert_eq!(inn.open(b"b", &t1), Ok(()));
        // Another connection's key schedule is separate.
        let (_, mut other) = s.frame_macs(Side::Server, 2).expect("macs");
        assert!(other.open(b"a", &t0).is_err());
        assert!(rejected_frames() >= 4);
        // Under TLS frames carry no MAC.
        assert!(Session::new(Some(&key(4)), 1, &[1; 32], &[2; 32], b"x", true)
            .frame_macs(Side::Client, 0)
            .is_none());
    }
}

//! Constant-size onion for mix circuit setup (Sphinx/HORNET style).
//!
//! The client builds one [`SetupPacket`] per circuit. Each hop on the route
//! peels one layer with [`peel_setup`]: it learns its next hop (or that it is
//! the last one), an opaque per-hop payload (the node puts a slot assignment
//! and segment keys there) and [`HopSecrets`] it shares with the client. It
//! learns nothing about the other hops, not even how long the route is.
//!
//! # Construction
//!
//! A packet is always [`MAX_HOPS`] slots of [`SLOT_BYTES`] each
//! ([`SETUP_PACKET_BYTES`] in all), whatever the route length. The slot a hop
//! reads is slot 0:
//!
//! ```text
//! slot = ephemeral x25519 public key (32) | ChaCha20-Poly1305(routing info) (708) | tag (16)
//! routing info = kind (1) | next hop length (1) | payload length (u16 LE)
//!              | next hop, zero padded to 64 | payload, zero padded to 640
//! ```
//!
//! Every hop has its own ephemeral key, so peeling costs one x25519
//! agreement. From the shared secret `ss` the hop derives
//! `prk = HKDF-SHA256-Extract(salt = "mixnn/onion/v1", ss || ephemeral key)` and
//! from `prk`, with HKDF-Expand under distinct labels, the AEAD key, a
//! ChaCha20 stream key, the replay tag and any key the caller asks
//! [`HopSecrets::key`] for. All keys are single use, so the AEAD and the
//! stream use the all-zero nonce.
//!
//! Improvement over a per-slot MAC: the AEAD's associated data is the *rest
//! of the packet* (slots 1..), as in Sphinx, so a bit flipped anywhere in the
//! packet is caught by the very next honest hop, not only by the hop whose
//! slot it hit. (This is what makes tagging attacks between colluding hops
//! fail early.)
//!
//! After opening its slot the hop forms the next packet as
//! `(slots 1.. || one zero slot) XOR ChaCha20(stream key)`, so every byte
//! changes at every hop and two non-adjacent hops cannot match a packet by
//! its bytes. The builder works backwards from the last hop: it computes the
//! "filler" (what the zero slots appended by hops `0..i` become after their
//! keystreams), puts it at the tail of the last hop's packet, fills the unused
//! middle slots with random bytes, seals each hop's slot over the rest of its
//! packet, and undoes one keystream per step back.
//!
//! Replays: the replay tag is derived from the shared secret; [`peel_setup`]
//! asks the [`ReplayCache`] *after* the AEAD has verified (so forged packets
//! cannot poison the cache) and refuses a tag it has seen with
//! [`OnionError::Replay`]. Ephemeral keys giving an all-zero (low-order)
//! shared secret are refused on both sides.

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20::ChaCha20;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce, Tag};
use hkdf::Hkdf;
use rand::rngs::OsRng;
use rand::RngCore;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroize;

use crate::identity::OnionKeyPair;
use crate::replay::ReplayCache;

/// Most hops a setup packet can carry.
pub const MAX_HOPS: usize = 16;
/// Opaque payload capacity per hop (a serialized slot assignment fits here).
pub const HOP_PAYLOAD_BYTES: usize = 640;
/// Longest next-hop identifier (peer id bytes).
pub const MAX_NEXT_HOP_BYTES: usize = 64;

pub(crate) const EPH_BYTES: usize = 32;
const TAG_BYTES: usize = 16;
const ROUTING_HEADER_BYTES: usize = 4;
/// Plaintext routing info per hop: header, next hop and payload, zero padded.
pub const ROUTING_BYTES: usize = ROUTING_HEADER_BYTES + MAX_NEXT_HOP_BYTES + HOP_PAYLOAD_BYTES;
/// One hop's slot: ephemeral key, sealed routing info, AEAD tag.
pub const SLOT_BYTES: usize = EPH_BYTES + ROUTING_BYTES + TAG_BYTES;
/// Size of every setup packet, whatever the route length.
pub const SETUP_PACKET_BYTES: usize = MAX_HOPS * SLOT_BYTES;

const REST_BYTES: usize = SETUP_PACKET_BYTES - SLOT_BYTES;
const NH_OFFSET: usize = ROUTING_HEADER_BYTES;
const PAYLOAD_OFFSET: usize = NH_OFFSET + MAX_NEXT_HOP_BYTES;
const KIND_EXIT: u8 = 0;
const KIND_RELAY: u8 = 1;

const KDF_SALT: &[u8] = b"mixnn/onion/v1";
const LABEL_AEAD: &[u8] = b"mixnn/onion/v1/aead";
const LABEL_STREAM: &[u8] = b"mixnn/onion/v1/stream";
const LABEL_REPLAY: &[u8] = b"mixnn/onion/v1/replay-tag";
const LABEL_USER_PREFIX: &[u8] = b"mixnn/onion/v1/hop-key/";

/// Why a setup could not be built or peeled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OnionError {
    #[error("a route needs at least one hop")]
    NoHops,
    #[error("route has {hops} hops, at most {max} fit in a setup packet")]
    TooManyHops { hops: usize, max: usize },
    #[error("hop {hop}: payload of {len} bytes exceeds {max}")]
    PayloadTooLarge { hop: usize, len: usize, max: usize },
    #[error("hop {hop}: next hop of {len} bytes exceeds {max}")]
    NextHopTooLarge { hop: usize, len: usize, max: usize },
    #[error("hop {hop}: {reason}")]
    InvalidRoute { hop: usize, reason: &'static str },
    #[error("hop {hop}: onion key is a low-order point")]
    InvalidOnionKey { hop: usize },
    #[error("setup packet is {got} bytes, expected {expected}")]
    Length { expected: usize, got: usize },
    #[error("ephemeral key is a low-order point")]
    LowOrderKey,
    #[error("setup layer failed authentication")]
    Auth,
    #[error("setup packet replayed")]
    Replay,
    #[error("malformed routing info: {0}")]
    Malformed(&'static str),
}

/// What the client wants one hop to learn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopSpec {
    /// The hop's x25519 onion key for the current epoch.
    pub onion_key: [u8; 32],
    /// The next peer's id bytes; `None` for the last hop.
    pub next_hop: Option<Vec<u8>>,
    /// Opaque payload for this hop, at most [`HOP_PAYLOAD_BYTES`].
    pub payload: Vec<u8>,
}

/// Key material one hop shares with the client, derived from their x25519
/// shared secret. Zeroized on drop.
#[derive(Clone)]
pub struct HopSecrets {
    prk: [u8; 32],
    tag: [u8; 32],
}

impl HopSecrets {
    pub(crate) fn derive(shared: &[u8; 32], ephemeral: &[u8; 32]) -> Self {
        let mut ikm = [0u8; 64];
        ikm[..32].copy_from_slice(shared);
        ikm[32..].copy_from_slice(ephemeral);
        let (prk, hk) = Hkdf::<Sha256>::extract(Some(KDF_SALT), &ikm);
        ikm.zeroize();
        let mut out = Self {
            prk: [0u8; 32],
            tag: expand32(&hk, &[LABEL_REPLAY]),
        };
        out.prk.copy_from_slice(&prk);
        out
    }

    fn expand(&self, info: &[&[u8]]) -> [u8; 32] {
        match Hkdf::<Sha256>::from_prk(&self.prk) {
            Ok(hk) => expand32(&hk, info),
            // A 32-byte PRK is exactly SHA-256's output size, always accepted.
            Err(_) => unreachable!("HKDF-SHA256 accepts a 32-byte PRK"),
        }
    }

    /// A 32-byte key for `label` (HKDF-SHA256-Expand of this hop's secret).
    /// Distinct labels give independent keys; the client and the hop get
    /// the same key for the same label.
    pub fn key(&self, label: &str) -> [u8; 32] {
        self.expand(&[LABEL_USER_PREFIX, label.as_bytes()])
    }

    /// The replay tag of this setup layer (a hash of the shared secret).
    pub fn tag(&self) -> [u8; 32] {
        self.tag
    }

    pub(crate) fn aead(&self) -> ChaCha20Poly1305 {
        let mut k = self.expand(&[LABEL_AEAD]);
        let c = ChaCha20Poly1305::new(&k.into());
        k.zeroize();
        c
    }

    fn stream(&self) -> ChaCha20 {
        let mut k = self.expand(&[LABEL_STREAM]);
        let c = ChaCha20::new(&k.into(), &[0u8; 12].into());
        k.zeroize();
        c
    }
}

impl Drop for HopSecrets {
    fn drop(&mut self) {
        self.prk.zeroize();
        self.tag.zeroize();
    }
}

impl std::fmt::Debug for HopSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HopSecrets(..)")
    }
}

fn expand32(hk: &Hkdf<Sha256>, info: &[&[u8]]) -> [u8; 32] {
    let mut okm = [0u8; 32];
    if hk.expand_multi_info(info, &mut okm).is_err() {
        // 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
        unreachable!("HKDF-SHA256 can always expand 32 bytes");
    }
    okm
}

/// A setup packet: exactly [`SETUP_PACKET_BYTES`] bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SetupPacket(Box<[u8; SETUP_PACKET_BYTES]>);

impl SetupPacket {
    fn zeroed() -> Self {
        Self(Box::new([0u8; SETUP_PACKET_BYTES]))
    }

    /// The packet bytes, to send after the node's own framing.
    pub fn as_bytes(&self) -> &[u8; SETUP_PACKET_BYTES] {
        &self.0
    }

    /// Wraps received bytes; anything but [`SETUP_PACKET_BYTES`] is an error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OnionError> {
        if bytes.len() != SETUP_PACKET_BYTES {
            return Err(OnionError::Length {
                expected: SETUP_PACKET_BYTES,
                got: bytes.len(),
            });
        }
        let mut p = Self::zeroed();
        p.0.copy_from_slice(bytes);
        Ok(p)
    }
}

impl AsRef<[u8]> for SetupPacket {
    fn as_ref(&self) -> &[u8] {
        &self.0[..]
    }
}

impl std::fmt::Debug for SetupPacket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SetupPacket({} bytes)", SETUP_PACKET_BYTES)
    }
}

/// What a hop learns from its layer.
#[derive(Debug)]
pub struct Peeled {
    /// The next peer's id bytes; `None` if this hop is the last.
    pub next_hop: Option<Vec<u8>>,
    /// The opaque payload the client left for this hop.
    pub payload: Vec<u8>,
    /// Keys shared with the client.
    pub secrets: HopSecrets,
    /// The packet to forward to `next_hop`; meaningless for the last hop.
    pub next_packet: SetupPacket,
}

/// Builds a setup packet for `hops` (in route order) and returns it with the
/// secrets the client shares with each hop, in the same order.
///
/// Every hop but the last must have a non-empty `next_hop`; the last must
/// have none.
pub fn build_setup(hops: &[HopSpec]) -> Result<(SetupPacket, Vec<HopSecrets>), OnionError> {
    let n = hops.len();
    if n == 0 {
        return Err(OnionError::NoHops);
    }
    if n > MAX_HOPS {
        return Err(OnionError::TooManyHops {
            hops: n,
            max: MAX_HOPS,
        });
    }
    for (i, hop) in hops.iter().enumerate() {
        if hop.payload.len() > HOP_PAYLOAD_BYTES {
            return Err(OnionError::PayloadTooLarge {
                hop: i,
                len: hop.payload.len(),
                max: HOP_PAYLOAD_BYTES,
            });
        }
        match (&hop.next_hop, i + 1 == n) {
            (Some(next), _) if next.len() > MAX_NEXT_HOP_BYTES => {
                return Err(OnionError::NextHopTooLarge {
                    hop: i,
                    len: next.len(),
                    max: MAX_NEXT_HOP_BYTES,
                })
            }
            (Some(_), true) => {
                return Err(OnionError::InvalidRoute {
                    hop: i,
                    reason: "the last hop cannot have a next hop",
                })
            }
            (Some(next), false) if next.is_empty() => {
                return Err(OnionError::InvalidRoute {
                    hop: i,
                    reason: "next hop is empty",
                })
            }
            (None, false) => {
                return Err(OnionError::InvalidRoute {
                    hop: i,
                    reason: "only the last hop may lack a next hop",
                })
            }
            _ => {}
        }
    }

    // One fresh ephemeral key and one agreement per hop.
    let mut ephemerals = Vec::with_capacity(n);
    let mut secrets = Vec::with_capacity(n);
    for (i, hop) in hops.iter().enumerate() {
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        let eph = StaticSecret::from(seed);
        seed.zeroize();
        let eph_pub = PublicKey::from(&eph).to_bytes();
        let shared = eph.diffie_hellman(&PublicKey::from(hop.onion_key));
        if !shared.was_contributory() {
            return Err(OnionError::InvalidOnionKey { hop: i });
        }
        secrets.push(HopSecrets::derive(shared.as_bytes(), &eph_pub));
        ephemerals.push(eph_pub);
    }

    // Filler: what the zero slots appended by hops 0..n-1 look like at the
    // last hop. filler_{i+1} = (filler_i || 0^S) XOR stream_i[(N-i-1)S..NS].
    let filler_len = (n - 1) * SLOT_BYTES;
    let mut filler = vec![0u8; filler_len];
    for (i, s) in secrets.iter().take(n - 1).enumerate() {
        let mut stream = s.stream();
        stream.seek(((MAX_HOPS - i - 1) * SLOT_BYTES) as u64);
        stream.apply_keystream(&mut filler[..(i + 1) * SLOT_BYTES]);
    }

    // The last hop's packet: its slot, random unused slots, then the filler.
    let mut packet = SetupPacket::zeroed();
    {
        let buf = &mut packet.0[..];
        let random_end = SETUP_PACKET_BYTES - filler_len;
        OsRng.fill_bytes(&mut buf[SLOT_BYTES..random_end]);
        buf[random_end..].copy_from_slice(&filler);
    }
    let last = n - 1;
    seal_slot(
        &mut packet.0,
        &ephemerals[last],
        &hops[last],
        &secrets[last],
    );

    // Walk back: undo hop i's shift and keystream, then seal hop i's slot
    // over the rest of its packet.
    for i in (0..last).rev() {
        let buf = &mut packet.0[..];
        buf.copy_within(..REST_BYTES, SLOT_BYTES);
        secrets[i].stream().apply_keystream(&mut buf[SLOT_BYTES..]);
        seal_slot(&mut packet.0, &ephemerals[i], &hops[i], &secrets[i]);
    }

    Ok((packet, secrets))
}

/// Writes slot 0: the ephemeral key and the routing info sealed with the
/// rest of the packet as associated data.
fn seal_slot(
    buf: &mut [u8; SETUP_PACKET_BYTES],
    ephemeral: &[u8; 32],
    hop: &HopSpec,
    secrets: &HopSecrets,
) {
    let (slot, rest) = buf.split_at_mut(SLOT_BYTES);
    slot[..EPH_BYTES].copy_from_slice(ephemeral);
    let (routing, tag_out) = slot[EPH_BYTES..].split_at_mut(ROUTING_BYTES);
    encode_routing(hop, routing);
    // Lengths were checked by build_setup and the buffer is far below
    // ChaCha20-Poly1305's message limit, so sealing cannot fail.
    match secrets
        .aead()
        .encrypt_in_place_detached(&Nonce::default(), rest, routing)
    {
        Ok(tag) => tag_out.copy_from_slice(&tag),
        Err(_) => unreachable!("ChaCha20-Poly1305 seals a {ROUTING_BYTES}-byte buffer"),
    }
}

pub(crate) fn encode_routing(hop: &HopSpec, out: &mut [u8]) {
    out.fill(0);
    match &hop.next_hop {
        Some(next) => {
            out[0] = KIND_RELAY;
            // Checked against MAX_NEXT_HOP_BYTES (< 256) by build_setup.
            out[1] = next.len() as u8;
            out[NH_OFFSET..NH_OFFSET + next.len()].copy_from_slice(next);
        }
        None => out[0] = KIND_EXIT,
    }
    // Checked against HOP_PAYLOAD_BYTES (< 65536) by build_setup.
    out[2..4].copy_from_slice(&(hop.payload.len() as u16).to_le_bytes());
    out[PAYLOAD_OFFSET..PAYLOAD_OFFSET + hop.payload.len()].copy_from_slice(&hop.payload);
}

type Routing = (Option<Vec<u8>>, Vec<u8>);

fn decode_routing(r: &[u8; ROUTING_BYTES]) -> Result<Routing, OnionError> {
    let nh_len = usize::from(r[1]);
    let payload_len = usize::from(u16::from_le_bytes([r[2], r[3]]));
    if nh_len > MAX_NEXT_HOP_BYTES {
        return Err(OnionError::Malformed("next hop length"));
    }
    if payload_len > HOP_PAYLOAD_BYTES {
        return Err(OnionError::Malformed("payload length"));
    }
    let nh_field = &r[NH_OFFSET..PAYLOAD_OFFSET];
    let payload_field = &r[PAYLOAD_OFFSET..];
    if !is_zero(&nh_field[nh_len..]) || !is_zero(&payload_field[payload_len..]) {
        return Err(OnionError::Malformed("nonzero padding"));
    }
    let next_hop = match (r[0], nh_len) {
        (KIND_EXIT, 0) => None,
        (KIND_RELAY, 1..) => Some(nh_field[..nh_len].to_vec()),
        (KIND_EXIT, _) => return Err(OnionError::Malformed("last hop with a next hop")),
        (KIND_RELAY, _) => return Err(OnionError::Malformed("empty next hop")),
        _ => return Err(OnionError::Malformed("unknown kind")),
    };
    Ok((next_hop, payload_field[..payload_len].to_vec()))
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, x| acc | x) == 0
}

/// Peels this hop's layer off a setup packet.
///
/// One x25519 agreement with `key`, one AEAD open (authenticating the whole
/// packet), a replay check, and one keystream pass to form the next packet.
pub fn peel_setup(
    packet: &[u8],
    key: &OnionKeyPair,
    replay: &mut dyn ReplayCache,
) -> Result<Peeled, OnionError> {
    if packet.len() != SETUP_PACKET_BYTES {
        return Err(OnionError::Length {
            expected: SETUP_PACKET_BYTES,
            got: packet.len(),
        });
    }
    let (slot, rest) = packet.split_at(SLOT_BYTES);
    let mut eph = [0u8; EPH_BYTES];
    eph.copy_from_slice(&slot[..EPH_BYTES]);
    let shared = key.secret().diffie_hellman(&PublicKey::from(eph));
    if !shared.was_contributory() {
        return Err(OnionError::LowOrderKey);
    }
    let secrets = HopSecrets::derive(shared.as_bytes(), &eph);
    drop(shared);

    let mut routing = [0u8; ROUTING_BYTES];
    routing.copy_from_slice(&slot[EPH_BYTES..EPH_BYTES + ROUTING_BYTES]);
    let tag = Tag::from_slice(&slot[EPH_BYTES + ROUTING_BYTES..]);
    secrets
        .aead()
        .decrypt_in_place_detached(&Nonce::default(), rest, &mut routing, tag)
        .map_err(|_| OnionError::Auth)?;

    if !replay.check_and_insert(secrets.tag()) {
        routing.zeroize();
        return Err(OnionError::Replay);
    }
    let decoded = decode_routing(&routing);
    routing.zeroize();
    let (next_hop, payload) = decoded?;

    let mut next_packet = SetupPacket::zeroed();
    next_packet.0[..REST_BYTES].copy_from_slice(rest);
    secrets.stream().apply_keystream(&mut next_packet.0[..]);

    Ok(Peeled {
        next_hop,
        payload,
        secrets,
        next_packet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::MemoryReplayCache;

    fn route(keys: &[OnionKeyPair]) -> Vec<HopSpec> {
        let n = keys.len();
        keys.iter()
            .enumerate()
            .map(|(i, k)| HopSpec {
                onion_key: k.public(),
                next_hop: (i + 1 < n).then(|| vec![i as u8 + 1; 1 + i % MAX_NEXT_HOP_BYTES]),
                payload: vec![0xA0 ^ i as u8; i * 37],
            })
            .collect()
    }

    #[test]
    fn sizes() {
        assert_eq!(SLOT_BYTES, 756);
        assert_eq!(SETUP_PACKET_BYTES, 16 * 756);
    }

    #[test]
    fn three_hops_round_trip() {
        let keys: Vec<_> = (0..3).map(|_| OnionKeyPair::generate(1, 2)).collect();
        let hops = route(&keys);
        let (packet, client) = build_setup(&hops).unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = packet.as_bytes().to_vec();
        for (i, k) in keys.iter().enumerate() {
            let mut cache = MemoryReplayCache::new(4);
            let p = peel_setup(&bytes, k, &mut cache).unwrap_or_else(|e| panic!("hop {i}: {e}"));
            assert_eq!(p.next_hop, hops[i].next_hop);
            assert_eq!(p.payload, hops[i].payload);
            assert_eq!(p.secrets.key("fwd"), client[i].key("fwd"));
            assert_ne!(p.secrets.key("fwd"), p.secrets.key("bwd"));
            assert_eq!(p.secrets.tag(), client[i].tag());
            assert_ne!(p.next_packet.as_bytes()[..], bytes[..]);
            bytes = p.next_packet.as_bytes().to_vec();
        }
    }

    #[test]
    fn low_order_ephemeral_is_refused() {
        let k = OnionKeyPair::generate(1, 2);
        let hops = route(std::slice::from_ref(&k));
        let (packet, _) = build_setup(&hops).unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = packet.as_bytes().to_vec();
        bytes[..32].fill(0); // the identity point
        let mut cache = MemoryReplayCache::new(4);
        assert_eq!(
            peel_setup(&bytes, &k, &mut cache).err(),
            Some(OnionError::LowOrderKey)
        );
    }

    #[test]
    fn low_order_onion_key_is_refused_by_builder() {
        let hops = vec![HopSpec {
            onion_key: [0u8; 32],
            next_hop: None,
            payload: vec![],
        }];
        assert_eq!(
            build_setup(&hops).err(),
            Some(OnionError::InvalidOnionKey { hop: 0 })
        );
    }

    #[test]
    fn routing_codec_rejects_noncanonical() {
        let hop = HopSpec {
            onion_key: [9; 32],
            next_hop: Some(vec![1, 2, 3]),
            payload: vec![4; 10],
        };
        let mut r = [0u8; ROUTING_BYTES];
        encode_routing(&hop, &mut r);
        assert_eq!(
            decode_routing(&r).ok(),
            Some((hop.next_hop.clone(), hop.payload.clone()))
        );
        let mut bad = r;
        bad[NH_OFFSET + 3] = 1;
        assert!(decode_routing(&bad).is_err(), "nonzero next hop padding");
        let mut bad = r;
        bad[ROUTING_BYTES - 1] = 1;
        assert!(decode_routing(&bad).is_err(), "nonzero payload padding");
        let mut bad = r;
        bad[0] = KIND_EXIT;
        assert!(decode_routing(&bad).is_err(), "exit with next hop");
        let mut bad = r;
        bad[0] = 7;
        assert!(decode_routing(&bad).is_err(), "unknown kind");
        let mut bad = r;
        bad[1] = 65;
        assert!(decode_routing(&bad).is_err(), "next hop too long");
        let mut bad = r;
        bad[2..4].copy_from_slice(&641u16.to_le_bytes());
        assert!(decode_routing(&bad).is_err(), "payload too long");
        let mut bad = r;
        bad[1] = 0;
        bad[NH_OFFSET..NH_OFFSET + 3].fill(0);
        assert!(decode_routing(&bad).is_err(), "relay with empty next hop");
    }
}

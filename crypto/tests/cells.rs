//! Data cells and messages: round trips, tampering, ordering, malformed input.

use mixnn_crypto::cells::{
    message_cells, seal_message, CellError, CellKey, CellOpener, CellSealer, MessageReader,
    CELL_BYTES, CELL_PAYLOAD, MAX_MESSAGE_BYTES,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn pair() -> (CellSealer, CellOpener) {
    let k = CellKey::random();
    (CellSealer::new(&k), CellOpener::new(&k))
}

/// Feeds sealed cells to a reader; returns the messages it completed.
fn read_all(
    reader: &mut MessageReader,
    opener: &mut CellOpener,
    wire: &mut [u8],
) -> Result<Vec<Vec<u8>>, CellError> {
    assert_eq!(wire.len() % CELL_BYTES, 0);
    let mut done = Vec::new();
    for cell in wire.chunks_exact_mut(CELL_BYTES) {
        if let Some(m) = reader.push(opener, cell)? {
            done.push(m);
        }
    }
    Ok(done)
}

/// One sealed cell whose plaintext the test chooses (to forge lengths and padding).
fn cell_with_plaintext(sealer: &mut CellSealer, plaintext: &[u8]) -> Vec<u8> {
    let mut pt = Box::new([0u8; CELL_PAYLOAD]);
    pt[..plaintext.len()].copy_from_slice(plaintext);
    let mut cell = vec![0u8; CELL_BYTES];
    sealer.seal_into(&pt, &mut cell).expect("seal");
    cell
}

#[test]
fn multi_mib_message_round_trips() {
    let (mut s, mut o) = pair();
    let msg = bytes(5 * 1024 * 1024 + 3, 5);
    let mut wire = Vec::new();
    let cells = seal_message(&mut s, &msg, &mut wire).expect("seal");
    assert_eq!(cells, 88, "81 data cells round up to the size class of 88");
    assert_eq!(wire.len(), cells * CELL_BYTES);
    let mut r = MessageReader::new(MAX_MESSAGE_BYTES);
    let got = read_all(&mut r, &mut o, &mut wire).expect("open");
    assert_eq!(got, vec![msg]);
    assert!(!r.in_progress());
}

#[test]
fn messages_follow_each_other_and_buffers_are_reused() {
    let (mut s, mut o) = pair();
    let mut r = MessageReader::new(1 << 20);
    let mut wire = Vec::new();
    let msgs = [
        bytes(100_000, 1),
        Vec::new(),
        bytes(7, 2),
        bytes(3 * CELL_PAYLOAD, 3),
        // Shorter than the buffer handed back: no stale byte may show.
        bytes(2 * CELL_PAYLOAD - 8, 4),
        bytes(2 * CELL_PAYLOAD + 5, 5),
        bytes(10, 6),
        bytes(5 * CELL_PAYLOAD, 7),
    ];
    for m in &msgs {
        seal_message(&mut s, m, &mut wire).expect("seal");
    }
    let mut got = Vec::new();
    let mut prefixes = 0;
    for cell in wire.chunks_exact_mut(CELL_BYTES) {
        if let Some(m) = r.push(&mut o, cell).expect("open") {
            got.push(m.clone());
            r.recycle(m);
            assert!(r.partial().is_none());
        } else {
            // What has arrived of the message in progress is its true
            // prefix, and its length is known from the first cell.
            let (prefix, len) = r.partial().expect("a message is in progress");
            let want = &msgs[got.len()];
            assert_eq!(len, want.len());
            assert!(!prefix.is_empty() && prefix.len() <= len);
            assert_eq!(prefix, &want[..prefix.len()]);
            prefixes += 1;
        }
    }
    assert_eq!(got, msgs.to_vec());
    assert!(prefixes >= 10, "{prefixes}");
    assert_eq!(o.next_seq(), s.next_seq());
}

#[test]
fn buckets_hide_sizes_within_a_size_class() {
    let (mut s, _) = pair();
    let count = |s: &mut CellSealer, len: usize| {
        let mut out = Vec::new();
        seal_message(s, &vec![1u8; len], &mut out).expect("seal")
    };
    assert_eq!(count(&mut s, 0), count(&mut s, CELL_PAYLOAD - 8));
    assert_eq!(count(&mut s, CELL_PAYLOAD * 2), 3);
    // 17 and 18 cells of data share the class of 18 cells.
    assert_eq!(count(&mut s, CELL_PAYLOAD * 16), 18);
    assert_eq!(count(&mut s, CELL_PAYLOAD * 17 - 8), 18);
    assert_eq!(count(&mut s, CELL_PAYLOAD * 18 - 8), 18);
    assert_eq!(count(&mut s, CELL_PAYLOAD * 18), 20);
}

#[test]
fn sealed_cells_do_not_show_plaintext() {
    let (mut s, _) = pair();
    let msg = vec![0x41u8; 3 * CELL_PAYLOAD];
    let mut wire = Vec::new();
    seal_message(&mut s, &msg, &mut wire).expect("seal");
    for cell in wire.chunks_exact(CELL_BYTES) {
        let body = &cell[8..];
        let a = body.iter().filter(|&&b| b == 0x41).count();
        let z = body.iter().filter(|&&b| b == 0).count();
        assert!(a < body.len() / 64 && z < body.len() / 64, "a={a} z={z}");
    }
}

#[test]
fn oversize_message_is_refused_before_sealing() {
    let (mut s, _) = pair();
    // calloc'd and never touched, so this costs no real memory.
    let big = vec![0u8; MAX_MESSAGE_BYTES + 1];
    let mut out = vec![9u8; 3];
    assert_eq!(
        seal_message(&mut s, &big, &mut out),
        Err(CellError::MessageTooLarge {
            len: MAX_MESSAGE_BYTES as u64 + 1,
            max: MAX_MESSAGE_BYTES
        })
    );
    assert_eq!(out, vec![9u8; 3], "output untouched");
    assert_eq!(s.next_seq(), 0, "no sequence number spent");
}

#[test]
fn wrong_key_fails_auth() {
    let (mut s, _) = pair();
    let mut other = CellOpener::new(&CellKey::random());
    let mut wire = Vec::new();
    seal_message(&mut s, b"hello", &mut wire).expect("seal");
    assert_eq!(other.open_in_place(&mut wire), Err(CellError::Auth));
    assert_eq!(
        other.next_seq(),
        0,
        "a failed cell does not advance the opener"
    );
}

#[test]
fn derived_direction_keys_do_not_open_each_other() {
    let segment = CellKey::random();
    let (fwd, bwd) = (segment.derive("forward"), segment.derive("backward"));
    let mut s = CellSealer::new(&fwd);
    let mut wire = Vec::new();
    seal_message(&mut s, b"x", &mut wire).expect("seal");
    let mut copy = wire.clone();
    assert_eq!(
        CellOpener::new(&bwd).open_in_place(&mut copy),
        Err(CellError::Auth)
    );
    assert!(CellOpener::new(&fwd).open_in_place(&mut wire).is_ok());
}

#[test]
fn replayed_cell_is_refused() {
    let (mut s, mut o) = pair();
    let mut wire = Vec::new();
    seal_message(&mut s, b"one", &mut wire).expect("seal");
    let copy = wire.clone();
    o.open_in_place(&mut wire).expect("first");
    let mut again = copy;
    assert_eq!(
        o.open_in_place(&mut again),
        Err(CellError::Replay {
            seq: 0,
            expected: 1
        })
    );
}

#[test]
fn gap_and_reorder_are_distinct_errors() {
    let (mut s, mut o) = pair();
    let mut wire = Vec::new();
    for m in [b"a", b"b", b"c", b"d"] {
        seal_message(&mut s, m, &mut wire).expect("seal");
    }
    let mut cells: Vec<Vec<u8>> = wire.chunks_exact(CELL_BYTES).map(<[u8]>::to_vec).collect();
    o.open_in_place(&mut cells[0]).expect("0");
    // Cell 2 before cell 1: a gap at first...
    assert_eq!(
        o.open_in_place(&mut cells[2]),
        Err(CellError::Gap {
            seq: 2,
            expected: 1
        })
    );
    // ...and when cell 1 turns up late, a reorder.
    assert_eq!(
        o.open_in_place(&mut cells[1]),
        Err(CellError::Reordered { seq: 1, ahead: 2 })
    );
    // A lost cell: 3 after 0 on a fresh opener is a gap.
    let mut o2 = CellOpener::new(&CellKey::from_bytes([0; 32]));
    let mut fresh = cells[3].clone();
    assert_eq!(
        o2.open_in_place(&mut fresh),
        Err(CellError::Gap {
            seq: 3,
            expected: 0
        })
    );
}

#[test]
fn truncated_and_overlong_cells_are_length_errors() {
    let (mut s, mut o) = pair();
    let mut wire = Vec::new();
    seal_message(&mut s, b"abc", &mut wire).expect("seal");
    for len in [0, 7, 8, CELL_BYTES - 16, CELL_BYTES - 1] {
        let mut short = wire[..len].to_vec();
        assert_eq!(
            o.open_in_place(&mut short),
            Err(CellError::Length {
                expected: CELL_BYTES,
                got: len
            })
        );
    }
    let mut long = wire.clone();
    long.push(0);
    assert!(matches!(
        o.open_in_place(&mut long),
        Err(CellError::Length { .. })
    ));
    let mut r = MessageReader::new(100);
    assert!(r.push(&mut o, &mut wire[..CELL_BYTES - 1]).is_err());
    assert_eq!(
        r.push(&mut o, &mut wire).expect("whole cell"),
        Some(b"abc".to_vec())
    );
    let mut small = vec![0u8; 10];
    assert!(s.seal_in_place(&mut small).is_err());
}

#[test]
fn claimed_length_over_the_limit_is_refused_before_allocating() {
    let (mut s, mut o) = pair();
    // u64::MAX would abort the process if the reader tried to reserve it.
    for claimed in [u64::MAX, MAX_MESSAGE_BYTES as u64 + 1, 1001] {
        let mut cell = cell_with_plaintext(&mut s, &claimed.to_le_bytes());
        let mut r = MessageReader::new(1000);
        assert_eq!(
            r.push(&mut o, &mut cell),
            Err(CellError::MessageTooLarge {
                len: claimed,
                max: 1000
            })
        );
        assert!(!r.in_progress());
    }
    // The reader's limit is capped at MAX_MESSAGE_BYTES.
    assert_eq!(MessageReader::new(usize::MAX).max_len(), MAX_MESSAGE_BYTES);
}

#[test]
fn nonzero_padding_is_refused() {
    // In the first (data) cell.
    let (mut s, mut o) = pair();
    let mut pt = 3u64.to_le_bytes().to_vec();
    pt.extend_from_slice(b"abcX");
    let mut cell = cell_with_plaintext(&mut s, &pt);
    let mut r = MessageReader::new(100);
    assert_eq!(r.push(&mut o, &mut cell), Err(CellError::BadPadding));

    // In a pure padding cell of the size class (17 data cells -> 18 cells).
    let (mut s, mut o) = pair();
    let len = 16 * CELL_PAYLOAD + 10;
    let msg = bytes(len, 8);
    let mut accepted = 0usize;
    // Build the plaintext stream by hand.
    let mut stream = (len as u64).to_le_bytes().to_vec();
    stream.extend_from_slice(&msg);
    stream.resize(18 * CELL_PAYLOAD, 0);
    stream[17 * CELL_PAYLOAD + 5] = 1;
    let mut r = MessageReader::new(2 << 20);
    let mut result = Ok(None);
    for chunk in stream.chunks_exact(CELL_PAYLOAD) {
        let mut cell = cell_with_plaintext(&mut s, chunk);
        result = r.push(&mut o, &mut cell);
        if result.is_err() {
            break;
        }
        accepted += 1;
    }
    assert_eq!(result, Err(CellError::BadPadding));
    assert_eq!(accepted, 17, "the eighteenth cell was the one refused");
}

#[test]
fn an_error_drops_the_partial_message() {
    let (mut s, mut o) = pair();
    let mut wire = Vec::new();
    seal_message(&mut s, &bytes(2 * CELL_PAYLOAD, 4), &mut wire).expect("seal");
    let mut r = MessageReader::new(1 << 20);
    assert_eq!(
        r.push(&mut o, &mut wire[..CELL_BYTES]).expect("first"),
        None
    );
    assert!(r.in_progress());
    let second = &mut wire[CELL_BYTES..2 * CELL_BYTES];
    second[100] ^= 0x80;
    assert_eq!(r.push(&mut o, second), Err(CellError::Auth));
    assert!(!r.in_progress());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn messages_round_trip(len in 0..5 * CELL_PAYLOAD, seed in any::<u64>()) {
        let (mut s, mut o) = pair();
        let msg = bytes(len, seed);
        let mut wire = Vec::new();
        let cells = seal_message(&mut s, &msg, &mut wire).expect("seal");
        prop_assert_eq!(cells, message_cells(len));
        let needed = (len + 8).div_ceil(CELL_PAYLOAD);
        prop_assert!(cells >= needed && cells * 8 <= needed * 9, "{} cells for {} needed", cells, needed);
        prop_assert_eq!(wire.len(), cells * CELL_BYTES);
        let mut r = MessageReader::new(len);
        let got = read_all(&mut r, &mut o, &mut wire).expect("open");
        prop_assert_eq!(got, vec![msg]);
    }

    #[test]
    fn one_byte_under_the_limit_is_refused(len in 1..3 * CELL_PAYLOAD, seed in any::<u64>()) {
        let (mut s, mut o) = pair();
        let mut wire = Vec::new();
        seal_message(&mut s, &bytes(len, seed), &mut wire).expect("seal");
        let mut r = MessageReader::new(len - 1);
        prop_assert_eq!(
            read_all(&mut r, &mut o, &mut wire),
            Err(CellError::MessageTooLarge { len: len as u64, max: len - 1 })
        );
    }

    /// Any flipped bit in any cell of a message is an error, never a
    /// wrong message: in the body or tag it fails the AEAD, in the sequence
    /// number it fails the order check.
    #[test]
    fn flipped_bit_is_an_error(len in 0..3 * CELL_PAYLOAD, bit in 0..4 * CELL_BYTES * 8, seed in any::<u64>()) {
        let (mut s, mut o) = pair();
        let msg = bytes(len, seed);
        let mut wire = Vec::new();
        seal_message(&mut s, &msg, &mut wire).expect("seal");
        let bit = bit % (wire.len() * 8);
        wire[bit / 8] ^= 1 << (bit % 8);
        let mut r = MessageReader::new(len);
        let res = read_all(&mut r, &mut o, &mut wire);
        let in_seq = bit / 8 % CELL_BYTES < 8;
        if in_seq {
            prop_assert!(matches!(res, Err(CellError::Gap { .. }) | Err(CellError::Replay { .. })), "{:?}", res);
        } else {
            prop_assert_eq!(res, Err(CellError::Auth));
        }
    }

    #[test]
    fn random_cells_are_an_error(cell in proptest::collection::vec(any::<u8>(), CELL_BYTES..=CELL_BYTES), seq0 in any::<bool>()) {
        let (_, mut o) = pair();
        let mut cell = cell;
        if seq0 {
            cell[..8].fill(0); // pass the order check, so the AEAD must refuse it
        }
        let mut r = MessageReader::new(MAX_MESSAGE_BYTES);
        prop_assert!(r.push(&mut o, &mut cell).is_err());
    }

    #[test]
    fn random_lengths_are_an_error(len in 0..2 * CELL_BYTES, fill in any::<u8>()) {
        prop_assume!(len != CELL_BYTES);
        let (_, mut o) = pair();
        let mut cell = vec![fill; len];
        prop_assert_eq!(o.open_in_place(&mut cell), Err(CellError::Length { expected: CELL_BYTES, got: len }));
    }
}

/// Every backend of each suite against the RustCrypto crate of that suite
/// (`chacha20poly1305`, `aes-gcm`), byte for byte: the same ciphertext
/// and tag for random keys, nonces, associated data and lengths (every
/// length up to a few blocks, then around block and cell boundaries), and
/// each opens what the other sealed. One key object seals and opens in
/// turn, as a circuit's keys do.
mod backend_matches_the_rustcrypto_crate {
    use aes_gcm::Aes256Gcm;
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};
    use chacha20poly1305::ChaCha20Poly1305;
    use mixnn_crypto::aead::{Backend, CellAead, CellSuite};
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, RngCore, SeedableRng};

    const BACKENDS: [Backend; 3] = [Backend::OpenSsl, Backend::Assembly, Backend::Portable];

    fn check(key: [u8; 32], nonce: [u8; 12], aad: &[u8], plain: &[u8]) {
        assert_eq!(
            CellAead::new(&key).backend(),
            mixnn_crypto::aead::chacha_backend()
        );
        let chacha: Vec<CellAead> = BACKENDS
            .iter()
            .map(|&b| {
                let aead = CellAead::with_backend(&key, b);
                assert_eq!(aead.backend(), b);
                aead
            })
            .collect();
        check_suite(
            &ChaCha20Poly1305::new(&key.into()),
            chacha,
            nonce,
            aad,
            plain,
        );
        let fastest = CellAead::for_suite(&key, CellSuite::Aes256Gcm);
        assert_eq!(fastest.backend(), mixnn_crypto::aead::aes_gcm_backend());
        let aes: Vec<CellAead> = [Backend::Ring, Backend::Assembly, Backend::Portable]
            .iter()
            .map(|&b| {
                let aead = CellAead::aes_with_backend(&key, b);
                assert_eq!((aead.backend(), aead.suite()), (b, CellSuite::Aes256Gcm));
                aead
            })
            .chain([fastest])
            .collect();
        check_suite(&Aes256Gcm::new(&key.into()), aes, nonce, aad, plain);
    }

    fn check_suite<R: AeadInPlace>(
        reference: &R,
        aeads: Vec<CellAead>,
        nonce: [u8; 12],
        aad: &[u8],
        plain: &[u8],
    ) {
        let mut want = plain.to_vec();
        let want_tag = reference
            .encrypt_in_place_detached(nonce.as_slice().into(), aad, &mut want)
            .expect("reference seal");
        for mut aead in aeads {
            let what = format!(
                "{} bytes, {:?} {:?}",
                plain.len(),
                aead.suite(),
                aead.backend()
            );

            let mut got = plain.to_vec();
            let got_tag = aead.seal_in_place(&nonce, aad, &mut got).expect("seal");
            assert_eq!(got, want, "ciphertext, {what}");
            assert_eq!(&got_tag[..], want_tag.as_slice(), "tag, {what}");

            // Each opens the other's output.
            let mut back = want.clone();
            assert!(
                aead.open_in_place(&nonce, aad, &mut back, &got_tag),
                "{what}"
            );
            assert_eq!(back, plain, "{what}");
            let mut back = got;
            reference
                .decrypt_in_place_detached(nonce.as_slice().into(), aad, &mut back, &want_tag)
                .expect("reference open");
            assert_eq!(back, plain, "{what}");

            // From one buffer into another: the same bytes, and the source
            // untouched.
            let mut out = vec![0xA5u8; plain.len()];
            let tag = aead.seal_to(&nonce, aad, plain, &mut out).expect("seal_to");
            assert_eq!(out, want, "seal_to ciphertext, {what}");
            assert_eq!(&tag[..], want_tag.as_slice(), "seal_to tag, {what}");
            let mut opened = vec![0x5Au8; plain.len()];
            assert!(
                aead.open_to(&nonce, aad, &want, &tag, &mut opened),
                "{what}"
            );
            assert_eq!(opened, plain, "open_to, {what}");
            if !plain.is_empty() {
                let mut bad = want.clone();
                bad[plain.len() / 2] ^= 1;
                assert!(
                    !aead.open_to(&nonce, aad, &bad, &tag, &mut opened),
                    "{what}"
                );
                let mut bad_in_place = bad;
                assert!(
                    !aead.open_in_place(&nonce, aad, &mut bad_in_place, &tag),
                    "{what}"
                );
                let mut short = vec![0u8; plain.len() - 1];
                assert!(!aead.open_to(&nonce, aad, &want, &tag, &mut short));
                assert!(aead.seal_to(&nonce, aad, plain, &mut short).is_none());
            }
            // A failed open leaves the key good for the next operation.
            let mut again = plain.to_vec();
            assert_eq!(
                aead.seal_in_place(&nonce, aad, &mut again),
                Some(got_tag),
                "{what}"
            );
            assert_eq!(again, want, "{what}");
        }
    }

    #[test]
    fn every_short_length_and_the_boundaries() {
        let mut rng = StdRng::seed_from_u64(13);
        let cell = mixnn_crypto::cells::CELL_PAYLOAD;
        let lengths = (0..=600)
            .chain([1023, 1024, 1025, 4095, 4096, 4097, 16_384, 65_535, 65_536])
            .chain([cell - 1, cell, cell + 1, 1 << 20, (1 << 20) + 17]);
        for len in lengths {
            let mut key = [0u8; 32];
            let mut nonce = [0u8; 12];
            rng.fill_bytes(&mut key);
            rng.fill_bytes(&mut nonce);
            let mut plain = vec![0u8; len];
            rng.fill_bytes(&mut plain);
            let mut aad = vec![0u8; rng.gen_range(0..40)];
            rng.fill_bytes(&mut aad);
            check(key, nonce, &aad, &plain);
            check(key, nonce, &[], &plain);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        #[test]
        fn random_keys_nonces_and_lengths(
            key in any::<[u8; 32]>(),
            nonce in any::<[u8; 12]>(),
            aad in proptest::collection::vec(any::<u8>(), 0..64),
            plain in proptest::collection::vec(any::<u8>(), 0..20_000),
        ) {
            check(key, nonce, &aad, &plain);
        }
    }

    /// Whole cells of either suite: a cell sealed by the node's sealer is
    /// the reference crate's ciphertext under the cell nonce
    /// `0^4 || seq LE`, and opens under its own suite only.
    #[test]
    fn sealed_cells_are_reference_ciphertexts() {
        let key_bytes = [0x42u8; 32];
        cells_match(
            CellSuite::ChaCha20Poly1305,
            &ChaCha20Poly1305::new(&key_bytes.into()),
        );
        cells_match(CellSuite::Aes256Gcm, &Aes256Gcm::new(&key_bytes.into()));
    }

    fn cells_match<R: AeadInPlace>(suite: CellSuite, reference: &R) {
        use mixnn_crypto::cells::{
            CellError, CellKey, CellOpener, CellSealer, CELL_BYTES, CELL_PAYLOAD,
        };
        let key = CellKey::from_bytes([0x42u8; 32]);
        let mut sealer = CellSealer::with_suite(&key, suite);
        assert_eq!(sealer.suite(), suite);
        let mut opener = CellOpener::with_suite(&key, suite);
        let other = match suite {
            CellSuite::ChaCha20Poly1305 => CellSuite::Aes256Gcm,
            CellSuite::Aes256Gcm => CellSuite::ChaCha20Poly1305,
        };
        let mut stranger = CellOpener::with_suite(&key, other);
        let mut rng = StdRng::seed_from_u64(7);
        for seq in 0u64..5 {
            let mut pt = Box::new([0u8; CELL_PAYLOAD]);
            rng.fill_bytes(&mut pt[..]);
            let mut cell = vec![0u8; CELL_BYTES];
            assert_eq!(sealer.seal_into(&pt, &mut cell), Ok(seq));
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&seq.to_le_bytes());
            let mut want = pt.to_vec();
            let tag = reference
                .encrypt_in_place_detached(nonce.as_slice().into(), &[], &mut want)
                .expect("seal");
            assert_eq!(&cell[..8], &seq.to_le_bytes());
            assert_eq!(&cell[8..8 + CELL_PAYLOAD], &want[..], "{suite:?}");
            assert_eq!(&cell[8 + CELL_PAYLOAD..], tag.as_slice(), "{suite:?}");
            // The same key under the other suite refuses the cell it
            // expects, and stays where it was.
            if seq == 0 {
                let mut copy = cell.clone();
                assert_eq!(stranger.open_in_place(&mut copy), Err(CellError::Auth));
                assert_eq!(stranger.next_seq(), 0);
            }
            let opened = opener.open_in_place(&mut cell).expect("open");
            assert_eq!(opened, &pt[..], "{suite:?}");
        }
    }
}

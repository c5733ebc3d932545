//! Circuit setup and cell crypto against their raw primitives.
//!
//! `cargo bench -p mixnn-crypto --bench crypto`
//!
//! - `setup_build/{3,16}`: a client building a setup packet.
//! - `setup_peel_per_hop` beside `x25519_agreement`: one hop's peel against
//!   one raw `StaticSecret::diffie_hellman` (target: at most 2x).
//! - `cells/*`: sealing and opening a message that fills its 16-cell bucket
//!   (~1 MiB), in message bytes per second (target: at least 2 GB/s each
//!   on one core).
//! - `raw_aead_1MiB/{chacha20poly1305_crate,ring,openssl,aws_lc}/{seal,open}`:
//!   the raw ChaCha20-Poly1305 implementations over the same bytes in
//!   64 KiB chunks, in place with a detached tag; cells run on `openssl`.
//! - `raw_aead_1MiB/{ring,openssl,aws_lc}_aes256gcm/{seal,open}`: AES-256-GCM
//!   the same way, and `cells_aes256gcm` the cells' AES-256-GCM backend
//!   through [`CellAead`] (ring, or aws-lc where the CPU has AVX-512:
//!   `aes_gcm_backend`).
//!   `cells/seal_open_1MiB_exact` shows a message of exactly 1 MiB, which
//!   its length prefix pushes into the 32-cell bucket (half padding).

use std::hint::black_box;
use std::time::Duration;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Tag};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use mixnn_crypto::aead::{Backend, CellAead, CellSuite};
use mixnn_crypto::cells::{
    seal_message, CellKey, CellOpener, CellSealer, MessageCells, MessageReader, CELL_BYTES,
    CELL_PAYLOAD,
};
use mixnn_crypto::onion::{build_setup, peel_setup, HopSpec, HOP_PAYLOAD_BYTES};
use mixnn_crypto::replay::ReplayCache;
use mixnn_crypto::OnionKeyPair;
use std::cell::RefCell;
use x25519_dalek::{PublicKey, StaticSecret};

/// Accepts every tag, so one packet can be peeled over and over.
struct AlwaysFresh;

impl ReplayCache for AlwaysFresh {
    fn check_and_insert(&mut self, _tag: [u8; 32]) -> bool {
        true
    }
}

fn route(keys: &[OnionKeyPair]) -> Vec<HopSpec> {
    let n = keys.len();
    keys.iter()
        .enumerate()
        .map(|(i, k)| HopSpec {
            onion_key: k.public(),
            next_hop: (i + 1 < n).then(|| vec![i as u8; 38]),
            payload: vec![i as u8; HOP_PAYLOAD_BYTES],
        })
        .collect()
}

fn setup(c: &mut Criterion) {
    let keys: Vec<_> = (0..16).map(|_| OnionKeyPair::generate(1, 2)).collect();
    let mut g = c.benchmark_group("setup");
    for n in [3usize, 16] {
        let hops = route(&keys[..n]);
        g.bench_function(format!("setup_build/{n}"), |b| {
            b.iter(|| build_setup(black_box(&hops)).map(|(p, _)| p))
        });
    }
    let hops = route(&keys[..3]);
    let packet = match build_setup(&hops) {
        Ok((p, _)) => p,
        Err(e) => panic!("build: {e}"),
    };
    g.bench_function("setup_peel_per_hop", |b| {
        b.iter(|| {
            peel_setup(black_box(packet.as_bytes()), &keys[0], &mut AlwaysFresh)
                .map(|p| p.payload.len())
        })
    });
    let secret = StaticSecret::from([7u8; 32]);
    let public = PublicKey::from(keys[1].public());
    g.bench_function("x25519_agreement", |b| {
        b.iter(|| {
            black_box(&secret)
                .diffie_hellman(black_box(&public))
                .to_bytes()
        })
    });
    g.finish();
}

/// Seals a chunk in place under the nonce for a counter; returns the tag.
type SealFn<'a> = dyn Fn(&mut [u8], u64) -> [u8; 16] + 'a;
/// Opens a chunk in place; false if it does not authenticate.
type OpenFn<'a> = dyn Fn(&mut [u8], u64, &[u8; 16]) -> bool + 'a;

fn cells(c: &mut Criterion) {
    // Fills a 16-cell bucket exactly: 16 * CELL_PAYLOAD minus the length prefix.
    let msg = vec![0x5Au8; 16 * CELL_PAYLOAD - 8];
    let exact = vec![0x5Au8; 1 << 20];
    let key = CellKey::random();

    let mut g = c.benchmark_group("cells");
    g.throughput(Throughput::Bytes(msg.len() as u64));

    // As a host seals: cell by cell into cell buffers it reuses; and as a
    // host opens, cell by cell into the message. Both suites.
    let mut wire = vec![0u8; 32 * CELL_BYTES];
    let mut reader = MessageReader::new(1 << 21);
    for (prefix, suite) in [
        ("", CellSuite::ChaCha20Poly1305),
        ("aes256gcm_", CellSuite::Aes256Gcm),
    ] {
        let mut sealer = CellSealer::with_suite(&key, suite);
        g.bench_function(format!("{prefix}seal_1MiB"), |b| {
            b.iter(|| {
                let mut cells = MessageCells::new(&mut sealer, black_box(&msg))?;
                for cell in wire.chunks_exact_mut(CELL_BYTES).take(cells.total()) {
                    cells.seal_next(cell)?;
                }
                Ok::<_, mixnn_crypto::cells::CellError>(())
            })
        });

        let mut sealed = Vec::new();
        if let Err(e) = seal_message(&mut CellSealer::with_suite(&key, suite), &msg, &mut sealed) {
            panic!("seal: {e}");
        }
        g.bench_function(format!("{prefix}open_1MiB"), |b| {
            b.iter_batched_ref(
                || sealed.clone(),
                |cells| {
                    let mut opener = CellOpener::with_suite(&key, suite);
                    let mut got = None;
                    for cell in cells.chunks_exact_mut(CELL_BYTES) {
                        got = reader.push(&mut opener, cell).ok().flatten().or(got);
                    }
                    if let Some(m) = got {
                        reader.recycle(m);
                    }
                },
                BatchSize::LargeInput,
            )
        });
    }

    let seal_open = |name: &str, msg: &[u8], g: &mut criterion::BenchmarkGroup<'_, _>| {
        let mut sealer = CellSealer::new(&key);
        let mut opener = CellOpener::new(&key);
        let mut reader = MessageReader::new(1 << 21);
        let mut wire = Vec::with_capacity(32 * CELL_BYTES);
        g.bench_function(name, |b| {
            b.iter(|| {
                wire.clear();
                let _ = seal_message(&mut sealer, black_box(msg), &mut wire);
                let mut got = None;
                for cell in wire.chunks_exact_mut(CELL_BYTES) {
                    got = reader.push(&mut opener, cell).ok().flatten().or(got);
                }
                if let Some(m) = got {
                    reader.recycle(m);
                }
            })
        });
    };
    seal_open("seal_open_1MiB", &msg, &mut g);
    g.throughput(Throughput::Bytes(exact.len() as u64));
    seal_open("seal_open_1MiB_exact", &exact, &mut g);
    g.finish();

    // The raw AEADs over the same message bytes in 64 KiB chunks, each in
    // place with a detached tag as cells use them.
    let raw = |g: &mut criterion::BenchmarkGroup<'_, _>,
               name: &str,
               seal: &SealFn<'_>,
               open: &OpenFn<'_>| {
        let mut buf = msg.clone();
        g.bench_function(format!("{name}/seal"), |b| {
            b.iter(|| {
                for (i, chunk) in buf.chunks_mut(64 * 1024).enumerate() {
                    black_box(seal(chunk, i as u64));
                }
            })
        });
        let mut sealed = msg.clone();
        let tags: Vec<[u8; 16]> = sealed
            .chunks_mut(64 * 1024)
            .enumerate()
            .map(|(i, chunk)| seal(chunk, i as u64))
            .collect();
        g.bench_function(format!("{name}/open"), |b| {
            b.iter_batched_ref(
                || sealed.clone(),
                |buf| {
                    for ((i, chunk), tag) in buf.chunks_mut(64 * 1024).enumerate().zip(&tags) {
                        if !open(chunk, i as u64, tag) {
                            panic!("{name}: open failed");
                        }
                    }
                },
                BatchSize::LargeInput,
            )
        });
    };
    let nonce = |i: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&i.to_le_bytes());
        n
    };
    let mut g = c.benchmark_group("raw_aead_1MiB");
    g.throughput(Throughput::Bytes(msg.len() as u64));

    let rustcrypto = ChaCha20Poly1305::new(&[3u8; 32].into());
    raw(
        &mut g,
        "chacha20poly1305_crate",
        &|chunk, i| {
            let mut t = [0u8; 16];
            if let Ok(tag) = rustcrypto.encrypt_in_place_detached(&nonce(i).into(), &[], chunk) {
                t.copy_from_slice(&tag);
            }
            t
        },
        &|chunk, i, tag| {
            rustcrypto
                .decrypt_in_place_detached(&nonce(i).into(), &[], chunk, Tag::from_slice(tag))
                .is_ok()
        },
    );

    // ring's ChaCha20-Poly1305 (what the libp2p Noise link runs on), and
    // AES-256-GCM beside it: what a second cell suite would run at.
    for (name, alg) in [
        ("ring", &ring::aead::CHACHA20_POLY1305),
        ("ring_aes256gcm", &ring::aead::AES_256_GCM),
    ] {
        let ring_key = match ring::aead::UnboundKey::new(alg, &[3u8; 32]) {
            Ok(k) => ring::aead::LessSafeKey::new(k),
            Err(e) => panic!("ring key: {e}"),
        };
        raw(
            &mut g,
            name,
            &|chunk, i| {
                let mut t = [0u8; 16];
                if let Ok(tag) = ring_key.seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(nonce(i)),
                    ring::aead::Aad::empty(),
                    chunk,
                ) {
                    t.copy_from_slice(tag.as_ref());
                }
                t
            },
            &|chunk, i, tag| {
                ring_key
                    .open_in_place_separate_tag(
                        ring::aead::Nonce::assume_unique_for_key(nonce(i)),
                        ring::aead::Aad::empty(),
                        ring::aead::Tag::from(*tag),
                        chunk,
                        0..,
                    )
                    .is_ok()
            },
        );
    }

    // AES-256-GCM through libcrypto, the library cells use.
    let gcm = RefCell::new(OpenSslGcm::new(&[3u8; 32]));
    raw(
        &mut g,
        "openssl_aes256gcm",
        &|chunk, i| gcm.borrow_mut().seal(&nonce(i), chunk),
        &|chunk, i, tag| gcm.borrow_mut().open(&nonce(i), chunk, tag),
    );

    // OpenSSL and aws-lc, the ChaCha20-Poly1305 backends cells choose
    // between by the CPU (`chacha_backend`); the AES-256-GCM backend of
    // AES cells on this CPU, and aws-lc's AES-256-GCM beside it.
    for (name, aead) in [
        (
            "openssl",
            CellAead::with_backend(&[3u8; 32], Backend::OpenSsl),
        ),
        (
            "aws_lc",
            CellAead::with_backend(&[3u8; 32], Backend::Assembly),
        ),
        (
            "cells_aes256gcm",
            CellAead::for_suite(&[3u8; 32], CellSuite::Aes256Gcm),
        ),
        (
            "aws_lc_aes256gcm",
            CellAead::aes_with_backend(&[3u8; 32], Backend::Assembly),
        ),
    ] {
        let aead = RefCell::new(aead);
        raw(
            &mut g,
            name,
            &|chunk, i| {
                aead.borrow_mut()
                    .seal_in_place(&nonce(i), &[], chunk)
                    .unwrap_or_default()
            },
            &|chunk, i, tag| aead.borrow_mut().open_in_place(&nonce(i), &[], chunk, tag),
        );
    }
    g.finish();
}

/// AES-256-GCM on one libcrypto context, used as the cells' backend
/// uses ChaCha20-Poly1305: a nonce per operation, in place, detached tag.
struct OpenSslGcm {
    ctx: openssl::cipher_ctx::CipherCtx,
}

impl OpenSslGcm {
    fn new(key: &[u8; 32]) -> Self {
        let mut ctx = openssl::cipher_ctx::CipherCtx::new().expect("context");
        ctx.encrypt_init(
            Some(openssl::cipher::Cipher::aes_256_gcm()),
            Some(key),
            None,
        )
        .expect("key");
        Self { ctx }
    }

    fn seal(&mut self, nonce: &[u8; 12], data: &mut [u8]) -> [u8; 16] {
        let mut tag = [0u8; 16];
        let n = data.len();
        let ok = self.ctx.encrypt_init(None, None, Some(nonce)).is_ok()
            && self.ctx.cipher_update_inplace(data, n).is_ok()
            && self.ctx.cipher_final(&mut []).is_ok()
            && self.ctx.tag(&mut tag).is_ok();
        assert!(ok, "AES-256-GCM seal");
        tag
    }

    fn open(&mut self, nonce: &[u8; 12], data: &mut [u8], tag: &[u8; 16]) -> bool {
        let n = data.len();
        self.ctx.decrypt_init(None, None, Some(nonce)).is_ok()
            && self.ctx.set_tag(tag).is_ok()
            && self.ctx.cipher_update_inplace(data, n).is_ok()
            && self.ctx.cipher_final(&mut []).is_ok()
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = setup, cells
}
criterion_main!(benches);

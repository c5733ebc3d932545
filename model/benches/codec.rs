//! The tensor codec on a `[256, 512]` activation: dense (no zeros), sparse
//! (half `+0.0`, as after a ReLU) and mostly zero (four in five `+0.0`, as
//! an MNIST batch), encode and decode, per MiB of the dense tensor; and
//! the finiteness check a slot runs on every tensor it takes, beside the
//! element-by-element search it replaced.
//!
//! `cargo bench -p mixnn-model --bench codec`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mixnn_model::tensor::first_non_finite;
use mixnn_model::{DecodeLimits, HostTensor};

fn tensor(zero_percent: u64) -> HostTensor {
    // A fixed xorshift stream: values in (0, 1], zeros at random places.
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    let data = (0..256 * 512)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if (s >> 40) % 100 < zero_percent {
                0.0
            } else {
                ((s >> 40) as f32 + 1.0) / 16_777_216.0
            }
        })
        .collect();
    HostTensor::new(vec![256, 512], data).expect("shape")
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec_256x512");
    g.throughput(Throughput::Bytes(256 * 512 * 4));
    for (name, t) in [
        ("dense", tensor(0)),
        ("half_zero", tensor(50)),
        ("four_fifths_zero", tensor(80)),
    ] {
        let bytes = t.encode();
        let mut out = Vec::with_capacity(bytes.len());
        g.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| {
                out.clear();
                t.encode_into(&mut out);
                out.len()
            })
        });
        g.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| {
                HostTensor::decode(&bytes, DecodeLimits::default())
                    .expect("decode")
                    .data
                    .len()
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("finite_256x784");
    g.throughput(Throughput::Bytes(256 * 784 * 4));
    let x: Vec<f32> = (0..256 * 784).map(|i| (i % 97) as f32 * 0.01).collect();
    g.bench_function("first_non_finite", |b| {
        b.iter(|| first_non_finite(std::hint::black_box(&x)))
    });
    g.bench_function("position_is_finite", |b| {
        b.iter(|| std::hint::black_box(&x).iter().position(|v| !v.is_finite()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

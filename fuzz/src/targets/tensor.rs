//! The tensor codec: `HostTensor::decode` under limits of the fuzzer's
//! choosing (what it accepts is the one encoding of what it returns, and a
//! `StreamDecoder` fed the same bytes in pieces gives the same answer), and
//! tensors of the fuzzer's shape and values encoded and decoded again.

use mixnn_model::tensor::StreamDecoder;
use mixnn_model::{CodecError, DecodeLimits, HostTensor};

use crate::input::{seed, Input};
use crate::Target;

pub const TARGET: Target = Target {
    name: "tensor",
    run,
    seeds,
    max_len: 8192,
};

const DECODE: u8 = 0;
const ENCODE: u8 = 1;

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    match input.u8() % 2 {
        DECODE => decode(input),
        _ => encode(input),
    }
}

fn decode(mut input: Input<'_>) {
    let b = input.u8();
    let limits = DecodeLimits {
        max_rank: usize::from(b & 7),
        max_elements: match b >> 3 {
            0 => DecodeLimits::default().max_elements,
            n => usize::from(n) * 29,
        },
    };
    let bytes = input.rest();
    let one_shot = HostTensor::decode(bytes, limits);
    let piece = usize::from(b % 61) + 1;
    let streamed = streamed(bytes, piece, limits);
    match (&one_shot, &streamed) {
        (Ok(a), Ok(b)) => assert!(
            a.shape == b.shape
                && a.data.len() == b.data.len()
                && a.data
                    .iter()
                    .zip(&b.data)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
            "the streaming decoder gives the same tensor"
        ),
        (a, b) => assert_eq!(a, b, "the streaming decoder gives the same answer"),
    }
    let Ok(t) = one_shot else {
        return;
    };
    assert!(t.shape.len() <= limits.max_rank.min(mixnn_model::tensor::MAX_RANK));
    assert_eq!(t.numel(), t.data.len());
    assert!(t.data.len() <= limits.max_elements);
    assert_eq!(t.encoded_len(), bytes.len());
    assert!(t.max_encoded_len() >= bytes.len());
    assert!(t.encode() == bytes, "a tensor has one encoding");
    let mut out = vec![0xEE];
    t.encode_into(&mut out);
    assert!(out[1..] == *bytes, "encode_into appends the same bytes");
}

/// `bytes` fed to a [`StreamDecoder`] `piece` bytes at a time.
fn streamed(bytes: &[u8], piece: usize, limits: DecodeLimits) -> Result<HostTensor, CodecError> {
    let mut dec: Option<StreamDecoder> = None;
    let mut end = 0;
    while end < bytes.len() {
        end = (end + piece).min(bytes.len());
        let prefix = &bytes[..end];
        match dec.as_mut() {
            Some(d) => d.feed(prefix)?,
            None => dec = StreamDecoder::start(prefix, bytes.len(), limits)?,
        }
    }
    match dec {
        Some(d) => d.finish(bytes),
        None => HostTensor::decode(bytes, limits),
    }
}

fn encode(mut input: Input<'_>) {
    let rank = usize::from(input.u8()) % 5;
    let shape: Vec<usize> = (0..rank).map(|_| usize::from(input.u8() % 9)).collect();
    let n: usize = shape.iter().product();
    // Each element from one byte: +0.0 often, -0.0, NaN and the rest too.
    let data: Vec<f32> = (0..n)
        .map(|_| match input.u8() {
            0..=127 => 0.0,
            128 => -0.0,
            129 => f32::NAN,
            130 => f32::from_bits(0x7f80_0001),
            b => f32::from(b) - 200.0,
        })
        .collect();
    let t = HostTensor::new(shape.clone(), data).expect("data fits its shape");
    let e = t.encode();
    assert_eq!(e.len(), t.encoded_len());
    let back = HostTensor::decode(&e, DecodeLimits::default()).expect("an encoding decodes");
    assert_eq!(back.shape, shape);
    let bits = |d: &[f32]| d.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back.data), bits(&t.data), "values bit for bit");
}

fn seeds() -> Vec<Vec<u8>> {
    let sparse = HostTensor::new(vec![2, 8], {
        let mut d = vec![0.0; 16];
        d[3] = 1.5;
        d[9] = -0.0;
        d
    })
    .expect("tensor");
    let dense = HostTensor::new(vec![3], vec![1.0, 2.0, f32::NAN]).expect("tensor");
    let scalar = HostTensor::new(vec![], vec![4.0]).expect("tensor");
    let mut seeds: Vec<Vec<u8>> = [sparse, dense, scalar]
        .iter()
        .map(|t| seed(&[&[DECODE, 4], &t.encode()]))
        .collect();
    seeds.push(seed(&[
        &[ENCODE, 2, 3, 4],
        &[0, 200, 128, 129, 0, 0, 255, 0, 1, 2, 3, 250],
    ]));
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode() {
        for s in seeds().iter().filter(|s| s[0] == DECODE) {
            assert!(HostTensor::decode(&s[2..], DecodeLimits::default()).is_ok());
        }
    }
}

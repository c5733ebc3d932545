//! Property tests for the tensor codec.

use mixnn_model::{Arch, DecodeLimits, HostTensor, Slot};
use proptest::prelude::*;

fn tensor() -> impl Strategy<Value = HostTensor> {
    prop::collection::vec(0usize..5, 0..=4).prop_flat_map(|shape| {
        let n = shape.iter().product::<usize>();
        let element = prop_oneof![
            any::<f32>(),
            // Mostly +0.0, as after a ReLU: the sparse form.
            Just(0.0f32),
            Just(0.0f32),
            Just(0.0f32),
            Just(-0.0f32),
        ];
        prop::collection::vec(element, n).prop_map(move |data| HostTensor {
            shape: shape.clone(),
            data,
        })
    })
}

proptest! {
    #[test]
    fn round_trips(t in tensor()) {
        let back = HostTensor::decode(&t.encode(), DecodeLimits::default()).expect("decode");
        prop_assert_eq!(back.shape, t.shape);
        let bits = |d: &[f32]| d.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&back.data), bits(&t.data));
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(t) = HostTensor::decode(&bytes, DecodeLimits::default()) {
            prop_assert_eq!(&t.encode(), &bytes);
        }
        let _ = Slot::from_bytes(&bytes);
        let _ = Arch::parse(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn truncations_are_errors(t in tensor(), cut in 1usize..64) {
        let b = t.encode();
        let n = b.len().saturating_sub(cut);
        prop_assert!(HostTensor::decode(&b[..n], DecodeLimits::default()).is_err());
    }

    #[test]
    fn arch_display_round_trips(dims in prop::collection::vec(1usize..2000, 2..6)) {
        let s = format!("mlp:{}", dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("-"));
        let a = Arch::parse(&s).expect("valid");
        prop_assert_eq!(a.to_string(), s);
        prop_assert_eq!(a.stages().len(), dims.len() - 1);
    }
}

//! Built-in families on the CPU backend against onnxruntime running the
//! same scikit-learn networks (fixtures/builtin.expected.json), and the
//! artifact round trip.

use serde_json::Value;
use tern_models::{Artifact, ArtifactError, BuiltIn, Family, SpecError, Weights, cpu_device};

fn fixture(name: &str) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/");
    std::fs::read_to_string(format!("{root}{name}")).expect(name)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

fn expected() -> (Value, Vec<f32>) {
    let e: Value = serde_json::from_str(&fixture("builtin.expected.json")).unwrap();
    let input = floats(&e["input"]["data"]);
    (e, input)
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "value {i}: got {g}, onnxruntime {w}");
    }
}

fn load(name: &str) -> Weights {
    serde_json::from_str(&fixture(name)).unwrap()
}

#[test]
fn mlp_matches_onnxruntime_through_an_artifact() {
    let (e, input) = expected();
    let device = cpu_device();
    let weights = load("iris-mlp.weights.json");
    let family = weights.family.clone();
    let bytes = weights.into_artifact(&device).unwrap();
    let loaded = Artifact::decode(bytes.clone(), &device).unwrap();
    assert_eq!(loaded.family, family);
    assert_eq!(BuiltIn::output_names(&family), ["probabilities"]);
    let out = loaded.model.run(input, 8, &device);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1, [8, 3]);
    assert_close(&out[0].0, &floats(&e["mlp"]["probabilities"]), 1e-5);
}

#[test]
fn autoencoder_matches_onnxruntime() {
    let (e, input) = expected();
    let device = cpu_device();
    let weights = load("iris-autoencoder.weights.json");
    assert_eq!(weights.family.layers(), [(4, 8), (8, 3), (3, 8), (8, 4)]);
    let bytes = weights.into_artifact(&device).unwrap();
    let out = Artifact::decode(bytes.clone(), &device).unwrap().model.run(input, 8, &device);
    assert_eq!(out[0].1, [8, 4]);
    assert_eq!(out[1].1, [8]);
    assert_close(&out[0].0, &floats(&e["autoencoder"]["reconstruction"]), 1e-4);
    assert_close(&out[1].0, &floats(&e["autoencoder"]["score"]), 1e-4);
}

#[test]
fn weights_of_the_wrong_shape_are_refused() {
    let device = cpu_device();
    let mut w = load("iris-mlp.weights.json");
    w.layers[1].bias.pop();
    assert_eq!(w.build(&device).unwrap_err(), SpecError::LayerShape { index: 1, inputs: 16, outputs: 3 });
    let mut w = load("iris-mlp.weights.json");
    w.layers.pop();
    assert_eq!(w.build(&device).unwrap_err(), SpecError::LayerCount { expected: 2, got: 1 });
}

#[test]
fn bad_artifacts_get_clear_errors() {
    let device = cpu_device();
    let good = load("iris-mlp.weights.json").into_artifact(&device).unwrap();

    assert_eq!(Artifact::decode(b"\x1f\x8b not this", &device).unwrap_err(), ArtifactError::Magic);
    let mut v = good.clone();
    v[3] = 9;
    assert_eq!(Artifact::decode(v.clone(), &device).unwrap_err(), ArtifactError::Version(9));
    assert!(matches!(Artifact::decode(&good[..6], &device), Err(ArtifactError::Header(_))));
    for cut in [good.len() / 2, good.len() - 1] {
        assert!(matches!(Artifact::decode(&good[..cut], &device), Err(ArtifactError::Weights(_))), "cut at {cut}");
    }

    // A header that claims another shape than the weights have.
    let other =
        Family::Mlp(tern_models::MlpSpec { inputs: 4, hidden: vec![17], outputs: 3, head: tern_models::Head::Softmax });
    let header = postcard::to_allocvec(&other).unwrap();
    let old_len = u32::from_le_bytes(good[4..8].try_into().unwrap()) as usize;
    let mut v = b"TBM\x01".to_vec();
    v.extend_from_slice(&(header.len() as u32).to_le_bytes());
    v.extend_from_slice(&header);
    v.extend_from_slice(&good[8 + old_len..]);
    let err = Artifact::decode(v.clone(), &device).unwrap_err();
    assert!(matches!(err, ArtifactError::Weights(_)), "{err}");

    // A header that would allocate far too much.
    let huge = Family::Mlp(tern_models::MlpSpec {
        inputs: 60_000,
        hidden: vec![60_000],
        outputs: 3,
        head: tern_models::Head::Identity,
    });
    assert!(matches!(huge.validate(), Err(SpecError::Params(_))));
    // 2^16 × 2^16 is 2^32: zero in a 32-bit usize, so a wrapping count
    // would let it through on armv7.
    let wraps = Family::Mlp(tern_models::MlpSpec {
        inputs: tern_models::MAX_WIDTH,
        hidden: vec![tern_models::MAX_WIDTH],
        outputs: tern_models::MAX_WIDTH,
        head: tern_models::Head::Identity,
    });
    assert_eq!(wraps.validate(), Err(SpecError::Params(2 * ((1 << 32) + (1 << 16)))));
    let header = postcard::to_allocvec(&huge).unwrap();
    let mut v = b"TBM\x01".to_vec();
    v.extend_from_slice(&(header.len() as u32).to_le_bytes());
    v.extend_from_slice(&header);
    assert!(matches!(Artifact::decode(v.clone(), &device), Err(ArtifactError::Spec(SpecError::Params(_)))));
}

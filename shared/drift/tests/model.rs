//! A baseline bound to a model's tensors: built from reference requests,
//! carried as a file, read back and fed by requests.

use tern_drift::{Collector, ModelBaseline, Plan, Source};
use tern_proto::{DType, Tensor, TensorData, TensorSpec};

fn spec(name: &str, dtype: DType, shape: &[Option<u64>]) -> TensorSpec {
    TensorSpec { name: name.into(), dtype, shape: shape.to_vec() }
}

fn signature() -> (Vec<TensorSpec>, Vec<TensorSpec>) {
    (
        vec![spec("x", DType::F32, &[None, Some(3)])],
        vec![spec("label", DType::I64, &[None]), spec("probabilities", DType::F32, &[None, Some(2)])],
    )
}

fn plan() -> Vec<(String, Source, Plan)> {
    let col = |c: u32| Source::InputColumn { input: "x".into(), column: c };
    vec![
        ("a".into(), col(0), Plan::Numeric { bins: 10 }),
        ("b".into(), col(1), Plan::Numeric { bins: 10 }),
        ("kind".into(), col(2), Plan::Categorical),
        ("output:label".into(), Source::OutputColumn { output: "label".into(), column: 0 }, Plan::Categorical),
        ("output:probabilities".into(), Source::OutputScores { output: "probabilities".into() }, Plan::Classes),
    ]
}

/// A request of `rows` rows: `a` runs over [shift, shift + 1), `b` over
/// [0, 1), `kind` cycles 0, 1, 2; the "model" says class 1 when a > 0.5.
fn request(rows: usize, start: usize, shift: f32) -> (Vec<Tensor>, Vec<Tensor>) {
    let mut x = Vec::new();
    let (mut label, mut probs) = (Vec::new(), Vec::new());
    for r in start..start + rows {
        let a = ((r * 37) % 100) as f32 / 100.0 + shift;
        let b = ((r * 53) % 100) as f32 / 100.0;
        x.extend([a, b, (r % 3) as f32]);
        let p = a.clamp(0.0, 1.0);
        label.push(i64::from(p > 0.5));
        probs.extend([1.0 - p, p]);
    }
    (
        vec![Tensor::new(vec![rows, 3], TensorData::F32(x)).unwrap()],
        vec![
            Tensor::new(vec![rows], TensorData::I64(label)).unwrap(),
            Tensor::new(vec![rows, 2], TensorData::F32(probs)).unwrap(),
        ],
    )
}

fn reference() -> ModelBaseline {
    let (inputs, outputs) = signature();
    let mut c = Collector::new(plan(), &inputs, &outputs).unwrap();
    for batch in 0..10 {
        let (i, o) = request(100, batch * 100, 0.0);
        c.push(&i, Some(&o)).unwrap();
    }
    c.finish().unwrap()
}

#[test]
fn a_window_like_the_reference_is_close_and_a_shifted_feature_is_not() {
    let model = reference();
    let bytes = model.encode();
    let model = ModelBaseline::decode(&bytes).unwrap();
    let (inputs, outputs) = signature();
    let binding = model.bind(&inputs, &outputs).unwrap();

    let mut same = model.baseline.window(Some(tern_drift::WINDOW_K), 1);
    let (i, o) = request(500, 7, 0.0);
    assert_eq!(binding.observe(&model.baseline, &mut same, &i, &o).unwrap(), 500);
    let d = model.baseline.compare(&same).unwrap();
    assert_eq!(d.len(), 5);
    for f in &d {
        assert!(f.linf.unwrap() < 0.1, "{}: {:?}", f.feature, f.linf);
        assert_eq!(f.n, 500, "{}", f.feature);
    }

    let mut shifted = model.baseline.window(Some(tern_drift::WINDOW_K), 2);
    let (i, o) = request(500, 7, 0.5);
    binding.observe(&model.baseline, &mut shifted, &i, &o).unwrap();
    let d = model.baseline.compare(&shifted).unwrap();
    let by = |name: &str| d.iter().find(|f| f.feature == name).unwrap();
    assert!(by("a").linf.unwrap() > 0.4, "{:?}", by("a"));
    assert!(by("a").psi.unwrap() > 1.0, "{:?}", by("a"));
    assert!(by("b").linf.unwrap() < 0.1, "{:?}", by("b"));
    assert!(by("kind").linf.unwrap() < 0.1, "{:?}", by("kind"));
    // The model answers class 1 far more often: its outputs moved too.
    assert!(by("output:label").linf.unwrap() > 0.3, "{:?}", by("output:label"));
    assert!(by("output:probabilities").linf.unwrap() > 0.3, "{:?}", by("output:probabilities"));
}

#[test]
fn binding_checks_the_signature() {
    let model = reference();
    let (inputs, outputs) = signature();
    let narrow = vec![spec("x", DType::F32, &[None, Some(2)])];
    let e = model.bind(&narrow, &outputs).unwrap_err().to_string();
    assert!(e.contains("feature \"kind\"") && e.contains("no column 2"), "{e}");
    let renamed = vec![spec("input", DType::F32, &[None, Some(3)])];
    let e = model.bind(&renamed, &outputs).unwrap_err().to_string();
    assert!(e.contains("no input named \"x\""), "{e}");
    let three = vec![outputs[0].clone(), spec("probabilities", DType::F32, &[None, Some(3)])];
    let e = model.bind(&inputs, &three).unwrap_err().to_string();
    assert!(e.contains("2 classes"), "{e}");
}

#[test]
fn a_request_that_does_not_fit_counts_nothing() {
    let model = reference();
    let (inputs, outputs) = signature();
    let binding = model.bind(&inputs, &outputs).unwrap();
    let mut w = model.baseline.window(None, 1);
    let empty = w.clone();
    let (i, o) = request(4, 0, 0.0);
    // Two columns where the binding reads a third.
    let narrow = vec![Tensor::new(vec![4, 2], TensorData::F32(vec![0.0; 8])).unwrap()];
    assert!(binding.observe(&model.baseline, &mut w, &narrow, &o).is_err());
    assert!(binding.observe(&model.baseline, &mut w, &i, &o[..1]).is_err());
    let lying = vec![Tensor { shape: vec![9, 3], data: TensorData::F32(vec![0.0; 12]) }];
    assert!(binding.observe(&model.baseline, &mut w, &lying, &o).is_err());
    assert_eq!(w, empty);
}

#[test]
fn images_are_summarized_per_channel() {
    let inputs = vec![spec("image", DType::U8, &[None, Some(3), Some(2), Some(2)])];
    let outputs = vec![spec("logits", DType::F32, &[None, Some(4)])];
    let plan = vec![
        ("image".into(), Source::InputImage { input: "image".into() }, Plan::Image),
        ("output:logits".into(), Source::OutputScores { output: "logits".into() }, Plan::Classes),
    ];
    let mut c = Collector::new(plan, &inputs, &outputs).unwrap();
    let pixels: Vec<u8> = (0..24).map(|i| (i * 10) as u8).collect();
    let image = Tensor::new(vec![2, 3, 2, 2], TensorData::U8(pixels)).unwrap();
    let logits = Tensor::new(vec![2, 4], TensorData::F32(vec![0.0, 3.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0])).unwrap();
    c.push(&[image], Some(&[logits])).unwrap();
    let model = c.finish().unwrap();
    let tern_drift::Summary::Image(ch) = &model.baseline.profile.features[0] else { panic!() };
    // Channel 0 is pixels 0..4 of image 0 and 12..16 of image 1.
    assert_eq!(ch[0].n, 8);
    assert_eq!(ch[0].mean, (0.0 + 10.0 + 20.0 + 30.0 + 120.0 + 130.0 + 140.0 + 150.0) / 8.0);
    let tern_drift::Summary::Classes(s) = &model.baseline.profile.features[1] else { panic!() };
    assert_eq!(s.counts, vec![1, 1, 0, 0]);
}

#[test]
fn decoding_checks_what_it_reads() {
    let bytes = reference().encode();
    assert!(ModelBaseline::decode(&bytes[4..]).unwrap_err().to_string().contains("not a Tern baseline"));
    for cut in [5, bytes.len() / 2, bytes.len() - 1] {
        assert!(ModelBaseline::decode(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    let mut model = reference();
    model.sources.pop();
    assert!(ModelBaseline::decode(&model.encode()).unwrap_err().to_string().contains("4 sources for 5 features"));
    let mut model = reference();
    model.sources.swap(0, 4);
    assert!(ModelBaseline::decode(&model.encode()).unwrap_err().to_string().contains("cannot feed"));
}

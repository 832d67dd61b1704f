//! A baseline bound to a model's tensors: which input column, image input
//! or output each feature is read from, the file that carries both, and the
//! collector that builds one from reference data run through the model.

use crate::profile::{Feature, Kind, Layout, Profile, Summary};
use crate::{Baseline, BaselineBuilder, DriftError};
use serde::{Deserialize, Serialize};
use tern_proto::{Tensor, TensorData, TensorSpec};

/// Where a feature's values come from in one request to the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// Element `column` of the last axis of input `input`, once per row
    /// (every index of the axes before it).
    InputColumn {
        /// The input's name.
        input: String,
        /// The index on its last axis.
        column: u32,
    },
    /// Input `input` as a batch of images with channels on axis 1 (NCHW).
    InputImage {
        /// The input's name.
        input: String,
    },
    /// The last axis of output `output` as class scores, one answer per row.
    OutputScores {
        /// The output's name.
        output: String,
    },
    /// Element `column` of the last axis of output `output`, once per row (a
    /// regressor's value, a label).
    OutputColumn {
        /// The output's name.
        output: String,
        /// The index on its last axis.
        column: u32,
    },
}

impl Source {
    fn tensor(&self) -> (Side, &str) {
        match self {
            Source::InputColumn { input, .. } | Source::InputImage { input } => (Side::Input, input),
            Source::OutputScores { output } | Source::OutputColumn { output, .. } => (Side::Output, output),
        }
    }

    fn fits(&self, kind: &Kind) -> bool {
        matches!(
            (self, kind),
            (Source::InputColumn { .. } | Source::OutputColumn { .. }, Kind::Numeric { .. } | Kind::Categorical { .. })
                | (Source::InputImage { .. }, Kind::Image { .. })
                | (Source::OutputScores { .. }, Kind::Classes { .. })
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Input,
    Output,
}

/// A model version's baseline and where each of its features comes from:
/// what a device windows its requests against. One [`Source`] per feature,
/// in the layout's order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelBaseline {
    /// The reference data's summaries.
    pub baseline: Baseline,
    /// Where each feature is read from.
    pub sources: Vec<Source>,
}

/// The first bytes of an encoded [`ModelBaseline`]: `TDB` and the format's
/// version.
pub const MAGIC: [u8; 4] = *b"TDB\x01";

impl ModelBaseline {
    /// A model baseline from its parts, checked: one source per feature, of
    /// a kind that fits it.
    pub fn new(baseline: Baseline, sources: Vec<Source>) -> Result<Self, DriftError> {
        let features = baseline.layout.features();
        if sources.len() != features.len() {
            return Err(DriftError::Invalid(format!("{} sources for {} features", sources.len(), features.len())));
        }
        for (f, s) in features.iter().zip(&sources) {
            if !s.fits(&f.kind) {
                return Err(DriftError::Invalid(format!("feature {:?}: {s:?} cannot feed {:?}", f.name, f.kind)));
            }
            let (_, name) = s.tensor();
            if name.is_empty() || name.len() > 256 {
                return Err(DriftError::Invalid(format!(
                    "feature {:?}: a tensor name of {} bytes",
                    f.name,
                    name.len()
                )));
            }
        }
        Ok(Self { baseline, sources })
    }

    /// The file: [`MAGIC`], then postcard.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend(postcard::to_stdvec(self).expect("a model baseline always encodes"));
        out
    }

    /// A model baseline from bytes that came from elsewhere, checked. The
    /// caller bounds `bytes` (a decoded sketch or count list is never
    /// longer than the bytes that carried it).
    pub fn decode(bytes: &[u8]) -> Result<Self, DriftError> {
        let body = bytes
            .strip_prefix(&MAGIC)
            .ok_or_else(|| DriftError::Invalid("not a Tern baseline file (no TDB\\x01 header)".into()))?;
        let ModelBaseline { baseline, sources } = postcard::from_bytes(body)?;
        Self::new(Baseline::new(baseline.layout, baseline.profile)?, sources)
    }

    /// The same without its quantile sketches: what devices get (their
    /// distances then come from the bins).
    pub fn without_sketches(&self) -> Self {
        let baseline = Baseline {
            layout: self.baseline.layout.clone(),
            profile: self.baseline.profile.clone().without_sketches(),
        };
        Self { baseline, sources: self.sources.clone() }
    }

    /// The most bytes a window on this layout can take encoded without
    /// sketches (what a device sends per window): every count at its
    /// largest.
    pub fn max_window_bytes(&self) -> usize {
        let mut w = self.baseline.window(None, 0);
        for s in &mut w.features {
            match s {
                Summary::Numeric(n) => {
                    n.counts.iter_mut().for_each(|c| *c = u64::MAX);
                    (n.missing, n.moments.n) = (u64::MAX, u64::MAX);
                }
                Summary::Categorical(c) => {
                    c.counts.iter_mut().for_each(|c| *c = u64::MAX);
                    c.missing = u64::MAX;
                }
                Summary::Image(channels) => channels.iter_mut().for_each(|m| m.n = u64::MAX),
                Summary::Classes(c) => {
                    c.counts.iter_mut().chain(c.confidence.iter_mut()).for_each(|c| *c = u64::MAX);
                    c.missing = u64::MAX;
                }
            }
        }
        postcard::to_stdvec(&w).map_or(usize::MAX, |v| v.len())
    }

    /// Binds the sources to a model's signature, checking that each tensor
    /// is there and has room for what is read from it.
    pub fn bind(&self, inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Result<Binding, DriftError> {
        let mut taps = Vec::with_capacity(self.sources.len());
        for (f, s) in self.baseline.layout.features().iter().zip(&self.sources) {
            let (side, name) = s.tensor();
            let specs = if side == Side::Input { inputs } else { outputs };
            let bad = |why: String| DriftError::Invalid(format!("feature {:?}: {why}", f.name));
            let tensor = specs.iter().position(|t| t.name == name).ok_or_else(|| {
                bad(format!("the model has no {} named {name:?}", if side == Side::Input { "input" } else { "output" }))
            })?;
            let spec = &specs[tensor];
            let last = spec.shape.last().copied().flatten();
            let tap = match (s, &f.kind) {
                (Source::InputColumn { column, .. } | Source::OutputColumn { column, .. }, _) => {
                    if spec.shape.is_empty() && *column > 0 {
                        return Err(bad(format!("{name:?} is a scalar; it has no column {column}")));
                    }
                    if last.is_some_and(|d| u64::from(*column) >= d) {
                        return Err(bad(format!(
                            "{name:?} has {} columns; there is no column {column}",
                            last.unwrap_or(0)
                        )));
                    }
                    let flat = spec.shape.is_empty() || (spec.shape.len() == 1 && last.is_none());
                    if flat && *column > 0 {
                        return Err(bad(format!("{name:?} holds one value per row; there is no column {column}")));
                    }
                    Tap::Column { side, tensor, column: *column as usize, flat }
                }
                (Source::InputImage { .. }, Kind::Image { channels }) => {
                    if spec.shape.len() != 4 {
                        return Err(bad(format!("{name:?} has rank {}, not an NCHW image's 4", spec.shape.len())));
                    }
                    if spec.shape[1].is_some_and(|c| c != u64::from(*channels)) {
                        return Err(bad(format!("{name:?} has {:?} channels, the baseline {channels}", spec.shape[1])));
                    }
                    Tap::Image { tensor, channels: usize::from(*channels) }
                }
                (Source::OutputScores { .. }, Kind::Classes { classes }) => {
                    if last != Some(u64::from(*classes)) {
                        return Err(bad(format!(
                            "{name:?}'s last axis is {last:?}, the baseline has {classes} classes"
                        )));
                    }
                    Tap::Scores { tensor }
                }
                _ => return Err(bad(format!("{s:?} cannot feed {:?}", f.kind))),
            };
            taps.push(tap);
        }
        Ok(Binding { taps })
    }
}

impl Tap {
    fn reads_inputs(&self) -> bool {
        matches!(self, Tap::Column { side: Side::Input, .. } | Tap::Image { .. })
    }
}

#[derive(Clone, Copy, Debug)]
enum Tap {
    /// `flat`: every element is a row (a rank-1 tensor whose one axis is
    /// open is a batch of scalars).
    Column {
        side: Side,
        tensor: usize,
        column: usize,
        flat: bool,
    },
    Image {
        tensor: usize,
        channels: usize,
    },
    Scores {
        tensor: usize,
    },
}

/// A [`ModelBaseline`]'s sources resolved against one signature: it reads
/// a request's tensors into a window.
#[derive(Clone, Debug)]
pub struct Binding {
    taps: Vec<Tap>,
}

/// A tensor's elements as `f64`, converted once per request however many
/// features read it.
struct Cached<'a> {
    tensors: &'a [Tensor],
    f64s: Vec<Option<Vec<f64>>>,
}

impl<'a> Cached<'a> {
    fn new(tensors: &'a [Tensor]) -> Self {
        Self { tensors, f64s: vec![None; tensors.len()] }
    }

    fn get(&mut self, i: usize) -> Option<(&'a Tensor, &[f64])> {
        let t = self.tensors.get(i)?;
        Some((t, self.f64s[i].get_or_insert_with(|| t.data.to_f64())))
    }
}

fn f32s(t: &Tensor) -> std::borrow::Cow<'_, [f32]> {
    match &t.data {
        TensorData::F32(v) => std::borrow::Cow::Borrowed(v),
        other => std::borrow::Cow::Owned(other.to_f64().into_iter().map(|x| x as f32).collect()),
    }
}

/// Rows of a tensor read along its last axis (or, `flat`, one per
/// element): `(rows, width)`.
fn rows(t: &Tensor, flat: bool) -> (usize, usize) {
    if flat {
        return (t.data.len(), 1);
    }
    match t.shape.last() {
        Some(&w) if w > 0 => (t.data.len() / w, w),
        Some(_) => (0, 0),
        None => (t.data.len(), 1),
    }
}

impl Binding {
    /// Counts one request into `window` (a profile on `baseline`'s layout):
    /// `inputs` and `outputs` in the signature's order. Returns the rows
    /// counted (the first feature's). A tensor missing or too narrow for
    /// a feature is an error, and then nothing of the request is counted.
    pub fn observe(
        &self,
        baseline: &Baseline,
        window: &mut Profile,
        inputs: &[Tensor],
        outputs: &[Tensor],
    ) -> Result<u64, DriftError> {
        self.check(inputs, outputs)?;
        self.count(baseline, window, inputs, outputs, |_| true)
    }

    /// Counts a request's inputs only (its features read from inputs), as
    /// it arrives: see [`Binding::observe`]. Returns its rows.
    pub fn observe_inputs(
        &self,
        baseline: &Baseline,
        window: &mut Profile,
        inputs: &[Tensor],
    ) -> Result<u64, DriftError> {
        let part = Binding { taps: self.taps.iter().copied().filter(Tap::reads_inputs).collect() };
        part.check(inputs, &[])?;
        self.count(baseline, window, inputs, &[], Tap::reads_inputs)
    }

    /// Counts the model's answer to a request (its features read from
    /// outputs): see [`Binding::observe`].
    pub fn observe_outputs(
        &self,
        baseline: &Baseline,
        window: &mut Profile,
        outputs: &[Tensor],
    ) -> Result<(), DriftError> {
        let part = Binding { taps: self.taps.iter().copied().filter(|t| !t.reads_inputs()).collect() };
        part.check(&[], outputs)?;
        self.count(baseline, window, &[], outputs, |t| !t.reads_inputs()).map(drop)
    }

    /// Whether any feature is read from the model's outputs.
    pub fn reads_outputs(&self) -> bool {
        self.taps.iter().any(|t| !t.reads_inputs())
    }

    fn count(
        &self,
        baseline: &Baseline,
        window: &mut Profile,
        inputs: &[Tensor],
        outputs: &[Tensor],
        which: impl Fn(&Tap) -> bool,
    ) -> Result<u64, DriftError> {
        let layout = &baseline.layout;
        let (mut ins, mut outs) = (Cached::new(inputs), Cached::new(outputs));
        let mut counted = None;
        for (i, tap) in self.taps.iter().enumerate().filter(|(_, t)| which(t)) {
            let n = match *tap {
                Tap::Column { side, tensor, column, flat } => {
                    let cache = if side == Side::Input { &mut ins } else { &mut outs };
                    let (t, values) = cache.get(tensor).expect("checked above");
                    let (n, width) = rows(t, flat);
                    for r in 0..n {
                        window.observe(layout, i, values[r * width + column])?;
                    }
                    n
                }
                Tap::Image { tensor, .. } => {
                    let t = &inputs[tensor];
                    let (batch, channels) = (t.shape[0], t.shape[1]);
                    let plane = t.shape[2] * t.shape[3];
                    let pixels = f32s(t);
                    for b in 0..batch {
                        for c in 0..channels {
                            let at = (b * channels + c) * plane;
                            window.observe_channel(layout, i, c, &pixels[at..at + plane])?;
                        }
                    }
                    batch
                }
                Tap::Scores { tensor } => {
                    let t = &outputs[tensor];
                    let (n, width) = rows(t, false);
                    let scores = f32s(t);
                    for r in 0..n {
                        window.observe_scores(layout, i, &scores[r * width..(r + 1) * width])?;
                    }
                    n
                }
            };
            counted.get_or_insert(n as u64);
        }
        Ok(counted.unwrap_or(0))
    }

    fn check(&self, inputs: &[Tensor], outputs: &[Tensor]) -> Result<(), DriftError> {
        let missing = |what: &str, i: usize| DriftError::Invalid(format!("the request has no {what} {i}"));
        for t in inputs.iter().chain(outputs) {
            if t.shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d)) != Some(t.data.len()) {
                return Err(DriftError::Invalid(format!(
                    "a tensor of shape {:?} with {} elements",
                    t.shape,
                    t.data.len()
                )));
            }
        }
        for tap in &self.taps {
            match *tap {
                Tap::Column { side, tensor, column, flat } => {
                    let t = if side == Side::Input { inputs.get(tensor) } else { outputs.get(tensor) };
                    let t = t.ok_or_else(|| missing(if side == Side::Input { "input" } else { "output" }, tensor))?;
                    let (n, width) = rows(t, flat);
                    if n > 0 && column >= width {
                        return Err(DriftError::Invalid(format!("a tensor of width {width} has no column {column}")));
                    }
                }
                Tap::Image { tensor, channels } => {
                    let t = inputs.get(tensor).ok_or_else(|| missing("input", tensor))?;
                    if t.shape.len() != 4 || t.shape[1] != channels {
                        return Err(DriftError::Invalid(format!(
                            "an image of shape {:?}, not {channels} channels",
                            t.shape
                        )));
                    }
                }
                Tap::Scores { tensor } => {
                    outputs.get(tensor).ok_or_else(|| missing("output", tensor))?;
                }
            }
        }
        Ok(())
    }
}

/// How to summarize one feature of reference data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Numbers, in this many quantile bins.
    Numeric {
        /// Bins between the smallest and largest value.
        bins: usize,
    },
    /// Codes (see [`BaselineBuilder::categorical`]).
    Categorical,
    /// An image input's channels.
    Image,
    /// A classifier's scores.
    Classes,
}

enum Held {
    Values(Vec<f64>),
    Profiled(Profile, Layout),
}

/// Builds a [`ModelBaseline`] from reference requests and the model's
/// answers to them: numeric and categorical values are held until
/// [`Collector::finish`] places the bins; images and scores are counted as
/// they come.
pub struct Collector {
    features: Vec<(String, Source, Plan)>,
    binding: Binding,
    held: Vec<Held>,
}

impl Collector {
    /// A collector of `features` (name, where from, how), bound to a
    /// model's signature.
    pub fn new(
        features: Vec<(String, Source, Plan)>,
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
    ) -> Result<Self, DriftError> {
        let mut layout_features = Vec::new();
        let mut held = Vec::new();
        for (name, source, plan) in &features {
            let kind = match (plan, source) {
                (Plan::Numeric { .. }, _) => Kind::Numeric { cuts: Vec::new() },
                (Plan::Categorical, _) => Kind::Categorical { values: Vec::new() },
                (Plan::Image, Source::InputImage { input }) => {
                    let spec = inputs.iter().find(|s| &s.name == input);
                    let channels = spec.and_then(|s| s.shape.get(1).copied().flatten()).ok_or_else(|| {
                        DriftError::Invalid(format!("feature {name:?}: input {input:?} has no fixed channel axis"))
                    })?;
                    Kind::Image { channels: u16::try_from(channels).unwrap_or(u16::MAX) }
                }
                (Plan::Classes, Source::OutputScores { output }) => {
                    let spec = outputs.iter().find(|s| &s.name == output);
                    let classes = spec.and_then(|s| s.shape.last().copied().flatten()).ok_or_else(|| {
                        DriftError::Invalid(format!("feature {name:?}: output {output:?} has no fixed class axis"))
                    })?;
                    Kind::Classes { classes: u32::try_from(classes).unwrap_or(u32::MAX) }
                }
                _ => {
                    return Err(DriftError::Invalid(format!(
                        "feature {name:?}: {plan:?} cannot be read from {source:?}"
                    )));
                }
            };
            held.push(match kind {
                Kind::Numeric { .. } | Kind::Categorical { .. } => Held::Values(Vec::new()),
                _ => {
                    let layout = Layout::of(vec![Feature { name: name.clone(), kind: kind.clone() }])?;
                    Held::Profiled(Profile::new(&layout, None, 0), layout)
                }
            });
            layout_features.push(Feature { name: name.clone(), kind });
        }
        let layout = Layout::unchecked(layout_features);
        let sources: Vec<Source> = features.iter().map(|(_, s, _)| s.clone()).collect();
        let binding = ModelBaseline::bind_parts(&layout, &sources, inputs, outputs)?;
        Ok(Self { features, binding, held })
    }

    /// Counts one reference request and the model's answer to it
    /// (`None`: the request was not run, and only its inputs count).
    pub fn push(&mut self, inputs: &[Tensor], outputs: Option<&[Tensor]>) -> Result<(), DriftError> {
        let taps: Vec<Tap> = match outputs {
            Some(_) => self.binding.taps.clone(),
            None => self.binding.taps.iter().copied().filter(Tap::reads_inputs).collect(),
        };
        let outputs = outputs.unwrap_or(&[]);
        Binding { taps }.check(inputs, outputs)?;
        let (mut ins, mut outs) = (Cached::new(inputs), Cached::new(outputs));
        for (tap, held) in self.binding.taps.iter().zip(&mut self.held) {
            if !tap.reads_inputs() && outputs.is_empty() {
                continue;
            }
            match (*tap, held) {
                (Tap::Column { side, tensor, column, flat }, Held::Values(values)) => {
                    let cache = if side == Side::Input { &mut ins } else { &mut outs };
                    let (t, all) = cache.get(tensor).expect("checked above");
                    let (n, width) = rows(t, flat);
                    values.extend((0..n).map(|r| all[r * width + column]));
                }
                (tap, Held::Profiled(p, layout)) => {
                    let b = ModelBaseline::single(layout);
                    Binding { taps: vec![tap] }.observe(&b, p, inputs, outputs)?;
                }
                _ => unreachable!("a tap and what it holds are made together"),
            }
        }
        Ok(())
    }

    /// The model baseline.
    pub fn finish(self) -> Result<ModelBaseline, DriftError> {
        let mut builder = BaselineBuilder::new();
        let mut sources = Vec::new();
        for ((name, source, plan), held) in self.features.into_iter().zip(self.held) {
            match (plan, held) {
                (Plan::Numeric { bins }, Held::Values(v)) => builder.numeric(&name, &v, bins)?,
                (Plan::Categorical, Held::Values(v)) => builder.categorical(&name, &v)?,
                (_, Held::Profiled(mut p, layout)) => {
                    let kind = layout.features()[0].kind.clone();
                    builder.profiled(&name, kind, p.features.remove(0))?
                }
                _ => unreachable!("a plan and what it holds are made together"),
            };
            sources.push(source);
        }
        ModelBaseline::new(builder.build()?, sources)
    }
}

impl ModelBaseline {
    fn bind_parts(
        layout: &Layout,
        sources: &[Source],
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
    ) -> Result<Binding, DriftError> {
        let empty = Profile { features: Vec::new() };
        let probe =
            ModelBaseline { baseline: Baseline { layout: layout.clone(), profile: empty }, sources: sources.to_vec() };
        probe.bind(inputs, outputs)
    }

    fn single(layout: &Layout) -> Baseline {
        Baseline { layout: layout.clone(), profile: Profile { features: Vec::new() } }
    }
}

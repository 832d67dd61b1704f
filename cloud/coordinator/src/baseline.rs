//! Training baselines from reference data (`tern model register
//! --baseline`): a CSV with a header, one column per feature of the model's
//! input, or a `.npy` batch of its input tensors; complete rows run
//! through the model for the distribution of its outputs.

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use tern_drift::{Collector, ModelBaseline, Plan, Source};
use tern_proto::{DType, Tensor, TensorData, TensorSpec};

/// Rows run through the model at once where its batch axis is open.
const BATCH: usize = 64;

/// How the reference data is summarized.
#[derive(Debug, Clone)]
pub struct Options {
    /// CSV columns holding category codes.
    pub categorical: Vec<String>,
    /// Quantile bins per numeric feature.
    pub bins: usize,
}

/// What building the baseline did, for the user.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// Rows (or samples) read.
    pub rows: usize,
    /// Rows run through the model.
    pub run: usize,
    /// Why outputs are not in the baseline, if they are not.
    pub outputs_skipped: Option<String>,
    /// Features summarized.
    pub features: Vec<String>,
}

/// The model's signature, and the model itself where it runs as it is.
pub struct Model {
    /// Inputs.
    pub inputs: Vec<TensorSpec>,
    /// Outputs.
    pub outputs: Vec<TensorSpec>,
    /// The loaded model; `None` where raw tract refuses the source.
    pub backend: Option<Box<dyn tern_runtime::Backend>>,
    /// Why it is `None`.
    pub why_not: Option<String>,
}

/// Loads a model file as the registry would: the signature, and the model
/// where raw tract runs it (a source that needs compiling gives its
/// signature from `tern_compile::probe` and no outputs).
pub fn load(
    bytes: &[u8],
    shapes: &std::collections::BTreeMap<String, Vec<usize>>,
    consts: &std::collections::BTreeMap<String, String>,
) -> Result<Model> {
    let format = tern_runtime::sniff_format(bytes);
    match tern_runtime::load(format, bytes.to_vec()) {
        Ok(b) => {
            Ok(Model { inputs: b.inputs().to_vec(), outputs: b.outputs().to_vec(), backend: Some(b), why_not: None })
        }
        Err(e) if format == tern_proto::ModelFormat::Onnx => {
            let (inputs, outputs) = tern_compile::probe(bytes, shapes, consts)
                .map_err(|c| anyhow::anyhow!("model refused ({format}): {e}; and compiling does not help: {c}"))?;
            Ok(Model { inputs, outputs, backend: None, why_not: Some(format!("raw tract refuses the source: {e}")) })
        }
        Err(e) => bail!("model refused ({format}): {e}"),
    }
}

/// Builds the baseline of `data` (`.csv` or `.npy`) for `model`.
pub fn build(data: &Path, model: &Model, opts: &Options) -> Result<(ModelBaseline, Report)> {
    let bytes = std::fs::read(data).with_context(|| format!("reading {}", data.display()))?;
    let shown = data.display().to_string();
    let [input] = model.inputs.as_slice() else {
        bail!(
            "--baseline fills one input; the model has {} ({})",
            model.inputs.len(),
            model.inputs.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
        );
    };
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        let stats: tern_drift::sagemaker::Statistics = serde_json::from_slice(&bytes)
            .with_context(|| format!("{shown}: not Model Monitor's statistics.json schema"))?;
        let (baseline, notes) = stats.to_baseline(&input.name).with_context(|| shown.clone())?;
        baseline.bind(&model.inputs, &model.outputs).with_context(|| format!("{shown} does not fit the model"))?;
        for n in &notes {
            tracing::warn!("{shown}: {n}");
        }
        let rows = stats.dataset.item_count as usize;
        let features = baseline.baseline.layout.features().iter().map(|f| f.name.clone()).collect();
        let why = "a Model Monitor statistics.json has no outputs".to_owned();
        return Ok((baseline, Report { rows, run: 0, outputs_skipped: Some(why), features }));
    }
    let table = if bytes.starts_with(b"\x93NUMPY") {
        npy(&bytes, input).with_context(|| format!("{shown}: not a usable .npy"))?
    } else {
        csv_table(&bytes, input, opts, &shown)?
    };
    let Table { shape, values, mut features, complete } = table;
    let rows = shape[0];
    let mut report = Report { rows, ..Report::default() };
    let mut outputs = Vec::new();
    match &model.backend {
        None => report.outputs_skipped = model.why_not.clone(),
        Some(_) => {
            for o in &model.outputs {
                let name = format!("output:{}", o.name);
                match output_plan(o) {
                    Some((source, plan)) => outputs.push((name, source, plan)),
                    None => tracing::info!("output {o} has no drift summary (not class scores or one value per row)"),
                }
            }
        }
    }
    features.extend(outputs.iter().cloned());
    let names: Vec<String> = features.iter().map(|(n, _, _)| n.clone()).collect();
    let mut collector = Collector::new(features, &model.inputs, &model.outputs)?;
    let per_row: usize = shape[1..].iter().product();
    let batch = match input.shape.first() {
        Some(None) => BATCH,
        _ => 1,
    };
    let pb = ProgressBar::new(rows as u64);
    pb.set_style(ProgressStyle::with_template("baseline {bar:30} {pos}/{len} rows").expect("template"));
    let mut start = 0;
    while start < rows {
        let end = (start + batch).min(rows);
        let tensor = |from: usize, to: usize| -> Result<Tensor> {
            let mut dims = shape.clone();
            dims[0] = to - from;
            if input.shape.len() + 1 == dims.len() {
                dims.remove(0);
            }
            tensor_of(input.dtype, dims, &values[from * per_row..to * per_row])
        };
        let run = |inputs: Vec<Tensor>, what: String| -> Result<Vec<Tensor>> {
            let b = model.backend.as_ref().expect("only run with a backend");
            tern_runtime::run_guarded(b.as_ref(), inputs)
                .map_err(|e| anyhow::anyhow!("{shown}: the model failed on {what}: {e}"))
        };
        if outputs.is_empty() {
            collector.push(&[tensor(start, end)?], None)?;
        } else if complete[start..end].iter().all(|c| *c) {
            let inputs = vec![tensor(start, end)?];
            let answers = run(inputs.clone(), format!("rows {}..={}", start + 1, end))?;
            collector.push(&inputs, Some(&answers))?;
            report.run += end - start;
        } else {
            // A row with a missing value counts for its inputs but is not run.
            for (r, whole) in complete.iter().enumerate().take(end).skip(start) {
                let inputs = vec![tensor(r, r + 1)?];
                if *whole {
                    let answers = run(inputs.clone(), format!("row {}", r + 1))?;
                    collector.push(&inputs, Some(&answers))?;
                    report.run += 1;
                } else {
                    collector.push(&inputs, None)?;
                }
            }
        }
        pb.set_position(end as u64);
        start = end;
    }
    pb.finish_and_clear();
    report.features = names;
    let baseline = collector.finish().with_context(|| format!("{shown}: cannot summarize it"))?;
    Ok((baseline, report))
}

/// Where an output's drift summary comes from: class scores (floats over
/// a fixed last axis of 2 or more), a value per row (a float or integer
/// tensor whose last axis is 1 or the batch).
fn output_plan(o: &TensorSpec) -> Option<(Source, Plan)> {
    let float = matches!(o.dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16);
    let integer = !float && o.dtype != DType::Bool;
    let last = o.shape.last().copied();
    let one_per_row = match o.shape.len() {
        1 => last == Some(None) || last == Some(Some(1)),
        2 => last == Some(Some(1)),
        _ => false,
    };
    let column = Source::OutputColumn { output: o.name.clone(), column: 0 };
    match (float, integer, one_per_row) {
        (true, _, true) => Some((column, Plan::Numeric { bins: tern_drift::DEFAULT_BINS })),
        (_, true, true) => Some((column, Plan::Categorical)),
        (true, _, false) if o.shape.len() == 2 && matches!(last, Some(Some(c)) if c >= 2) => {
            Some((Source::OutputScores { output: o.name.clone() }, Plan::Classes))
        }
        _ => None,
    }
}

/// Reference data as one flat tensor: `shape[0]` rows.
struct Table {
    shape: Vec<usize>,
    values: Vec<f64>,
    features: Vec<(String, Source, Plan)>,
    /// Whether each row has every value (only those are run).
    complete: Vec<bool>,
}

fn csv_table(bytes: &[u8], input: &TensorSpec, opts: &Options, shown: &str) -> Result<Table> {
    ensure!(!bytes.iter().all(|b| b.is_ascii_whitespace()), "{shown} is empty: a baseline CSV starts with a header");
    ensure!(
        input.shape.len() == 2,
        "{shown}: a CSV fills an input of rank 2 (rows × features); {input} has rank {} (give a .npy)",
        input.shape.len()
    );
    let (mut reader, header) = csv_reader(bytes, true, shown)?;
    if let Some(i) = header.iter().position(|h| h.is_empty()) {
        bail!("{shown} line 1: column {} has no name", i + 1);
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = header.iter().find(|h| !seen.insert(h.as_str())) {
        bail!("{shown} line 1: column {dup:?} appears twice");
    }
    if let Some(width) = input.shape[1] {
        let width = width as usize;
        if header.len() < width {
            bail!(
                "{shown} line 1: {} columns, but input {input} takes {width} features: {} missing (columns are the input's features in order)",
                header.len(),
                width - header.len()
            );
        }
        if header.len() > width {
            bail!(
                "{shown} line 1: {} columns, but input {input} takes {width} features: column {:?} and after have no place",
                header.len(),
                header[width]
            );
        }
    }
    for c in &opts.categorical {
        ensure!(header.contains(c), "--categorical {c:?}: {shown} has no such column ({})", header.join(", "));
    }
    let mut values = Vec::new();
    let mut complete = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{shown}: reading row {}", i + 1))?;
        let line = record.position().map_or(i as u64 + 2, |p| p.line());
        if record.len() != header.len() {
            bail!("{shown} line {line}: {} fields, the header has {}", record.len(), header.len());
        }
        let mut all = true;
        for (field, name) in record.iter().zip(&header) {
            let field = field.trim();
            let x = if is_missing(field) {
                all = false;
                f64::NAN
            } else {
                field
                    .parse::<f64>()
                    .map_err(|_| anyhow::anyhow!("{shown} line {line}, column {name:?}: {field:?} is not a number"))?
            };
            values.push(x);
        }
        complete.push(all);
    }
    ensure!(!complete.is_empty(), "{shown} has a header but no rows");
    let features = header
        .iter()
        .enumerate()
        .map(|(j, name)| {
            let plan =
                if opts.categorical.contains(name) { Plan::Categorical } else { Plan::Numeric { bins: opts.bins } };
            (name.clone(), Source::InputColumn { input: input.name.clone(), column: j as u32 }, plan)
        })
        .collect();
    Ok(Table { shape: vec![complete.len(), header.len()], values, features, complete })
}

/// A CSV reader over `bytes` (`flexible`: rows of any length, for the
/// caller to judge) and its header, trimmed.
pub fn csv_reader<'a>(bytes: &'a [u8], flexible: bool, shown: &str) -> Result<(csv::Reader<&'a [u8]>, Vec<String>)> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(flexible).from_reader(bytes);
    let header = reader
        .headers()
        .with_context(|| format!("{shown}: reading its header"))?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    Ok((reader, header))
}

/// Whether a (trimmed) CSV cell stands for a missing value: empty, `nan`
/// in any case, or `NA`.
pub fn is_missing(field: &str) -> bool {
    field.is_empty() || field.eq_ignore_ascii_case("nan") || field == "NA"
}

fn npy(bytes: &[u8], input: &TensorSpec) -> Result<Table> {
    let file = npyz::NpyFile::new(bytes)?;
    let shape: Vec<usize> = file.shape().iter().map(|d| *d as usize).collect();
    ensure!(
        file.order() == npyz::Order::C,
        "the array is in Fortran order; save it C-contiguous (numpy.ascontiguousarray)"
    );
    let values: Vec<f64> = match file.dtype() {
        npyz::DType::Plain(t) => match (t.type_char(), t.size_field()) {
            (npyz::TypeChar::Float, 4) => file.into_vec::<f32>()?.into_iter().map(f64::from).collect(),
            (npyz::TypeChar::Float, 8) => file.into_vec::<f64>()?,
            (npyz::TypeChar::Uint, 1) => file.into_vec::<u8>()?.into_iter().map(f64::from).collect(),
            (npyz::TypeChar::Int, 4) => file.into_vec::<i32>()?.into_iter().map(f64::from).collect(),
            (npyz::TypeChar::Int, 8) => file.into_vec::<i64>()?.into_iter().map(|x| x as f64).collect(),
            (c, s) => bail!("element type {c:?} of {s} bytes (give float32, float64, uint8, int32 or int64)"),
        },
        other => bail!("element type {other:?} (give a plain numeric array)"),
    };
    // A sample is the input without its first (batch) axis, or the whole
    // input where it has no batch axis of 1 or open.
    let sample: &[Option<u64>] = match input.shape.first() {
        Some(None) | Some(Some(1)) => &input.shape[1..],
        _ => &input.shape,
    };
    ensure!(
        shape.len() == sample.len() + 1,
        "shape {shape:?}: input {input} takes samples of rank {}; give [samples, …]",
        sample.len()
    );
    for (axis, (got, want)) in shape[1..].iter().zip(sample).enumerate() {
        if let Some(w) = want {
            ensure!(*got as u64 == *w, "shape {shape:?}: axis {} is {got}, input {input} has {w}", axis + 1);
        }
    }
    ensure!(shape[0] > 0, "shape {shape:?} has no samples");
    let features = match input.shape.len() {
        4 => vec![(input.name.clone(), Source::InputImage { input: input.name.clone() }, Plan::Image)],
        2 => (0..shape[1])
            .map(|j| {
                let s = Source::InputColumn { input: input.name.clone(), column: j as u32 };
                (format!("{}[{j}]", input.name), s, Plan::Numeric { bins: tern_drift::DEFAULT_BINS })
            })
            .collect(),
        r => bail!("input {input} has rank {r}: baselines summarize rank 2 (features) or 4 (NCHW images)"),
    };
    let complete = (0..shape[0])
        .map(|r| {
            let n = values.len() / shape[0];
            values[r * n..(r + 1) * n].iter().all(|x| x.is_finite())
        })
        .collect();
    Ok(Table { shape, values, features, complete })
}

/// A tensor of `dtype` holding `values`.
fn tensor_of(dtype: DType, shape: Vec<usize>, values: &[f64]) -> Result<Tensor> {
    let data = match dtype {
        DType::F32 => TensorData::F32(values.iter().map(|x| *x as f32).collect()),
        DType::F64 => TensorData::F64(values.to_vec()),
        DType::F16 => TensorData::F16(values.iter().map(|x| half::f16::from_f64(*x)).collect()),
        DType::BF16 => TensorData::BF16(values.iter().map(|x| half::bf16::from_f64(*x)).collect()),
        DType::I64 => TensorData::I64(values.iter().map(|x| *x as i64).collect()),
        DType::I32 => TensorData::I32(values.iter().map(|x| *x as i32).collect()),
        DType::U8 => TensorData::U8(values.iter().map(|x| *x as u8).collect()),
        other => bail!("input element type {other} is not supported for baselines"),
    };
    Tensor::new(shape, data).map_err(|e| anyhow::anyhow!(e))
}

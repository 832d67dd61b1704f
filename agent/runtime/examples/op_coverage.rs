//! Operator coverage: runs ONNX's backend node tests (the
//! `onnx/backend/test/data/node` folder of the `onnx` wheel) through the
//! agent's own load path, `tern_runtime::load` then `run`, and writes a
//! report per operator. `scripts/op-coverage` fetches the tests and runs it.
//!
//!   op_coverage NODE_DIR [--onnxruntime LIB] [--md OUT.md] [--json OUT.json] [--only SUBSTR]
//!
//! Each tensor-only test (every graph input and output a tensor) ends as
//! one of: `pass`; `not carried` (its test data holds an element type that
//! `Tensor` has no variant for); `refused` (the load fails); `fails` (it
//! loads, the run errs); `wrong` (it runs, an output differs beyond ONNX's
//! own tolerance, rtol 1e-3 and atol 1e-7). On tract, a test that is not a
//! pass is tried again as `tern compile` would build it with constants
//! chosen by this program: every input's shape pinned to the test's, and
//! each small integer input but the first (at most 8 elements: axes,
//! shapes, pads) declared constant and folded in; one that then passes
//! counts as `pass after compile`.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use tern_proto::{ModelFormat, Tensor, TensorData};
use tern_runtime::{Backend, RuntimeError, TractModel, compile_onnx, onnx_tensor, run_guarded};
use tract_onnx::prelude::Framework;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    Pass,
    PassAfterCompile,
    NotCarried,
    Refused,
    Fails,
    Wrong,
    NotTensorOnly,
}

const OUTCOMES: [Outcome; 6] =
    [Outcome::Pass, Outcome::PassAfterCompile, Outcome::NotCarried, Outcome::Refused, Outcome::Fails, Outcome::Wrong];

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::PassAfterCompile => "pass after compile",
            Outcome::NotCarried => "not carried",
            Outcome::Refused => "refused",
            Outcome::Fails => "fails",
            Outcome::Wrong => "wrong",
            Outcome::NotTensorOnly => "not tensor-only",
        }
    }
}

#[derive(serde::Serialize)]
struct Row {
    test: String,
    op: String,
    outcome: Outcome,
    detail: String,
}

struct Case {
    model: Vec<u8>,
    names: Vec<String>,
    inputs: Vec<Tensor>,
    outputs: Vec<Tensor>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut dir = None;
    let (mut ort, mut md, mut json, mut only) = (None, None, None, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--onnxruntime" => ort = args.next().map(PathBuf::from),
            "--md" => md = args.next().map(PathBuf::from),
            "--json" => json = args.next().map(PathBuf::from),
            "--only" => only = args.next(),
            _ => dir = Some(PathBuf::from(a)),
        }
    }
    let Some(dir) = dir else {
        fatal("usage: op_coverage NODE_DIR [--onnxruntime LIB] [--md OUT.md] [--json OUT.json] [--only SUBSTR]")
    };
    let backend = match &ort {
        Some(lib) => init_ort(lib),
        None => "tract".to_string(),
    };
    // Quiet the default hook: tract's panics are caught and reported per
    // test. Fatal errors go through `fatal`, not a panic.
    std::panic::set_hook(Box::new(|_| {}));
    let mut tests: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| fatal(&format!("{}: {e}", dir.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("model.onnx").exists())
        .filter(|p| only.as_ref().is_none_or(|o| p.to_string_lossy().contains(o.as_str())))
        .collect();
    tests.sort();
    let ops = single_ops(&tests);
    let rows: Vec<Row> = tests.iter().map(|t| run_test(t, &ops, ort.is_some())).collect();
    let report = markdown(&rows, &backend);
    print!("{report}");
    if let Some(p) = md {
        std::fs::write(&p, &report).unwrap_or_else(|e| fatal(&format!("{}: {e}", p.display())));
    }
    if let Some(p) = json {
        let text = serde_json::to_string_pretty(&rows).expect("rows serialize");
        std::fs::write(&p, text).unwrap_or_else(|e| fatal(&format!("{}: {e}", p.display())));
    }
}

fn fatal(msg: &str) -> ! {
    eprintln!("op_coverage: {msg}");
    std::process::exit(2);
}

#[cfg(feature = "onnxruntime")]
fn init_ort(lib: &Path) -> String {
    tern_runtime::ort_backend::init(lib, &[]).unwrap_or_else(|e| fatal(&e.to_string()));
    format!("onnxruntime (`{}`)", lib.file_name().map(|n| n.to_string_lossy()).unwrap_or_default())
}

#[cfg(not(feature = "onnxruntime"))]
fn init_ort(_: &Path) -> String {
    fatal("built without the onnxruntime feature")
}

/// The operator of each test whose graph is one node, by test name.
fn single_ops(tests: &[PathBuf]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for t in tests {
        let Ok(bytes) = std::fs::read(t.join("model.onnx")) else { continue };
        let Ok(proto) = tract_onnx::onnx().proto_model_for_read(&mut &*bytes) else { continue };
        let Some(graph) = proto.graph else { continue };
        if let [node] = graph.node.as_slice() {
            let name = t.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.insert(name, node.op_type.clone());
        }
    }
    out
}

fn snake(op: &str) -> String {
    let mut s = String::new();
    let chars: Vec<char> = op.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
        let prev_lower = i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit());
        if i > 0 && c.is_uppercase() && (prev_lower || next_lower) {
            s.push('_');
        }
        s.extend(c.to_lowercase());
    }
    s
}

/// A test's operator: its own node's for a one-node graph; for
/// `test_X_expanded` (a function body, many nodes) that of `test_X`; else
/// the longest operator name, snake-cased, the test's name starts with;
/// else its first node's.
fn op_of(name: &str, ops: &BTreeMap<String, String>, nodes: &[String]) -> String {
    if let [only] = nodes {
        return only.clone();
    }
    if let Some(i) = name.find("_expanded")
        && let Some(op) = ops.get(&name[..i])
    {
        return op.clone();
    }
    let bare = name.strip_prefix("test_").unwrap_or(name);
    let by_snake: BTreeMap<String, &String> = ops.values().map(|o| (snake(o), o)).collect();
    by_snake
        .iter()
        .filter(|(k, _)| bare == k.as_str() || bare.starts_with(&format!("{k}_")))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| (*v).clone())
        .unwrap_or_else(|| nodes.first().cloned().unwrap_or_default())
}

fn run_test(dir: &Path, ops: &BTreeMap<String, String>, on_ort: bool) -> Row {
    let test = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let row = |op: String, outcome, detail: String| Row { test: test.clone(), op, outcome, detail };
    let model = match std::fs::read(dir.join("model.onnx")) {
        Ok(m) => m,
        Err(e) => return row(String::new(), Outcome::Refused, e.to_string()),
    };
    let proto = match tract_onnx::onnx().proto_model_for_read(&mut &*model) {
        Ok(p) => p,
        Err(e) => return row(String::new(), Outcome::Refused, format!("{e:#}")),
    };
    let graph = proto.graph.unwrap_or_default();
    let nodes: Vec<String> = graph.node.iter().map(|n| n.op_type.clone()).collect();
    let op = op_of(&test, ops, &nodes);
    let initialized: BTreeSet<&str> = graph.initializer.iter().map(|i| i.name.as_str()).collect();
    let is_tensor = |v: &tract_onnx::pb::ValueInfoProto| {
        matches!(
            v.r#type.as_ref().and_then(|t| t.value.as_ref()),
            Some(tract_onnx::pb::type_proto::Value::TensorType(_))
        )
    };
    let inputs: Vec<_> = graph.input.iter().filter(|i| !initialized.contains(i.name.as_str())).collect();
    if !inputs.iter().all(|i| is_tensor(i)) || !graph.output.iter().all(is_tensor) {
        return row(op, Outcome::NotTensorOnly, "a graph input or output is a sequence, map or optional".into());
    }
    let case = match read_case(dir, model, inputs.iter().map(|i| i.name.clone()).collect()) {
        Ok(c) => c,
        Err(e) => return row(op, Outcome::NotCarried, format!("test data: {e}")),
    };
    let (outcome, detail) = attempt(&case, load_onnx);
    if outcome == Outcome::Pass || on_ort {
        return row(op, outcome, detail);
    }
    match attempt(&case, compiled) {
        (Outcome::Pass, _) => row(op, Outcome::PassAfterCompile, detail),
        _ => row(op, outcome, detail),
    }
}

fn read_case(dir: &Path, model: Vec<u8>, names: Vec<String>) -> Result<Case, String> {
    let set = dir.join("test_data_set_0");
    let read = |prefix: &str| -> Result<Vec<Tensor>, String> {
        let mut out = Vec::new();
        for i in 0.. {
            let p = set.join(format!("{prefix}_{i}.pb"));
            let Ok(bytes) = std::fs::read(&p) else { break };
            out.push(onnx_tensor(&bytes).map_err(|e| format!("{prefix}_{i}.pb: {e}"))?);
        }
        Ok(out)
    };
    Ok(Case { model, names, inputs: read("input")?, outputs: read("output")? })
}

/// A loaded model and the inputs to run it on.
type Loaded = Result<(Box<dyn Backend>, Vec<Tensor>), RuntimeError>;

fn load_onnx(case: &Case) -> Loaded {
    Ok((tern_runtime::load(ModelFormat::Onnx, case.model.clone())?, case.inputs.clone()))
}

/// As `tern compile` builds it: shapes pinned, small integer inputs folded.
/// The first input is never folded: it is the data in every operator whose
/// later inputs are axes or shapes, and folding all inputs would make the
/// whole graph a constant.
fn compiled(case: &Case) -> Loaded {
    let mut shapes = BTreeMap::new();
    let mut consts = BTreeMap::new();
    let mut rest = Vec::new();
    for (i, (name, t)) in case.names.iter().zip(&case.inputs).enumerate() {
        let small_int = i > 0 && t.data.len() <= 8 && matches!(t.data, TensorData::I64(_) | TensorData::I32(_));
        if small_int {
            consts.insert(name.clone(), t.clone());
        } else {
            shapes.insert(name.clone(), t.shape.clone());
            rest.push(t.clone());
        }
    }
    let nnef = compile_onnx(&case.model, &shapes, &consts)?;
    Ok((Box::new(TractModel::nnef(&nnef)?), rest))
}

fn attempt(case: &Case, load: fn(&Case) -> Loaded) -> (Outcome, String) {
    let loaded = catch_unwind(AssertUnwindSafe(|| load(case)))
        .unwrap_or_else(|_| Err(RuntimeError::Load("the loader panicked".into())));
    let (model, inputs) = match loaded {
        Ok(m) => m,
        Err(e) => return (Outcome::Refused, first_line(&e.to_string())),
    };
    if let Err(e) = tern_runtime::check_inputs(model.inputs(), &inputs) {
        return (Outcome::Fails, first_line(&e.to_string()));
    }
    let got = match run_guarded(&*model, inputs) {
        Ok(o) => o,
        Err(e) => return (Outcome::Fails, first_line(&e.to_string())),
    };
    if got.len() != case.outputs.len() {
        return (Outcome::Wrong, format!("{} outputs, expected {}", got.len(), case.outputs.len()));
    }
    for (i, (g, w)) in got.iter().zip(&case.outputs).enumerate() {
        if let Err(e) = close(g, w) {
            return (Outcome::Wrong, format!("output {i}: {e}"));
        }
    }
    (Outcome::Pass, String::new())
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    line.chars().take(200).collect()
}

/// ONNX's backend test comparison: `|got - want| <= atol + rtol * |want|`
/// on every element type (integers compared as f64, so `i64` / `u64`
/// beyond 2^53 lose their low bits), NaN equal to NaN.
fn close(got: &Tensor, want: &Tensor) -> Result<(), String> {
    if got.shape != want.shape {
        return Err(format!("shape {:?}, expected {:?}", got.shape, want.shape));
    }
    if got.dtype() != want.dtype() {
        return Err(format!("element type {}, expected {}", got.dtype(), want.dtype()));
    }
    let (g, w) = (got.data.to_f64(), want.data.to_f64());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= 1e-7 + 1e-3 * b.abs();
        if !ok {
            return Err(format!("element {i} is {a}, expected {b}"));
        }
    }
    Ok(())
}

fn markdown(rows: &[Row], backend: &str) -> String {
    let tensor: Vec<&Row> = rows.iter().filter(|r| r.outcome != Outcome::NotTensorOnly).collect();
    let count = |rs: &[&Row], o: Outcome| rs.iter().filter(|r| r.outcome == o).count();
    let pct = |n: usize, d: usize| if d == 0 { 0.0 } else { 100.0 * n as f64 / d as f64 };
    let mut s = format!(
        "# ONNX node tests through `tern_runtime::load` on {backend}\n\n{} tests, {} tensor-only.\n\n",
        rows.len(),
        tensor.len()
    );
    s += "`pass after compile`: not a pass as loaded, a pass as `tern compile` builds it with constants this \
          report chooses (every input's shape pinned, integer inputs after the first of at most 8 elements \
          folded in); tried on tract only. `not carried`: the test data holds an element type `Tensor` has \
          no variant for. `first reason`: that of the first test of the operator that does not pass.\n\n";
    s += "| outcome | tests | share |\n|---|---|---|\n";
    for o in OUTCOMES {
        let n = count(&tensor, o);
        s += &format!("| {} | {n} | {:.1} % |\n", o.label(), pct(n, tensor.len()));
    }
    let passing = count(&tensor, Outcome::Pass) + count(&tensor, Outcome::PassAfterCompile);
    s += &format!("| **pass, both ways** | **{passing}** | **{:.1} %** |\n\n", pct(passing, tensor.len()));
    let mut by_op: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in &tensor {
        by_op.entry(r.op.as_str()).or_default().push(r);
    }
    s += "| operator | tests | pass | pass after compile | not carried | refused | fails | wrong | first reason |\n";
    s += "|---|---|---|---|---|---|---|---|---|\n";
    for (op, rs) in &by_op {
        let reason = rs
            .iter()
            .find(|r| matches!(r.outcome, Outcome::NotCarried | Outcome::Refused | Outcome::Fails | Outcome::Wrong))
            .map(|r| format!("`{}`: {}", r.test, r.detail.replace('|', "\\|")))
            .unwrap_or_default();
        s += &format!(
            "| {op} | {} | {} | {} | {} | {} | {} | {} | {reason} |\n",
            rs.len(),
            count(rs, Outcome::Pass),
            count(rs, Outcome::PassAfterCompile),
            count(rs, Outcome::NotCarried),
            count(rs, Outcome::Refused),
            count(rs, Outcome::Fails),
            count(rs, Outcome::Wrong)
        );
    }
    s
}

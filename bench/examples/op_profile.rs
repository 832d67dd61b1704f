//! Where the time goes, per operator, in the two tract plans tern-bench
//! compares: tract straight from ONNX, and the pinned-shape NNEF a device
//! receives (ONNX → NNEF → load → optimize). Prints each plan's operators
//! and the time spent in each kind of operator.
//!
//!     cargo run --release -p tern-bench --example op_profile -- MODEL.onnx 1,3,48,192 [RUNS]

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::eval;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).context("usage: op_profile MODEL.onnx SHAPE [RUNS]")?;
    let shape: Vec<usize> = args.get(2).context("shape")?.split(',').map(str::parse).collect::<Result<_, _>>()?;
    let runs: usize = args.get(3).map(|r| r.parse()).transpose()?.unwrap_or(200);

    let raw =
        tract_onnx::onnx().model_for_path(model)?.with_input_fact(0, f32::fact(&shape).into())?.into_optimized()?;
    let nnef_bytes = tern_runtime::onnx_to_nnef(&std::fs::read(model)?, Some(std::slice::from_ref(&shape)))?;
    let nnef = tract_nnef::nnef().with_onnx().model_for_read(&mut &*nnef_bytes)?.into_optimized()?;

    let n = shape.iter().product();
    let input: Tensor =
        tract_ndarray::ArrayD::from_shape_vec(shape.clone(), (0..n).map(|i| (i % 17) as f32 / 17.0).collect())?.into();
    for (name, m) in [("tract from ONNX", raw), ("tract from pinned NNEF", nnef)] {
        profile(name, m, &input, runs)?;
    }
    Ok(())
}

fn profile(name: &str, model: TypedModel, input: &Tensor, runs: usize) -> Result<()> {
    let plan = model.into_runnable()?;
    let mut state = plan.spawn()?;
    let mut per_kind: BTreeMap<String, (usize, Duration)> = BTreeMap::new();
    let mut nodes = 0;
    let mut total = Duration::ZERO;
    for run in 0..runs + 20 {
        let mut this_run: Vec<(String, Duration)> = Vec::new();
        let start = Instant::now();
        state.run_plan_with_eval(tvec!(input.clone().into_tvalue()), |session, op_state, node, inputs| {
            let t = Instant::now();
            let r = eval(session, op_state, node, inputs);
            this_run.push((node.op().name().to_string(), t.elapsed()));
            r
        })?;
        if run >= 20 {
            total += start.elapsed();
            nodes = this_run.len();
            for (kind, d) in this_run {
                let e = per_kind.entry(kind).or_default();
                e.0 += 1;
                e.1 += d;
            }
        }
    }
    println!("\n## {name}: {nodes} nodes evaluated per run, {:.3} ms per run (mean of {runs})\n", ms(total, runs));
    println!("| operator | nodes | ms per run | share |\n|---|---|---|---|");
    let mut rows: Vec<_> = per_kind.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1.1));
    for (kind, (count, d)) in rows {
        println!(
            "| {kind} | {} | {:.3} | {:.1}% |",
            count / runs,
            ms(d, runs),
            100.0 * d.as_secs_f64() / total.as_secs_f64()
        );
    }
    Ok(())
}

fn ms(d: Duration, runs: usize) -> f64 {
    d.as_secs_f64() * 1e3 / runs as f64
}

//! What reusing tract run states between runs saves, on the pinned-shape
//! NNEF a device runs: per-run time with one state reused, with a fresh
//! state spawned for each run, and with a never-run state cloned for each run
//! (what `tern-runtime` does, because operators such as GRU, LSTM and Scan
//! keep state across runs). Interleaved rounds, median of each.
//!
//!     cargo run --release -p tern-bench --example state_reuse -- MODEL.onnx 1,3,48,192 [RUNS]

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use tract_onnx::prelude::*;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).context("usage: state_reuse MODEL.onnx SHAPE [RUNS]")?;
    let shape: Vec<usize> = args.get(2).context("shape")?.split(',').map(str::parse).collect::<Result<_, _>>()?;
    let runs: usize = args.get(3).map(|r| r.parse()).transpose()?.unwrap_or(500);
    let nnef_bytes = tern_runtime::onnx_to_nnef(&std::fs::read(model)?, Some(std::slice::from_ref(&shape)))?;
    let plan = tract_nnef::nnef().with_onnx().model_for_read(&mut &*nnef_bytes)?.into_optimized()?.into_runnable()?;
    let n = shape.iter().product();
    let input: TValue =
        tract_ndarray::ArrayD::from_shape_vec(shape.clone(), (0..n).map(|i| (i % 17) as f32 / 17.0).collect())?
            .into_tvalue();

    let pristine = plan.spawn()?;
    let mut reused = plan.spawn()?;
    let mut times: [Vec<Duration>; 3] = Default::default();
    for _ in 0..20 {
        reused.run(tvec![input.clone()])?;
    }
    for round in 0..5 {
        for _ in 0..runs / 5 {
            let t = Instant::now();
            reused.run(tvec![input.clone()])?;
            times[0].push(t.elapsed());
            let t = Instant::now();
            plan.spawn()?.run(tvec![input.clone()])?;
            times[1].push(t.elapsed());
            let t = Instant::now();
            pristine.clone().run(tvec![input.clone()])?;
            times[2].push(t.elapsed());
        }
        eprintln!("round {round} done");
    }
    for (name, t) in ["one state reused", "fresh state per run", "pristine state cloned per run"].iter().zip(&mut times)
    {
        t.sort();
        let p = |q: f64| t[((t.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
        println!("{name:32} p50 {:.3} ms  p99 {:.3} ms", p(0.5), p(0.99));
    }
    Ok(())
}

//! `tern compile`: an ONNX file compiled on this machine for a device
//! target with `tern-compile` (shapes pinned, declared constants folded,
//! NNEF written), checked against the source, and the report printed.

use anyhow::{Context, Result};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tern_proto::Sha256Digest;

/// Compile an ONNX model on this machine for a device target.
#[derive(clap::Args)]
pub struct CompileArgs {
    /// The ONNX source model.
    #[arg(long)]
    file: PathBuf,
    /// Where to write the compiled tract NNEF archive (refused if it exists).
    #[arg(long)]
    out: PathBuf,
    /// An input's shape, repeatable: --input-shape image=1,3,320,320.
    #[arg(long = "input-shape", value_parser = parse_shape)]
    shapes: Vec<(String, Vec<usize>)>,
    /// An input that is constant in use, repeatable: --const mode=true,
    /// --const rate=16000 (comma-separated for several elements). It
    /// leaves the signature.
    #[arg(long = "const", value_parser = parse_const)]
    consts: Vec<(String, String)>,
    /// Largest accepted |compiled − source| / (1 + |source|) per element.
    #[arg(long, default_value_t = tern_compile::DEFAULT_TOLERANCE)]
    tolerance: f64,
    /// Seeded random input sets to compare the artifact with the source on.
    #[arg(long, default_value_t = tern_compile::DEFAULT_CASES as u16, value_parser = clap::value_parser!(u16).range(1..=1000))]
    cases: u16,
    /// Seed of those inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn parse_shape(s: &str) -> Result<(String, Vec<usize>), String> {
    let (name, dims) =
        s.split_once('=').filter(|(n, _)| !n.is_empty()).ok_or(format!("expected IN=D,D,…, got {s:?}"))?;
    let dims = dims
        .split(',')
        .map(|d| d.trim().parse::<usize>().map_err(|_| format!("{d:?} in {s:?} is not a dimension")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((name.to_owned(), dims))
}

fn parse_const(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(n, _)| !n.is_empty())
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .ok_or(format!("expected IN=VALUE, got {s:?}"))
}

/// Runs `tern compile`.
pub fn run(args: CompileArgs, json_out: bool) -> Result<()> {
    let source = std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    anyhow::ensure!(!args.out.exists(), "{} exists: give another --out", args.out.display());
    let opts = tern_compile::Options {
        shapes: args.shapes.into_iter().collect::<BTreeMap<_, _>>(),
        consts: args.consts.into_iter().collect::<BTreeMap<_, _>>(),
        tolerance: args.tolerance,
        cases: usize::from(args.cases),
        seed: args.seed,
    };
    let c = tern_compile::compile(&source, &opts).with_context(|| format!("compiling {}", args.file.display()))?;
    tern_durable::write_atomic(&args.out, &c.nnef, false).with_context(|| format!("writing {}", args.out.display()))?;
    let inputs: Vec<String> = c.inputs.iter().map(|s| s.to_string()).collect();
    if json_out {
        let errors: Vec<_> = c
            .errors
            .iter()
            .map(|e| json!({ "output": e.name, "max_abs": e.max_abs, "max_scaled": e.max_scaled }))
            .collect();
        let report = json!({
            "path": args.out,
            "source_bytes": c.source_bytes,
            "bytes": c.nnef.len(),
            "sha256": Sha256Digest::of(&c.nnef).to_hex(),
            "inputs": inputs,
            "cases": opts.cases,
            "tolerance": opts.tolerance,
            "errors": errors,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("wrote {} ({} bytes; the source is {} bytes)", args.out.display(), c.nnef.len(), c.source_bytes);
    println!("inputs: {}", inputs.join(", "));
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING).set_header(["output", "max abs error", "max scaled error"]);
    for e in &c.errors {
        t.add_row([e.name.clone(), format!("{:.3e}", e.max_abs), format!("{:.3e}", e.max_scaled)]);
    }
    println!("against the source on {} seeded input sets (tolerance {:e}):\n{t}", opts.cases, opts.tolerance);
    Ok(())
}

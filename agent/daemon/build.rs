//! Turns the device profiles (`firmware-targets/profiles/*.toml`) into Rust
//! constants at build time, so that the agent carries no TOML parser.

use serde::Deserialize;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Profile {
    version: u32,
    arch: String,
    description: String,
    #[serde(default)]
    cores: Option<usize>,
    #[serde(default)]
    memory_mb: Option<u64>,
    #[serde(default)]
    accelerators: Vec<String>,
    threads_per_model: usize,
    queue_per_model: usize,
    #[serde(default)]
    max_batch: Option<usize>,
    #[serde(default)]
    request_memory_mb: Option<usize>,
    #[serde(default)]
    onnxruntime: Option<String>,
    #[serde(default)]
    onnxruntime_providers: Vec<String>,
    /// What `tern compile` checks against; the agent has no use for it.
    #[serde(default)]
    #[allow(dead_code)]
    compile: Option<toml::Table>,
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../firmware-targets/profiles");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("firmware-targets/profiles")
        .map(|e| e.expect("a profile file").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut out = String::from("/// The built-in profiles, by name (generated from firmware-targets/profiles).\n");
    out.push_str("pub const PROFILES: &[(&str, Profile)] = &[\n");
    for path in files {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path.file_stem().unwrap().to_str().expect("a UTF-8 profile name").to_owned();
        let text = std::fs::read_to_string(&path).expect("readable profile");
        let p: Profile = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        writeln!(
            out,
            "    ({name:?}, Profile {{ version: {}, arch: {:?}, description: {:?}, cores: {:?}, memory_mb: {:?}, accelerators: &{:?}, threads_per_model: {}, queue_per_model: {}, max_batch: {:?}, request_memory_mb: {:?}, onnxruntime: {:?}, onnxruntime_providers: &{:?} }}),",
            p.version,
            p.arch,
            p.description,
            p.cores,
            p.memory_mb,
            p.accelerators,
            p.threads_per_model,
            p.queue_per_model,
            p.max_batch,
            p.request_memory_mb,
            p.onnxruntime,
            p.onnxruntime_providers,
        )
        .unwrap();
    }
    out.push_str("];\n");
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("profiles.rs");
    std::fs::write(dest, out).unwrap();
}

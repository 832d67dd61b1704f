//! Embeds the device profiles (`firmware-targets/profiles/*.toml`) as text,
//! so that `tern compile --target` knows them wherever it runs.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../firmware-targets/profiles");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("firmware-targets/profiles")
        .map(|e| e.expect("a profile file").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut out = String::from("/// The built-in profiles' files, by name.\nconst FILES: &[(&str, &str)] = &[\n");
    for path in files {
        println!("cargo:rerun-if-changed={}", path.display());
        let name = path.file_stem().unwrap().to_str().expect("a UTF-8 profile name");
        let path = path.canonicalize().unwrap();
        writeln!(out, "    ({name:?}, include_str!({:?})),", path.to_str().expect("a UTF-8 path")).unwrap();
    }
    out.push_str("];\n");
    std::fs::write(Path::new(&std::env::var("OUT_DIR").unwrap()).join("profiles.rs"), out).unwrap();
}

//! `tern compile` on real ONNX files: an open batch axis pinned, the NNEF
//! it writes registered and served by an agent; a model whose `If` cannot
//! be made concrete refused with the node that blocks it, nothing written.

mod common;

use common::*;
use std::process::Command;

fn compile(args: &[&str]) -> std::process::Output {
    Command::new(tern_bin()).arg("compile").args(args).output().unwrap()
}

#[test]
fn a_pinned_model_is_written_as_nnef_checked_and_served() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("iris.nnef.tar");
    let iris = fixture("iris.onnx");
    let args = ["--file", iris.to_str().unwrap(), "--input-shape", "X=1,4", "--out", out.to_str().unwrap()];
    let run = compile(&args);
    let said = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(said.contains("inputs: X: f32[1,4]"), "{said}");
    assert!(said.contains("probabilities"), "{said}");
    // The same again: refused rather than written over.
    let again = compile(&args);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists: give another --out"));
    // Registered as NNEF, served by an agent, answering as the source does.
    let coord = Coord::start();
    let v = coord.json(&["model", "register", "iris", "--file", out.to_str().unwrap()]);
    assert_eq!(v["format"], "nnef", "{v}");
    coord.ok(&["model", "approve", "iris:1"]);
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    agent.start();
    agent.wait_serving("iris", 1);
    let (status, answer) =
        agent.post("/v1/models/iris:predict", r#"{"inputs":[{"shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["outputs"][0]["data"][0], 0, "setosa: {answer}");
}

#[test]
fn a_model_that_cannot_be_made_concrete_is_refused_with_the_node_and_nothing_written() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("mode.nnef.tar");
    let src = fixture("mode-if.onnx");
    let run = compile(&["--file", src.to_str().unwrap(), "--input-shape", "x=2,4", "--out", out.to_str().unwrap()]);
    assert!(!run.status.success());
    let e = String::from_utf8_lossy(&run.stderr);
    assert!(e.contains("cannot compile") && e.contains("\"y\" If"), "{e}");
    assert!(!out.exists());
    let bad = compile(&["--file", src.to_str().unwrap(), "--input-shape", "image=1,4", "--out", out.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("the model has no input \"image\""));
}

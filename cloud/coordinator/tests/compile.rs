//! `tern compile` on real ONNX files: an open batch axis pinned, the NNEF
//! it writes registered and served by an agent; a model whose `If` cannot
//! be made concrete refused with the node that blocks it, nothing written;
//! `If`s a constant or a pinned shape decides resolved; skl2onnx's ZipMap
//! made a tensor; a device whose onnxruntime is too old runs tract.

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
    // With its condition declared constant, the `If` is replaced by the
    // branch it takes (whose output shape differs from the other's, which
    // tract alone refuses), and the result agrees with the source.
    // So is one on Equal(sr, 16000) with sr declared constant (rate-if.onnx,
    // as silero-vad branches on its sample rate).
    let rate = fixture("rate-if.onnx");
    let cases = [(&src, "mode=true", 4), (&src, "mode=false", 1), (&rate, "sr=16000", 4), (&rate, "sr=8000", 1)];
    for (i, (src, konst, width)) in cases.into_iter().enumerate() {
        let mode = konst;
        let out = work.path().join(format!("case-{i}.nnef.tar"));
        let run = Command::new(tern_bin())
            .args(["--json", "compile", "--file", src.to_str().unwrap(), "--input-shape", "x=2,4"])
            .args(["--const", konst, "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let r: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
        assert_eq!(r["inputs"], serde_json::json!(["x: f32[2,4]"]), "{konst} left the signature: {r}");
        assert_eq!(r["report"]["errors"][0]["max_abs"], 0.0, "{r}");
        let nnef = tern_runtime::TractModel::nnef(&std::fs::read(&out).unwrap()).unwrap();
        let x = tern_proto::Tensor { shape: vec![2, 4], data: tern_proto::TensorData::F32(vec![1.0; 8]) };
        let y = tern_runtime::Backend::run(&nnef, vec![x]).unwrap();
        assert_eq!(y[0].shape, vec![2, width], "mode={mode}");
    }
    // An `If` on a dimension (squeeze an axis only when it is 1, as
    // PyTorch exports it): the pinned shape decides the branch, and tract,
    // which types both branches, would refuse their different ranks.
    let shape_if = fixture("shape-if.onnx");
    let open =
        compile(&["--file", shape_if.to_str().unwrap(), "--out", work.path().join("open.tar").to_str().unwrap()]);
    assert!(!open.status.success(), "with N open the branch is not known");
    let e = String::from_utf8_lossy(&open.stderr);
    assert!(e.contains("cannot compile") && e.contains("If"), "{e}");
    for (rows, want) in [(1, vec![4]), (3, vec![3, 4])] {
        let out = work.path().join(format!("shape-{rows}.nnef.tar"));
        let shape = format!("x={rows},4");
        let run =
            compile(&["--file", shape_if.to_str().unwrap(), "--input-shape", &shape, "--out", out.to_str().unwrap()]);
        assert!(run.status.success(), "{shape}: {}", String::from_utf8_lossy(&run.stderr));
        let nnef = tern_runtime::TractModel::nnef(&std::fs::read(&out).unwrap()).unwrap();
        let x = tern_proto::Tensor { shape: vec![rows, 4], data: tern_proto::TensorData::F32(vec![1.0; rows * 4]) };
        assert_eq!(tern_runtime::Backend::run(&nnef, vec![x]).unwrap()[0].shape, want, "{shape}");
    }
}

/// PaddleOCR's PP-OCRv4 text detector, as the `rapidocr-onnxruntime` wheel
/// on PyPI ships it (batch, height and width all open): `scripts/test`
/// fetches it (`scripts/fetch-models`); `TERN_OCR_DET` points elsewhere.
fn ocr_detector() -> std::path::PathBuf {
    let path = std::env::var_os("TERN_OCR_DET").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/models/ch_PP-OCRv4_det_infer.onnx")
    });
    assert!(path.is_file(), "{} is missing: run scripts/fetch-models (scripts/test does)", path.display());
    path
}

#[test]
fn a_real_detector_raw_tract_refuses_is_registered_compiled_for_its_profile_and_served() {
    let det = ocr_detector();
    let det = det.to_str().unwrap();
    let coord = Coord::start();
    // With a TUF root, so the agent checks its artifact against the
    // targets metadata too.
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("root.key");
    coord.ok(&["registry", "sign-root", "--key", key.to_str().unwrap(), "--generate"]);
    // Raw tract refuses its open height and width; pinned, it compiles: so
    // it is registered as needing compiling rather than refused.
    let e = coord.fails(&["model", "register", "det", "--file", det, "--input-shape", "x=1,3,40000,40000"]);
    assert!(e.contains("--input-shape: shape [1, 3, 40000, 40000] does not fit input x: f32[?,3,?,?]"), "{e}");
    let v = coord.json(&["model", "register", "det", "--file", det, "--input-shape", "x=1,3,64,64"]);
    let why = v["needs_compiling"].as_str().unwrap_or_default();
    assert!(why.starts_with("raw tract refuses it: "), "{v}");
    assert_eq!(v["compile_shapes"]["x"], serde_json::json!([1, 3, 64, 64]), "{v}");
    coord.ok(&["model", "approve", "det:1"]);
    let mut agent = Agent::enrolled(&coord, "cam-01");
    let e = coord.fails(&["fleet", "assign", "cam-01", "det:1"]);
    assert!(
        e.contains("det:1 has no artifact for profile \"rpi4\"") && e.contains("tern compile det:1 --target rpi4"),
        "{e}"
    );

    // Bad input: a clear error, nothing stored.
    let e = coord.fails(&["compile", "det:1", "--target", "rpi9"]);
    assert!(e.contains("no device profile \"rpi9\" (built in: generic-linux, "), "{e}");
    let e = coord.fails(&["compile", "det:1", "--target", "rpi4", "--input-shape", "image=1,3,64,64"]);
    assert!(e.contains("the model has no input \"image\" (its inputs: x: f32[?,3,?,?])"), "{e}");
    let e = coord.fails(&["compile", "det:1", "--target", "rpi4", "--const", "x=oops"]);
    assert!(e.contains("const x=\"oops\""), "{e}");
    assert!(coord.json(&["model", "show", "det:1"])["targets"].is_null(), "nothing stored");

    // Compiled for rpi4 (at the shapes given at registration), checked
    // against the source, measured, judged against rpi4's budget.
    let ort =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/models/onnxruntime/libonnxruntime.so");
    let r =
        coord.json(&["compile", "det:1", "--target", "rpi4", "--cases", "2", "--onnxruntime", ort.to_str().unwrap()]);
    let report = &r["report"];
    // Timed on both backends this machine has (the source on onnxruntime).
    for backend in ["tract", "onnxruntime"] {
        assert!(report["latency"][backend]["p50_us"].as_u64().unwrap() > 0, "{backend}: {r}");
    }
    assert_eq!(r["inputs"], serde_json::json!(["x: f32[1,3,64,64]"]), "{r}");
    assert!(report["errors"][0]["max_scaled"].as_f64().unwrap() <= 1e-4, "{r}");
    assert!(report["latency"]["tract"]["runs"].as_u64().unwrap() >= 10, "{r}");
    let fit = &report["fit"];
    assert_eq!(fit["speed_factor"], 5.0, "rpi4's factor: {r}");
    assert_eq!(fit["max_model_memory_mb"], 512, "{r}");
    assert!(fit["refused"].is_null(), "{r}");
    assert!(fit["peak_model_bytes"].as_u64().unwrap() > 4_000_000, "at least its weights: {r}");
    let shown = coord.ok(&["model", "show", "det:1"]);
    assert!(shown.contains("rpi4") && shown.contains("fits") && shown.contains("needs compiling"), "{shown}");
    // The targets metadata lists the source, the rpi4 artifact at rpi4's
    // path, and (the only NNEF one) at the plain path for older agents.
    let repo = work.path().join("repo");
    coord.ok(&["registry", "export-tuf", repo.to_str().unwrap()]);
    let targets = std::fs::read_to_string(repo.join("targets.json")).unwrap();
    let sha = r["sha256"].as_str().unwrap();
    for path in ["det/1/model.onnx", "det/1/rpi4/model.nnef.tar", "det/1/model.nnef.tar"] {
        assert!(targets.contains(&format!("\"{path}\"")), "{path} not listed: {targets}");
    }
    assert_eq!(targets.matches(sha).count(), 2, "{targets}");

    // Asked for (whichever is faster here): offered beside the tract artifact.
    assert_eq!(report["backend"], "onnxruntime", "{r}");
    let stored = coord.json(&["model", "show", "det:1"]);
    let alt = &stored["targets"]["rpi4"]["alternative"];
    assert_eq!(
        (&alt["backend"], &alt["format"]),
        (&serde_json::json!("onnxruntime"), &serde_json::json!("onnx")),
        "{stored}"
    );
    // Listed at rpi4's path for its format, and nowhere else.
    let targets = std::fs::read_to_string(work.path().join("repo/targets.json")).unwrap();
    assert!(targets.contains("\"det/1/rpi4/model.onnx\""), "{targets}");
    assert_eq!(targets.matches(alt["sha256"].as_str().unwrap()).count(), 1, "{targets}");

    // cam-01's onnxruntime is 1.19, older than the C API the backend needs:
    // it gets the rpi4 artifact, self-tests it and serves it on tract.
    // cam-02 has a library that fits: it runs the onnxruntime artifact, on
    // the same golden vectors.
    let old = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/models/onnxruntime-1.19/libonnxruntime.so")
        .canonicalize()
        .expect("scripts/fetch-models fetches onnxruntime 1.19.2's library");
    let mut ort_agent = Agent::enrolled(&coord, "cam-02");
    for (id, agent, args) in [
        ("cam-01", &mut agent, vec!["--onnxruntime", old.to_str().unwrap()]),
        ("cam-02", &mut ort_agent, vec!["--onnxruntime", ort.to_str().unwrap()]),
    ] {
        coord.ok(&["fleet", "assign", id, "det:1"]);
        agent.start_with(&args);
        agent.wait_serving("det", 1);
        let zeros = vec!["0.5"; 3 * 64 * 64].join(",");
        let (status, answer) = agent
            .post("/v1/models/det:predict", &format!(r#"{{"inputs":[{{"shape":[1,3,64,64],"data":[{zeros}]}}]}}"#));
        assert_eq!(status, 200, "{id}: {answer}");
        assert_eq!(answer["outputs"][0]["shape"], serde_json::json!([1, 1, 64, 64]), "{id}: {answer}");
    }
    let served = |agent: &Agent| {
        let m = agent.models();
        let det = m["models"].as_array().unwrap().iter().find(|m| m["name"] == "det").cloned().unwrap();
        (det["format"].as_str().unwrap().to_owned(), det["sha256"].as_str().unwrap().to_owned())
    };
    assert_eq!(served(&agent), ("nnef".to_owned(), r["sha256"].as_str().unwrap().to_owned()));
    assert_eq!(served(&ort_agent), ("onnx".to_owned(), alt["sha256"].as_str().unwrap().to_owned()));
    assert!(ort_agent.logs().contains("onnxruntime loaded"), "{}", ort_agent.logs());
    let logs = agent.logs();
    assert!(logs.contains("expected version >= '1.22.x', but got '1.19.2'"), "{logs}");
    assert!(logs.contains(old.to_str().unwrap()) && logs.contains("running tract only"), "{logs}");
    // A recompile would change what cam-01 runs: refused while assigned.
    let e = coord.fails(&["compile", "det:1", "--target", "rpi4", "--cases", "1"]);
    assert!(e.contains("det:1 is assigned to cam-01, cam-02, whose artifact this would change"), "{e}");
}

#[test]
fn the_registry_checks_a_compiled_artifact_against_the_source_itself() {
    let coord = Coord::start();
    assert_eq!(coord.register_fixture("scorer", "scorer-a.onnx"), 1);
    let token = coord.admin_token();
    let http = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let upload = |bytes: Vec<u8>| -> String {
        let mut r = http
            .post(format!("{}/v1/artifacts", coord.admin))
            .header("authorization", format!("Bearer {token}"))
            .send(&bytes[..])
            .unwrap();
        r.body_mut().read_json::<serde_json::Value>().unwrap()["sha256"].as_str().unwrap().to_owned()
    };
    let put = |body: serde_json::Value| -> (u16, String) {
        let mut r = http
            .put(format!("{}/v1/models/scorer/versions/1/targets/rpi4", coord.admin))
            .header("authorization", format!("Bearer {token}"))
            .send_json(body)
            .unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    };
    // An artifact of another model (scorer-b, same signature): its own
    // report says it is exact; the registry runs it beside the source.
    let work = tempfile::tempdir().unwrap();
    let other = work.path().join("b.nnef.tar");
    let b = fixture("scorer-b.onnx");
    let run = compile(&["--file", b.to_str().unwrap(), "--input-shape", "x=1,4", "--out", other.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let sha = upload(std::fs::read(&other).unwrap());
    let fit = serde_json::json!({ "peak_model_bytes": 1, "process_peak_rss_bytes": 1, "host_p99_us": 1,
        "speed_factor": 1.0, "estimated_p99_us": 1, "max_model_memory_mb": null, "max_p99_ms": null, "refused": null });
    let report = serde_json::json!({ "shapes": { "x": [1, 4] }, "source_bytes": 1, "cases": 4, "tolerance": 1e-4,
        "errors": [{ "output": "scores", "max_abs": 0.0, "max_scaled": 0.0 }], "backend": "tract", "fit": fit });
    let (status, said) = put(serde_json::json!({ "sha256": sha, "report": report }));
    assert_eq!(status, 422, "{said}");
    assert!(said.contains("artifact refused: output") && said.contains("differs from the source's"), "{said}");
    // The real artifact, and an alternative for a backend there is none for.
    let own = work.path().join("a.nnef.tar");
    let a = fixture("scorer-a.onnx");
    let run = compile(&["--file", a.to_str().unwrap(), "--input-shape", "x=1,4", "--out", own.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let sha = upload(std::fs::read(&own).unwrap());
    let (status, said) =
        put(serde_json::json!({ "sha256": sha, "report": report, "alternative": { "backend": "tvm" } }));
    assert_eq!(status, 400, "{said}");
    assert!(said.contains("only onnxruntime has one"), "{said}");
    assert!(coord.json(&["model", "show", "scorer:1"])["targets"].is_null(), "nothing stored");
    // The real artifact is taken, with the registry's own errors.
    let (status, said) = put(serde_json::json!({ "sha256": sha, "report": report }));
    assert_eq!(status, 201, "{said}");
    let v: serde_json::Value = serde_json::from_str(&said).unwrap();
    assert_eq!(v["targets"]["rpi4"]["report"]["cases"], 4, "{v}");
    // A tolerance that is no bound is refused, for the client and the registry.
    let x = work.path().join("x.tar");
    let e = compile(&["--file", a.to_str().unwrap(), "--tolerance", "NaN", "--out", x.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("tolerance NaN: give a number above 0 and at most 1"));
    assert!(!x.exists());
    let mut loose = report.clone();
    loose["tolerance"] = serde_json::json!(1e300);
    let (status, said) = put(serde_json::json!({ "sha256": sha, "report": loose }));
    assert_eq!(status, 422, "{said}");
    assert!(said.contains("tolerance 1e300"), "{said}");
}

#[test]
fn a_model_that_loads_but_fails_on_every_run_is_refused_at_registration() {
    let coord = Coord::start();
    let run = coord.cli(&["model", "register", "drop", "--file", fixture("dropout-train.onnx").to_str().unwrap()]);
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "training-mode Dropout was accepted");
    assert!(said.contains("Dropout in training mode"), "{said}");
    let listed = coord.json(&["model", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
}

/// skl2onnx's default export of a classifier (`fixtures/iris-zipmap.onnx`):
/// its probabilities leave through a ZipMap as a sequence of maps, which
/// tract does not run and Tern's tensors cannot carry.
#[test]
fn a_zipmap_output_is_compiled_to_the_probability_tensor_and_served_on_both_backends() {
    let coord = Coord::start();
    let src = fixture("iris-zipmap.onnx");
    let v = coord.json(&["model", "register", "iris", "--file", src.to_str().unwrap()]);
    let why = v["needs_compiling"].as_str().unwrap_or_default();
    assert!(why.contains("compiling rewrites output \"output_probability\": the ZipMap"), "{v}");
    let outputs: Vec<&str> = v["outputs"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert_eq!(outputs, ["label", "output_probability"], "{v}");
    coord.ok(&["model", "approve", "iris:1"]);
    let ort =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/models/onnxruntime/libonnxruntime.so");
    let r = coord.json(&[
        "compile",
        "iris:1",
        "--target",
        "rpi4",
        "--input-shape",
        "X=1,4",
        "--onnxruntime",
        ort.to_str().unwrap(),
        "--prefer",
        "onnxruntime",
    ]);
    let rewrites = &r["report"]["rewrites"];
    assert_eq!(rewrites.as_array().map(Vec::len), Some(1), "{r}");
    assert!(
        rewrites[0]
            .as_str()
            .unwrap()
            .contains("f32 probability tensor it maps, one column per class; column i is class 0, 1, 2"),
        "{r}"
    );
    assert_eq!(r["report"]["backend"], "onnxruntime", "onnxruntime ran the rewritten source: {r}");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("iris.nnef.tar");
    let said = coord.ok(&[
        "compile",
        "--file",
        src.to_str().unwrap(),
        "--input-shape",
        "X=1,4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(said.contains("rewritten: output \"output_probability\": the ZipMap"), "{said}");
    // What onnxruntime from Python answers for this flower from iris.onnx's
    // probability tensor, the one the ZipMap (appended to it to make the
    // fixture) maps: the rewrite must give it back.
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("iris.expected.json")).unwrap()).unwrap();
    let want: Vec<f64> = expected["outputs"]["probabilities"]["data"].as_array().unwrap()[18..21]
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let mut tract_agent = Agent::enrolled(&coord, "cam-01");
    let mut ort_agent = Agent::enrolled(&coord, "cam-02");
    for (id, agent, args) in
        [("cam-01", &mut tract_agent, vec![]), ("cam-02", &mut ort_agent, vec!["--onnxruntime", ort.to_str().unwrap()])]
    {
        coord.ok(&["fleet", "assign", id, "iris:1"]);
        agent.start_with(&args);
        agent.wait_serving("iris", 1);
        let (status, answer) =
            agent.post("/v1/models/iris:predict", r#"{"inputs":[{"shape":[1,4],"data":[5.0,3.0,1.5,0.2]}]}"#);
        assert_eq!(status, 200, "{id}: {answer}");
        let p = &answer["outputs"][1];
        assert_eq!(
            (&p["name"], &p["shape"]),
            (&serde_json::json!("output_probability"), &serde_json::json!([1, 3])),
            "{id}: {answer}"
        );
        for (got, want) in p["data"].as_array().unwrap().iter().zip(&want) {
            assert!((got.as_f64().unwrap() - want).abs() < 1e-5, "{id}: {answer} against {want:?}");
        }
        assert_eq!(answer["outputs"][0]["data"][0], 0, "{id}: setosa: {answer}");
    }
    let format = |agent: &Agent| agent.models()["models"][0]["format"].as_str().unwrap().to_owned();
    assert_eq!((format(&tract_agent), format(&ort_agent)), ("nnef".to_owned(), "onnx".to_owned()));
}

/// A source whose `If` on a sample rate only resolves with the rate
/// constant (`fixtures/rate-if.onnx`, as silero-vad): registration is told
/// the constant, and `tern compile` folds it in by default.
#[test]
fn constants_declared_at_registration_let_it_in_and_are_what_compile_folds_by_default() {
    let coord = Coord::start();
    let src = fixture("rate-if.onnx");
    let e = coord.fails(&["model", "register", "rate", "--file", src.to_str().unwrap()]);
    assert!(e.contains("compiling does not help"), "{e}");
    let e = coord.fails(&["model", "register", "rate", "--file", src.to_str().unwrap(), "--const", "rate=1"]);
    assert!(e.contains("the model has no input \"rate\""), "{e}");
    let v = coord.json(&["model", "register", "rate", "--file", src.to_str().unwrap(), "--const", "sr=16000"]);
    assert!(v["needs_compiling"].is_string(), "{v}");
    assert_eq!(v["compile_consts"], serde_json::json!({ "sr": "16000" }), "{v}");
    assert!(coord.ok(&["model", "show", "rate:1"]).contains("compile consts  sr=16000"));
    coord.ok(&["model", "approve", "rate:1"]);
    let r = coord.json(&["compile", "rate:1", "--target", "generic-linux", "--input-shape", "x=2,4", "--cases", "1"]);
    assert_eq!(r["inputs"], serde_json::json!(["x: f32[2,4]"]), "sr folded in: {r}");
    assert_eq!(r["report"]["consts"], serde_json::json!({ "sr": "16000" }), "{r}");
}

//! Drift on a real dataset end to end: scikit-learn's breast-cancer data
//! (loaded through Python, TERN_PYTHON), a model trained on its training
//! split (fixtures/breast-cancer.onnx, `scripts/make-fixtures.py
//! breast-cancer`), registered with the training split as its baseline;
//! the held-out rows streamed through a real agent's local API, then the
//! same rows with one feature shifted.

mod common;

use common::{Agent, Coord, fixture};
use serde_json::Value;
use std::path::Path;

/// The split `make-fixtures.py` trained on, written as CSVs: the training
/// rows, the held-out rows, and the held-out rows with "mean radius"
/// moved up by one training standard deviation.
const SPLIT: &str = r#"
import sys, numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
d = load_breast_cancer()
x_train, x_test, _, _ = train_test_split(d.data.astype(np.float32), d.target, test_size=0.3, random_state=0, stratify=d.target)
out = sys.argv[1]
header = ",".join(d.feature_names)
np.savetxt(out + "/train.csv", x_train, delimiter=",", header=header, comments="", fmt="%.9g")
np.savetxt(out + "/heldout.csv", x_test, delimiter=",", header=header, comments="", fmt="%.9g")
shifted = x_test.copy()
shifted[:, 0] += x_train[:, 0].std()
np.savetxt(out + "/shifted.csv", shifted, delimiter=",", header=header, comments="", fmt="%.9g")
"#;

fn python() -> String {
    std::env::var("TERN_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn split(dir: &Path) {
    let out = std::process::Command::new(python()).args(["-c", SPLIT, dir.to_str().unwrap()]).output().unwrap();
    assert!(
        out.status.success(),
        "{} cannot make the split (run scripts/test, which installs scikit-learn, or set TERN_PYTHON): {}",
        python(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rows(path: &Path) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().skip(1).map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect()
}

/// Sends `rows` to the model, ten a request.
fn stream(agent: &Agent, rows: &[Vec<f64>]) {
    for chunk in rows.chunks(10) {
        let data: Vec<f64> = chunk.iter().flatten().copied().collect();
        let body = serde_json::json!({ "inputs": [{ "shape": [chunk.len(), 30], "data": data }] }).to_string();
        let (status, answer) = agent.post("/v1/models/bc:predict", &body);
        assert_eq!(status, 200, "{answer}");
    }
}

/// Waits until the agent holds no telemetry for the coordinator, on disk
/// or on its way there.
fn wait_delivered(agent: &Agent) {
    common::wait_for("telemetry delivered", std::time::Duration::from_secs(30), || {
        let (_, t) = agent.get("/v1/telemetry");
        (t["held"] == 0 && t["queued"] == 0).then_some(())
    });
}

/// Waits until every record the agent made is on disk; returns how many
/// it holds.
fn written(agent: &Agent) -> Value {
    common::wait_for("telemetry written", std::time::Duration::from_secs(10), || {
        let (_, t) = agent.get("/v1/telemetry");
        (t["queued"] == 0).then(|| t["held"].clone())
    })
}

/// The windows closed so far, oldest first.
fn windows(agent: &Agent) -> Vec<Value> {
    let (status, drift) = agent.get("/v1/models/bc/drift");
    assert_eq!(status, 200, "{drift}");
    let mut w = drift["windows"].as_array().unwrap().clone();
    w.reverse();
    w
}

/// The input features an alert was raised on in a window.
fn raised_inputs(w: &Value) -> Vec<String> {
    w["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["key"]["rule"] == "feature_drift" && c["change"] == "raised")
        .map(|c| c["key"]["feature"].as_str().unwrap().to_owned())
        .collect()
}

/// A webhook receiver: answers 503 to the first POST and 200 to the
/// others; sends on each body as it came.
fn hook_server() -> (String, std::sync::mpsc::Receiver<Value>) {
    use std::io::{BufRead, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut len = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim_end().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let status = if n == 0 { "503 Service Unavailable" } else { "200 OK" };
            write!(conn, "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
            let _ = tx.send(serde_json::from_slice(&body).unwrap());
        }
    });
    (url, rx)
}

#[test]
fn a_shifted_feature_raises_its_alert_and_the_others_stay_quiet() {
    let dir = tempfile::tempdir().unwrap();
    split(dir.path());
    let (hook, posted) = hook_server();
    let coord = Coord::start_with(&["--webhook", &hook]);
    let train = dir.path().join("train.csv");
    let model = fixture("breast-cancer.onnx");
    let out = coord.ok(&[
        "model",
        "register",
        "bc",
        "--file",
        model.to_str().unwrap(),
        "--baseline",
        train.to_str().unwrap(),
    ]);
    assert!(out.contains("baseline: 398 rows, 398 run through the model, 32 features"), "{out}");
    let v = coord.json(&["model", "show", "bc:1"]);
    assert!(v["baseline"]["size"].as_u64().unwrap() < v["baseline_full"]["size"].as_u64().unwrap(), "{v}");
    coord.ok(&["model", "approve", "bc:1"]);
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.ok(&["fleet", "assign", "cam-01", "bc:1"]);
    agent.start_with(&["--drift-window-rows", "100"]);
    agent.wait_serving("bc", 1);

    let heldout = rows(&dir.path().join("heldout.csv"));
    let shifted = rows(&dir.path().join("shifted.csv"));
    assert_eq!((heldout.len(), heldout[0].len()), (171, 30));
    // Unshifted: three passes in different orders, five windows of 100.
    let mut quiet_rows = heldout.clone();
    quiet_rows.extend(heldout.iter().rev().cloned());
    quiet_rows.extend(heldout.iter().step_by(2).chain(heldout.iter().skip(1).step_by(2)).cloned());
    stream(&agent, &quiet_rows);
    let quiet = windows(&agent);
    assert_eq!(quiet.len(), 5, "{quiet:?}");
    let false_alarms: usize = quiet.iter().map(|w| raised_inputs(w).len()).sum();
    for w in &quiet {
        assert_eq!(w["rows"], 100);
        assert!(raised_inputs(w).is_empty(), "an unshifted feature raised an alert: {w}");
    }
    // Shifted: the alert on that feature within the first full window.
    stream(&agent, &shifted);
    stream(&agent, &shifted);
    let all = windows(&agent);
    let after: Vec<&Value> = all.iter().skip(quiet.len()).collect();
    let delay = after.iter().position(|w| raised_inputs(w).contains(&"mean radius".to_owned()));
    let Some(delay) = delay else { panic!("no alert on the shifted feature in {} windows: {after:?}", after.len()) };
    // Window 5 holds 12 unshifted rows and 88 shifted ones: it may raise it.
    assert!(delay <= 1, "raised in window {delay} after the shift");
    let others: Vec<String> = after.iter().flat_map(|w| raised_inputs(w)).filter(|f| f != "mean radius").collect();
    assert!(others.is_empty(), "unshifted features raised alerts: {others:?}");
    let (_, drift) = agent.get("/v1/models/bc/drift");
    let firing: Vec<&Value> = drift["alerts"].as_array().unwrap().iter().collect();
    assert!(firing.iter().any(|a| a["rule"] == "feature_drift" && a["feature"] == "mean radius"), "{drift}");
    assert!(agent.logs().contains("alert raised"), "the agent logs the alert");

    // The windows and the alert reach the coordinator (wire 6 telemetry).
    // Three passes more of shifted rows: most of the hour is shifted then.
    for _ in 0..3 {
        stream(&agent, &shifted);
    }
    wait_delivered(&agent);
    let alerts = coord.json(&["alerts", "list"]);
    let ours: Vec<&Value> = alerts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["rule"] == "feature_drift" && a["feature"] == "mean radius" && a["device"] == "cam-01")
        .collect();
    assert_eq!(ours.len(), 1, "{alerts}");
    let id = ours[0]["id"].as_u64().unwrap();
    // The webhook heard of it: refused once (503), taken when tried again.
    let first = posted.recv_timeout(std::time::Duration::from_secs(20)).expect("a webhook POST");
    let again = posted.recv_timeout(std::time::Duration::from_secs(20)).expect("the POST tried again");
    assert_eq!(first, again);
    assert_eq!(first["event"], "alert_raised", "{first}");
    assert_eq!((first["alert"]["id"].as_u64(), &first["alert"]["feature"]), (Some(id), &ours[0]["feature"]));
    assert_eq!(first["alert"]["device"], "cam-01");
    assert!(coord.ok(&["alerts", "list"]).contains("mean radius"));
    coord.ok(&["alerts", "ack", &id.to_string()]);
    let acked = coord.json(&["alerts", "list", "--all"]);
    assert!(acked.as_array().unwrap().iter().any(|a| a["id"] == id && a["acked_at"].is_u64()), "{acked}");
    let fleet = coord.json(&["monitor", "drift", "bc:1", "--buckets", "4"]);
    assert_eq!(fleet["devices"], 1);
    let (_, kept) = coord.admin_get("/v1/monitor/windows/bc?device=cam-01");
    let kept: Vec<Value> = serde_json::from_str(&kept).unwrap();
    assert_eq!(fleet["windows"].as_u64().unwrap() as usize, kept.len());
    assert_eq!(fleet["rows"].as_u64().unwrap(), kept.iter().map(|w| w["rows"].as_u64().unwrap()).sum::<u64>());
    let row = |f: &str| fleet["features"].as_array().unwrap().iter().find(|x| x["feature"] == f).unwrap().clone();
    assert_eq!(row("mean radius")["status"], "drift", "{fleet}");
    assert_eq!(row("mean texture")["status"], "ok", "{fleet}");
    assert_eq!(row("mean radius")["series"].as_array().unwrap().len(), 4);
    assert_eq!(coord.json(&["monitor", "drift", "bc:1", "--group", "lab"])["devices"], 1);
    let elsewhere = coord.json(&["monitor", "drift", "bc:1", "--group", "depot"]);
    assert_eq!((elsewhere["devices"].as_u64(), elsewhere["windows"].as_u64()), (Some(0), Some(0)));
    assert_eq!(coord.json(&["monitor", "drift", "bc:1", "--device", "cam-02"])["windows"], 0);
    let table = coord.ok(&["monitor", "drift", "bc"]);
    assert!(table.contains("mean radius") && table.contains("drift") && table.contains("1 devices"), "{table}");
    let (status, metrics) = coord.admin_get("/metrics");
    assert_eq!(status, 200, "{metrics}");
    assert!(metrics.contains("tern_drift_linf{model=\"bc\",version=\"1\",feature=\"mean radius\"}"), "{metrics}");
    assert!(metrics.contains("tern_alerts_raised_total{model=\"bc\",rule=\"feature_drift\"} 1"), "{metrics}");
    assert!(metrics.contains("tern_devices_connected 1"), "{metrics}");
    assert!(metrics.contains("tern_webhook_delivered_total 1"), "{metrics}");
    // Unshifted again: the device clears the alert, and the webhook hears.
    stream(&agent, &heldout);
    stream(&agent, &heldout);
    wait_delivered(&agent);
    let cleared = posted.recv_timeout(std::time::Duration::from_secs(20)).expect("the cleared alert's POST");
    assert_eq!((&cleared["event"], cleared["alert"]["id"].as_u64()), (&"alert_cleared".into(), Some(id)), "{cleared}");
    assert!(cleared["alert"]["cleared_at_ms"].is_u64(), "{cleared}");
    // What the note reports: detection delay in windows, false alarms per
    // feature-window over the unshifted windows, and the margins.
    let robust = |w: &Value, input: bool| -> f64 {
        w["distances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["feature"].as_str().unwrap().starts_with("output:") != input)
            .filter_map(|d| d["linf_robust"].as_f64())
            .fold(f64::MIN, f64::max)
    };
    let quiet_max = quiet.iter().map(|w| robust(w, true)).fold(f64::MIN, f64::max);
    let shifted_value = after[delay]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"]["feature"] == "mean radius")
        .unwrap()["value"]
        .as_f64()
        .unwrap();
    eprintln!(
        "detection delay: {} window(s) after the first shifted row; false alarms: {false_alarms} in {} feature-windows; \
         largest robust L-inf of an input in the unshifted windows {quiet_max:.3}, of mean radius when raised {shifted_value:.3} (threshold 0.1)",
        delay + 1,
        quiet.len() * 30
    );
}

#[test]
fn a_bad_baseline_is_refused_naming_the_place_and_registers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coord::start();
    let model = fixture("breast-cancer.onnx");
    let header: Vec<String> = (0..30).map(|i| format!("f{i}")).collect();
    let row: Vec<String> = (0..30).map(|i| format!("{}.5", i)).collect();
    let cases = [
        ("missing.csv", format!("{}\n{}\n", header[..29].join(","), row[..29].join(",")), "29 columns, but input"),
        (
            "text.csv",
            format!("{}\n{}\n{}\n", header.join(","), row.join(","), row.join(",").replacen("3.5", "abc", 1)),
            "line 3, column \"f3\": \"abc\" is not a number",
        ),
        ("empty.csv", String::new(), "is empty"),
        ("header-only.csv", format!("{}\n", header.join(",")), "has a header but no rows"),
        (
            "ragged.csv",
            format!("{}\n{}\n1,2\n", header.join(","), row.join(",")),
            "line 3: 2 fields, the header has 30",
        ),
    ];
    for (name, text, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        let e = coord.fails(&[
            "model",
            "register",
            "bc",
            "--file",
            model.to_str().unwrap(),
            "--baseline",
            path.to_str().unwrap(),
        ]);
        assert!(e.contains(want) && e.contains(name), "{name}: {e}");
    }
    let good = dir.path().join("good.csv");
    std::fs::write(&good, format!("{}\n{}\n", header.join(","), row.join(","))).unwrap();
    let e = coord.fails(&[
        "model",
        "register",
        "bc",
        "--file",
        model.to_str().unwrap(),
        "--baseline",
        good.to_str().unwrap(),
        "--categorical",
        "nope",
    ]);
    assert!(e.contains("--categorical \"nope\""), "{e}");
    assert_eq!(coord.json(&["model", "list"]), serde_json::json!([]), "nothing was registered");
}

/// The registered `bc:1` with the training split as its baseline.
fn registered(dir: &Path) -> Coord {
    split(dir);
    let coord = Coord::start();
    let train = dir.join("train.csv");
    let model = fixture("breast-cancer.onnx");
    coord.ok(&["model", "register", "bc", "--file", model.to_str().unwrap(), "--baseline", train.to_str().unwrap()]);
    coord
}

#[test]
fn model_monitor_files_go_out_and_come_back_and_datasets_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let coord = registered(dir.path());
    let d = dir.path();
    let out = d.join("mm");
    let said = coord.ok(&["monitor", "export-constraints", "bc:1", "--out", out.to_str().unwrap()]);
    assert!(said.contains("30 features; constraints suggested from the baseline"), "{said}");
    assert!(said.contains("left out (no Model Monitor counterpart): output:label, output:probabilities"), "{said}");
    let stats: Value = serde_json::from_str(&std::fs::read_to_string(out.join("statistics.json")).unwrap()).unwrap();
    let f = &stats["features"][0];
    assert_eq!(f["name"], "mean radius");
    assert_eq!(f["numerical_statistics"]["common"]["num_present"], 398.0);
    assert_eq!(f["numerical_statistics"]["distribution"]["kll"]["buckets"].as_array().unwrap().len(), 10);
    let cons: Value = serde_json::from_str(&std::fs::read_to_string(out.join("constraints.json")).unwrap()).unwrap();
    assert_eq!(cons["monitoring_config"]["distribution_constraints"]["comparison_method"], "Robust");

    // The held-out rows keep the constraints; shifted, one feature drifts.
    let check = |file: &str| -> Value {
        let path = d.join(file);
        let out = d.join(format!("{file}.violations.json"));
        coord.ok(&["monitor", "check", "bc:1", "--data", path.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
    };
    assert_eq!(check("heldout.csv"), serde_json::json!({ "violations": [] }));
    let v = check("shifted.csv");
    let got: Vec<(&str, &str)> = v["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["feature_name"].as_str().unwrap(), x["constraint_check_type"].as_str().unwrap()))
        .collect();
    assert_eq!(got, vec![("mean radius", "baseline_drift_check")], "{v}");

    // A dataset without one column, with one more, and a word in another.
    let text = std::fs::read_to_string(d.join("heldout.csv")).unwrap();
    let odd: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut cells: Vec<String> = l.split(',').skip(1).map(str::to_owned).collect();
            cells.push(if i == 0 { "camera".into() } else { "7".into() });
            if i == 5 {
                cells[0] = "n/a".into();
            }
            cells.join(",")
        })
        .collect();
    std::fs::write(d.join("odd.csv"), odd.join("\n")).unwrap();
    let v = check("odd.csv");
    let got: Vec<(&str, &str)> = v["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["feature_name"].as_str().unwrap(), x["constraint_check_type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("mean radius", "missing_column_check"),
            ("camera", "extra_column_check"),
            ("mean texture", "data_type_check"),
        ],
        "{v}"
    );

    // Imported constraints are the version's from then on: a threshold of
    // 0.9 lets the shifted feature pass.
    let mut loose = cons.clone();
    loose["monitoring_config"]["distribution_constraints"]["comparison_threshold"] = serde_json::json!(0.9);
    std::fs::write(d.join("loose.json"), serde_json::to_vec(&loose).unwrap()).unwrap();
    coord.ok(&["monitor", "import-constraints", "bc:1", d.join("loose.json").to_str().unwrap()]);
    assert_eq!(check("shifted.csv"), serde_json::json!({ "violations": [] }));
    let back = d.join("back");
    coord.ok(&["monitor", "export-constraints", "bc:1", "--out", back.to_str().unwrap()]);
    let exported: Value =
        serde_json::from_str(&std::fs::read_to_string(back.join("constraints.json")).unwrap()).unwrap();
    assert_eq!(exported, loose, "exported field for field as imported");

    // Another schema, or a feature the baseline lacks: refused, naming the
    // place, and the imported constraints stay.
    let e = coord.fails(&["monitor", "import-constraints", "bc:1", out.join("statistics.json").to_str().unwrap()]);
    assert!(e.contains("statistics.json: not Model Monitor's constraints.json schema") && e.contains("line"), "{e}");
    let mut unknown = loose.clone();
    unknown["features"][0]["name"] = serde_json::json!("mean radiance");
    std::fs::write(d.join("unknown.json"), serde_json::to_vec(&unknown).unwrap()).unwrap();
    let e = coord.fails(&["monitor", "import-constraints", "bc:1", d.join("unknown.json").to_str().unwrap()]);
    assert!(e.contains("\"mean radiance\""), "{e}");
    assert_eq!(
        check("shifted.csv"),
        serde_json::json!({ "violations": [] }),
        "the loose constraints are still in force"
    );

    // Model Monitor's statistics register as a baseline too, and export
    // again as they came.
    let model = fixture("breast-cancer.onnx");
    let said = coord.ok(&[
        "model",
        "register",
        "bc",
        "--file",
        model.to_str().unwrap(),
        "--baseline",
        out.join("statistics.json").to_str().unwrap(),
    ]);
    assert!(said.contains("30 features (no outputs"), "{said}");
    let again = d.join("again");
    coord.ok(&["monitor", "export-constraints", "bc:2", "--out", again.to_str().unwrap()]);
    let stats2: Value = serde_json::from_str(&std::fs::read_to_string(again.join("statistics.json")).unwrap()).unwrap();
    assert_eq!(differs(&stats2, &stats, "statistics"), None, "statistics.json comes back field for field");
}

/// The first place two JSON values differ, numbers named `mean`, `sum` and
/// `std_dev` compared to 1e-12 (they are recomputed from each other).
fn differs(a: &Value, b: &Value, at: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            if x.keys().ne(y.keys()) {
                return Some(format!(
                    "{at}: keys {:?} vs {:?}",
                    x.keys().collect::<Vec<_>>(),
                    y.keys().collect::<Vec<_>>()
                ));
            }
            x.iter().find_map(|(k, v)| {
                let here = format!("{at}.{k}");
                if ["mean", "sum", "std_dev"].contains(&k.as_str()) {
                    let (p, q) = (v.as_f64().unwrap(), y[k].as_f64().unwrap());
                    return ((p - q).abs() > 1e-12 * (1.0 + q.abs())).then(|| format!("{here}: {p} vs {q}"));
                }
                differs(v, &y[k], &here)
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).enumerate().find_map(|(i, (v, w))| differs(v, w, &format!("{at}[{i}]")))
        }
        _ => (a != b).then(|| format!("{at}: {a} vs {b}")),
    }
}

#[test]
fn telemetry_buffered_offline_survives_sigkill_and_arrives_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let coord = registered(dir.path());
    coord.ok(&["model", "approve", "bc:1"]);
    let mut agent = Agent::enrolled(&coord, "cam-01");
    coord.ok(&["fleet", "assign", "cam-01", "bc:1"]);
    agent.start_with(&["--drift-window-rows", "10"]);
    agent.wait_serving("bc", 1);
    let heldout = rows(&dir.path().join("heldout.csv"));
    stream(&agent, &heldout[..20]);
    wait_delivered(&agent);
    let quic = coord.quic.clone();
    let coord_dir = coord.stop_gently();
    // Offline: five windows closed and buffered.
    stream(&agent, &heldout[20..70]);
    assert_eq!(written(&agent), 5, "five windows on disk");
    agent.proc.as_mut().unwrap().kill9();
    agent.start_with(&["--drift-window-rows", "10"]);
    agent.wait_answering("bc", 1);
    // The five windows survived, and the new process says it started (its
    // record written on the outbox thread, soon after).
    assert_eq!(written(&agent), 6, "the buffer after SIGKILL");
    stream(&agent, &heldout[70..90]);
    let coord = Coord::start_in(coord_dir, &["--quic-listen", &quic]).map_err(|(_, log)| log).unwrap();
    wait_delivered(&agent);
    let (status, body) = coord.admin_get("/v1/monitor/windows/bc?device=cam-01");
    assert_eq!(status, 200, "{body}");
    let windows: Vec<Value> = serde_json::from_str(&body).unwrap();
    let records: Vec<u64> = windows.iter().map(|w| w["record"].as_u64().unwrap()).collect();
    assert_eq!(records.len(), 9, "every window once: {records:?}");
    assert!(records.windows(2).all(|p| p[0] < p[1]), "in order: {records:?}");
    assert!(windows.iter().all(|w| w["rows"] == 10), "{windows:?}");
}

#[test]
fn npy_samples_make_a_baseline_by_column_or_by_image_channel() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = r#"
import sys, numpy as np
rng = np.random.default_rng(5)
np.save(sys.argv[1] + "/images.npy", rng.random((20, 3, 4, 4), dtype=np.float32))
np.save(sys.argv[1] + "/rows.npy", rng.normal(14.0, 3.0, (50, 30)).astype(np.float32))
np.save(sys.argv[1] + "/wrong.npy", rng.random((5, 4, 4, 3), dtype=np.float32))
"#;
    let out = std::process::Command::new(python()).args(["-c", script, d.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let coord = Coord::start();
    let register = |name: &str, model: &str, data: &str| {
        coord.cli(&[
            "model",
            "register",
            name,
            "--file",
            fixture(model).to_str().unwrap(),
            "--baseline",
            d.join(data).to_str().unwrap(),
        ])
    };
    let ok = register("img", "tiny-image.onnx", "images.npy");
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(said.contains("baseline: 20 rows, 20 run through the model, 2 features"), "{said}");
    let said = coord.ok(&["monitor", "export-constraints", "img:1", "--out", d.join("img").to_str().unwrap()]);
    assert!(said.contains("left out (no Model Monitor counterpart): image, output:probs"), "{said}");
    let ok = register("bc", "breast-cancer.onnx", "rows.npy");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("50 rows, 50 run through the model, 32 features"));
    let stats: Value = serde_json::from_str(
        &std::fs::read_to_string({
            coord.ok(&["monitor", "export-constraints", "bc:1", "--out", d.join("bc").to_str().unwrap()]);
            d.join("bc/statistics.json")
        })
        .unwrap(),
    )
    .unwrap();
    assert_eq!(stats["features"][29]["name"], "features[29]");
    let bad = register("img", "tiny-image.onnx", "wrong.npy");
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && e.contains("wrong.npy") && e.contains("axis 1 is 4, input"), "{e}");
}

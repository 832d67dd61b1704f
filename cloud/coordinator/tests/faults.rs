//! Faults on the device, with real processes: a candidate that kills the
//! agent inside the runtime, a data dir on a small tmpfs that fills up
//! during a download, and the link cut again and again during a download
//! (every packet of a network namespace dropped by nftables;
//! `TERN_SOAK_LINK_CUTS=50` for the long run); an update's steps taken
//! while the coordinator was away reach it after the agent restarts. The
//! tmpfs and the namespace need root (mount, ip netns), as CI has.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn answer(agent: &Agent) -> Option<u64> {
    scorer_answer(agent).map(|(version, _)| version)
}

/// The reason of the coordinator's newest history step for `name:version`
/// in `phase`, once there is one.
fn step(coord: &Coord, name: &str, version: u64, phase: &str) -> String {
    for _ in 0..300 {
        let d = coord.json(&["fleet", "show", "cam-01"]);
        let found = d["history"].as_array().and_then(|h| {
            h.iter().rev().find_map(|e| {
                (e["name"] == name && e["version"] == version && e["phase"] == phase)
                    .then(|| e["reason"].as_str().unwrap_or_default().to_owned())
            })
        });
        if let Some(reason) = found {
            return reason;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "no {name}:{version} {phase} in the history: {}\n{}",
        coord.json(&["fleet", "show", "cam-01"])["history"],
        coord.log()
    );
}

#[test]
fn a_candidate_that_kills_the_agent_is_not_loaded_again_after_the_restart_and_is_reported_failed() {
    let (coord, mut agent) = serving(&[], "scorer-a.onnx", "scorer");
    // Runs on the coordinator's machine; needs 576 MB a run, so one
    // reference input set rather than four seeded ones (each takes seconds
    // in a debug build).
    let reference = agent.data().with_file_name("reference.tensors");
    let x = tern_proto::Tensor { shape: vec![1, 4], data: tern_proto::TensorData::F32(vec![0.1, 0.7, 0.2, 0.0]) };
    std::fs::write(&reference, tern_proto::encode_tensors(&[x]).unwrap()).unwrap();
    let file = fixture("scorer-oversized.onnx");
    let v = coord.json(&[
        "model",
        "register",
        "scorer",
        "--file",
        file.to_str().unwrap(),
        "--reference",
        reference.to_str().unwrap(),
    ]);
    assert_eq!(v["version"], 2);
    coord.ok(&["model", "approve", "scorer:2"]);
    // A device with less memory than v2 needs: the agent's address space
    // capped 256 MiB above what it takes serving v1; and the agent built
    // with panic=abort, as devices run it: tract's panic on the failed
    // allocation ends the process.
    agent.proc.as_mut().unwrap().kill9();
    agent.bin = Some(abort_agent_bin());
    agent.start();
    agent.wait_serving("scorer", 1);
    let vm_kib = proc_status(agent.pid(), "VmSize");
    agent.proc.as_mut().unwrap().kill9();
    agent.prefix = vec!["prlimit".into(), format!("--as={}", (vm_kib + 256 * 1024) * 1024), "--".into()];
    agent.start();
    agent.wait_serving("scorer", 1);
    coord.ok(&["fleet", "assign", "cam-01", "scorer:2"]);
    let status = std::iter::repeat_with(|| {
        std::thread::sleep(Duration::from_millis(100));
        agent.proc.as_mut().unwrap().exited()
    })
    .take(600)
    .find_map(|s| s)
    .unwrap_or_else(|| panic!("the agent did not die in v2's self-test: {}", agent.logs()));
    assert!(!status.success(), "{status:?}");
    assert!(agent.logs().contains("failed to allocate Layout { size: 576000000"), "{}", agent.logs());
    // The panic was written down before the process ended: its service
    // manager starts it again, v1 serves, and v2 is not run again.
    agent.start();
    agent.wait_serving("scorer", 1);
    let reason = step(&coord, "scorer", 2, "failed");
    assert!(
        reason.starts_with(
            "crashed in self-test: the agent panicked while it was running this version (failed to allocate Layout"
        ),
        "{reason}"
    );
    assert!(reason.ends_with("not tried again until the desired state changes"), "{reason}");
    assert!(!agent.data().join("panicked").exists(), "the record is taken at the start");
    std::thread::sleep(Duration::from_secs(3));
    assert!(agent.proc.as_mut().unwrap().exited().is_none(), "the agent died again: {}", agent.logs());
    assert_eq!(answer(&agent), Some(1));
    let m = agent.models();
    let v2 = m["models"].as_array().unwrap().iter().find(|m| m["version"] == 2).cloned().unwrap_or(Value::Null);
    assert_eq!(v2["state"], "failed", "{m}");
    let shown = coord.ok(&["fleet", "show", "cam-01"]);
    assert!(shown.contains("crashed in self-test"), "{shown}");
}

#[test]
fn update_steps_taken_offline_reach_the_coordinator_after_the_agent_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "probation_secs = 4\n").unwrap();
    let coord = Coord::start_with(&["--update-policy", policy.to_str().unwrap()]);
    let mut agent = Agent::enrolled(&coord, "cam-01");
    assert_eq!(coord.register_fixture("scorer", "scorer-a.onnx"), 1);
    assert_eq!(coord.register_fixture("scorer", "scorer-a2.onnx"), 2);
    coord.ok(&["fleet", "assign", "cam-01", "scorer:1"]);
    agent.start();
    agent.wait_serving("scorer", 1);
    coord.ok(&["fleet", "assign", "cam-01", "scorer:2"]);
    agent.wait_answering("scorer", 2);
    // The coordinator goes away during v2's probation; v2 commits while
    // the agent is offline, then the agent dies.
    let quic = coord.quic.clone();
    let data = coord.stop_gently();
    agent.wait_serving("scorer", 2);
    agent.proc.as_mut().unwrap().kill9();
    let coord = Coord::start_in(data, &["--quic-listen", &quic, "--update-policy", policy.to_str().unwrap()])
        .unwrap_or_else(|(_, log)| panic!("{log}"));
    agent.start();
    let reason = step(&coord, "scorer", 2, "committed");
    assert!(reason.starts_with("on 0 requests"), "{reason}");
}

/// Unmounts (lazily: a process may still hold it) when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A built-in MLP (4 → 1024 → 1024 → 3) of about 4.2 MB, packed by
/// `tern model pack` from weights made here.
fn big_model(coord: &Coord, dir: &Path) -> std::path::PathBuf {
    let sizes = [4usize, 1024, 1024, 3];
    let layers: Vec<Value> = sizes
        .windows(2)
        .map(|w| {
            let weight: Vec<Vec<f32>> =
                (0..w[0]).map(|i| (0..w[1]).map(|j| ((i * 31 + j * 17) % 97) as f32 / 9700.0).collect()).collect();
            serde_json::json!({ "weight": weight, "bias": vec![0.0f32; w[1]] })
        })
        .collect();
    let weights = serde_json::json!({
        "family": { "Mlp": { "inputs": 4, "hidden": [1024, 1024], "outputs": 3, "head": "Softmax" } },
        "layers": layers,
    });
    let (json, out) = (dir.join("big.json"), dir.join("big.tbm"));
    std::fs::write(&json, serde_json::to_vec(&weights).unwrap()).unwrap();
    coord.ok(&["model", "pack", json.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    out
}

#[test]
fn a_disk_that_fills_up_during_a_download_fails_it_cleanly_and_the_active_model_serves_on() {
    let coord = Coord::start();
    let mut agent = Agent::new();
    std::fs::create_dir_all(agent.data()).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(agent.data())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mounting a tmpfs needs root (CI runs as root)");
    let _mounted = Mounted(agent.data());
    let out = agent.enroll(&coord.quic, &coord.token(), Some("cam-01"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(coord.register_fixture("scorer", "scorer-a.onnx"), 1);
    assert_eq!(coord.register_fixture("scorer", "scorer-a2.onnx"), 2);
    coord.ok(&["fleet", "assign", "cam-01", "scorer:1"]);
    agent.start();
    agent.wait_serving("scorer", 1);

    let work = tempfile::tempdir().unwrap();
    let big = big_model(&coord, work.path());
    assert!(std::fs::metadata(&big).unwrap().len() > 3 << 20);
    coord.json(&["model", "register", "big", "--file", big.to_str().unwrap()]);
    coord.ok(&["model", "approve", "big:1"]);
    coord.ok(&["fleet", "assign", "cam-01", "big:1"]);
    let reason = step(&coord, "big", 1, "retrying");
    assert!(reason.contains("disk full: 4231709 bytes to fetch, "), "{reason}");
    // Between tries nothing of it is left, and the active model serves.
    wait_for("partial/ to be empty", Duration::from_secs(30), || {
        std::fs::read_dir(agent.data().join("partial")).unwrap().next().is_none().then_some(())
    });
    assert_eq!(answer(&agent), Some(1));
    let m = agent.models();
    let b = m["models"].as_array().unwrap().iter().find(|m| m["name"] == "big").cloned().unwrap_or(Value::Null);
    assert!(b["detail"].as_str().is_some_and(|d| d.contains("disk full")), "{m}");
    // The space is there for what fits.
    coord.ok(&["fleet", "unassign", "cam-01", "big"]);
    coord.ok(&["fleet", "assign", "cam-01", "scorer:2"]);
    agent.wait_serving("scorer", 2);
    agent.proc.as_mut().unwrap().kill9();
}

/// A network namespace joined to this one by a veth pair whose host end
/// caps the rate towards it (tc tbf): the agent runs inside, the
/// coordinator outside. Removed (with its veth) when dropped.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    fn new(rate: &str) -> Self {
        let id = std::process::id() % 10_000;
        let (name, host_if, ns_if) = (format!("tern-cut-{id}"), format!("tch{id}"), format!("tcn{id}"));
        let net = format!("10.203.{}", id % 250);
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(std::process::Stdio::null()).status();
        ip(&["netns", "add", &name]);
        let ns = Self { name, host_if, host_ip: format!("{net}.1"), ns_ip: format!("{net}.2") };
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns_if]);
        ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&["-n", &ns.name, "addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_if]);
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        let tc = Command::new("tc")
            .args(["qdisc", "add", "dev", &ns.host_if, "root", "tbf", "rate", rate, "burst", "16kb", "latency", "50ms"])
            .status()
            .expect("tc (iproute2)");
        assert!(tc.success(), "tc tbf on {}", ns.host_if);
        ns
    }

    /// Cuts the link (every packet in or out of the namespace dropped by
    /// nftables, as a radio outage would) or restores it.
    fn link(&self, up: bool) {
        let rules = if up {
            "delete table inet tern_cut".to_string()
        } else {
            "table inet tern_cut {\n chain i { type filter hook input priority 0; policy drop; }\n \
             chain o { type filter hook output priority 0; policy drop; }\n}\n"
                .to_string()
        };
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft (Debian's nftables; scripts/test installs it)");
        use std::io::Write;
        nft.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success(), "nft: {rules}");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).stderr(std::process::Stdio::null()).status();
    }
}

#[test]
fn a_download_cut_off_again_and_again_resumes_where_it_was_and_verifies() {
    let cuts: usize = std::env::var("TERN_SOAK_LINK_CUTS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    // About a second of transfer between cuts: 4.2 MB over `cuts` seconds.
    let rate = format!("{}kbit", (4_400_000 * 8 / 1000 / cuts.max(1)).max(64));
    let ns = Netns::new(&rate);
    let coord = Coord::start_with(&["--quic-listen", &format!("{}:0", ns.host_ip)]);
    let mut agent = Agent::enrolled(&coord, "cam-01");
    agent.prefix = vec!["ip".into(), "netns".into(), "exec".into(), ns.name.clone()];
    agent.listen = format!("{}:0", ns.ns_ip);
    assert_eq!(coord.register_fixture("scorer", "scorer-a.onnx"), 1);
    coord.ok(&["fleet", "assign", "cam-01", "scorer:1"]);
    // An idle timeout of 20 s (the default is 60 s), so that a cut of 22 s
    // ends the connection.
    agent.start_with(&["--keep-alive-secs", "5", "--idle-timeout-secs", "20"]);
    agent.wait_serving("scorer", 1);

    let work = tempfile::tempdir().unwrap();
    let big = big_model(&coord, work.path());
    let size = std::fs::metadata(&big).unwrap().len();
    coord.json(&["model", "register", "big", "--file", big.to_str().unwrap()]);
    coord.ok(&["model", "approve", "big:1"]);
    coord.ok(&["fleet", "assign", "cam-01", "big:1"]);
    let partial = || {
        std::fs::read_dir(agent.data().join("partial"))
            .ok()?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()
    };
    wait_for("the download to start", Duration::from_secs(30), || partial().filter(|n| *n > 0));
    let mut rng = Rng(0x5eed);
    let mut long_cuts = 0;
    let mut offsets = Vec::new();
    for i in 0..cuts {
        std::thread::sleep(Duration::from_millis(300 + rng.below(900)));
        let Some(at) = partial() else { break };
        offsets.push(at);
        // Every fourth cut outlasts the agent's 20 s idle timeout: the
        // connection dies and the download starts again from what is on
        // disk; the others are over before either side gives up.
        let long = i % 4 == 3;
        long_cuts += usize::from(long);
        ns.link(false);
        std::thread::sleep(Duration::from_millis(if long { 22_000 } else { 1_500 }));
        ns.link(true);
    }
    let made = offsets.len();
    wait_for("big:1 to serve", Duration::from_secs(180), || {
        agent.models()["models"].as_array()?.iter().any(|m| m["name"] == "big" && m["state"] == "serving").then_some(())
    });
    assert_eq!(answer(&agent), Some(1), "scorer served on through the cuts");
    let logs = agent.logs();
    let resumed: Vec<u64> = logs
        .lines()
        .filter(|l| l.contains("artifact downloaded"))
        .filter_map(|l| l.split("resumed_from=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    let interrupted = logs.matches("download interrupted at byte").count();
    eprintln!(
        "{made} cuts ({long_cuts} past the idle timeout) of a {size}-byte download at {rate}; \
         {interrupted} attempts cut off; the last resumed from byte {:?}; partial sizes at the cuts: {offsets:?}",
        resumed.last()
    );
    assert!(made >= cuts.min(3), "the download ended before {} cuts: {offsets:?}", cuts.min(3));
    if long_cuts > 0 {
        assert!(interrupted >= 1, "a cut past the idle timeout ended no attempt: {logs}");
        assert!(resumed.last().is_some_and(|r| *r > 0), "the download started over: {resumed:?}");
    }
    agent.proc.as_mut().unwrap().kill9();
}

#[test]
fn an_artifact_longer_than_its_manifest_says_is_not_downloaded_and_nothing_of_it_is_kept() {
    let (coord, agent) = serving(&[], "scorer-a.onnx", "scorer");
    assert_eq!(coord.register_fixture("scorer", "scorer-a2.onnx"), 2);
    // Endless data: v2's artifact on the coordinator grows past the size
    // its signed manifest gives.
    let sha = tern_proto::Sha256Digest::of(&std::fs::read(fixture("scorer-a2.onnx")).unwrap());
    let stored = coord.data().join("artifacts/sha256").join(sha.to_hex());
    let good = std::fs::read(&stored).unwrap();
    let mut endless = good.clone();
    endless.extend(std::iter::repeat_n(0u8, 1 << 20));
    std::fs::write(&stored, &endless).unwrap();
    coord.ok(&["fleet", "assign", "cam-01", "scorer:2"]);
    let reason = step(&coord, "scorer", 2, "retrying");
    let want = format!("coordinator offered {} bytes from 0, the manifest says {} bytes", endless.len(), good.len());
    assert!(reason.contains(&want), "{reason}");
    assert!(std::fs::read_dir(agent.data().join("partial")).unwrap().next().is_none(), "bytes of it were kept");
    assert_eq!(answer(&agent), Some(1));
    // The right file back: the retry takes it.
    std::fs::write(&stored, &good).unwrap();
    agent.wait_serving("scorer", 2);
}

#[test]
fn an_agent_whose_clock_reads_1970_after_a_reboot_still_connects_and_updates_through_tuf() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    assert_eq!(coord.register_fixture("scorer", "scorer-a.onnx"), 1);
    assert_eq!(coord.register_fixture("scorer", "scorer-a2.onnx"), 2);
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("root.key");
    coord.ok(&["registry", "sign-root", "--key", key.to_str().unwrap(), "--generate"]);
    coord.ok(&["fleet", "assign", "cam-01", "scorer:1"]);
    agent.start();
    agent.wait_serving("scorer", 1);
    assert!(agent.data().join("identity/tuf.json").exists());
    // The device reboots without a real-time clock, and the coordinator
    // restarted meanwhile, two hours later (its new server certificate is
    // younger than anything the device knows of the time).
    agent.proc.as_mut().unwrap().kill9();
    let quic = coord.quic.clone();
    let coord = Coord::start_in_env(coord.stop_gently(), &["--quic-listen", &quic], &faketime("+2h"))
        .unwrap_or_else(|(_, log)| panic!("{log}"));
    agent.env = faketime("@1970-01-02 00:00:00");
    agent.start();
    coord.ok(&["fleet", "assign", "cam-01", "scorer:2"]);
    agent.wait_serving("scorer", 2);
    let logs = agent.logs();
    assert!(logs.contains("1970-01-02T00:00:") && logs.contains("connected to coordinator"), "{logs}");
    agent.proc.as_mut().unwrap().kill9();
}

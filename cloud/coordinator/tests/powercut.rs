//! Power cuts, not only kills: the agent runs on a data dir where only what
//! it fsynced survives (`powercut/shim.c`, an LD_PRELOAD shim, records each
//! file's bytes at its last fsync and each folder's entries at the folder's
//! last fsync). At seeded random instants of updates the agent is killed
//! and its data dir rebuilt from that record alone, as a disk would come
//! back after the power went; after each such reboot it must start, serve a
//! version it verified (answering as that version does), never report an
//! older generation than it reported before, and keep in `models/` only
//! files whose digest is their name. `TERN_SOAK_CUTS=100` for the long run
//! (CI: 12).

mod common;

use common::*;
use serde_json::Value;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The durable record of one folder tree.
struct Layer {
    data: PathBuf,
    shadow: PathBuf,
    so: PathBuf,
}

fn key(m: &std::fs::Metadata) -> String {
    format!("{}-{}", m.dev(), m.ino())
}

impl Layer {
    fn new(data: &Path, work: &Path) -> Self {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/powercut/shim.c");
        let so = work.join("powercut.so");
        let status = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&so)
            .arg(&src)
            .arg("-ldl")
            .status()
            .expect("a C compiler (cc): scripts/ensure-deps installs one");
        assert!(status.success(), "building {}", src.display());
        let layer = Self { data: data.canonicalize().unwrap(), shadow: work.join("shadow"), so };
        layer.baseline();
        layer
    }

    /// What the agent's environment needs for the shim.
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.so.to_str().unwrap().into()),
            ("TERN_POWERCUT_DIR".into(), self.data.to_str().unwrap().into()),
            ("TERN_POWERCUT_SHADOW".into(), self.shadow.to_str().unwrap().into()),
        ]
    }

    /// Everything there now is durable (after enrollment, after a reboot).
    fn baseline(&self) {
        let _ = std::fs::remove_dir_all(&self.shadow);
        std::fs::create_dir_all(self.shadow.join("ino")).unwrap();
        std::fs::create_dir_all(self.shadow.join("dir")).unwrap();
        self.record(&self.data);
    }

    fn record(&self, dir: &Path) {
        let mut list = String::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let name = e.file_name().into_string().unwrap();
            if m.is_file() {
                std::fs::copy(e.path(), self.shadow.join("ino").join(key(&m))).unwrap();
                list += &format!("f {} {name}\n", key(&m));
            } else if m.is_dir() {
                self.record(&e.path());
                list += &format!("d {} {name}\n", key(&m));
            }
        }
        std::fs::write(self.shadow.join("dir").join(key(&std::fs::metadata(dir).unwrap())), list).unwrap();
    }

    /// The power cut, once the process is dead: the folder as the record
    /// has it. Returns how many files lost bytes or were lost.
    fn cut(&self, root: &str) -> (usize, usize) {
        let before = files(&self.data);
        let rebuilt = self.data.with_extension("rebuilt");
        let _ = std::fs::remove_dir_all(&rebuilt);
        self.rebuild(root, &rebuilt);
        std::fs::remove_dir_all(&self.data).unwrap();
        std::fs::rename(&rebuilt, &self.data).unwrap();
        let after = files(&self.data);
        let changed = before.iter().filter(|(p, b)| after.get(*p).is_some_and(|a| a != *b)).count();
        let gone = before.keys().filter(|p| !after.contains_key(*p)).count();
        self.baseline();
        (changed, gone)
    }

    fn rebuild(&self, dir_key: &str, at: &Path) {
        std::fs::create_dir(at).unwrap();
        let list = std::fs::read_to_string(self.shadow.join("dir").join(dir_key)).unwrap_or_default();
        for line in list.lines() {
            let mut parts = line.splitn(3, ' ');
            let (kind, k, name) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
            let path = at.join(name);
            if kind == "d" {
                self.rebuild(k, &path);
            } else {
                // Never synced: a file that was created has no bytes yet.
                let bytes = std::fs::read(self.shadow.join("ino").join(k)).unwrap_or_default();
                std::fs::write(&path, bytes).unwrap();
            }
        }
    }

    /// How many files' synced bytes it holds.
    fn records(&self) -> usize {
        std::fs::read_dir(self.shadow.join("ino")).unwrap().count()
    }

    fn root_key(&self) -> String {
        key(&std::fs::metadata(&self.data).unwrap())
    }
}

/// Every file under `dir`, by relative path.
fn files(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                out.insert(
                    e.path().strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(e.path()).unwrap_or_default(),
                );
            }
        }
    }
    out
}

fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The log of the agent's latest start.
fn last_log(agent: &Agent) -> String {
    let mut logs: Vec<_> = std::fs::read_dir(agent.dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("agent-")))
        .collect();
    logs.sort();
    logs.last().map(|p| std::fs::read_to_string(p).unwrap_or_default()).unwrap_or_default()
}

#[test]
fn the_layer_keeps_only_what_was_synced() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("old"), "old\n").unwrap();
    let layer = Layer::new(&data, work.path());
    // coreutils' sync FILE calls fsync on it; sync DIR on the folder.
    let script = "cd \"$0\" && echo one > synced && sync synced && echo two > unsynced && sync . \
        && echo more >> synced && echo three > after && mv old moved && rm -f unsynced-gone";
    let status = Command::new("sh").args(["-c", script]).arg(&layer.data).envs(layer.env()).status().unwrap();
    assert!(status.success());
    let (changed, gone) = layer.cut(&layer.root_key());
    let after = files(&layer.data);
    let text = |p: &str| after.get(Path::new(p)).map(|b| String::from_utf8_lossy(b).into_owned());
    assert_eq!(text("synced").as_deref(), Some("one\n"), "bytes after the last fsync are lost");
    assert_eq!(text("unsynced").as_deref(), Some(""), "an entry synced, its bytes never: empty");
    assert_eq!(text("after"), None, "created after the folder's last sync: gone");
    assert_eq!((text("old").as_deref(), text("moved")), (Some("old\n"), None), "a rename not synced is undone");
    assert_eq!((changed, gone), (2, 2), "{after:?}");
}

#[test]
fn power_cuts_at_random_instants_of_updates_leave_a_verified_model_and_no_older_generation() {
    let cuts: u64 = std::env::var("TERN_SOAK_CUTS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    assert_eq!(coord.register_fixture("scorer", "scorer-a.onnx"), 1);
    coord.ok(&["fleet", "assign", "cam-01", "scorer:1"]);
    let work = tempfile::tempdir().unwrap();
    let layer = Layer::new(&agent.data(), work.path());
    let baseline = layer.records();
    agent.env = layer.env();
    agent.start();
    agent.wait_serving("scorer", 1);
    // The shim is in the agent: its fsyncs were recorded.
    assert!(layer.records() > baseline, "no fsync of the agent was recorded: is the shim loaded?");
    let mut rng = Rng(0x0b1a_c0ff);
    let mut reported = 0u64;
    let (mut changed, mut gone) = (0, 0);
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..cuts {
        // A new version every time, so that each one is an update of its
        // own (a version given up is not tried again): scorer-a and
        // scorer-a2 in turn, odd versions answering x, even ones 2x.
        let next = i + 2;
        let file = if next % 2 == 1 { "scorer-a.onnx" } else { "scorer-a2.onnx" };
        assert_eq!(coord.register_fixture("scorer", file), next);
        coord.ok(&["fleet", "assign", "cam-01", &format!("scorer:{next}")]);
        std::thread::sleep(Duration::from_millis(rng.below(2500)));
        // What it told the coordinator before the power went.
        if let Some(g) = coord.device("cam-01")["reported_generation"].as_u64() {
            reported = reported.max(g);
        }
        agent.proc.as_mut().unwrap().kill9();
        let (c, g) = layer.cut(&layer.root_key());
        (changed, gone) = (changed + c, gone + g);
        agent.start();
        // What the coordinator was told must be on the disk the agent came back to.
        let restored = agent.restored_generation();
        assert!(restored >= reported, "cut {i}: the agent reported generation {reported}, came back at {restored}");
        let (version, scores) = match wait_until(Duration::from_secs(30), || scorer_answer(&agent)) {
            Some(a) => a,
            None => panic!("cut {i}: no answer 30 s after the reboot; the agent's last log:\n{}", last_log(&agent)),
        };
        let factor = if version % 2 == 1 { 1.0 } else { 2.0 };
        let want: Vec<f64> = [0.1, 0.7, 0.2].iter().map(|x| x * factor).collect();
        assert!(scores.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "v{version} answered {scores:?}");
        let d: Value = wait_for("a status after the reboot", Duration::from_secs(30), || {
            Some(coord.device("cam-01")).filter(|d| d["reported_generation"].as_u64().is_some())
        });
        // Reports go on at once; the newest the coordinator holds must be
        // one the agent still has.
        std::thread::sleep(Duration::from_millis(300));
        let g = coord.device("cam-01")["reported_generation"]
            .as_u64()
            .unwrap_or(0)
            .max(d["reported_generation"].as_u64().unwrap());
        assert!(g >= reported, "cut {i}: the agent reported generation {reported}, after the power cut {g}");
        for e in std::fs::read_dir(agent.data().join("models")).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let digest = tern_proto::Sha256Digest::of(&std::fs::read(e.path()).unwrap()).to_hex();
            assert_eq!(name, digest, "cut {i}: a file in models/ that is not what its name says");
        }
        let which = match next - version {
            0 => "the new version",
            1 => "the one before",
            _ => "an older one",
        };
        *outcomes.entry(format!("{which} served")).or_default() += 1;
    }
    // And it still takes updates once left alone.
    let v = coord.register_fixture("scorer", "scorer-a.onnx");
    coord.ok(&["fleet", "assign", "cam-01", &format!("scorer:{v}")]);
    agent.wait_serving("scorer", v);
    eprintln!("{cuts} power cuts: {changed} files rolled back to older bytes, {gone} lost; after each: {outcomes:?}");
}

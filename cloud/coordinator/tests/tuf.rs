//! The registry's TUF repository against a reference TUF client: python-tuf
//! (`scripts/tuf-client.py`, ngclient) refreshes from `tern registry
//! export-tuf` and downloads a verified target, follows a root rotation,
//! and refuses a replaced or lengthened artifact, a rolled-back or expired
//! timestamp and one signed by another key; Tern's own verifier
//! (`tern_trust::tuf`) refuses each of them too, with its own error. Agents
//! on the live link refuse mix-and-match, rollback, a foreign key, freeze,
//! a timestamp below a new root's threshold and a fast-forward (recovered
//! by a root that replaces the online keys), and a registry restored from
//! an older backup replays nothing. Needs python3 with python-tuf and
//! libfaketime (`scripts/test` installs both and sets TERN_PYTHON).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use tern_trust::tuf::{TrustedSet, TufError};

fn python() -> String {
    let py = std::env::var("TERN_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py).args(["-c", "import tuf.ngclient"]).output().is_ok_and(|o| o.status.success());
    assert!(ok, "{py} cannot import python-tuf: run scripts/test (it installs it), or set TERN_PYTHON");
    py
}

/// Runs the reference client; Ok(stdout) or Err(stderr).
fn reference_client(
    repo: &Path,
    client: &Path,
    target: &str,
    out: &Path,
    env: &[(&str, &str)],
) -> Result<String, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tuf-client.py");
    let o = Command::new(python())
        .arg(script)
        .args([repo, client])
        .arg(target)
        .arg(out)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    if o.status.success() { Ok(text(&o.stdout)) } else { Err(text(&o.stderr)) }
}

fn read(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Tern's verifier refreshing from an exported directory at `clock`, as a
/// device would: from what it persisted (`trusted`: its root, timestamp
/// and snapshot), roots first; `trusted` is what it persists after.
fn tern_client(repo: &Path, trusted: &mut TrustedSet, clock: u64) -> Result<(), TufError> {
    let mut set = TrustedSet::new(&trusted.root().bytes, trusted.floor())?;
    let mut v = set.root().body.version + 1;
    while let Ok(b) = std::fs::read(repo.join(format!("{v}.root.json"))) {
        set.update_root(&b)?;
        v += 1;
    }
    set.root_is_fresh(clock)?;
    set.restore(trusted.timestamp().map(|t| &t.bytes[..]), trusted.snapshot().map(|t| &t.bytes[..]))?;
    if set.update_timestamp(&read(repo.join("timestamp.json")), clock)? {
        set.update_snapshot(&read(repo.join("snapshot.json")), clock)?;
        set.update_targets(&read(repo.join("targets.json")), clock)?;
    }
    *trusted = set;
    Ok(())
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn python_tuf_refreshes_from_the_registry_s_repository_and_both_clients_refuse_the_same_attacks() {
    let coord = Coord::start();
    coord.register_fixture("iris", "iris.onnx");
    let work = tempfile::tempdir().unwrap();
    let (repo, key) = (work.path().join("repo"), work.path().join("root.key"));
    let repo_s = repo.to_str().unwrap();
    // No root yet: the export says what to do.
    let e = coord.fails(&["registry", "export-tuf", repo_s]);
    assert!(e.contains("tern registry sign-root"), "{e}");
    coord.ok(&["registry", "sign-root", "--key", key.to_str().unwrap(), "--generate"]);
    coord.ok(&["registry", "export-tuf", repo_s]);

    // The reference client bootstraps from 1.root.json and downloads iris:1.
    let client = work.path().join("python-client");
    let out = work.path().join("got.onnx");
    let said = reference_client(&repo, &client, "iris/1/model.onnx", &out, &[]).unwrap();
    // Versions follow the clock (unix seconds) when it is ahead of them.
    assert!(said.starts_with("ok root=1 timestamp=") && said.contains(" length=1669"), "{said}");
    assert_eq!(read(out.clone()), read(fixture("iris.onnx")));
    // Tern's verifier takes the same repository.
    let mut tern = TrustedSet::new(&read(repo.join("1.root.json")), 0).unwrap();
    tern_client(&repo, &mut tern, now()).unwrap();
    let target = tern.target("iris/1/model.onnx").unwrap().clone();
    assert_eq!(target.check("iris:1", &read(fixture("iris.onnx"))), Ok(()));
    assert_eq!(target.custom.as_ref().unwrap()["tern"]["format"], "onnx");

    // Root rotation: a new root key, the new root signed by the old key too.
    let new_key = work.path().join("root2.key");
    let e = coord.fails(&["registry", "sign-root", "--key", new_key.to_str().unwrap(), "--generate"]);
    assert!(e.contains("--previous-key"), "a rotation without the old key is refused: {e}");
    std::fs::remove_file(&new_key).unwrap();
    coord.ok(&[
        "registry",
        "sign-root",
        "--key",
        new_key.to_str().unwrap(),
        "--generate",
        "--previous-key",
        key.to_str().unwrap(),
    ]);
    coord.ok(&["registry", "export-tuf", repo_s]);
    let said = reference_client(&repo, &client, "iris/1/model.onnx", &out, &[]).unwrap();
    assert!(said.starts_with("ok root=2 timestamp="), "{said}");
    tern_client(&repo, &mut tern, now()).unwrap();
    assert_eq!(tern.root().body.version, 2);

    // Arbitrary software: the artifact replaced in the repository.
    let artifact = repo.join("targets/iris/1/model.onnx");
    let good = read(artifact.clone());
    let mut evil = good.clone();
    evil[100] ^= 0xff;
    std::fs::write(&artifact, &evil).unwrap();
    let fresh_client = work.path().join("fresh");
    let e = reference_client(&repo, &fresh_client, "iris/1/model.onnx", &out, &[]).unwrap_err();
    assert!(e.contains("refused: LengthOrHashMismatchError"), "{e}");
    let e = target.check("iris:1", &evil).unwrap_err();
    assert!(e.to_string().contains("sha256"), "{e}");
    // Endless data: the artifact with more bytes than signed.
    let mut endless = good.clone();
    endless.extend_from_slice(&[0; 4096]);
    std::fs::write(&artifact, &endless).unwrap();
    let e = reference_client(&repo, &fresh_client, "iris/1/model.onnx", &out, &[]).unwrap_err();
    assert!(e.contains("refused: DownloadLengthMismatchError"), "{e}");
    assert!(target.check("iris:1", &endless).unwrap_err().to_string().contains("5765 bytes, 1669 signed"));
    std::fs::write(&artifact, &good).unwrap();

    // Rollback: a newer export, then the older timestamp put back.
    let old_timestamp = read(repo.join("timestamp.json"));
    coord.ok(&["registry", "export-tuf", repo_s]);
    reference_client(&repo, &client, "iris/1/model.onnx", &out, &[]).unwrap();
    tern_client(&repo, &mut tern, now()).unwrap();
    std::fs::write(repo.join("timestamp.json"), &old_timestamp).unwrap();
    let e = reference_client(&repo, &client, "iris/1/model.onnx", &out, &[]).unwrap_err();
    assert!(e.contains("refused: BadVersionNumberError"), "{e}");
    let e = tern_client(&repo, &mut tern, now()).unwrap_err();
    assert!(matches!(e, TufError::Rollback { .. }), "{e}");

    // Freeze: the newest files, two days on (the timestamp lives a day).
    coord.ok(&["registry", "export-tuf", repo_s]);
    let frozen_env = faketime("+2d");
    let env: Vec<(&str, &str)> = frozen_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let e = reference_client(&repo, &work.path().join("frozen"), "iris/1/model.onnx", &out, &env).unwrap_err();
    assert!(e.contains("refused: ExpiredMetadataError"), "{e}");
    let mut frozen = TrustedSet::new(&read(repo.join("1.root.json")), 0).unwrap();
    let e = tern_client(&repo, &mut frozen, now() + 2 * 86_400).unwrap_err();
    assert!(matches!(e, TufError::Expired { .. }), "{e}");

    // Signed by a key the root does not name: the timestamp re-signed by
    // an attacker's own key.
    let (attacker, _) = tern_trust::SigningKey::generate().unwrap();
    let ts: serde_json::Value = serde_json::from_slice(&read(repo.join("timestamp.json"))).unwrap();
    let forged = tern_trust::tuf::sign_metadata(tern_trust::tuf::Role::Timestamp, &ts["signed"], &[&attacker]);
    std::fs::write(repo.join("timestamp.json"), &forged).unwrap();
    let e = reference_client(&repo, &work.path().join("forged"), "iris/1/model.onnx", &out, &[]).unwrap_err();
    assert!(e.contains("refused: UnsignedMetadataError"), "{e}");
    let mut forged_client = TrustedSet::new(&read(repo.join("1.root.json")), 0).unwrap();
    let e = tern_client(&repo, &mut forged_client, now()).unwrap_err();
    assert!(matches!(e, TufError::BelowThreshold { valid: 0, .. }), "{e}");
}

/// The refusal a device reported last, once it names `generation`.
fn refusal(coord: &Coord, generation: u64) -> String {
    wait_for(&format!("refusal of generation {generation}"), std::time::Duration::from_secs(30), || {
        let r = &coord.device("cam-01")["refused"];
        (r["generation"] == generation).then(|| r["reason"].as_str().unwrap().to_owned())
    })
}

fn generation(coord: &Coord) -> u64 {
    coord.device("cam-01")["generation"].as_u64().unwrap()
}

/// The TUF root version the agent persisted.
fn agent_root(agent: &Agent) -> u64 {
    let saved: serde_json::Value = serde_json::from_slice(&read(agent.data().join("identity/tuf.json"))).unwrap();
    let root: serde_json::Value = serde_json::from_str(saved["root"].as_str().unwrap()).unwrap();
    root["signed"]["version"].as_u64().unwrap()
}

/// Restarts the coordinator on its data dir after `change` to it.
fn restart(coord: Coord, change: impl FnOnce(&Path)) -> Coord {
    restart_env(coord, &[], change)
}

/// The same, with `env` for the restarted coordinator (its clock moved).
fn restart_env(coord: Coord, env: &[(String, String)], change: impl FnOnce(&Path)) -> Coord {
    let quic = coord.quic.clone();
    let dir = coord.stop_gently();
    change(&dir.path().join("data"));
    Coord::start_in_env(dir, &["--quic-listen", &quic], env).unwrap_or_else(|(_, log)| panic!("restart: {log}"))
}

/// The version of the TUF timestamp the agent persisted.
fn agent_timestamp(agent: &Agent) -> u64 {
    let saved: serde_json::Value = serde_json::from_slice(&read(agent.data().join("identity/tuf.json"))).unwrap();
    let ts: serde_json::Value = serde_json::from_str(saved["timestamp"].as_str().unwrap()).unwrap();
    ts["signed"]["version"].as_u64().unwrap()
}

#[test]
fn agents_take_desired_states_through_the_registry_s_tuf_metadata_and_refuse_each_attack() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    for _ in 0..4 {
        coord.register_fixture("iris", "iris.onnx");
    }
    // Before the repository has a root: the signed state alone.
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    agent.start();
    agent.wait_serving("iris", 1);
    assert!(!agent.data().join("identity/tuf.json").exists());

    // Root 1 signed offline: the agent, enrolled before it existed, takes
    // it as the registry key introduces it, with the next state.
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("root.key");
    coord.ok(&["registry", "sign-root", "--key", key.to_str().unwrap(), "--generate"]);
    let export = work.path().join("export");
    for _ in 0..2 {
        coord.ok(&["registry", "export-tuf", export.to_str().unwrap()]);
    }
    coord.ok(&["fleet", "assign", "cam-01", "iris:2"]);
    agent.wait_serving("iris", 2);
    assert_eq!(agent_root(&agent), 1);

    // The repository's counters put back one, and its clock ten minutes
    // (versions never go below the clock): it signs a timestamp of the
    // version the agent holds, naming another snapshot (mix and match).
    let counters = read(coord.data().join("tuf/counters.json"));
    let held = agent_timestamp(&agent);
    let back = |n: u64| format!(r#"{{"timestamp":{n},"snapshot":{n},"targets":{n}}}"#);
    let earlier = faketime("-600s");
    let coord = restart_env(coord, &earlier, |d| std::fs::write(d.join("tuf/counters.json"), back(held - 1)).unwrap());
    coord.ok(&["fleet", "assign", "cam-01", "iris:3"]);
    let e = refusal(&coord, generation(&coord));
    assert!(e.contains("TUF: snapshot.json does not match what is signed for it: sha256"), "{e}");
    // Put back further: a rollback.
    let coord = restart_env(coord, &earlier, |d| std::fs::write(d.join("tuf/counters.json"), back(held - 2)).unwrap());
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    let e = refusal(&coord, generation(&coord));
    let want = format!("TUF: timestamp version {} is older than the trusted version {held} (rollback)", held - 1);
    assert!(e.contains(&want), "{e}");
    agent.wait_serving("iris", 2);

    // Signed by a key the root does not name: the timestamp key replaced.
    let timestamp_key = read(coord.data().join("tuf/timestamp.key"));
    let coord = restart(coord, |d| {
        std::fs::write(d.join("tuf/counters.json"), &counters).unwrap();
        std::fs::write(d.join("tuf/timestamp.key"), tern_trust::SigningKey::generate().unwrap().1).unwrap();
    });
    coord.ok(&["fleet", "assign", "cam-01", "iris:4"]);
    let e = refusal(&coord, generation(&coord));
    assert!(e.contains("TUF: timestamp metadata has 0 valid signatures by its keys; 1 are required"), "{e}");
    agent.wait_serving("iris", 2);

    // The right key back: the state is taken.
    let coord = restart(coord, |d| std::fs::write(d.join("tuf/timestamp.key"), &timestamp_key).unwrap());
    agent.wait_serving("iris", 4);

    // Freeze: the agent's clock two days on, past the timestamp's day.
    agent.proc.as_mut().unwrap().kill9();
    agent.env = faketime("+2d");
    agent.start();
    coord.ok(&["fleet", "assign", "cam-01", "iris:3"]);
    let e = refusal(&coord, generation(&coord));
    assert!(e.contains("TUF: timestamp metadata expired at"), "{e}");
    agent.wait_serving("iris", 4);
    agent.proc.as_mut().unwrap().kill9();
    agent.env.clear();
    agent.start();
    agent.wait_serving("iris", 3);

    // Root rotation while the agent runs: root 2, signed by both keys.
    let key2 = work.path().join("root2.key");
    coord.ok(&[
        "registry",
        "sign-root",
        "--key",
        key2.to_str().unwrap(),
        "--generate",
        "--previous-key",
        key.to_str().unwrap(),
    ]);
    coord.ok(&["fleet", "assign", "cam-01", "iris:2"]);
    agent.wait_serving("iris", 2);
    assert_eq!(agent_root(&agent), 2);

    // A coordinator that no longer has the repository (or is held to wire
    // 3, which cannot carry it): the agent, restarted, still trusts root 2
    // and refuses a state without TUF metadata.
    agent.proc.as_mut().unwrap().kill9();
    let coord = restart(coord, |d| std::fs::remove_dir_all(d.join("tuf")).unwrap());
    agent.start();
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    let e = refusal(&coord, generation(&coord));
    assert!(e.contains("trusts TUF root 2 and the desired state came without TUF metadata"), "{e}");
    agent.wait_serving("iris", 2);
    drop(coord);
}

/// Copies a folder as `cp -a` does.
fn copy_dir(from: &Path, to: &Path) {
    let st = std::process::Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(st.success());
}

#[test]
fn a_registry_restored_from_an_older_backup_replays_nothing_and_its_next_change_is_taken() {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    for _ in 0..3 {
        coord.register_fixture("iris", "iris.onnx");
    }
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("root.key");
    coord.ok(&["registry", "sign-root", "--key", key.to_str().unwrap(), "--generate"]);
    // A backup while nothing is assigned: the state it holds is empty, and
    // its TUF counters are behind what the agent will trust.
    let backup = tempfile::tempdir().unwrap();
    let saved = backup.path().join("data");
    let coord = restart(coord, |d| copy_dir(d, &saved));
    agent.start();
    for v in 1..=3 {
        coord.ok(&["fleet", "assign", "cam-01", &format!("iris:{v}")]);
        agent.wait_serving("iris", v);
    }
    let applied = wait_for("generation 3 reported", std::time::Duration::from_secs(30), || {
        coord.device("cam-01")["reported_generation"].as_u64().filter(|g| *g == 3)
    });
    // The registry put back: it signs and sends its generation 0, empty;
    // the agent has applied 3 and ignores it.
    let connected = agent.logs().matches("connected to coordinator").count();
    let coord = restart(coord, |d| {
        std::fs::remove_dir_all(d).unwrap();
        copy_dir(&saved, d);
    });
    wait_for("the agent back on the restored coordinator", std::time::Duration::from_secs(30), || {
        (agent.logs().matches("connected to coordinator").count() > connected).then_some(())
    });
    let d = wait_for("its report", std::time::Duration::from_secs(30), || {
        Some(coord.device("cam-01")).filter(|d| d["reported_generation"].as_u64() == Some(applied))
    });
    assert_eq!(d["generation"], 0, "{d}");
    assert!(coord.log().contains("applied a newer desired state than the registry holds"), "{}", coord.log());
    std::thread::sleep(std::time::Duration::from_secs(2));
    agent.wait_serving("iris", 3);
    // A change made on the restored registry goes past what the agent
    // applied, so it is not taken for a replay; the TUF metadata of the
    // restored repository went past what the agent trusted (its versions
    // follow the clock), so nothing was refused.
    coord.ok(&["fleet", "assign", "cam-01", "iris:2"]);
    assert_eq!(generation(&coord), 4);
    agent.wait_serving("iris", 2);
    assert!(coord.device("cam-01")["refused"].is_null(), "{}", coord.device("cam-01"));
}

/// cam-01 serving iris:1 through root 1 (its key at `key`), with two more
/// versions registered.
fn trusting_root_1(key: &Path) -> (Coord, Agent) {
    let coord = Coord::start();
    let mut agent = Agent::enrolled(&coord, "cam-01");
    for _ in 0..3 {
        coord.register_fixture("iris", "iris.onnx");
    }
    coord.ok(&["registry", "sign-root", "--key", key.to_str().unwrap(), "--generate"]);
    agent.start();
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    agent.wait_serving("iris", 1);
    assert_eq!(agent_root(&agent), 1);
    (coord, agent)
}

#[test]
fn a_fast_forwarded_timestamp_freezes_the_agent_until_a_new_root_replaces_the_online_keys() {
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("root.key");
    let (coord, agent) = trusting_root_1(&key);
    // Whoever holds the online keys signs version 1000 of each role: the
    // agent takes it, validly signed as it is.
    let counters = read(coord.data().join("tuf/counters.json"));
    let ahead = r#"{"timestamp":4000000000000,"snapshot":4000000000000,"targets":4000000000000}"#;
    let coord = restart(coord, |d| std::fs::write(d.join("tuf/counters.json"), ahead).unwrap());
    coord.ok(&["fleet", "assign", "cam-01", "iris:2"]);
    agent.wait_serving("iris", 2);
    // The repository's own counters back: every timestamp it signs is now
    // older than the one the agent trusts, and refused.
    let coord = restart(coord, |d| std::fs::write(d.join("tuf/counters.json"), &counters).unwrap());
    coord.ok(&["fleet", "assign", "cam-01", "iris:3"]);
    let e = refusal(&coord, generation(&coord));
    assert!(e.contains("is older than the trusted version 4000000000001 (rollback)"), "{e}");
    agent.wait_serving("iris", 2);
    // Recovery as TUF has it: new online keys, named by root 2 signed with
    // the offline root key. Metadata the old keys signed no longer holds
    // the agent back.
    let coord = restart(coord, |d| {
        for f in ["timestamp.key", "snapshot.key", "targets.key"] {
            std::fs::write(d.join("tuf").join(f), tern_trust::SigningKey::generate().unwrap().1).unwrap();
        }
    });
    coord.ok(&["registry", "sign-root", "--key", key.to_str().unwrap()]);
    coord.ok(&["fleet", "assign", "cam-01", "iris:1"]);
    agent.wait_serving("iris", 1);
    assert_eq!(agent_root(&agent), 2);
}

#[test]
fn a_timestamp_below_the_threshold_of_a_new_root_is_refused_with_one_good_signature() {
    use tern_trust::tuf::{Key, Role, sign_metadata};
    let work = tempfile::tempdir().unwrap();
    let key = work.path().join("root.key");
    let (coord, agent) = trusting_root_1(&key);
    // Root 2, signed with the root key, wants the timestamp signed by two
    // keys: the repository's and one it does not have.
    let root1: serde_json::Value = serde_json::from_slice(&read(coord.data().join("tuf/1.root.json"))).unwrap();
    let mut signed = root1["signed"].clone();
    signed["version"] = 2.into();
    let other = Key::ed25519(&tern_trust::SigningKey::generate().unwrap().0.verifying_key());
    signed["keys"][other.id()] = serde_json::to_value(&other).unwrap();
    let ts = &mut signed["roles"]["timestamp"];
    ts["keyids"].as_array_mut().unwrap().push(other.id().into());
    ts["threshold"] = 2.into();
    let root_key = tern_trust::SigningKey::from_pkcs8(&read(key)).unwrap();
    std::fs::write(coord.data().join("tuf/2.root.json"), sign_metadata(Role::Root, &signed, &[&root_key])).unwrap();
    coord.ok(&["fleet", "assign", "cam-01", "iris:2"]);
    let e = refusal(&coord, generation(&coord));
    assert!(e.contains("TUF: timestamp metadata has 1 valid signatures by its keys; 2 are required"), "{e}");
    agent.wait_serving("iris", 1);
    assert_eq!(agent_root(&agent), 1, "nothing of a refused state is kept");
}

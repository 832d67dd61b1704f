//! What TUF verification costs a device: a refresh as the agent does it on
//! every desired state (root from its persisted copy, restored timestamp and
//! snapshot, then the new timestamp, snapshot and targets, and one target
//! looked up) for repositories of 10, 100 and 1,000 targets.
//!
//!     cargo run --release -p tern-trust --example tuf_cost
//!
//! docs/performance.md has the figures, on x86 and on aarch64 under qemu.

use std::collections::BTreeMap;
use std::time::Instant;
use tern_trust::SigningKey;
use tern_trust::tuf::{
    ISSUED_FIELD, Key, MetaFile, Role, RoleKeys, Root, TargetFile, Targets, TrustedSet, Versions, format_time,
    sign_metadata,
};

const NOW: u64 = 1_780_000_000;
const DAY: u64 = 86_400;

struct Repo {
    root: Vec<u8>,
    timestamp: Vec<u8>,
    snapshot: Vec<u8>,
    targets: Vec<u8>,
}

fn repo(n: usize, version: u64) -> Repo {
    let keys: Vec<SigningKey> = (0..4).map(|_| SigningKey::generate().unwrap().0).collect();
    let mut all = BTreeMap::new();
    let mut roles = BTreeMap::new();
    for (key, role) in keys.iter().zip([Role::Root, Role::Timestamp, Role::Snapshot, Role::Targets]) {
        let k = Key::ed25519(&key.verifying_key());
        roles.insert(role.name().to_string(), RoleKeys { keyids: vec![k.id()], threshold: 1 });
        all.insert(k.id(), k);
    }
    let root = Root { consistent_snapshot: false, version: 1, expires: format_time(NOW + 365 * DAY), keys: all, roles };
    let root = sign_metadata(Role::Root, &root, &[&keys[0]]);
    let targets = (0..n)
        .map(|i| {
            let file = TargetFile {
                length: 1_000_000 + i as u64,
                hashes: [("sha256".to_string(), format!("{:064x}", i))].into(),
                custom: Some(
                    serde_json::json!({ "tern": { "name": format!("model-{i}"), "version": 1, "format": "nnef" } }),
                ),
            };
            (format!("model-{i}/1/model.nnef.tar"), file)
        })
        .collect();
    let targets =
        sign_metadata(Role::Targets, &Targets { version, expires: format_time(NOW + 30 * DAY), targets }, &[&keys[3]]);
    let meta = |version| MetaFile { version, length: None, hashes: None };
    let snapshot = sign_metadata(
        Role::Snapshot,
        &Versions {
            version,
            expires: format_time(NOW + 7 * DAY),
            meta: [("targets.json".to_string(), meta(version))].into(),
        },
        &[&keys[2]],
    );
    let snap = MetaFile {
        version,
        length: Some(snapshot.len() as u64),
        hashes: Some([("sha256".to_string(), tern_proto::Sha256Digest::of(&snapshot).to_hex())].into()),
    };
    let mut ts = serde_json::to_value(Versions {
        version,
        expires: format_time(NOW + DAY),
        meta: [("snapshot.json".to_string(), snap)].into(),
    })
    .unwrap();
    ts.as_object_mut().unwrap().insert(ISSUED_FIELD.into(), format_time(NOW).into());
    let timestamp = sign_metadata(Role::Timestamp, &ts, &[&keys[1]]);
    Repo { root, timestamp, snapshot, targets }
}

fn refresh(r: &Repo, restored: Option<&TrustedSet>) -> TrustedSet {
    let mut set = TrustedSet::new(&r.root, 0).unwrap();
    if let Some(t) = restored {
        set.restore(t.timestamp().map(|v| &v.bytes[..]), t.snapshot().map(|v| &v.bytes[..])).unwrap();
    }
    set.update_timestamp(&r.timestamp, NOW).unwrap();
    set.update_snapshot(&r.snapshot, NOW).unwrap();
    set.update_targets(&r.targets, NOW).unwrap();
    set.target("model-0/1/model.nnef.tar").unwrap();
    set
}

fn main() {
    println!("{:>8} {:>14} {:>14}", "targets", "targets bytes", "refresh (ms)");
    for n in [10, 100, 1_000] {
        let r = repo(n, 2);
        let first = refresh(&r, None);
        let rounds = if n >= 1_000 { 20 } else { 100 };
        let start = Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(refresh(&r, Some(&first)));
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / rounds as f64;
        println!("{n:>8} {:>14} {ms:>14.3}", r.targets.len());
    }
}

use super::*;
use std::rc::Rc;

const DAY: u64 = 86_400;
/// 2026-12-01T00:00:00Z.
const NOW: u64 = 1_796_083_200;

struct Keys {
    root: Rc<SigningKey>,
    timestamp: Rc<SigningKey>,
    snapshot: Rc<SigningKey>,
    targets: Rc<SigningKey>,
}

fn key() -> SigningKey {
    SigningKey::generate().unwrap().0
}

fn keys() -> Keys {
    Keys { root: key().into(), timestamp: key().into(), snapshot: key().into(), targets: key().into() }
}

fn id(k: &SigningKey) -> String {
    Key::ed25519(&k.verifying_key()).id()
}

fn root_body(k: &Keys, version: u64, expires: u64) -> Root {
    let mut keys = BTreeMap::new();
    let mut roles = BTreeMap::new();
    for (role, key) in
        [("root", &*k.root), ("timestamp", &*k.timestamp), ("snapshot", &*k.snapshot), ("targets", &*k.targets)]
    {
        keys.insert(id(key), Key::ed25519(&key.verifying_key()));
        roles.insert(role.to_string(), RoleKeys { keyids: vec![id(key)], threshold: 1 });
    }
    Root { consistent_snapshot: false, version, expires: format_time(expires), keys, roles }
}

fn versions(version: u64, expires: u64, file: &str, of: u64, bytes: Option<&[u8]>) -> Versions {
    let meta = MetaFile {
        version: of,
        length: bytes.map(|b| b.len() as u64),
        hashes: bytes.map(|b| [("sha256".to_string(), hex(&Sha256::digest(b)))].into()),
    };
    Versions { version, expires: format_time(expires), meta: [(file.to_string(), meta)].into() }
}

const ARTIFACT: &[u8] = b"model bytes";

fn targets_body(version: u64, expires: u64) -> Targets {
    let file = TargetFile {
        length: ARTIFACT.len() as u64,
        hashes: [("sha256".to_string(), hex(&Sha256::digest(ARTIFACT)))].into(),
        custom: None,
    };
    Targets { version, expires: format_time(expires), targets: [("iris/1".to_string(), file)].into() }
}

/// A repository at one moment: the four files a client fetches.
struct Repo {
    root: Vec<u8>,
    timestamp: Vec<u8>,
    snapshot: Vec<u8>,
    targets: Vec<u8>,
}

/// Versions (timestamp, snapshot, targets), all expiring in a week.
fn repo(k: &Keys, v: (u64, u64, u64)) -> Repo {
    let week = NOW + 7 * DAY;
    let targets = sign_metadata(Role::Targets, &targets_body(v.2, week), &[&*k.targets]);
    let snapshot = sign_metadata(Role::Snapshot, &versions(v.1, week, "targets.json", v.2, None), &[&*k.snapshot]);
    let timestamp =
        sign_metadata(Role::Timestamp, &versions(v.0, week, "snapshot.json", v.1, Some(&snapshot)), &[&*k.timestamp]);
    Repo {
        root: sign_metadata(Role::Root, &root_body(k, 1, NOW + 365 * DAY), &[&*k.root]),
        timestamp,
        snapshot,
        targets,
    }
}

fn refresh(set: &mut TrustedSet, r: &Repo, clock: u64) -> Result<(), TufError> {
    if set.update_timestamp(&r.timestamp, clock)? {
        set.update_snapshot(&r.snapshot, clock)?;
        set.update_targets(&r.targets, clock)?;
    }
    Ok(())
}

fn trusting(k: &Keys, r: &Repo) -> TrustedSet {
    let _ = k;
    let mut set = TrustedSet::new(&r.root, 0).unwrap();
    refresh(&mut set, r, NOW).unwrap();
    set
}

#[test]
fn a_repository_verifies_and_names_its_targets() {
    let k = keys();
    let r = repo(&k, (1, 1, 1));
    let set = trusting(&k, &r);
    let t = set.target("iris/1").unwrap();
    assert_eq!(t.check("iris/1", ARTIFACT), Ok(()));
    assert_eq!(set.target("iris/2"), Err(TufError::NoSuchTarget("iris/2".into())));
}

#[test]
fn arbitrary_software_is_refused_by_hash_and_by_signature() {
    let k = keys();
    let r = repo(&k, (1, 1, 1));
    let set = trusting(&k, &r);
    let t = set.target("iris/1").unwrap();
    let e = t.check("iris/1", b"evil bytes!").unwrap_err();
    assert!(matches!(e, TufError::Mismatch { .. }) && e.to_string().contains("sha256"), "{e}");
    // Targets metadata that lists the evil file, signed by another key.
    let mut set = TrustedSet::new(&r.root, 0).unwrap();
    set.update_timestamp(&r.timestamp, NOW).unwrap();
    set.update_snapshot(&r.snapshot, NOW).unwrap();
    let forged = sign_metadata(Role::Targets, &targets_body(1, NOW + DAY), &[&key()]);
    let e = set.update_targets(&forged, NOW).unwrap_err();
    assert_eq!(e, TufError::BelowThreshold { role: Role::Targets, valid: 0, threshold: 1 });
    // A body changed after signing.
    let tampered = String::from_utf8(r.targets.clone()).unwrap().replace("\"length\": 11", "\"length\": 12");
    assert_ne!(tampered.as_bytes(), r.targets);
    assert!(matches!(set.update_targets(tampered.as_bytes(), NOW), Err(TufError::BelowThreshold { .. })));
}

#[test]
fn endless_data_is_refused_past_the_signed_length() {
    let k = keys();
    let set = trusting(&k, &repo(&k, (1, 1, 1)));
    let mut more = ARTIFACT.to_vec();
    more.extend_from_slice(b" and more");
    let e = set.target("iris/1").unwrap().check("iris/1", &more).unwrap_err();
    assert!(e.to_string().contains("20 bytes, 11 signed"), "{e}");
    // Metadata larger than a client takes is refused before it is parsed.
    let huge = vec![b' '; MAX_METADATA_BYTES + 1];
    let mut set = set;
    assert!(matches!(set.update_timestamp(&huge, NOW), Err(TufError::TooLarge { .. })));
}

#[test]
fn rollback_of_any_role_is_refused() {
    let k = keys();
    let mut set = trusting(&k, &repo(&k, (5, 5, 5)));
    // An older timestamp.
    let e = refresh(&mut set, &repo(&k, (4, 5, 5)), NOW).unwrap_err();
    assert_eq!(e, TufError::Rollback { role: Role::Timestamp, got: 4, trusted: 5 });
    // A newer timestamp naming an older snapshot.
    let e = refresh(&mut set, &repo(&k, (6, 4, 5)), NOW).unwrap_err();
    assert_eq!(e, TufError::Rollback { role: Role::Snapshot, got: 4, trusted: 5 });
    // A newer snapshot naming older targets.
    let e = refresh(&mut set, &repo(&k, (7, 6, 4)), NOW).unwrap_err();
    assert_eq!(e, TufError::Rollback { role: Role::Targets, got: 4, trusted: 5 });
    // Forward is fine; the same timestamp again is nothing new.
    refresh(&mut set, &repo(&k, (8, 7, 6)), NOW).unwrap();
    assert_eq!(set.update_timestamp(&repo(&k, (8, 7, 6)).timestamp, NOW), Ok(false));
}

#[test]
fn freeze_is_refused_once_metadata_expires() {
    let k = keys();
    let r = repo(&k, (1, 1, 1));
    let mut set = trusting(&k, &r);
    // The same (frozen) timestamp a week and a second later.
    let later = NOW + 7 * DAY + 1;
    let e = set.update_timestamp(&r.timestamp, later).unwrap_err();
    assert!(matches!(e, TufError::Expired { role: Role::Timestamp, .. }), "{e}");
    // A fresh timestamp over an expired snapshot.
    let week = NOW + 7 * DAY;
    let snapshot = sign_metadata(Role::Snapshot, &versions(2, week, "targets.json", 1, None), &[&*k.snapshot]);
    let ts = sign_metadata(
        Role::Timestamp,
        &versions(2, later + DAY, "snapshot.json", 2, Some(&snapshot)),
        &[&*k.timestamp],
    );
    assert_eq!(set.update_timestamp(&ts, later), Ok(true));
    let e = set.update_snapshot(&snapshot, later).unwrap_err();
    assert!(matches!(e, TufError::Expired { role: Role::Snapshot, .. }), "{e}");
    assert_eq!(
        e.to_string(),
        format!("snapshot metadata expired at {}; it is at least {}", format_time(week), format_time(later))
    );
}

#[test]
fn mix_and_match_is_refused() {
    let k = keys();
    let (a, b) = (repo(&k, (1, 1, 1)), repo(&k, (2, 2, 2)));
    let mut set = TrustedSet::new(&a.root, 0).unwrap();
    set.update_timestamp(&a.timestamp, NOW).unwrap();
    // A snapshot other than the one the timestamp names (its hash differs).
    let e = set.update_snapshot(&b.snapshot, NOW).unwrap_err();
    assert!(matches!(e, TufError::Mismatch { .. }), "{e}");
    set.update_snapshot(&a.snapshot, NOW).unwrap();
    // Targets of another version than the snapshot names.
    let e = set.update_targets(&b.targets, NOW).unwrap_err();
    assert_eq!(e, TufError::WrongVersion { role: Role::Targets, got: 2, expected: 1, by: "the snapshot" });
    // Steps out of order.
    let mut fresh = TrustedSet::new(&a.root, 0).unwrap();
    assert_eq!(fresh.update_snapshot(&a.snapshot, NOW), Err(TufError::Order("a timestamp")));
    assert_eq!(fresh.update_targets(&a.targets, NOW), Err(TufError::Order("a snapshot")));
}

#[test]
fn wrong_keys_and_below_threshold_signatures_are_refused() {
    let k = keys();
    let r = repo(&k, (1, 1, 1));
    let mut set = TrustedSet::new(&r.root, 0).unwrap();
    // Signed by the snapshot key, not the timestamp key.
    let ts = sign_metadata(Role::Timestamp, &versions(1, NOW + DAY, "snapshot.json", 1, None), &[&*k.snapshot]);
    assert!(matches!(set.update_timestamp(&ts, NOW), Err(TufError::BelowThreshold { valid: 0, .. })));
    // A root that asks two of three keys for targets: one signature is not
    // enough, the same one twice neither, two distinct ones are.
    let (t2, t3) = (key(), key());
    let mut body = root_body(&k, 1, NOW + DAY);
    for t in [&t2, &t3] {
        body.keys.insert(id(t), Key::ed25519(&t.verifying_key()));
    }
    body.roles.insert("targets".into(), RoleKeys { keyids: vec![id(&k.targets), id(&t2), id(&t3)], threshold: 2 });
    let root = sign_metadata(Role::Root, &body, &[&*k.root]);
    let mut set = TrustedSet::new(&root, 0).unwrap();
    set.update_timestamp(&r.timestamp, NOW).unwrap();
    set.update_snapshot(&r.snapshot, NOW).unwrap();
    let one = sign_metadata(Role::Targets, &targets_body(1, NOW + DAY), &[&*k.targets]);
    assert_eq!(
        set.update_targets(&one, NOW),
        Err(TufError::BelowThreshold { role: Role::Targets, valid: 1, threshold: 2 })
    );
    let twice = sign_metadata(Role::Targets, &targets_body(1, NOW + DAY), &[&t2, &t2]);
    assert!(matches!(set.update_targets(&twice, NOW), Err(TufError::BelowThreshold { valid: 1, .. })));
    let two = sign_metadata(Role::Targets, &targets_body(1, NOW + DAY), &[&t2, &t3]);
    assert_eq!(set.update_targets(&two, NOW), Ok(()));
}

#[test]
fn a_new_root_must_be_signed_by_the_old_and_the_new_and_come_in_order() {
    let k = keys();
    let r = repo(&k, (3, 3, 3));
    let trusted = trusting(&k, &r);
    // The next refresh starts from the persisted root: roots first.
    let mut set = TrustedSet::new(&r.root, 0).unwrap();
    // Rotate the root and timestamp keys: v2 signed by the old root key and the new.
    let k2 =
        Keys { root: key().into(), timestamp: key().into(), snapshot: k.snapshot.clone(), targets: k.targets.clone() };
    let v2 = root_body(&k2, 2, NOW + 365 * DAY);
    let only_new = sign_metadata(Role::Root, &v2, &[&*k2.root]);
    assert!(matches!(set.update_root(&only_new), Err(TufError::BelowThreshold { .. })), "the old root must sign");
    let only_old = sign_metadata(Role::Root, &v2, &[&*k.root]);
    assert!(matches!(set.update_root(&only_old), Err(TufError::BelowThreshold { .. })), "the new root must sign");
    let skip = sign_metadata(Role::Root, &root_body(&k2, 3, NOW + DAY), &[&*k.root, &*k2.root]);
    assert_eq!(
        set.update_root(&skip),
        Err(TufError::WrongVersion { role: Role::Root, got: 3, expected: 2, by: "the trusted root" })
    );
    let both = sign_metadata(Role::Root, &v2, &[&*k.root, &*k2.root]);
    set.update_root(&both).unwrap();
    assert_eq!(set.root().body.version, 2);
    // The persisted timestamp, signed by the replaced timestamp key, no
    // longer verifies and is dropped; the snapshot (same key) is kept. So a
    // repository whose old timestamp key was abused to sign version 1000
    // recovers with version 1 under the new key (fast-forward recovery),
    // while the snapshot still guards against rollback.
    let kept = set.restore(Some(&trusted.timestamp().unwrap().bytes), Some(&trusted.snapshot().unwrap().bytes));
    assert_eq!(kept, Ok((false, true)));
    assert_eq!(set.update_root(&both), Err(TufError::Order("every root update, before the timestamp,")));
    let fresh = repo(&k2, (1, 3, 3));
    refresh(&mut set, &fresh, NOW).unwrap();
    // The old timestamp key no longer counts.
    let old = repo(&k, (4, 4, 4));
    let mut set = TrustedSet::new(&r.root, 0).unwrap();
    set.update_root(&both).unwrap();
    assert!(matches!(set.update_timestamp(&old.timestamp, NOW), Err(TufError::BelowThreshold { .. })));
    // An expired root (after the last rotation) stops the refresh.
    assert!(matches!(set.root_is_fresh(NOW + 366 * DAY), Err(TufError::Expired { role: Role::Root, .. })));
}

#[test]
fn a_clock_at_1970_is_held_up_by_the_newest_verified_timestamp() {
    let k = keys();
    let week = NOW + 7 * DAY;
    let issued = |version: u64, at: u64, expires: u64| {
        let mut v = serde_json::to_value(versions(version, expires, "snapshot.json", 1, None)).unwrap();
        v.as_object_mut().unwrap().insert(ISSUED_FIELD.into(), format_time(at).into());
        sign_metadata(Role::Timestamp, &v, &[&*k.timestamp])
    };
    let r = repo(&k, (1, 1, 1));
    let mut set = TrustedSet::new(&r.root, 0).unwrap();
    // The device reads 1970; a timestamp issued now is taken and raises the floor.
    assert_eq!(set.update_timestamp(&issued(2, NOW, week), 0), Ok(true));
    assert_eq!(set.floor(), NOW);
    // An old timestamp that expired before that floor is refused, though
    // the clock says 1970.
    let mut fresh = TrustedSet::new(&r.root, set.floor()).unwrap();
    let e = fresh.update_timestamp(&issued(1, NOW - 9 * DAY, NOW - 2 * DAY), 0).unwrap_err();
    assert!(matches!(e, TufError::Expired { role: Role::Timestamp, .. }), "{e}");
}

#[test]
fn times_round_trip_and_malformed_ones_are_refused() {
    assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(parse_time("2026-12-01T00:00:00Z"), Some(NOW));
    assert_eq!(format_time(NOW + 3661), "2026-12-01T01:01:01Z");
    for t in [0, 951_782_400, 4_102_444_800, NOW] {
        assert_eq!(parse_time(&format_time(t)), Some(t));
    }
    assert_eq!(parse_time("2024-02-29T00:00:00Z"), Some(1_709_164_800));
    for bad in [
        "2026-12-01 00:00:00Z",
        "2026-13-01T00:00:00Z",
        "2026-12-01T00:00:00",
        "1969-12-31T23:59:59Z",
        "2026-02-29T00:00:00Z",
        "2026-04-31T00:00:00Z",
        "2026-12-+1T00:00:00Z",
    ] {
        assert_eq!(parse_time(bad), None, "{bad}");
    }
}

#[test]
fn metadata_of_another_role_or_spec_is_refused() {
    let k = keys();
    let r = repo(&k, (1, 1, 1));
    let mut set = TrustedSet::new(&r.root, 0).unwrap();
    let e = set.update_timestamp(&r.snapshot, NOW).unwrap_err();
    assert!(e.to_string().contains("_type is Some(\"snapshot\")"), "{e}");
    assert!(matches!(set.update_timestamp(b"{not json", NOW), Err(TufError::Malformed { .. })));
}

#[test]
fn a_timestamp_cannot_push_the_lower_bound_of_time_far_ahead_and_a_set_clock_ignores_it() {
    let k = keys();
    let r = repo(&k, (1, 1, 1));
    let signed = |issued: u64, expires: u64| {
        let mut v = serde_json::to_value(versions(2, expires, "snapshot.json", 1, None)).unwrap();
        v.as_object_mut().unwrap().insert(ISSUED_FIELD.into(), format_time(issued).into());
        sign_metadata(Role::Timestamp, &v, &[&*k.timestamp])
    };
    let mut set = TrustedSet::new(&r.root, 0).unwrap();
    // Issued in 2200 and valid till 2201: more life than a timestamp may claim.
    let far = parse_time("2200-01-01T00:00:00Z").unwrap();
    let e = set.update_timestamp(&signed(far, far + 365 * DAY), 0).unwrap_err();
    assert!(matches!(e, TufError::Malformed { role: Role::Timestamp, .. }), "{e}");
    assert_eq!(set.floor(), 0);
    // Issued after it expires.
    assert!(set.update_timestamp(&signed(NOW + DAY, NOW), 0).is_err());
    // A floor ahead of a clock that is set does not count.
    let mut set = TrustedSet::new(&r.root, NOW + 30 * DAY).unwrap();
    assert_eq!(set.update_timestamp(&signed(NOW, NOW + DAY), NOW), Ok(true));
}

#[test]
fn targets_come_only_through_the_snapshot_the_trusted_timestamp_names() {
    let k = keys();
    let (a, b) = (repo(&k, (1, 1, 1)), repo(&k, (2, 2, 2)));
    let trusted = trusting(&k, &a);
    let mut set = TrustedSet::new(&a.root, 0).unwrap();
    set.restore(Some(&trusted.timestamp().unwrap().bytes), Some(&trusted.snapshot().unwrap().bytes)).unwrap();
    // A newer timestamp, then the old snapshot (whose update fails): the
    // restored snapshot does not let old targets through.
    assert_eq!(set.update_timestamp(&b.timestamp, NOW), Ok(true));
    assert!(set.update_snapshot(&a.snapshot, NOW).is_err());
    let e = set.update_targets(&a.targets, NOW).unwrap_err();
    assert_eq!(e, TufError::WrongVersion { role: Role::Snapshot, got: 1, expected: 2, by: "the timestamp" });
    assert_eq!(set.target("iris/1"), Err(TufError::Order("targets")));
}

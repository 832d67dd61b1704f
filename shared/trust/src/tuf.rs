//! TUF metadata (specification 1.0: root, timestamp, snapshot, targets;
//! canonical JSON; ed25519 keys), the writing side the registry uses, and a
//! sans-IO client that verifies like a TUF client: every check of the
//! specification's client workflow (5.3 to 5.6) for the four top-level
//! roles, with `now` passed in. Delegations are not followed: a target must
//! be listed by the top-level targets role.

use crate::{SigningKey, VerifyingKey, hex};
use ring::signature::{ED25519, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The specification version Tern writes.
pub const SPEC_VERSION: &str = "1.0.31";

/// Largest metadata file a client takes (python-tuf's default for root;
/// Tern's targets of a fleet stay far below it).
pub const MAX_METADATA_BYTES: usize = 512 * 1024;

/// Before this (2026-01-01), a clock is taken for one that was never set
/// (no real-time clock): then the newest time a verified timestamp carried
/// is the lower bound of now. A set clock is used as it reads.
pub const PLAUSIBLE_CLOCK: u64 = 1_767_225_600;

/// The longest a timestamp may be valid past the time it says it was
/// issued (one that claims more is refused, so that a timestamp key cannot
/// push a clockless device's lower bound of time far ahead).
pub const MAX_TIMESTAMP_LIFE: u64 = 31 * 86_400;

/// Where a model version's artifact sits in the registry's repository:
/// `NAME/VERSION/model.{onnx,nnef.tar,tbm}`.
pub fn target_path(name: &str, version: u32, format: tern_proto::ModelFormat) -> String {
    format!("{name}/{version}/model.{}", extension(format))
}

/// The target path of a version's artifact compiled for one device
/// profile: `NAME/VERSION/PROFILE/model.EXT`. An agent looks for its own
/// profile's path first, then for [`target_path`].
pub fn profile_target_path(name: &str, version: u32, profile: &str, format: tern_proto::ModelFormat) -> String {
    format!("{name}/{version}/{profile}/model.{}", extension(format))
}

fn extension(format: tern_proto::ModelFormat) -> &'static str {
    match format {
        tern_proto::ModelFormat::Onnx => "onnx",
        tern_proto::ModelFormat::Nnef => "nnef.tar",
        tern_proto::ModelFormat::Burn => "tbm",
    }
}

/// A top-level role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Keys of every role; signs itself.
    Root,
    /// The newest snapshot, short-lived.
    Timestamp,
    /// The versions of every targets file.
    Snapshot,
    /// The target files with their lengths and hashes.
    Targets,
}

impl Role {
    /// The role's name in metadata.
    pub fn name(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::Timestamp => "timestamp",
            Role::Snapshot => "snapshot",
            Role::Targets => "targets",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why metadata or a target was refused. Each TUF attack class has its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TufError {
    /// Not JSON, not of the expected shape, or not in canonical form.
    #[error("{role} metadata is malformed: {detail}")]
    Malformed {
        /// The role expected.
        role: Role,
        /// What is wrong.
        detail: String,
    },
    /// Larger than a client takes.
    #[error("{role} metadata is {len} bytes; at most {max} are taken")]
    TooLarge {
        /// The role.
        role: Role,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Fewer valid signatures by the role's keys than its threshold (a wrong
    /// key, a forged or a missing signature).
    #[error("{role} metadata has {valid} valid signatures by its keys; {threshold} are required")]
    BelowThreshold {
        /// The role.
        role: Role,
        /// Valid signatures by distinct keys of the role.
        valid: usize,
        /// Its threshold.
        threshold: u32,
    },
    /// Older than what is trusted (a rollback attack).
    #[error("{role} version {got} is older than the trusted version {trusted} (rollback)")]
    Rollback {
        /// The role.
        role: Role,
        /// The version offered.
        got: u64,
        /// The version trusted.
        trusted: u64,
    },
    /// Not the version the metadata above it names (mix-and-match), or a
    /// root that skips a version.
    #[error("{role} version {got} is not the version {expected} that {by} names")]
    WrongVersion {
        /// The role.
        role: Role,
        /// The version offered.
        got: u64,
        /// The version expected.
        expected: u64,
        /// What names it.
        by: &'static str,
    },
    /// Past its expiry (a freeze attack, or a repository not kept fresh).
    #[error("{role} metadata expired at {expires}; it is at least {now}")]
    Expired {
        /// The role.
        role: Role,
        /// When it expired.
        expires: String,
        /// The time it is at least (the clock, or the newest time verified).
        now: String,
    },
    /// Bytes that do not match the length or hash signed for them
    /// (arbitrary software, endless data).
    #[error("{what} does not match what is signed for it: {detail}")]
    Mismatch {
        /// The file.
        what: String,
        /// How.
        detail: String,
    },
    /// A step asked for before the one it depends on.
    #[error("{0} first")]
    Order(&'static str),
    /// No such target in the targets metadata.
    #[error("no target named {0:?}")]
    NoSuchTarget(String),
}

/// An ed25519 public key as TUF writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    /// "ed25519".
    pub keytype: String,
    /// "ed25519".
    pub scheme: String,
    /// The public key.
    pub keyval: KeyVal,
}

/// A key's public value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVal {
    /// 32 bytes, lowercase hex.
    pub public: String,
}

impl Key {
    /// The TUF form of an ed25519 public key.
    pub fn ed25519(key: &VerifyingKey) -> Self {
        Key { keytype: "ed25519".into(), scheme: "ed25519".into(), keyval: KeyVal { public: hex(&key.0) } }
    }

    /// Its key id: the SHA-256 of its canonical JSON, in hex.
    pub fn id(&self) -> String {
        let value = serde_json::to_value(self).expect("a key is JSON");
        hex(&Sha256::digest(tern_proto::canonical_json(&value).expect("a key is canonical")))
    }

    fn verifying(&self) -> Option<[u8; 32]> {
        if self.keytype != "ed25519" || self.scheme != "ed25519" {
            return None;
        }
        let bytes = unhex(&self.keyval.public)?;
        bytes.try_into().ok()
    }
}

/// The keys and threshold of one role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleKeys {
    /// Key ids.
    pub keyids: Vec<String>,
    /// How many of them must sign.
    pub threshold: u32,
}

/// What the root role signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    /// Whether files are named by version and hash.
    pub consistent_snapshot: bool,
    /// Counting from 1.
    pub version: u64,
    /// ISO 8601, UTC, to the second.
    pub expires: String,
    /// Every role's keys, by key id.
    pub keys: BTreeMap<String, Key>,
    /// Each top-level role's key ids and threshold.
    pub roles: BTreeMap<String, RoleKeys>,
}

/// A metadata file as the timestamp and snapshot roles name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaFile {
    /// Its version.
    pub version: u64,
    /// Its length, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<u64>,
    /// Its hashes by algorithm, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hashes: Option<BTreeMap<String, String>>,
}

/// What the timestamp and snapshot roles sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versions {
    /// Counting from 1.
    pub version: u64,
    /// ISO 8601, UTC.
    pub expires: String,
    /// Metadata files by name (`snapshot.json`; `targets.json`).
    pub meta: BTreeMap<String, MetaFile>,
}

/// One target file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetFile {
    /// Its exact length in bytes.
    pub length: u64,
    /// Its hashes by algorithm (`sha256` at least, for Tern).
    pub hashes: BTreeMap<String, String>,
    /// Anything else (Tern puts the model's name, version and format here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<Value>,
}

/// What the targets role signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    /// Counting from 1.
    pub version: u64,
    /// ISO 8601, UTC.
    pub expires: String,
    /// Target files by path.
    pub targets: BTreeMap<String, TargetFile>,
}

/// Signs `signed` (a root, versions or targets body) as `role`'s metadata
/// with `keys`: the JSON file a repository serves.
pub fn sign_metadata<T: Serialize>(role: Role, signed: &T, keys: &[&SigningKey]) -> Vec<u8> {
    let mut body = serde_json::to_value(signed).expect("metadata is JSON");
    let obj = body.as_object_mut().expect("metadata is an object");
    obj.insert("_type".into(), role.name().into());
    obj.insert("spec_version".into(), SPEC_VERSION.into());
    let bytes = tern_proto::canonical_json(&body).expect("metadata is canonical");
    let signatures: Vec<Value> = keys
        .iter()
        .map(|k| json!({ "keyid": Key::ed25519(&k.verifying_key()).id(), "sig": hex(&k.sign_bytes(&bytes)) }))
        .collect();
    serde_json::to_vec_pretty(&json!({ "signed": body, "signatures": signatures })).expect("JSON")
}

/// Parsed metadata whose signatures are yet to be checked.
struct Envelope {
    signed: Value,
    canonical: Vec<u8>,
    signatures: Vec<(String, Vec<u8>)>,
}

fn parse(role: Role, bytes: &[u8]) -> Result<Envelope, TufError> {
    if bytes.len() > MAX_METADATA_BYTES {
        return Err(TufError::TooLarge { role, len: bytes.len(), max: MAX_METADATA_BYTES });
    }
    let malformed = |detail: String| TufError::Malformed { role, detail };
    let mut v: Value = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    let signed = v.get_mut("signed").map(Value::take).ok_or_else(|| malformed("no \"signed\"".into()))?;
    let kind = signed.get("_type").and_then(Value::as_str);
    if kind != Some(role.name()) {
        return Err(malformed(format!("_type is {kind:?}, not {:?}", role.name())));
    }
    let spec = signed.get("spec_version").and_then(Value::as_str).unwrap_or("");
    if spec.split('.').next() != Some("1") {
        return Err(malformed(format!("spec_version {spec:?} is not 1.x")));
    }
    let canonical = tern_proto::canonical_json(&signed).map_err(|e| malformed(e.to_string()))?;
    let sigs = v.get("signatures").and_then(Value::as_array).ok_or_else(|| malformed("no \"signatures\"".into()))?;
    let mut signatures = Vec::with_capacity(sigs.len());
    for s in sigs {
        let keyid = s.get("keyid").and_then(Value::as_str);
        let sig = s.get("sig").and_then(Value::as_str).and_then(unhex);
        match (keyid, sig) {
            (Some(k), Some(sig)) => signatures.push((k.to_owned(), sig)),
            _ => return Err(malformed(format!("signature {s} has no keyid or hex sig"))),
        }
    }
    Ok(Envelope { signed, canonical, signatures })
}

impl Envelope {
    fn body<T: for<'de> Deserialize<'de>>(&self, role: Role) -> Result<T, TufError> {
        T::deserialize(&self.signed).map_err(|e| TufError::Malformed { role, detail: e.to_string() })
    }

    /// Checks `threshold` signatures by distinct keys of `role` in `root`.
    fn verify(&self, role: Role, root: &Root) -> Result<(), TufError> {
        let keys = root
            .roles
            .get(role.name())
            .ok_or_else(|| TufError::Malformed { role: Role::Root, detail: format!("no keys for the {role} role") })?;
        let mut valid = std::collections::BTreeSet::new();
        for (keyid, sig) in &self.signatures {
            if !keys.keyids.contains(keyid) || valid.contains(keyid) {
                continue;
            }
            let Some(public) = root.keys.get(keyid).and_then(Key::verifying) else { continue };
            if UnparsedPublicKey::new(&ED25519, &public).verify(&self.canonical, sig).is_ok() {
                valid.insert(keyid.clone());
            }
        }
        // A threshold of 0 would trust anything.
        let threshold = keys.threshold.max(1);
        if valid.len() < threshold as usize {
            return Err(TufError::BelowThreshold { role, valid: valid.len(), threshold });
        }
        Ok(())
    }
}

/// A verified metadata file: its body and the bytes it came as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified<T> {
    /// What it signs.
    pub body: T,
    /// The file, to persist.
    pub bytes: Vec<u8>,
}

/// What a client trusts, advanced one file at a time in the order of the
/// specification: root rotations, then timestamp, snapshot, targets.
#[derive(Debug, Clone)]
pub struct TrustedSet {
    root: Verified<Root>,
    timestamp: Option<Verified<Versions>>,
    snapshot: Option<Verified<Versions>>,
    targets: Option<Verified<Targets>>,
    /// The time it is at least, in Unix seconds: the clock or, if that is
    /// behind (a device without a real-time clock reads 1970), the newest
    /// time a verified timestamp carried.
    floor: u64,
}

/// The signed field in which Tern's timestamp role says when it signed.
pub const ISSUED_FIELD: &str = "x-tern-issued";

impl TrustedSet {
    /// Starts from a root the client already trusts (shipped with it, or
    /// persisted), and from the newest time it verified before (0 if none).
    /// The root must be signed by its own keys; it may have expired (a
    /// refresh brings a newer one).
    pub fn new(root: &[u8], floor: u64) -> Result<Self, TufError> {
        let env = parse(Role::Root, root)?;
        let body: Root = env.body(Role::Root)?;
        env.verify(Role::Root, &body)?;
        Ok(Self {
            root: Verified { body, bytes: root.to_vec() },
            timestamp: None,
            snapshot: None,
            targets: None,
            floor,
        })
    }

    /// Adds the timestamp and snapshot a client persisted, once the root is
    /// final (after every [`TrustedSet::update_root`]): the baseline against
    /// which rollbacks are refused. Expiry is not checked. One that no
    /// longer verifies against the trusted root (its role's keys or
    /// threshold changed) is dropped rather than refused: versions signed
    /// by replaced keys must not hold the client back (fast-forward
    /// recovery). Returns whether each was kept.
    pub fn restore(&mut self, timestamp: Option<&[u8]>, snapshot: Option<&[u8]>) -> Result<(bool, bool), TufError> {
        if self.timestamp.is_some() || self.snapshot.is_some() {
            return Err(TufError::Order("restoring, before any timestamp update,"));
        }
        let take = |role: Role, b: &[u8]| -> Option<Verified<Versions>> {
            let env = parse(role, b).ok()?;
            env.verify(role, &self.root.body).ok()?;
            let body: Versions = env.body(role).ok()?;
            let names = if role == Role::Timestamp { "snapshot.json" } else { "targets.json" };
            body.meta.contains_key(names).then(|| Verified { body, bytes: b.to_vec() })
        };
        self.timestamp = timestamp.and_then(|b| take(Role::Timestamp, b));
        self.snapshot = snapshot.and_then(|b| take(Role::Snapshot, b));
        Ok((self.timestamp.is_some(), self.snapshot.is_some()))
    }

    /// The trusted root.
    pub fn root(&self) -> &Verified<Root> {
        &self.root
    }

    /// The trusted timestamp, if any.
    pub fn timestamp(&self) -> Option<&Verified<Versions>> {
        self.timestamp.as_ref()
    }

    /// The trusted snapshot, if any.
    pub fn snapshot(&self) -> Option<&Verified<Versions>> {
        self.snapshot.as_ref()
    }

    /// The trusted targets, if any.
    pub fn targets(&self) -> Option<&Verified<Targets>> {
        self.targets.as_ref()
    }

    /// The time it is at least (Unix seconds), after what was verified.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    fn now(&self, clock: u64) -> u64 {
        if clock >= PLAUSIBLE_CLOCK { clock } else { clock.max(self.floor) }
    }

    fn check_expiry(&self, role: Role, expires: &str, clock: u64) -> Result<(), TufError> {
        let at = parse_time(expires).ok_or_else(|| TufError::Malformed {
            role,
            detail: format!("expires {expires:?} is not YYYY-MM-DDTHH:MM:SSZ"),
        })?;
        let now = self.now(clock);
        if at <= now {
            return Err(TufError::Expired { role, expires: expires.into(), now: format_time(now) });
        }
        Ok(())
    }

    /// Takes the next root (`N+1.root.json`): signed by a threshold of the
    /// trusted root's root keys and of its own, with exactly the next
    /// version. Only before the timestamp (and [`TrustedSet::restore`]).
    pub fn update_root(&mut self, bytes: &[u8]) -> Result<(), TufError> {
        if self.timestamp.is_some() || self.snapshot.is_some() {
            return Err(TufError::Order("every root update, before the timestamp,"));
        }
        let env = parse(Role::Root, bytes)?;
        env.verify(Role::Root, &self.root.body)?;
        let body: Root = env.body(Role::Root)?;
        let expected = self.root.body.version.checked_add(1).ok_or_else(|| TufError::Malformed {
            role: Role::Root,
            detail: "the trusted root has the highest version there is".into(),
        })?;
        same_version(Role::Root, body.version, expected, "the trusted root")?;
        env.verify(Role::Root, &body)?;
        self.root = Verified { body, bytes: bytes.to_vec() };
        Ok(())
    }

    /// After the last root: it must not have expired.
    pub fn root_is_fresh(&self, clock: u64) -> Result<(), TufError> {
        self.check_expiry(Role::Root, &self.root.body.expires, clock)
    }

    /// Takes `timestamp.json`. Returns false for the version already
    /// trusted (nothing new), true for a newer one.
    pub fn update_timestamp(&mut self, bytes: &[u8], clock: u64) -> Result<bool, TufError> {
        self.root_is_fresh(clock)?;
        let env = parse(Role::Timestamp, bytes)?;
        env.verify(Role::Timestamp, &self.root.body)?;
        let body: Versions = env.body(Role::Timestamp)?;
        let snap = named(&body, Role::Timestamp, "snapshot.json")?;
        if let Some(old) = &self.timestamp {
            if body.version < old.body.version {
                return Err(TufError::Rollback { role: Role::Timestamp, got: body.version, trusted: old.body.version });
            }
            let old_snap = old.body.meta.get("snapshot.json").map_or(0, |m| m.version);
            if snap.version < old_snap {
                return Err(TufError::Rollback { role: Role::Snapshot, got: snap.version, trusted: old_snap });
            }
            if body.version == old.body.version {
                // Nothing new: the one trusted must still be fresh (a
                // repository frozen at one timestamp is refused once it expires).
                self.check_expiry(Role::Timestamp, &old.body.expires, clock)?;
                return Ok(false);
            }
        }
        self.check_expiry(Role::Timestamp, &body.expires, clock)?;
        if let Some(issued) = env.signed.get(ISSUED_FIELD) {
            let issued = issued.as_str().and_then(parse_time);
            let expires = parse_time(&body.expires).expect("checked above");
            match issued {
                // A set clock caps it: a timestamp claiming a later issue
                // cannot push the floor past the clock (it would matter the
                // day the clock is lost).
                Some(t) if t <= expires && expires - t <= MAX_TIMESTAMP_LIFE => {
                    let t = if clock >= PLAUSIBLE_CLOCK { t.min(clock) } else { t };
                    self.floor = self.floor.max(t);
                }
                _ => {
                    return Err(TufError::Malformed {
                        role: Role::Timestamp,
                        detail: format!(
                            "{ISSUED_FIELD} must be a time at most {MAX_TIMESTAMP_LIFE} s before it expires"
                        ),
                    });
                }
            }
        }
        self.timestamp = Some(Verified { body, bytes: bytes.to_vec() });
        // Targets are trusted again only through the snapshot this names.
        self.targets = None;
        Ok(true)
    }

    /// Takes `snapshot.json`, as the trusted timestamp names it.
    pub fn update_snapshot(&mut self, bytes: &[u8], clock: u64) -> Result<(), TufError> {
        let ts = self.timestamp.as_ref().ok_or(TufError::Order("a timestamp"))?;
        self.check_expiry(Role::Timestamp, &ts.body.expires, clock)?;
        let want = named(&ts.body, Role::Timestamp, "snapshot.json")?.clone();
        check_meta_file("snapshot.json", bytes, &want)?;
        let env = parse(Role::Snapshot, bytes)?;
        env.verify(Role::Snapshot, &self.root.body)?;
        let body: Versions = env.body(Role::Snapshot)?;
        same_version(Role::Snapshot, body.version, want.version, "the timestamp")?;
        if let Some(old) = &self.snapshot {
            for (name, m) in &old.body.meta {
                match body.meta.get(name) {
                    None => {
                        return Err(TufError::Malformed {
                            role: Role::Snapshot,
                            detail: format!("{name} is no longer listed (rollback)"),
                        });
                    }
                    Some(new) if new.version < m.version => {
                        return Err(TufError::Rollback { role: Role::Targets, got: new.version, trusted: m.version });
                    }
                    Some(_) => {}
                }
            }
        }
        self.check_expiry(Role::Snapshot, &body.expires, clock)?;
        self.snapshot = Some(Verified { body, bytes: bytes.to_vec() });
        self.targets = None;
        Ok(())
    }

    /// Takes `targets.json`, as the trusted snapshot names it.
    pub fn update_targets(&mut self, bytes: &[u8], clock: u64) -> Result<(), TufError> {
        let snap = self.snapshot.as_ref().ok_or(TufError::Order("a snapshot"))?;
        // The snapshot must be the one the trusted timestamp names (not a
        // restored one a failed snapshot update left behind).
        let ts = self.timestamp.as_ref().ok_or(TufError::Order("a timestamp"))?;
        let snapshot_named = named(&ts.body, Role::Timestamp, "snapshot.json")?;
        same_version(Role::Snapshot, snap.body.version, snapshot_named.version, "the timestamp")?;
        self.check_expiry(Role::Snapshot, &snap.body.expires, clock)?;
        let want = named(&snap.body, Role::Snapshot, "targets.json")?.clone();
        check_meta_file("targets.json", bytes, &want)?;
        let env = parse(Role::Targets, bytes)?;
        env.verify(Role::Targets, &self.root.body)?;
        let body: Targets = env.body(Role::Targets)?;
        same_version(Role::Targets, body.version, want.version, "the snapshot")?;
        self.check_expiry(Role::Targets, &body.expires, clock)?;
        self.targets = Some(Verified { body, bytes: bytes.to_vec() });
        Ok(())
    }

    /// Forgets the targets metadata (the largest file, which a client need
    /// not keep: the next refresh takes it again through the snapshot).
    pub fn drop_targets(&mut self) {
        self.targets = None;
    }

    /// A target of the trusted targets metadata.
    pub fn target(&self, path: &str) -> Result<&TargetFile, TufError> {
        let targets = self.targets.as_ref().ok_or(TufError::Order("targets"))?;
        targets.body.targets.get(path).ok_or_else(|| TufError::NoSuchTarget(path.into()))
    }
}

impl TargetFile {
    /// Checks downloaded bytes against the signed length and SHA-256. A
    /// download must stop at [`TargetFile::length`] bytes: this refuses more.
    pub fn check(&self, what: &str, bytes: &[u8]) -> Result<(), TufError> {
        check_file(what, bytes, Some(self.length), Some(&self.hashes), true)
    }
}

/// The entry for `file` in the meta of `role`'s `body`.
fn named<'a>(body: &'a Versions, role: Role, file: &str) -> Result<&'a MetaFile, TufError> {
    body.meta.get(file).ok_or_else(|| TufError::Malformed { role, detail: format!("no {file} in meta") })
}

/// `role`'s metadata must be exactly the version that `by` names.
fn same_version(role: Role, got: u64, expected: u64, by: &'static str) -> Result<(), TufError> {
    if got == expected { Ok(()) } else { Err(TufError::WrongVersion { role, got, expected, by }) }
}

fn check_meta_file(what: &str, bytes: &[u8], named: &MetaFile) -> Result<(), TufError> {
    check_file(what, bytes, named.length, named.hashes.as_ref(), false)
}

fn check_file(
    what: &str,
    bytes: &[u8],
    length: Option<u64>,
    hashes: Option<&BTreeMap<String, String>>,
    need_sha256: bool,
) -> Result<(), TufError> {
    let mismatch = |detail: String| TufError::Mismatch { what: what.into(), detail };
    if let Some(len) = length
        && bytes.len() as u64 != len
    {
        return Err(mismatch(format!("{} bytes, {len} signed", bytes.len())));
    }
    let sha = hashes.and_then(|h| h.get("sha256"));
    match sha {
        Some(want) => {
            let got = hex(&Sha256::digest(bytes));
            if got != want.to_ascii_lowercase() {
                return Err(mismatch(format!("sha256 {got}, {want} signed")));
            }
        }
        None if need_sha256 => return Err(mismatch("no sha256 is signed for it".into())),
        None => {}
    }
    Ok(())
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Unix seconds of `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_time(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| {
        let digits = s.get(r)?;
        digits.bytes().all(|c| c.is_ascii_digit()).then(|| digits.parse::<u64>().ok())?
    };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&mo) || d < 1 || d > month_days[(mo - 1) as usize] || h > 23 || mi > 59 || se > 59 || y < 1970
    {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se)
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds.
pub fn format_time(t: u64) -> String {
    let (days, rem) = (t / 86_400, t % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

// Howard Hinnant's algorithms, for days since 1970-01-01 (proleptic Gregorian).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: u64) -> (u64, u64, u64) {
    let z = z + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { yoe + era * 400 + 1 } else { yoe + era * 400 }, m, d)
}

#[cfg(test)]
#[path = "tuf_tests.rs"]
mod tests;

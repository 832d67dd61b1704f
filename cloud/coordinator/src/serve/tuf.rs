//! The registry's TUF repository (`<data-dir>/tuf/`): root metadata signed
//! offline (`tern registry sign-root`, with a key the operator keeps off
//! the coordinator), and timestamp, snapshot and targets metadata signed
//! here with three online keys, listing every approved version's artifact.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tern_durable::write_atomic;
use tern_registry::{Approval, ModelVersion};
use tern_trust::SigningKey;
use tern_trust::tuf::{
    ISSUED_FIELD, Key, MetaFile, Role, RoleKeys, Root, TargetFile, Targets, Versions, format_time, sign_metadata,
};

const DAY: u64 = 86_400;
/// How long each online role's metadata is valid: the timestamp is re-signed
/// at every build, so a short life bounds a freeze.
const TIMESTAMP_LIFE: u64 = DAY;
const SNAPSHOT_LIFE: u64 = 7 * DAY;
const TARGETS_LIFE: u64 = 30 * DAY;

/// The online roles and their key files in `tuf/`.
const ONLINE: [(Role, &str); 3] =
    [(Role::Timestamp, "timestamp.key"), (Role::Snapshot, "snapshot.key"), (Role::Targets, "targets.key")];

/// The repository's files and online keys.
pub struct TufRepo {
    dir: PathBuf,
    keys: BTreeMap<Role, SigningKey>,
    /// One build at a time: versions only go up.
    building: Mutex<()>,
    /// The newest build, which agents are sent until [`Self::current`]
    /// finds it stale.
    latest: Mutex<Option<(Fingerprint, u64, Built)>>,
}

/// What a build signed over: the number of roots and each target's path and
/// digest. A build is reused while these stay the same.
type Fingerprint = (usize, Vec<(String, tern_proto::Sha256Digest)>);

/// Agents are sent a newer build once the newest is this old: half the
/// timestamp's life, so that an agent always holds one with hours to go.
pub const REBUILD_AFTER: u64 = TIMESTAMP_LIFE / 2;

/// The metadata of one build, and the target files it lists.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Built {
    /// Every root, version 1 first.
    pub roots: Vec<String>,
    /// `timestamp.json`.
    pub timestamp: String,
    /// `snapshot.json`.
    pub snapshot: String,
    /// `targets.json`.
    pub targets: String,
    /// Each target's path and artifact digest.
    pub files: Vec<(String, tern_proto::Sha256Digest)>,
}

/// The versions the online roles last signed, so that they only go up.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Counters {
    timestamp: u64,
    snapshot: u64,
    targets: u64,
}

impl TufRepo {
    /// Opens `<data_dir>/tuf`, making the online keys on first use if
    /// `create` (only `tern serve` does: two processes must never each make
    /// their own).
    pub fn open(data_dir: &Path, create: bool) -> Result<Self> {
        let dir = data_dir.join("tuf");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut keys = BTreeMap::new();
        for (role, file) in ONLINE {
            let path = dir.join(file);
            let der = match std::fs::read(&path) {
                Ok(der) => der,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => {
                    bail!("{} is missing: start `tern serve` once with this data dir first", path.display())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let (_, der) = SigningKey::generate()?;
                    write_atomic(&path, &der, true).with_context(|| format!("writing {}", path.display()))?;
                    der
                }
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            keys.insert(role, SigningKey::from_pkcs8(&der).with_context(|| format!("loading {}", path.display()))?);
        }
        Ok(Self { dir, keys, building: Mutex::new(()), latest: Mutex::new(None) })
    }

    /// Root metadata files, version 1 first.
    pub fn roots(&self) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        loop {
            let path = self.dir.join(format!("{}.root.json", out.len() + 1));
            match std::fs::read(&path) {
                Ok(b) => out.push(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            }
        }
    }

    /// Signs the next root with `root_keys` (the new root keys, and the
    /// previous root's when they differ, which `signers` must then hold
    /// too), naming this repository's online keys; valid for `days`.
    /// Returns its version.
    pub fn sign_root(&self, root_keys: &[&SigningKey], signers: &[&SigningKey], days: u64, now: u64) -> Result<u64> {
        let roots = self.roots()?;
        let version = roots.len() as u64 + 1;
        let mut keys = BTreeMap::new();
        let mut roles = BTreeMap::new();
        let mut ids = Vec::new();
        for k in root_keys {
            let key = Key::ed25519(&k.verifying_key());
            ids.push(key.id());
            keys.insert(key.id(), key);
        }
        roles.insert("root".to_string(), RoleKeys { keyids: ids, threshold: 1 });
        for (role, key) in &self.keys {
            let key = Key::ed25519(&key.verifying_key());
            roles.insert(role.name().to_string(), RoleKeys { keyids: vec![key.id()], threshold: 1 });
            keys.insert(key.id(), key);
        }
        let root = Root { consistent_snapshot: false, version, expires: format_time(now + days * DAY), keys, roles };
        let bytes = sign_metadata(Role::Root, &root, signers);
        // The new root must verify as a client would take it.
        match roots.last() {
            None => tern_trust::tuf::TrustedSet::new(&bytes, 0).map(|_| ()),
            Some(prev) => tern_trust::tuf::TrustedSet::new(prev, 0).and_then(|mut t| t.update_root(&bytes)),
        }
        .context("the new root does not verify (was the previous root key given with --previous-key?)")?;
        // The online roles count from here; a repository with roots and no
        // counters (a data dir restored without it) refuses to build rather
        // than sign versions already used.
        let counters = self.dir.join("counters.json");
        if !counters.exists() {
            write_atomic(&counters, &serde_json::to_vec(&Counters::default())?, false)
                .context("writing tuf/counters.json")?;
        }
        let path = self.dir.join(format!("{version}.root.json"));
        write_atomic(&path, &bytes, false).with_context(|| format!("writing {}", path.display()))?;
        Ok(version)
    }

    /// The newest build if it still lists what `versions` approve under the
    /// same roots and is younger than [`REBUILD_AFTER`]; else a new build.
    /// `None` while the repository has no root.
    pub fn current(&self, versions: &[ModelVersion], now: u64) -> Result<Option<Built>> {
        let roots = self.roots()?.len();
        if roots == 0 {
            return Ok(None);
        }
        let fingerprint = (roots, listed(versions).into_iter().map(|l| (l.path, l.sha256)).collect::<Vec<_>>());
        let fresh = || {
            self.latest
                .lock()
                .expect("lock")
                .as_ref()
                .filter(|(f, at, _)| *f == fingerprint && now.saturating_sub(*at) < REBUILD_AFTER)
                .map(|(_, _, built)| built.clone())
        };
        if let Some(built) = fresh() {
            return Ok(Some(built));
        }
        // One build for every session that found the newest stale at once
        // (a fleet reconnecting after a restart): the others take its result.
        let one = self.building.lock().expect("lock");
        if let Some(built) = fresh() {
            return Ok(Some(built));
        }
        self.build_holding(versions, now, one).map(Some)
    }

    /// Signs new timestamp, snapshot and targets metadata listing the
    /// approved versions among `versions`.
    pub fn build(&self, versions: &[ModelVersion], now: u64) -> Result<Built> {
        self.build_holding(versions, now, self.building.lock().expect("lock"))
    }

    fn build_holding(&self, versions: &[ModelVersion], now: u64, _one: std::sync::MutexGuard<'_, ()>) -> Result<Built> {
        let roots = self.roots()?;
        if roots.is_empty() {
            bail!("the TUF repository has no root yet: sign one with `tern registry sign-root --key FILE`");
        }
        let root_count = roots.len();
        let counters_path = self.dir.join("counters.json");
        let mut c: Counters = match std::fs::read(&counters_path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("reading {}", counters_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{} is missing: the versions signed so far are unknown, and reusing one would break clients; restore it from a backup",
                counters_path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("reading {}", counters_path.display())),
        };
        // Never below the clock either: a data dir restored from an older
        // backup brings older counters back, and versions its clients hold
        // must not be signed again over other content (they would refuse
        // every later file as a rollback). At most one version a second is
        // taken from the clock; builds faster than that count on.
        let next = |v: u64| v.checked_add(1).map(|n| n.max(now)).context("a TUF version counter is at its maximum");
        (c.timestamp, c.snapshot, c.targets) = (next(c.timestamp)?, next(c.snapshot)?, next(c.targets)?);
        // Written before anything is signed with them: a crash never signs
        // two different files with one version.
        write_atomic(&counters_path, &serde_json::to_vec(&c)?, false).context("writing tuf/counters.json")?;
        let mut targets = BTreeMap::new();
        let mut files = Vec::new();
        for l in listed(versions) {
            let mut tern = serde_json::json!({ "name": l.name, "version": l.version, "format": l.format });
            if let Some(p) = &l.profile {
                tern["profile"] = serde_json::json!(p);
            }
            let file = TargetFile {
                length: l.size,
                hashes: [("sha256".to_string(), l.sha256.to_hex())].into(),
                custom: Some(serde_json::json!({ "tern": tern })),
            };
            files.push((l.path.clone(), l.sha256));
            targets.insert(l.path, file);
        }
        let key = |r: Role| &self.keys[&r];
        let targets_json = sign_metadata(
            Role::Targets,
            &Targets { version: c.targets, expires: format_time(now + TARGETS_LIFE), targets },
            &[key(Role::Targets)],
        );
        let meta = |version| MetaFile { version, length: None, hashes: None };
        let snapshot_json = sign_metadata(
            Role::Snapshot,
            &Versions {
                version: c.snapshot,
                expires: format_time(now + SNAPSHOT_LIFE),
                meta: [("targets.json".to_string(), meta(c.targets))].into(),
            },
            &[key(Role::Snapshot)],
        );
        let snap = MetaFile {
            version: c.snapshot,
            length: Some(snapshot_json.len() as u64),
            hashes: Some([("sha256".to_string(), tern_proto::Sha256Digest::of(&snapshot_json).to_hex())].into()),
        };
        let mut ts = serde_json::to_value(Versions {
            version: c.timestamp,
            expires: format_time(now + TIMESTAMP_LIFE),
            meta: [("snapshot.json".to_string(), snap)].into(),
        })?;
        ts.as_object_mut().expect("an object").insert(ISSUED_FIELD.into(), format_time(now).into());
        let timestamp_json = sign_metadata(Role::Timestamp, &ts, &[key(Role::Timestamp)]);
        let text = |b: Vec<u8>| String::from_utf8(b).context("metadata is not UTF-8");
        let built = Built {
            roots: roots.into_iter().map(text).collect::<Result<Vec<_>>>()?,
            timestamp: text(timestamp_json)?,
            snapshot: text(snapshot_json)?,
            targets: text(targets_json)?,
            files,
        };
        *self.latest.lock().expect("lock") = Some(((root_count, built.files.clone()), now, built.clone()));
        Ok(built)
    }
}

fn approved(versions: &[ModelVersion]) -> impl Iterator<Item = &ModelVersion> {
    versions.iter().filter(|v| v.status == Approval::Approved)
}

/// Where a version's source sits in the repository.
pub fn target_path(v: &ModelVersion) -> String {
    tern_trust::tuf::target_path(&v.name, v.version, v.format)
}

/// One file the targets metadata lists.
struct Listed {
    name: String,
    version: u32,
    path: String,
    sha256: tern_proto::Sha256Digest,
    size: u64,
    format: tern_proto::ModelFormat,
    profile: Option<String>,
}

/// Every file of the approved versions: each source at its
/// [`target_path`], each compiled artifact at its profile's path. A
/// compiled artifact is also listed at the plain path when that path is
/// free and no other artifact of its format claims it, so that agents from
/// before per-profile paths verify it too.
fn listed(versions: &[ModelVersion]) -> Vec<Listed> {
    let mut out = Vec::new();
    for v in approved(versions) {
        out.push(Listed {
            name: v.name.clone(),
            version: v.version,
            path: target_path(v),
            sha256: v.sha256,
            size: v.size,
            format: v.format,
            profile: None,
        });
        for (profile, t) in &v.targets {
            let alt = t.alternative.as_ref().map(|a| (a.sha256, a.size, a.format));
            for (sha256, size, format) in std::iter::once((t.sha256, t.size, t.format)).chain(alt) {
                let path = tern_trust::tuf::profile_target_path(&v.name, v.version, profile, format);
                let profile = Some(profile.clone());
                out.push(Listed { name: v.name.clone(), version: v.version, path, sha256, size, format, profile });
            }
        }
        let mut formats = Vec::new();
        for f in v.targets.values().map(|t| t.format).filter(|f| *f != v.format) {
            if !formats.contains(&f) {
                formats.push(f);
            }
        }
        for f in formats {
            if let Some(first) = v.plain_target(f) {
                let path = tern_trust::tuf::target_path(&v.name, v.version, f);
                out.push(Listed {
                    name: v.name.clone(),
                    version: v.version,
                    path,
                    sha256: first.sha256,
                    size: first.size,
                    format: f,
                    profile: None,
                });
            }
        }
    }
    out
}

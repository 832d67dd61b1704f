//! What a desired state is trusted by: on wire 4 the registry key's
//! signature over the state for this device, and the TUF metadata that must
//! list every artifact it names with the same length and digest; on every
//! wire the registry key's signature of each manifest. The TUF state the
//! agent verified last persists in `identity/tuf.json`, and that it has
//! taken a signed state in `identity/signed-states`, so that nothing older
//! or less signed is taken after a restart. Both are written by the
//! persister before the slots that follow them (see [`TrustFiles`]).

use std::path::{Path, PathBuf};
use tern_proto::{DesiredState, DeviceId, ModelManifest, SignedManifest, TufMetadata, WireVersion};
use tern_trust::VerifyingKey;
use tern_trust::tuf::{TrustedSet, profile_target_path, target_path};
use tracing::{error, info};

/// A desired state as the link received it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The state.
    pub state: DesiredState,
    /// Its signature and TUF metadata (wire 4 on).
    pub signed: Option<(Vec<u8>, Option<TufMetadata>)>,
    /// The session's wire version.
    pub wire: WireVersion,
}

/// The persisted TUF state: the files the refresh starts from.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Saved {
    root: String,
    timestamp: Option<String>,
    snapshot: Option<String>,
    /// The lower bound of now that verified timestamps gave.
    floor: u64,
}

/// The name of the TUF state's file in the identity folder.
const TUF_FILE: &str = "tuf.json";
/// The name of the file whose presence says a signed state was taken.
const SIGNED_FILE: &str = "signed-states";

/// The trust state to write, whole: the persister writes it durably before
/// any slots queued after it, so that slots on disk never name a state
/// whose trust was not kept with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustFiles {
    dir: PathBuf,
    tuf: Option<Vec<u8>>,
    signed: bool,
}

impl TrustFiles {
    /// Trust state to write into `dir`.
    #[cfg(test)]
    pub fn new(dir: &Path, tuf: Option<Vec<u8>>, signed: bool) -> Self {
        Self { dir: dir.to_path_buf(), tuf, signed }
    }

    /// Writes both files durably (each atomically).
    pub fn write(&self) -> std::io::Result<()> {
        if let Some(bytes) = &self.tuf {
            tern_durable::write_atomic(&self.dir.join(TUF_FILE), bytes, false)?;
        }
        if self.signed && !self.dir.join(SIGNED_FILE).exists() {
            tern_durable::write_atomic(&self.dir.join(SIGNED_FILE), b"", false)?;
        }
        Ok(())
    }
}

/// The keys and metadata the agent trusts.
pub struct Trust {
    registry_key: VerifyingKey,
    device: DeviceId,
    /// The device's profile: its compiled artifacts have their own targets.
    profile: String,
    /// A backend this agent has whose alternative artifacts it runs in
    /// place of a version's main one (`onnxruntime` once loaded).
    prefer: Option<String>,
    tuf: Option<TrustedSet>,
    /// Whether a desired state signed for this device was ever taken: from
    /// then on an unsigned one (an older wire) is refused.
    signed: bool,
    /// Where the state persists (none in tests).
    dir: Option<PathBuf>,
    /// Changed since last handed to the persister.
    unsaved: bool,
    /// Why the persisted TUF state could not be read: every state is
    /// refused with it (the committed models serve on) until it is fixed.
    broken: Option<String>,
}

impl Trust {
    /// Trust in `registry_key` alone, persisting nothing.
    #[cfg(test)]
    pub fn new(registry_key: VerifyingKey, device: DeviceId) -> Self {
        Self {
            registry_key,
            device,
            profile: String::new(),
            prefer: None,
            tuf: None,
            signed: false,
            dir: None,
            unsaved: false,
            broken: None,
        }
    }

    /// Loads what `dir` holds (nothing yet: the registry key alone); what
    /// changes later is handed out by [`Trust::unsaved`] for the persister.
    pub fn open(registry_key: VerifyingKey, device: DeviceId, profile: String, dir: &Path) -> anyhow::Result<Self> {
        let file = dir.join(TUF_FILE);
        let loaded = match std::fs::read(&file) {
            Ok(bytes) => load(&bytes).map(Some).map_err(|e| format!("{}: {e}", file.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("reading {}: {e}", file.display())),
        };
        // A file that does not verify is not a fresh start (that would take
        // any root the registry key introduces, and forget the versions
        // seen), nor a reason to stop serving: updates wait until it is
        // restored from a backup.
        let (tuf, broken) = match loaded {
            Ok(tuf) => (tuf, None),
            Err(e) => {
                error!("{e}; refusing every desired state until it is restored");
                (
                    None,
                    Some(format!(
                        "the trusted TUF state is unreadable ({e}); restore it from a backup and restart the agent"
                    )),
                )
            }
        };
        if let Some(set) = &tuf {
            info!(root = set.root().body.version, "TUF root trusted");
        }
        let signed = dir.join(SIGNED_FILE).exists();
        Ok(Self {
            registry_key,
            device,
            profile,
            prefer: None,
            tuf,
            signed,
            dir: Some(dir.to_path_buf()),
            unsaved: false,
            broken,
        })
    }

    /// Takes a version's alternative for `backend` in place of its main
    /// artifact, when it has one (checked like the main one).
    pub fn preferring(mut self, backend: Option<String>) -> Self {
        self.prefer = backend;
        self
    }

    /// The trust state to persist if it changed since last asked (taken
    /// states change it); hand it to the persister before the slots.
    pub fn unsaved(&mut self) -> Option<TrustFiles> {
        let dir = self.dir.clone().filter(|_| std::mem::take(&mut self.unsaved))?;
        Some(TrustFiles { dir, tuf: self.tuf.as_ref().map(saved_bytes), signed: self.signed })
    }

    /// The version of the TUF root trusted, if any.
    pub fn root_version(&self) -> Option<u64> {
        self.tuf.as_ref().map(|t| t.root().body.version)
    }

    /// Checks `incoming` at `clock` (Unix seconds, as the device reads it);
    /// returns its verified manifests, or why the whole state is refused.
    /// Newer TUF metadata is kept only when the state is taken.
    pub fn check(&mut self, incoming: &Incoming, clock: u64) -> Result<Vec<ModelManifest>, String> {
        if let Some(why) = &self.broken {
            return Err(why.clone());
        }
        let state = &incoming.state;
        let tuf = match &incoming.signed {
            Some((signature, tuf)) => {
                self.registry_key.verify_state(&self.device, state, signature).map_err(|e| e.to_string())?;
                tuf.as_ref()
            }
            None if incoming.wire >= WireVersion::V4 => {
                return Err(format!(
                    "the coordinator sent an unsigned desired state on a wire {} session",
                    incoming.wire
                ));
            }
            None if self.signed => {
                return Err(format!(
                    "this device has taken desired states signed for it; an unsigned one (wire {}) is refused",
                    incoming.wire
                ));
            }
            None => None,
        };
        let manifests = verify_manifests(&self.registry_key, &state.models)?;
        // What this agent will run, each checked against TUF below.
        let manifests: Vec<ModelManifest> =
            manifests.into_iter().map(|m| self.prefer.as_deref().and_then(|b| m.for_backend(b)).unwrap_or(m)).collect();
        let refreshed = match (tuf, &self.tuf) {
            (Some(meta), trusted) => Some(refresh(trusted.as_ref(), meta, &self.registry_key, clock)?),
            (None, Some(t)) => {
                return Err(format!(
                    "this device trusts TUF root {} and the desired state came without TUF metadata",
                    t.root().body.version
                ));
            }
            (None, None) => None,
        };
        if let Some(mut set) = refreshed {
            for m in &manifests {
                let own = profile_target_path(&m.name, m.version, &self.profile, m.format);
                let (path, target) = match set.target(&own) {
                    Ok(t) => (own, t),
                    Err(_) => {
                        let path = target_path(&m.name, m.version, m.format);
                        let t = set.target(&path).map_err(|e| format!("TUF: {e}"))?;
                        (path, t)
                    }
                };
                let signed_sha = target.hashes.get("sha256").map(|h| h.to_ascii_lowercase());
                if target.length != m.size || signed_sha.as_deref() != Some(m.sha256.to_hex().as_str()) {
                    return Err(format!(
                        "TUF: {path} is signed as {} bytes with sha256 {}, the manifest says {} bytes with {}",
                        target.length,
                        signed_sha.as_deref().unwrap_or("none"),
                        m.size,
                        m.sha256
                    ));
                }
            }
            let newer_root = self.root_version() != Some(set.root().body.version);
            if newer_root {
                info!(root = set.root().body.version, "TUF root trusted");
            }
            // The same metadata again (each reconnect) is not written again.
            self.unsaved |= self.tuf.as_ref().map(saved_bytes) != Some(saved_bytes(&set));
            // The targets of the whole fleet need not stay in memory.
            set.drop_targets();
            self.tuf = Some(set);
        }
        if incoming.signed.is_some() && !self.signed {
            self.signed = true;
            self.unsaved = true;
        }
        Ok(manifests)
    }
}

/// The trusted set a `tuf.json` holds.
fn load(bytes: &[u8]) -> Result<TrustedSet, String> {
    let saved: Saved = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut set = TrustedSet::new(saved.root.as_bytes(), saved.floor).map_err(|e| e.to_string())?;
    set.restore(saved.timestamp.as_deref().map(str::as_bytes), saved.snapshot.as_deref().map(str::as_bytes))
        .map_err(|e| e.to_string())?;
    Ok(set)
}

/// Every manifest's registry signature: one bad one and the whole state is
/// refused, so that one forged manifest cannot slip in.
fn verify_manifests(key: &VerifyingKey, signed: &[SignedManifest]) -> Result<Vec<ModelManifest>, String> {
    signed.iter().map(|s| key.verify(s).map_err(|e| e.to_string())).collect()
}

/// The client workflow from the trusted state (or, with none, from root 1
/// as the registry key introduces it): roots in order, then timestamp,
/// snapshot and targets. The trusted state is left as it was.
fn refresh(
    trusted: Option<&TrustedSet>,
    meta: &TufMetadata,
    registry_key: &VerifyingKey,
    clock: u64,
) -> Result<TrustedSet, String> {
    let tuf = |e: tern_trust::tuf::TufError| format!("TUF: {e}");
    let mut set = match trusted {
        Some(t) => TrustedSet::new(&t.root().bytes, t.floor()).map_err(tuf)?,
        None => {
            let first = meta.roots.first().ok_or("TUF: the metadata has no root")?;
            registry_key.verify_root_intro(first, &meta.root_intro).map_err(|e| e.to_string())?;
            TrustedSet::new(first, 0).map_err(tuf)?
        }
    };
    let have = set.root().body.version;
    for root in meta.roots.iter().skip(usize::try_from(have).unwrap_or(usize::MAX)) {
        set.update_root(root).map_err(tuf)?;
    }
    if let Some(t) = trusted {
        set.restore(t.timestamp().map(|v| v.bytes.as_slice()), t.snapshot().map(|v| v.bytes.as_slice()))
            .map_err(tuf)?;
    }
    set.update_timestamp(&meta.timestamp, clock).map_err(tuf)?;
    set.update_snapshot(&meta.snapshot, clock).map_err(tuf)?;
    set.update_targets(&meta.targets, clock).map_err(tuf)?;
    Ok(set)
}

/// A trusted set as `tuf.json` holds it.
fn saved_bytes(set: &TrustedSet) -> Vec<u8> {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let saved = Saved {
        root: text(&set.root().bytes),
        timestamp: set.timestamp().map(|v| text(&v.bytes)),
        snapshot: set.snapshot().map(|v| text(&v.bytes)),
        floor: set.floor(),
    };
    serde_json::to_vec(&saved).expect("strings and an integer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::{DType, ManifestEncoding, ModelFormat, Sha256Digest, TensorSpec};
    use tern_trust::SigningKey;

    fn state(key: &SigningKey, generation: u64) -> DesiredState {
        let m = ModelManifest {
            name: "iris".into(),
            version: 1,
            sha256: Sha256Digest::of(b"model"),
            size: 5,
            format: ModelFormat::Onnx,
            inputs: vec![TensorSpec { name: "X".into(), dtype: DType::F32, shape: vec![None, Some(4)] }],
            outputs: vec![],
            created_at: 0,
            selftest: None,
            update: None,
            alternative: None,
            baseline: None,
            capture: None,
        };
        DesiredState { generation, models: vec![key.sign(&m, ManifestEncoding::CanonicalJson).unwrap()] }
    }

    #[test]
    fn a_wire_4_state_must_be_signed_for_this_device() {
        let (key, _) = SigningKey::generate().unwrap();
        let me = DeviceId::new("cam-01").unwrap();
        let mut trust = Trust::new(key.verifying_key(), me.clone());
        let s = state(&key, 3);
        let unsigned = Incoming { state: s.clone(), signed: None, wire: WireVersion::V4 };
        assert!(trust.check(&unsigned, 0).unwrap_err().contains("unsigned desired state on a wire v4 session"));
        let other = key.sign_state(&DeviceId::new("cam-02").unwrap(), &s);
        let foreign = Incoming { state: s.clone(), signed: Some((other, None)), wire: WireVersion::V4 };
        assert!(trust.check(&foreign, 0).unwrap_err().contains("desired state signature is invalid"));
        // Emptied on the way: the signature no longer matches.
        let sig = key.sign_state(&me, &s);
        let emptied = DesiredState { generation: 3, models: vec![] };
        let e = trust.check(&Incoming { state: emptied, signed: Some((sig.clone(), None)), wire: WireVersion::V4 }, 0);
        assert!(e.unwrap_err().contains("desired state signature is invalid"));
        let good = Incoming { state: s.clone(), signed: Some((sig, None)), wire: WireVersion::V4 };
        assert_eq!(trust.check(&good, 0).unwrap().len(), 1);
        // Older wire versions cannot sign; their manifests still must be
        // (on an agent that never took a signed state).
        let mut trust = Trust::new(key.verifying_key(), me.clone());
        assert_eq!(trust.check(&Incoming { wire: WireVersion::V3, ..unsigned.clone() }, 0).unwrap().len(), 1);
        let (other_key, _) = SigningKey::generate().unwrap();
        let forged = Incoming { state: state(&other_key, 4), signed: None, wire: WireVersion::V3 };
        assert!(trust.check(&forged, 0).unwrap_err().contains("manifest signed by unknown key"));
    }

    /// A repository of `files` (path, length, sha256), signed by fresh
    /// keys.
    fn repo(registry: &SigningKey, files: &[(&str, u64, Sha256Digest)], version: u64) -> TufMetadata {
        use std::collections::BTreeMap;
        use tern_trust::tuf::{
            Key, MetaFile, Role, RoleKeys, Root, TargetFile, Targets, Versions, format_time, sign_metadata,
        };
        let now = 1_780_000_000;
        let keys: Vec<SigningKey> = (0..4).map(|_| SigningKey::generate().unwrap().0).collect();
        let (mut all, mut roles) = (BTreeMap::new(), BTreeMap::new());
        for (key, role) in keys.iter().zip([Role::Root, Role::Timestamp, Role::Snapshot, Role::Targets]) {
            let k = Key::ed25519(&key.verifying_key());
            roles.insert(role.name().to_string(), RoleKeys { keyids: vec![k.id()], threshold: 1 });
            all.insert(k.id(), k);
        }
        let root =
            Root { consistent_snapshot: false, version: 1, expires: format_time(now + 86_400), keys: all, roles };
        let root = sign_metadata(Role::Root, &root, &[&keys[0]]);
        let target = |len: u64, sha: Sha256Digest| TargetFile {
            length: len,
            hashes: [("sha256".to_string(), sha.to_hex())].into(),
            custom: None,
        };
        let targets = Targets {
            version,
            expires: format_time(now + 86_400),
            targets: files.iter().map(|(p, len, sha)| (p.to_string(), target(*len, *sha))).collect(),
        };
        let targets = sign_metadata(Role::Targets, &targets, &[&keys[3]]);
        let meta = |v| [("targets.json".to_string(), MetaFile { version: v, length: None, hashes: None })].into();
        let snapshot = Versions { version, expires: format_time(now + 86_400), meta: meta(version) };
        let snapshot = sign_metadata(Role::Snapshot, &snapshot, &[&keys[2]]);
        let named = MetaFile { version, length: None, hashes: None };
        let ts = Versions {
            version,
            expires: format_time(now + 3_600),
            meta: [("snapshot.json".to_string(), named)].into(),
        };
        let timestamp = sign_metadata(Role::Timestamp, &ts, &[&keys[1]]);
        TufMetadata { root_intro: registry.sign_root_intro(&root), roots: vec![root], timestamp, snapshot, targets }
    }

    #[test]
    fn a_state_is_taken_only_if_the_tuf_targets_list_its_artifacts() {
        let (key, _) = SigningKey::generate().unwrap();
        let me = DeviceId::new("cam-01").unwrap();
        let mut trust = Trust::new(key.verifying_key(), me.clone());
        let s = state(&key, 3);
        let clock = 1_780_000_100;
        let signed = |tuf: TufMetadata| {
            let sig = key.sign_state(&me, &s);
            Incoming { state: s.clone(), signed: Some((sig, Some(tuf))), wire: WireVersion::V4 }
        };
        let sha = Sha256Digest::of(b"model");
        // A root the registry key did not introduce.
        let (other, _) = SigningKey::generate().unwrap();
        let mut forged = repo(&key, &[("iris/1/model.onnx", 5, sha)], 1);
        forged.root_intro = other.sign_root_intro(&forged.roots[0]);
        assert!(trust.check(&signed(forged), clock).unwrap_err().contains("not introduced by the registry key"));
        assert_eq!(trust.root_version(), None);
        // Listed with another length, or another digest.
        let e = trust.check(&signed(repo(&key, &[("iris/1/model.onnx", 6, sha)], 1)), clock).unwrap_err();
        assert!(e.contains("iris/1/model.onnx is signed as 6 bytes"), "{e}");
        let e = trust
            .check(&signed(repo(&key, &[("iris/1/model.onnx", 5, Sha256Digest::of(b"other"))], 1)), clock)
            .unwrap_err();
        assert!(e.contains("is signed as 5 bytes with sha256"), "{e}");
        assert_eq!(trust.root_version(), None, "nothing of a refused state is trusted");
        // Listed as the manifest says: taken, and root 1 trusted from now on.
        let good = repo(&key, &[("iris/1/model.onnx", 5, sha)], 1);
        assert_eq!(trust.check(&signed(good.clone()), clock).unwrap().len(), 1);
        assert_eq!(trust.root_version(), Some(1));
        // Another repository's root 1 is no longer taken on the registry
        // key's word, nor a state without metadata.
        let e = trust.check(&signed(repo(&key, &[("iris/1/model.onnx", 5, sha)], 2)), clock).unwrap_err();
        assert!(e.starts_with("TUF: timestamp metadata has 0 valid signatures by its keys"), "{e}");
        let bare = Incoming { state: s.clone(), signed: Some((key.sign_state(&me, &s), None)), wire: WireVersion::V4 };
        assert!(
            trust.check(&bare, clock).unwrap_err().contains("trusts TUF root 1 and the desired state came without")
        );
        // Expired at the device's clock (a freeze).
        assert!(trust.check(&signed(good), clock + 7_200).unwrap_err().contains("expired"));
    }

    #[test]
    fn a_device_checks_its_artifact_against_its_own_profile_s_target_first() {
        let (key, _) = SigningKey::generate().unwrap();
        let me = DeviceId::new("cam-01").unwrap();
        let s = state(&key, 3);
        let clock = 1_780_000_100;
        let (sha, other) = (Sha256Digest::of(b"model"), Sha256Digest::of(b"other"));
        let signed = |tuf: TufMetadata| {
            let sig = key.sign_state(&me, &s);
            Incoming { state: s.clone(), signed: Some((sig, Some(tuf))), wire: WireVersion::V4 }
        };
        let rpi4 = |profile: &str| Trust { profile: profile.into(), ..Trust::new(key.verifying_key(), me.clone()) };
        // The plain path holds another profile's artifact; rpi4's own path
        // holds this one: an rpi4 device takes it, another refuses it.
        let files = [("iris/1/model.onnx", 5, other), ("iris/1/rpi4/model.onnx", 5, sha)];
        assert_eq!(rpi4("rpi4").check(&signed(repo(&key, &files, 1)), clock).unwrap().len(), 1);
        let e = rpi4("rpi5").check(&signed(repo(&key, &files, 1)), clock).unwrap_err();
        assert!(e.starts_with("TUF: iris/1/model.onnx is signed as 5 bytes with sha256"), "{e}");
        // Its own path is binding when present: a wrong artifact there is
        // not excused by a matching plain path.
        let files = [("iris/1/model.onnx", 5, sha), ("iris/1/rpi4/model.onnx", 5, other)];
        let e = rpi4("rpi4").check(&signed(repo(&key, &files, 1)), clock).unwrap_err();
        assert!(e.starts_with("TUF: iris/1/rpi4/model.onnx is signed as 5 bytes"), "{e}");
    }

    #[test]
    fn once_a_signed_state_is_taken_an_unsigned_one_is_refused_even_after_a_restart() {
        let (key, _) = SigningKey::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let me = DeviceId::new("cam-01").unwrap();
        let mut trust = Trust::open(key.verifying_key(), me.clone(), String::new(), dir.path()).unwrap();
        // Unsigned (wire 3) is taken while nothing signed has been.
        let old = Incoming { state: state(&key, 2), signed: None, wire: WireVersion::V3 };
        assert_eq!(trust.check(&old, 0).unwrap().len(), 1);
        assert_eq!(trust.unsaved(), None, "nothing to write");
        let s = state(&key, 3);
        let signed =
            Incoming { state: s.clone(), signed: Some((key.sign_state(&me, &s), None)), wire: WireVersion::V4 };
        assert_eq!(trust.check(&signed, 0).unwrap().len(), 1);
        let files = trust.unsaved().expect("the first signed state is kept");
        assert_eq!(trust.unsaved(), None, "handed out once");
        assert_eq!(trust.check(&signed, 0).unwrap().len(), 1);
        assert_eq!(trust.unsaved(), None, "the same again changes nothing");
        let refused = |t: &mut Trust| t.check(&Incoming { state: state(&key, 4), ..old.clone() }, 0).unwrap_err();
        assert!(refused(&mut trust).contains("an unsigned one (wire v3) is refused"), "{}", refused(&mut trust));
        files.write().unwrap();
        let mut trust = Trust::open(key.verifying_key(), me.clone(), String::new(), dir.path()).unwrap();
        assert!(refused(&mut trust).contains("has taken desired states signed for it"));
    }

    #[test]
    fn an_unreadable_trust_file_refuses_every_state_and_is_kept() {
        let (key, _) = SigningKey::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tuf.json");
        std::fs::write(&file, b"{not json").unwrap();
        let me = DeviceId::new("cam-01").unwrap();
        let mut trust = Trust::open(key.verifying_key(), me.clone(), String::new(), dir.path()).unwrap();
        let s = state(&key, 3);
        let incoming =
            Incoming { state: s.clone(), signed: Some((key.sign_state(&me, &s), None)), wire: WireVersion::V4 };
        let e = trust.check(&incoming, 0).unwrap_err();
        assert!(e.starts_with("the trusted TUF state is unreadable") && e.ends_with("restart the agent"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"{not json");
    }
}

use crate::types::{
    Approval, Artifact, Device, EnrollToken, HistoryEntry, MAX_DEVICE_HISTORY, ModelVersion, NewVersion, Report,
    TargetArtifact,
};
use crate::{RegistryError, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tern_proto::{CapturePolicy, DeviceId, Sha256Digest};

/// The registry database.
///
/// Every mutating call is durable when it returns: sled's `flush` alone does
/// not fsync on Linux, so [`Registry::sync`] also fsyncs its files.
pub struct Registry {
    path: PathBuf,
    db: sled::Db,
    models: sled::Tree,
    devices: sled::Tree,
    /// Certificate SHA-256 → device id, so a connection finds its device in one lookup.
    certs: sled::Tree,
    /// Certificate SHA-256 → id of the removed device it belonged to.
    revoked: sled::Tree,
    tokens: sled::Tree,
    /// Held while a telemetry batch is stored.
    telemetry: std::sync::Mutex<()>,
    /// Held while a rollout is started (its devices checked against the
    /// active ones).
    rollout: std::sync::Mutex<()>,
}

fn version_key(name: &str, version: u32) -> Vec<u8> {
    // Names never contain NUL, and big-endian versions sort numerically.
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("registry records serialize")
}

pub(crate) fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
        key: String::from_utf8_lossy(key).replace('\0', ":"),
        reason: e.to_string(),
    })
}

fn token_key(secret: &[u8; 16]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Aborts a sled transaction with a registry error.
fn abort<T>(e: RegistryError) -> std::result::Result<T, ConflictableTransactionError<RegistryError>> {
    Err(ConflictableTransactionError::Abort(e))
}

fn unwrap_tx<T>(r: std::result::Result<T, TransactionError<RegistryError>>) -> Result<T> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => RegistryError::Storage(e),
    })
}

impl Registry {
    /// Opens (creating) the registry at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let db = sled::open(&path)?;
        Ok(Self {
            models: db.open_tree("models")?,
            devices: db.open_tree("devices")?,
            certs: db.open_tree("certs")?,
            revoked: db.open_tree("revoked")?,
            tokens: db.open_tree("tokens")?,
            telemetry: std::sync::Mutex::new(()),
            rollout: std::sync::Mutex::new(()),
            db,
            path,
        })
    }

    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    pub(crate) fn telemetry_lock(&self) -> &std::sync::Mutex<()> {
        &self.telemetry
    }

    pub(crate) fn rollout_lock(&self) -> &std::sync::Mutex<()> {
        &self.rollout
    }

    /// [`Registry::update_device`], durably.
    pub(crate) fn update_device_pub(&self, id: &str, f: impl Fn(&mut Device) -> Result<()>) -> Result<Device> {
        self.update_device(id, true, f)
    }

    /// Makes everything written so far durable.
    pub fn sync(&self) -> Result<()> {
        Ok(tern_durable::sync_sled(&self.db, &self.path)?)
    }

    // ---- models ----

    /// Registers a new version of `name`, numbered one past the latest.
    pub fn register(&self, name: &str, new: NewVersion) -> Result<ModelVersion> {
        loop {
            let version = self.latest_version(name)?.map_or(1, |v| v.version + 1);
            let record = ModelVersion {
                name: name.to_owned(),
                version,
                sha256: new.sha256,
                size: new.size,
                format: new.format,
                inputs: new.inputs.clone(),
                outputs: new.outputs.clone(),
                card: new.card.clone(),
                meta: new.meta.clone(),
                created_at: new.now,
                status: Approval::Pending,
                status_changed_at: new.now,
                selftest: new.selftest,
                needs_compiling: new.needs_compiling.clone(),
                compile_shapes: new.compile_shapes.clone(),
                compile_consts: new.compile_consts.clone(),
                tolerance_ppm: new.tolerance_ppm,
                targets: BTreeMap::new(),
                baseline: new.baseline,
                baseline_full: new.baseline_full,
                constraints: None,
                capture: None,
            };
            let key = version_key(name, version);
            // A concurrent registration that took this number makes us retry with the next.
            if self.models.compare_and_swap(&key, None::<&[u8]>, Some(encode(&record)))?.is_ok() {
                self.sync()?;
                return Ok(record);
            }
        }
    }

    fn latest_version(&self, name: &str) -> Result<Option<ModelVersion>> {
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(0);
        match self.models.scan_prefix(&prefix).next_back() {
            Some(kv) => {
                let (k, v) = kv?;
                Ok(Some(decode(&k, &v)?))
            }
            None => Ok(None),
        }
    }

    /// One version.
    pub fn version(&self, name: &str, version: u32) -> Result<ModelVersion> {
        let key = version_key(name, version);
        match self.models.get(&key)? {
            Some(v) => decode(&key, &v),
            None if self.latest_version(name)?.is_some() => {
                Err(RegistryError::UnknownVersion { name: name.to_owned(), version })
            }
            None => Err(RegistryError::UnknownModel(name.to_owned())),
        }
    }

    /// All versions of `name`, oldest first.
    pub fn versions(&self, name: &str) -> Result<Vec<ModelVersion>> {
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(0);
        let out = self
            .models
            .scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect::<Result<Vec<ModelVersion>>>()?;
        if out.is_empty() {
            return Err(RegistryError::UnknownModel(name.to_owned()));
        }
        Ok(out)
    }

    /// Every version of every model, by name then version.
    pub fn all_versions(&self) -> Result<Vec<ModelVersion>> {
        self.models
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Sets the approval status of a version. Rejecting a version that
    /// devices are assigned is refused ([`RegistryError::Deployed`]) unless
    /// `force`, which also unassigns it from each of them, in the same
    /// transaction; the devices whose desired state changed are returned.
    pub fn set_status(
        &self,
        name: &str,
        version: u32,
        status: Approval,
        now: u64,
        force: bool,
    ) -> Result<(ModelVersion, Vec<Device>)> {
        let before = self.version(name, version)?;
        let mut changed = Vec::new();
        loop {
            let (record, more) = self.set_status_once(name, version, status, now, force)?;
            changed.extend(more);
            // A device enrolled and assigned this version after the devices
            // were listed slipped past the transaction: go again (a forced
            // rejection unassigns it too; otherwise the rejection is undone).
            let late = if status == Approval::Rejected { self.assigned(name, version)? } else { Vec::new() };
            if late.is_empty() {
                self.sync()?;
                return Ok((record, changed));
            }
            if !force {
                self.set_status_once(name, version, before.status, before.status_changed_at, false)?;
                self.sync()?;
                let ids: Vec<&str> = late.iter().map(DeviceId::as_str).collect();
                return Err(RegistryError::Deployed { name: name.to_owned(), version, devices: ids.join(", ") });
            }
        }
    }

    /// One pass of [`Registry::set_status`] over the devices there are now.
    fn set_status_once(
        &self,
        name: &str,
        version: u32,
        status: Approval,
        now: u64,
        force: bool,
    ) -> Result<(ModelVersion, Vec<Device>)> {
        let key = version_key(name, version);
        // Every device listed now is read again inside the transaction, so
        // an assignment to one of them cannot slip past it.
        let ids: Vec<sled::IVec> = self.devices.iter().keys().collect::<Result<_, _>>()?;
        let result = (&self.models, &self.devices).transaction(|(models, devices)| {
            let Some(raw) = models.get(&key)? else {
                return abort(RegistryError::UnknownVersion { name: name.to_owned(), version });
            };
            let mut record: ModelVersion = match decode(&key, &raw) {
                Ok(r) => r,
                Err(e) => return abort(e),
            };
            let mut changed = Vec::new();
            if status == Approval::Rejected {
                for k in &ids {
                    let Some(raw) = devices.get(k)? else { continue };
                    let mut d: Device = match decode(k, &raw) {
                        Ok(d) => d,
                        Err(e) => return abort(e),
                    };
                    if d.desired.get(name) == Some(&version) {
                        d.desired.remove(name);
                        d.remember(name, version);
                        d.next_generation();
                        changed.push(d);
                    }
                }
                if !changed.is_empty() && !force {
                    let ids: Vec<&str> = changed.iter().map(|d| d.id.as_str()).collect();
                    return abort(RegistryError::Deployed { name: name.to_owned(), version, devices: ids.join(", ") });
                }
                for d in &changed {
                    devices.insert(d.id.as_str(), encode(d))?;
                }
            }
            record.status = status;
            record.status_changed_at = now;
            models.insert(key.as_slice(), encode(&record))?;
            Ok((record, changed))
        });
        unwrap_tx(result)
    }

    /// Sets (or, with `None`, clears) the Model Monitor constraints of a
    /// version (`tern monitor import-constraints`): a file in the artifact
    /// store. They are the coordinator's: no manifest carries them.
    pub fn set_constraints(&self, name: &str, version: u32, constraints: Option<Sha256Digest>) -> Result<ModelVersion> {
        let key = version_key(name, version);
        loop {
            let Some(raw) = self.models.get(&key)? else {
                return Err(RegistryError::UnknownVersion { name: name.to_owned(), version });
            };
            let mut record: ModelVersion = decode(&key, &raw)?;
            record.constraints = constraints;
            // A concurrent change to the record makes us read it again.
            if self.models.compare_and_swap(&key, Some(raw), Some(encode(&record)))?.is_ok() {
                self.sync()?;
                return Ok(record);
            }
        }
    }

    /// Sets (or, with `None`, ends) the data capture devices serving
    /// `name:version` are asked for; every device assigned the version gets
    /// a new generation, so its session sends the state again. Returns the
    /// record and those devices.
    pub fn set_capture(
        &self,
        name: &str,
        version: u32,
        capture: Option<CapturePolicy>,
    ) -> Result<(ModelVersion, Vec<Device>)> {
        let key = version_key(name, version);
        let ids: Vec<sled::IVec> = self.devices.iter().keys().collect::<Result<_, _>>()?;
        let result = (&self.models, &self.devices).transaction(|(models, devices)| {
            let Some(raw) = models.get(&key)? else {
                return abort(RegistryError::UnknownVersion { name: name.to_owned(), version });
            };
            let mut record: ModelVersion = match decode(&key, &raw) {
                Ok(r) => r,
                Err(e) => return abort(e),
            };
            record.capture = capture;
            models.insert(key.as_slice(), encode(&record))?;
            let mut changed = Vec::new();
            for k in &ids {
                let Some(raw) = devices.get(k)? else { continue };
                let mut d: Device = match decode(k, &raw) {
                    Ok(d) => d,
                    Err(e) => return abort(e),
                };
                if d.desired.get(name) == Some(&version) {
                    d.next_generation();
                    devices.insert(k, encode(&d))?;
                    changed.push(d);
                }
            }
            Ok((record, changed))
        });
        let out = unwrap_tx(result)?;
        self.sync()?;
        Ok(out)
    }

    /// Stores `artifact` as `name:version`'s compiled artifact for
    /// `profile`, replacing an older one. Refused while the version is
    /// assigned to a device whose artifact that would change (one of that
    /// profile, or any while the version has no compiled artifact yet):
    /// an agent takes a version's artifact once.
    pub fn set_target(
        &self,
        name: &str,
        version: u32,
        profile: &str,
        artifact: TargetArtifact,
    ) -> Result<ModelVersion> {
        self.version(name, version)?;
        let key = version_key(name, version);
        // Every device listed now is read again inside the transaction, so
        // an assignment of one of them that commits first is seen; one that
        // commits after reads the new record (assign reads the version in
        // its transaction) and gets the new artifact from the start. Only a
        // device enrolled after this listing and assigned before the commit
        // slips through: its agent then sees a new artifact of the version
        // and takes it as any update, verified and staged.
        let ids: Vec<DeviceId> = self.devices()?.into_iter().map(|d| d.id).collect();
        let result = (&self.models, &self.devices).transaction(|(models, devices)| {
            let Some(raw) = models.get(&key)? else {
                return abort(RegistryError::UnknownVersion { name: name.to_owned(), version });
            };
            let mut v: ModelVersion = match decode(&key, &raw) {
                Ok(v) => v,
                Err(e) => return abort(e),
            };
            let all = v.targets.is_empty() && v.needs_compiling.is_none();
            let mut affected = Vec::new();
            for id in &ids {
                let Some(raw) = devices.get(id.as_str())? else { continue };
                let d: Device = match decode(id.as_str().as_bytes(), &raw) {
                    Ok(d) => d,
                    Err(e) => return abort(e),
                };
                if d.desired.get(name) == Some(&version) && (all || d.profile == profile) {
                    affected.push(d.id.as_str().to_owned());
                }
            }
            if !affected.is_empty() {
                return abort(RegistryError::CompiledInUse {
                    name: name.to_owned(),
                    version,
                    devices: affected.join(", "),
                });
            }
            v.targets.insert(profile.to_owned(), artifact.clone());
            models.insert(key.as_slice(), encode(&v))?;
            Ok(v)
        });
        let v = unwrap_tx(result)?;
        self.sync()?;
        Ok(v)
    }

    /// The devices assigned `name:version`.
    pub fn assigned(&self, name: &str, version: u32) -> Result<Vec<DeviceId>> {
        Ok(self.devices()?.into_iter().filter(|d| d.desired.get(name) == Some(&version)).map(|d| d.id).collect())
    }

    // ---- enrollment tokens ----

    /// Stores a token under the hash of its secret.
    pub fn add_token(&self, secret: &[u8; 16], token: &EnrollToken) -> Result<()> {
        self.tokens.insert(token_key(secret), encode(token))?;
        self.sync()
    }

    /// Consumes a token and creates the device, atomically: a token enrolls
    /// exactly one device, and a device exists only with a consumed token.
    pub fn enroll(
        &self,
        secret: &[u8; 16],
        id: DeviceId,
        cert_sha256: Sha256Digest,
        agent_version: &str,
        now: u64,
    ) -> Result<Device> {
        let tkey = token_key(secret);
        let result = (&self.tokens, &self.devices, &self.certs).transaction(|(tokens, devices, certs)| {
            let Some(raw) = tokens.get(tkey)? else {
                return abort(RegistryError::TokenUnknown);
            };
            let mut token: EnrollToken = match decode(b"token", &raw) {
                Ok(t) => t,
                Err(e) => return abort(e),
            };
            if let Some(by) = &token.used_by {
                return abort(RegistryError::TokenUsed(by.to_string()));
            }
            if now >= token.expires_at {
                return abort(RegistryError::TokenExpired(now - token.expires_at));
            }
            if devices.get(id.as_str())?.is_some() {
                return abort(RegistryError::DeviceExists(id.to_string()));
            }
            token.used_by = Some(id.clone());
            let device = Device {
                id: id.clone(),
                group: token.group.clone(),
                profile: token.profile.clone(),
                enrolled_at: now,
                cert_sha256,
                last_seen: Some(now),
                agent_version: Some(agent_version.to_owned()),
                desired: BTreeMap::new(),
                generation: 0,
                reported: Vec::new(),
                reported_generation: None,
                refused: None,
                capabilities: None,
                history: Vec::new(),
                traffic: Vec::new(),
                past: Some(Vec::new()),
                tags: Default::default(),
            };
            tokens.insert(&tkey, encode(&token))?;
            devices.insert(id.as_str(), encode(&device))?;
            certs.insert(&cert_sha256.0, id.as_str())?;
            Ok(device)
        });
        let device = unwrap_tx(result)?;
        self.sync()?;
        Ok(device)
    }

    /// Checks a token without consuming it (so a refused request costs nothing).
    pub fn check_token(&self, secret: &[u8; 16], now: u64) -> Result<EnrollToken> {
        let key = token_key(secret);
        let token: EnrollToken = match self.tokens.get(key)? {
            Some(raw) => decode(b"token", &raw)?,
            None => return Err(RegistryError::TokenUnknown),
        };
        if let Some(by) = &token.used_by {
            return Err(RegistryError::TokenUsed(by.to_string()));
        }
        if now >= token.expires_at {
            return Err(RegistryError::TokenExpired(now - token.expires_at));
        }
        Ok(token)
    }

    // ---- devices ----

    /// One device.
    pub fn device(&self, id: &str) -> Result<Device> {
        match self.devices.get(id)? {
            Some(v) => decode(id.as_bytes(), &v),
            None => Err(RegistryError::UnknownDevice(id.to_owned())),
        }
    }

    /// The device holding the certificate with this digest.
    pub fn device_by_cert(&self, cert_sha256: &Sha256Digest) -> Result<Option<Device>> {
        match self.certs.get(cert_sha256.0)? {
            Some(id) => self.device(&String::from_utf8_lossy(&id)).map(Some),
            None => Ok(None),
        }
    }

    /// The id of the removed device this certificate belonged to, if it did.
    pub fn revoked(&self, cert_sha256: &Sha256Digest) -> Result<Option<String>> {
        Ok(self.revoked.get(cert_sha256.0)?.map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    /// Removes a device: its record goes, and its certificate is refused from
    /// now on (the id may enroll again, with a new token and a new key).
    pub fn remove_device(&self, id: &str) -> Result<Device> {
        let result = (&self.devices, &self.certs, &self.revoked).transaction(|(devices, certs, revoked)| {
            let Some(raw) = devices.remove(id)? else {
                return abort(RegistryError::UnknownDevice(id.to_owned()));
            };
            let device: Device = match decode(id.as_bytes(), &raw) {
                Ok(d) => d,
                Err(e) => return abort(e),
            };
            certs.remove(&device.cert_sha256.0)?;
            revoked.insert(&device.cert_sha256.0, id)?;
            Ok(device)
        });
        let device = unwrap_tx(result)?;
        self.sync()?;
        Ok(device)
    }

    /// All devices, by id.
    pub fn devices(&self) -> Result<Vec<Device>> {
        self.devices
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Applies `f` to a device record atomically and stores the result.
    fn update_device(&self, id: &str, durable: bool, f: impl Fn(&mut Device) -> Result<()>) -> Result<Device> {
        loop {
            let old = self.devices.get(id)?.ok_or_else(|| RegistryError::UnknownDevice(id.to_owned()))?;
            let mut device: Device = decode(id.as_bytes(), &old)?;
            f(&mut device)?;
            if self.devices.compare_and_swap(id, Some(old), Some(encode(&device)))?.is_ok() {
                if durable {
                    self.sync()?;
                }
                return Ok(device);
            }
        }
    }

    /// Sets the version of `name` a device should serve. Only approved
    /// versions are accepted, and only in a format the device's agent said
    /// it runs (when it has said).
    pub fn assign(&self, id: &str, name: &str, version: u32) -> Result<Device> {
        // Version and device in one transaction: a rejection that commits
        // first is seen here, and one that commits after sees this device.
        self.version(name, version)?;
        let key = version_key(name, version);
        let result = (&self.models, &self.devices).transaction(|(models, devices)| {
            let Some(raw) = models.get(&key)? else {
                return abort(RegistryError::UnknownVersion { name: name.to_owned(), version });
            };
            let v: ModelVersion = match decode(&key, &raw) {
                Ok(v) => v,
                Err(e) => return abort(e),
            };
            if v.status != Approval::Approved {
                return abort(RegistryError::NotApproved { name: name.to_owned(), version, status: v.status });
            }
            let Some(raw) = devices.get(id)? else {
                return abort(RegistryError::UnknownDevice(id.to_owned()));
            };
            let mut d: Device = match decode(id.as_bytes(), &raw) {
                Ok(d) => d,
                Err(e) => return abort(e),
            };
            let (format, signature) = match v.artifact_for(&d.profile) {
                Ok(Artifact::Source) => (v.format, [&v.inputs, &v.outputs]),
                Ok(Artifact::Compiled(t)) => {
                    if let Some(why) = t.report.fit.as_ref().and_then(|f| f.refused.clone()) {
                        return abort(RegistryError::DoesNotFit {
                            name: name.to_owned(),
                            version,
                            profile: d.profile.clone(),
                            why,
                        });
                    }
                    (t.format, [&t.inputs, &t.outputs])
                }
                Err(e) => return abort(e),
            };
            if let Some(caps) = d.capabilities.as_ref().filter(|c| !c.formats.contains(&format)) {
                let runs: Vec<String> = caps.formats.iter().map(|f| f.to_string()).collect();
                return abort(RegistryError::Unsupported {
                    device: id.to_owned(),
                    name: name.to_owned(),
                    version,
                    format,
                    runs: if runs.is_empty() { "no format".into() } else { runs.join(", ") },
                });
            }
            // Only a device known to speak the version gets it: the
            // coordinator leaves a manifest an older session cannot name
            // out of the desired state, and the agent would unload the
            // model of that name.
            // A device that has not said (none since enrolling, or a
            // version-1 Hello) counts as version 1.
            let said = d.capabilities.as_ref().map(|c| c.wire_version);
            let wire = said.unwrap_or(tern_proto::WireVersion::V1.0);
            if let Some(spec) = signature.into_iter().flatten().find(|s| wire < s.dtype.since().0) {
                let session = match said {
                    Some(w) => format!(
                        "its last session spoke wire version {w}; upgrade its agent, or raise the coordinator's --max-wire-version"
                    ),
                    None => "its agent has not said which wire versions it speaks (it has not connected since it enrolled, or it speaks version 1); assign it once it has connected".into(),
                };
                return abort(RegistryError::WireTooOld {
                    device: id.to_owned(),
                    name: name.to_owned(),
                    version,
                    tensor: spec.to_string(),
                    session,
                    needs: spec.dtype.since().0,
                });
            }
            if wire == tern_proto::WireVersion::V4.0 && !v.plain_path_serves(&d.profile) {
                return abort(RegistryError::ProfilePathOnly {
                    device: id.to_owned(),
                    name: name.to_owned(),
                    version,
                    profile: d.profile.clone(),
                });
            }
            // The version it has already: no change, and no new generation
            // (a rollout's assignment carried out again after a restart).
            if d.desired.get(name) == Some(&version) {
                return Ok(d);
            }
            if let Some(before) = d.desired.insert(name.to_owned(), version) {
                d.remember(name, before);
            }
            d.next_generation();
            devices.insert(id, encode(&d))?;
            Ok(d)
        });
        let device = unwrap_tx(result)?;
        self.sync()?;
        Ok(device)
    }

    /// Stops a device from serving any version of `name`.
    pub fn unassign(&self, id: &str, name: &str) -> Result<Device> {
        self.update_device(id, true, |d| {
            let Some(before) = d.desired.remove(name) else {
                return Err(RegistryError::NotAssigned { device: id.to_owned(), model: name.to_owned() });
            };
            d.remember(name, before);
            d.next_generation();
            Ok(())
        })
    }

    /// Records that a device was heard from, with what it reported. Not
    /// fsynced: losing a heartbeat to a power cut is harmless.
    pub fn seen(&self, id: &str, now: u64, report: &Report) -> Result<Device> {
        self.update_device(id, false, |d| {
            d.last_seen = Some(now);
            if let Some(v) = &report.agent_version {
                // A Hello: it says what the agent can do now (nothing, from an
                // agent of wire version 1), whatever an earlier one said.
                d.agent_version = Some(v.clone());
                d.capabilities = report.capabilities.clone();
            }
            if let Some(r) = &report.models {
                d.reported = r.clone();
            }
            if let Some(g) = report.generation {
                d.reported_generation = Some(g);
            }
            if let Some(r) = &report.refused {
                d.refused = r.clone();
            }
            if let Some(t) = &report.traffic {
                d.merge_traffic(t);
            }
            // The agent sends its recent steps whole each time: each is kept once.
            for e in report.history.iter().flatten() {
                if !d.history.iter().rev().any(|h| h.event == *e) {
                    d.history.push(HistoryEntry { event: e.clone(), received_at: now });
                }
            }
            let excess = d.history.len().saturating_sub(MAX_DEVICE_HISTORY);
            d.history.drain(..excess);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::{LinkDay, ModelFormat};

    fn new_version(bytes: &[u8]) -> NewVersion {
        NewVersion {
            sha256: Sha256Digest::of(bytes),
            size: bytes.len() as u64,
            format: ModelFormat::Onnx,
            inputs: vec![],
            outputs: vec![],
            card: Some("# card".into()),
            meta: BTreeMap::from([("owner".into(), "ml-team".into())]),
            selftest: None,
            needs_compiling: None,
            compile_shapes: BTreeMap::new(),
            compile_consts: BTreeMap::new(),
            tolerance_ppm: None,
            baseline: None,
            baseline_full: None,
            now: 100,
        }
    }

    fn target(bytes: &[u8], refused: Option<&str>) -> crate::TargetArtifact {
        let fit = crate::Fit {
            peak_model_bytes: 600 << 20,
            process_peak_rss_bytes: 610 << 20,
            host_p99_us: 1000,
            speed_factor: 2.5,
            estimated_p99_us: 2500,
            max_model_memory_mb: Some(512),
            max_p99_ms: None,
            refused: refused.map(str::to_owned),
        };
        crate::TargetArtifact {
            sha256: Sha256Digest::of(bytes),
            size: bytes.len() as u64,
            format: ModelFormat::Nnef,
            inputs: vec![],
            outputs: vec![],
            selftest: None,
            compiled_at: 7,
            report: crate::CompileReport { fit: Some(fit), backend: "tract".into(), ..Default::default() },
            alternative: None,
        }
    }

    #[test]
    fn compiled_artifacts_go_to_their_profile_and_a_missing_or_misfit_one_is_refused() {
        let (_dir, r) = approved_and_assigned();
        // cam-1 is assigned the source: its artifact may not change under it.
        let e = r.set_target("iris", 1, "rpi4", target(b"nnef", None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "iris:1 is assigned to cam-1, whose artifact this would change; unassign it from them first, or register and compile a new version"
        );
        assert!(r.version("iris", 1).unwrap().targets.is_empty(), "nothing stored");
        r.unassign("cam-1", "iris").unwrap();
        r.set_target("iris", 1, "rpi4", target(b"nnef", None)).unwrap();
        r.assign("cam-1", "iris", 1).unwrap();
        let v = r.version("iris", 1).unwrap();
        let m = v.manifest_for("rpi4").unwrap();
        assert_eq!(
            (m.sha256, m.format, m.name.as_str(), m.version),
            (Sha256Digest::of(b"nnef"), ModelFormat::Nnef, "iris", 1)
        );
        assert!(m.files().any(|f| f == Sha256Digest::of(b"nnef")));
        // A device of a profile with none is refused, with what to run.
        r.add_token(&[9; 16], &EnrollToken { profile: "rpi5".into(), ..token(50) }).unwrap();
        r.enroll(&[9; 16], DeviceId::new("cam-9").unwrap(), Sha256Digest::of(b"cam-9"), "0.1", 1).unwrap();
        let e = r.assign("cam-9", "iris", 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "iris:1 has no artifact for profile \"rpi5\" (compiled for rpi4); run: tern compile iris:1 --target rpi5"
        );
        // One that does not fit is refused with the numbers; cam-9 has
        // nothing assigned, so storing it changes nothing it gets.
        let why = "it takes 600.0 MiB (measured), the profile allows 512 MiB for a model";
        r.set_target("iris", 1, "rpi5", target(b"big", Some(why))).unwrap();
        let e = r.assign("cam-9", "iris", 1).unwrap_err();
        assert_eq!(e.to_string(), format!("iris:1 does not fit profile \"rpi5\": {why}"));
        assert!(r.device("cam-9").unwrap().desired.is_empty());
        // A version only compiling makes runnable never goes out as source.
        let mut raw = new_version(b"raw");
        raw.needs_compiling = Some("raw tract refuses it".into());
        r.register("det", raw).unwrap();
        r.set_status("det", 1, Approval::Approved, 3, false).unwrap();
        let e = r.assign("cam-1", "det", 1).unwrap_err();
        assert!(
            e.to_string().starts_with("det:1 has no artifact for profile \"rpi4\" (compiled for no profile yet)"),
            "{e}"
        );
    }

    #[test]
    fn an_artifact_only_at_its_profiles_path_is_not_assigned_to_a_wire_4_agent() {
        let (_dir, r) = approved_and_assigned();
        r.unassign("cam-1", "iris").unwrap();
        r.set_target("iris", 1, "rpi4", target(b"nnef-a", None)).unwrap();
        let caps = |wire_version| crate::Capabilities {
            formats: vec![ModelFormat::Nnef, ModelFormat::Onnx],
            backends: vec![],
            wire_version,
        };
        let hello =
            |wire| Report { agent_version: Some("0.3".into()), capabilities: Some(caps(wire)), ..Report::default() };
        r.seen("cam-2", 5, &hello(4)).unwrap();
        // One profile: the artifact is listed at the plain path as well.
        assert!(r.version("iris", 1).unwrap().plain_path_serves("rpi4"));
        r.assign("cam-2", "iris", 1).unwrap();
        r.unassign("cam-2", "iris").unwrap();
        // Another profile's artifact differs: only the profile paths list
        // them, and a wire-4 agent (issue 15's) looks only at the plain one.
        r.set_target("iris", 1, "jetson-orin", target(b"nnef-b", None)).unwrap();
        assert!(!r.version("iris", 1).unwrap().plain_path_serves("rpi4"));
        let e = r.assign("cam-2", "iris", 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cam-2 cannot be sent iris:1: its rpi4 artifact differs from another profile's, so it is listed only at its profile's path, which an agent speaking wire version 4 does not look up; upgrade its agent"
        );
        assert!(!r.device("cam-2").unwrap().desired.contains_key("iris"));
        r.seen("cam-2", 6, &hello(5)).unwrap();
        r.assign("cam-2", "iris", 1).unwrap();
    }

    fn token(expires_at: u64) -> EnrollToken {
        EnrollToken { group: "lab".into(), profile: "rpi4".into(), created_at: 0, expires_at, used_by: None }
    }

    #[test]
    fn versions_count_up_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = Registry::open(dir.path()).unwrap();
            assert_eq!(r.register("iris", new_version(b"a")).unwrap().version, 1);
            assert_eq!(r.register("iris", new_version(b"b")).unwrap().version, 2);
            assert_eq!(r.register("iris-big", new_version(b"c")).unwrap().version, 1);
            assert_eq!(r.set_status("iris", 2, Approval::Approved, 5, false).unwrap().0.status, Approval::Approved);
        }
        // sled releases its file lock from a background thread shortly after
        // the last handle drops; wait for it rather than fail.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let r = loop {
            match Registry::open(dir.path()) {
                Ok(r) => break r,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopening the registry: {e}"),
            }
        };
        let vs = r.versions("iris").unwrap();
        assert_eq!(vs.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(vs[1].status, Approval::Approved);
        assert_eq!(r.all_versions().unwrap().len(), 3);
        assert_eq!(r.register("iris", new_version(b"d")).unwrap().version, 3);
        assert!(matches!(r.version("iris", 9), Err(RegistryError::UnknownVersion { .. })));
        assert!(matches!(r.version("nope", 1), Err(RegistryError::UnknownModel(_))));
    }

    #[test]
    fn token_enrolls_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path()).unwrap();
        let secret = [7u8; 16];
        r.add_token(&secret, &token(1000)).unwrap();
        let id = DeviceId::new("cam-1").unwrap();
        let d = r.enroll(&secret, id.clone(), Sha256Digest::of(b"cert"), "0.1", 10).unwrap();
        assert_eq!((d.group.as_str(), d.profile.as_str()), ("lab", "rpi4"));
        let again = r.enroll(&secret, DeviceId::new("cam-2").unwrap(), Sha256Digest::of(b"x"), "0.1", 11);
        assert_eq!(again.unwrap_err().to_string(), "enrollment token was already used (by device cam-1)");
        assert!(matches!(r.device("cam-2"), Err(RegistryError::UnknownDevice(_))));
        assert!(matches!(
            r.enroll(&[9; 16], DeviceId::new("cam-3").unwrap(), Sha256Digest::of(b"y"), "0.1", 11),
            Err(RegistryError::TokenUnknown)
        ));
        assert_eq!(r.device_by_cert(&Sha256Digest::of(b"cert")).unwrap().unwrap().id, id);
    }

    #[test]
    fn expired_token_is_refused_and_stays_unused() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path()).unwrap();
        r.add_token(&[1; 16], &token(50)).unwrap();
        let err = r.enroll(&[1; 16], DeviceId::new("cam-1").unwrap(), Sha256Digest::of(b"c"), "0.1", 80).unwrap_err();
        assert!(matches!(err, RegistryError::TokenExpired(30)), "{err}");
        assert!(r.devices().unwrap().is_empty());
    }

    #[test]
    fn only_approved_versions_are_assigned() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path()).unwrap();
        r.add_token(&[1; 16], &token(50)).unwrap();
        r.enroll(&[1; 16], DeviceId::new("cam-1").unwrap(), Sha256Digest::of(b"c"), "0.1", 1).unwrap();
        r.register("iris", new_version(b"a")).unwrap();
        let err = r.assign("cam-1", "iris", 1).unwrap_err();
        assert!(err.to_string().contains("iris:1 is pending, only approved versions can be deployed"), "{err}");
        assert_eq!(r.device("cam-1").unwrap().generation, 0);
        r.set_status("iris", 1, Approval::Approved, 2, false).unwrap();
        let d = r.assign("cam-1", "iris", 1).unwrap();
        assert_eq!((d.desired["iris"], d.generation), (1, 1));
        assert!(matches!(r.assign("cam-9", "iris", 1), Err(RegistryError::UnknownDevice(_))));
    }

    #[test]
    fn a_device_may_report_versions_it_was_given_and_its_own_only_while_the_registry_cannot_tell() {
        let (_dir, r) = approved_and_assigned();
        r.register("iris", new_version(b"b")).unwrap();
        r.set_status("iris", 2, Approval::Approved, 3, false).unwrap();
        let d = r.assign("cam-1", "iris", 2).unwrap();
        assert!(d.may_report("iris", 2) && d.may_report("iris", 1), "now and before");
        // It says it serves iris:7: not taken while the record can tell.
        let status = tern_proto::ModelStatus {
            name: "iris".into(),
            version: 7,
            state: tern_proto::ModelState::Serving,
            detail: None,
        };
        let report = Report { models: Some(vec![status]), generation: Some(d.generation), ..Report::default() };
        let d = r.seen("cam-1", 5, &report).unwrap();
        assert!(!d.may_report("iris", 7));
        // A record from before past assignments were kept, or one behind
        // the generation the device applied, takes its word.
        assert!(Device { past: None, ..d.clone() }.may_report("iris", 7));
        assert!(Device { reported_generation: Some(d.generation + 1), ..d.clone() }.may_report("iris", 7));
        // Unassigned: still among its past.
        let d = r.unassign("cam-1", "iris").unwrap();
        assert!(d.may_report("iris", 2) && !d.may_report("iris", 3));
    }

    #[test]
    fn traffic_reports_keep_the_larger_count_and_the_newest_two_days() {
        let (_dir, r) = approved_and_assigned();
        let day = |link: &str, day, sent, received| LinkDay { link: link.into(), day, sent, received };
        let seen = |days: Vec<LinkDay>| r.seen("cam-1", 1, &Report { traffic: Some(days), ..Report::default() });
        seen(vec![day("quic", 10, 500, 400), day("mqtt", 10, 900, 800)]).unwrap();
        // An older count of one link (it crossed a newer one) lowers nothing.
        let d = seen(vec![day("quic", 10, 300, 200)]).unwrap();
        assert_eq!(d.traffic, vec![day("quic", 10, 500, 400), day("mqtt", 10, 900, 800)]);
        let d = seen(vec![day("quic", 12, 5, 5)]).unwrap();
        assert_eq!(d.traffic, vec![day("quic", 12, 5, 5)], "day 10 is two days before the newest");
    }

    fn approved_and_assigned() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path()).unwrap();
        for (i, id) in ["cam-1", "cam-2"].iter().enumerate() {
            r.add_token(&[i as u8; 16], &token(50)).unwrap();
            r.enroll(&[i as u8; 16], DeviceId::new(*id).unwrap(), Sha256Digest::of(id.as_bytes()), "0.1", 1).unwrap();
        }
        r.register("iris", new_version(b"a")).unwrap();
        r.set_status("iris", 1, Approval::Approved, 2, false).unwrap();
        r.assign("cam-1", "iris", 1).unwrap();
        (dir, r)
    }

    #[test]
    fn rejecting_a_deployed_version_is_refused_unless_forced_which_unassigns_it() {
        let (_dir, r) = approved_and_assigned();
        let err = r.set_status("iris", 1, Approval::Rejected, 3, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "iris:1 is assigned to cam-1; unassign it first, or reject with --force to unassign it from them"
        );
        assert_eq!(r.version("iris", 1).unwrap().status, Approval::Approved, "nothing changed");
        assert_eq!(r.device("cam-1").unwrap().desired.len(), 1);
        let (v, changed) = r.set_status("iris", 1, Approval::Rejected, 3, true).unwrap();
        assert_eq!(v.status, Approval::Rejected);
        assert_eq!(changed.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["cam-1"]);
        let d = r.device("cam-1").unwrap();
        assert!(d.desired.is_empty());
        assert_eq!(d.generation, 2);
        assert!(r.assigned("iris", 1).unwrap().is_empty());
    }

    #[test]
    fn unassign_and_remove() {
        let (_dir, r) = approved_and_assigned();
        let d = r.unassign("cam-1", "iris").unwrap();
        assert!(d.desired.is_empty());
        assert_eq!(d.generation, 2);
        assert!(matches!(r.unassign("cam-1", "iris"), Err(RegistryError::NotAssigned { .. })));
        let cert = Sha256Digest::of(b"cam-2");
        assert!(r.device_by_cert(&cert).unwrap().is_some());
        r.remove_device("cam-2").unwrap();
        assert!(r.device_by_cert(&cert).unwrap().is_none());
        assert_eq!(r.revoked(&cert).unwrap().as_deref(), Some("cam-2"));
        assert!(matches!(r.device("cam-2"), Err(RegistryError::UnknownDevice(_))));
        assert!(matches!(r.remove_device("cam-2"), Err(RegistryError::UnknownDevice(_))));
    }

    #[test]
    fn after_a_restore_from_an_older_backup_a_change_goes_past_what_the_device_applied() {
        let (_dir, r) = approved_and_assigned();
        let g = r.device("cam-1").unwrap().generation;
        // The device applied a generation this registry never signed (it
        // was restored from a backup taken before).
        r.seen("cam-1", 5, &Report { generation: Some(g + 7), ..Report::default() }).unwrap();
        assert_eq!(r.unassign("cam-1", "iris").unwrap().generation, g + 8);
        assert_eq!(r.assign("cam-1", "iris", 1).unwrap().generation, g + 9);
    }

    #[test]
    fn a_device_is_assigned_only_formats_its_agent_runs() {
        let (_dir, r) = approved_and_assigned();
        let caps = crate::Capabilities { formats: vec![ModelFormat::Nnef], backends: vec![], wire_version: 2 };
        let hello = Report { agent_version: Some("0.2".into()), capabilities: Some(caps), ..Report::default() };
        r.seen("cam-2", 5, &hello).unwrap();
        r.seen("cam-2", 6, &Report { generation: Some(0), ..Report::default() }).unwrap();
        let err = r.assign("cam-2", "iris", 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cam-2's agent runs nnef; iris:1 is onnx (register its NNEF form, which every agent runs)"
        );
        assert_eq!(r.device("cam-2").unwrap().reported_generation, Some(0));
    }

    #[test]
    fn a_half_precision_model_is_assigned_only_to_a_device_known_to_speak_wire_version_5() {
        let (_dir, r) = approved_and_assigned();
        let half = tern_proto::TensorSpec { name: "x".into(), dtype: tern_proto::DType::F16, shape: vec![Some(4)] };
        let f32s = tern_proto::TensorSpec { name: "y".into(), dtype: tern_proto::DType::F32, shape: vec![Some(4)] };
        r.register("plain", NewVersion { outputs: vec![f32s.clone()], ..new_version(b"p") }).unwrap();
        r.set_status("plain", 1, Approval::Approved, 2, false).unwrap();
        r.assign("cam-2", "plain", 1).unwrap();
        r.register("half", NewVersion { inputs: vec![f32s], outputs: vec![half], ..new_version(b"h") }).unwrap();
        r.set_status("half", 1, Approval::Approved, 2, false).unwrap();
        let err = r.assign("cam-2", "half", 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cam-2 cannot be sent half:1: its tensor x: f16[4] needs wire version 5, and its agent has not said which wire versions it speaks (it has not connected since it enrolled, or it speaks version 1); assign it once it has connected"
        );
        let caps =
            |wire_version| crate::Capabilities { formats: vec![ModelFormat::Onnx], backends: vec![], wire_version };
        let hello =
            |wire| Report { agent_version: Some("0.3".into()), capabilities: Some(caps(wire)), ..Report::default() };
        r.seen("cam-2", 5, &hello(4)).unwrap();
        let err = r.assign("cam-2", "half", 1).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cam-2 cannot be sent half:1: its tensor x: f16[4] needs wire version 5, and its last session spoke wire version 4; upgrade its agent, or raise the coordinator's --max-wire-version"
        );
        // A version-1 Hello says nothing: unknown again.
        r.seen("cam-2", 6, &Report { agent_version: Some("0.1.0".into()), ..Report::default() }).unwrap();
        assert!(r.assign("cam-2", "half", 1).unwrap_err().to_string().contains("has not said"));
        assert!(!r.device("cam-2").unwrap().desired.contains_key("half"));
        r.seen("cam-2", 7, &hello(5)).unwrap();
        assert_eq!(r.assign("cam-2", "half", 1).unwrap().desired.get("half"), Some(&1));
    }

    #[test]
    fn device_records_of_the_first_release_still_read() {
        let old = r#"{"id":"cam-1","group":"lab","profile":"rpi4","enrolled_at":1,
            "cert_sha256":"0000000000000000000000000000000000000000000000000000000000000000",
            "last_seen":2,"agent_version":"0.1.0","desired":{"iris":1},"generation":1,"reported":[]}"#;
        let d: Device = serde_json::from_str(old).unwrap();
        assert_eq!((d.reported_generation, d.capabilities), (None, None));
    }
}

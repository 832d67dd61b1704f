//! What the agent keeps on disk: the slot pointers in sled, and artifacts in
//! a content-addressed folder (`partial/` while downloading, `models/` once
//! verified). Only verified artifacts ever appear under `models/`.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use tern_durable::{sync_dir, sync_sled};
use tern_proto::{ModelManifest, Sha256Digest};

const ACTIVE: &[u8] = b"slots/active";

/// The agent's durable state.
pub struct Store {
    root: PathBuf,
    db: sled::Db,
}

impl Store {
    /// Opens (creating) the store under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self> {
        let root = data_dir.to_path_buf();
        for sub in ["models", "partial"] {
            std::fs::create_dir_all(root.join(sub))
                .with_context(|| format!("creating {}", root.join(sub).display()))?;
        }
        // A small cache, and no background flusher waking every 500 ms:
        // every write that must last is flushed and fsynced by `set_active`.
        let db = sled::Config::new()
            .path(root.join("state"))
            .cache_capacity(1 << 20)
            .flush_every_ms(None)
            .open()
            .context("opening the agent state (sled)")?;
        Ok(Self { root, db })
    }

    /// The manifests that were serving when last persisted.
    pub fn active(&self) -> Result<Vec<ModelManifest>> {
        match self.db.get(ACTIVE)? {
            Some(raw) => serde_json::from_slice(&raw).context("agent state: active slots are corrupt"),
            None => Ok(Vec::new()),
        }
    }

    /// Persists the serving manifests, durably (sled's flush does not fsync).
    pub fn set_active(&self, active: &[ModelManifest]) -> Result<()> {
        self.db.insert(ACTIVE, serde_json::to_vec(active)?)?;
        sync_sled(&self.db, &self.root.join("state"))?;
        Ok(())
    }

    /// Where a verified artifact lives.
    pub fn model_path(&self, sha: &Sha256Digest) -> PathBuf {
        self.root.join("models").join(sha.to_hex())
    }

    /// Where a download in progress lives.
    pub fn partial_path(&self, sha: &Sha256Digest) -> PathBuf {
        self.root.join("partial").join(sha.to_hex())
    }

    /// Moves a fully downloaded file into `models/` if its digest matches;
    /// otherwise deletes it and says what arrived.
    pub fn promote(&self, sha: &Sha256Digest) -> Result<(), String> {
        let partial = self.partial_path(sha);
        let actual = digest_file(&partial).map_err(|e| format!("reading download: {e}"))?;
        if &actual != sha {
            let _ = std::fs::remove_file(&partial);
            return Err(format!("artifact corrupt: sha256 is {actual}, manifest says {sha}"));
        }
        let dest = self.model_path(sha);
        std::fs::rename(&partial, &dest).map_err(|e| format!("storing artifact: {e}"))?;
        sync_dir(dest.parent().expect("has parent")).map_err(|e| format!("storing artifact: {e}"))?;
        Ok(())
    }
}

/// SHA-256 of a file, streamed.
pub fn digest_file(path: &Path) -> std::io::Result<Sha256Digest> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Sha256Digest(h.finalize().into()))
}

use crate::{RegistryError, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use tern_durable::sync_dir;
use tern_proto::Sha256Digest;

/// A folder of artifacts named by the SHA-256 of their bytes. A file appears
/// under its final name only once complete and synced, so a crash leaves at
/// most a stray temporary file.
#[derive(Debug, Clone)]
pub struct Artifacts {
    root: PathBuf,
}

impl Artifacts {
    /// Opens (creating) the folder.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(root.join("sha256"))?;
        fs::create_dir_all(root.join("tmp"))?;
        Ok(Self { root })
    }

    /// Where the artifact with `digest` lives (whether or not it exists).
    pub fn path(&self, digest: &Sha256Digest) -> PathBuf {
        self.root.join("sha256").join(digest.to_hex())
    }

    /// Whether the artifact is stored.
    pub fn contains(&self, digest: &Sha256Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Size of a stored artifact.
    pub fn size(&self, digest: &Sha256Digest) -> Result<u64> {
        match fs::metadata(self.path(digest)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(RegistryError::UnknownArtifact(*digest)),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores `bytes`, checking them against `expected` first when given.
    /// Nothing is written when the digest does not match.
    pub fn put(&self, bytes: &[u8], expected: Option<Sha256Digest>) -> Result<Sha256Digest> {
        let actual = Sha256Digest(Sha256::digest(bytes).into());
        if let Some(expected) = expected
            && expected != actual
        {
            return Err(RegistryError::DigestMismatch { expected, actual });
        }
        let dest = self.path(&actual);
        if dest.is_file() {
            return Ok(actual);
        }
        let mut tmp = tempfile::NamedTempFile::new_in(self.root.join("tmp"))?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&dest).map_err(|e| e.error)?;
        sync_dir(dest.parent().expect("artifact path has a parent"))?;
        Ok(actual)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_is_content_addressed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let a = Artifacts::open(dir.path()).unwrap();
        let d = a.put(b"model bytes", None).unwrap();
        assert_eq!(d, Sha256Digest::of(b"model bytes"));
        assert_eq!(fs::read(a.path(&d)).unwrap(), b"model bytes");
        assert_eq!(a.put(b"model bytes", Some(d)).unwrap(), d);

        let err = a.put(b"model bytez", Some(d)).unwrap_err();
        assert!(err.to_string().starts_with("upload corrupted: sha256 is"), "{err}");
        // The stored artifact is untouched and nothing else was written.
        assert_eq!(fs::read(a.path(&d)).unwrap(), b"model bytes");
        assert_eq!(fs::read_dir(dir.path().join("sha256")).unwrap().count(), 1);
    }
}

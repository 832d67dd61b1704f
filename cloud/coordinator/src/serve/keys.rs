//! The coordinator's identity on disk: the fleet CA, the registry signing
//! key and the admin token, made on first start and reused after.

use anyhow::{Context, Result, bail};
use ring::rand::{SecureRandom, SystemRandom};
use std::path::Path;
use tern_durable::write_atomic;
use tern_net::FleetCa;
use tern_trust::SigningKey;

/// Everything secret the coordinator holds.
pub struct Keys {
    pub ca: FleetCa,
    pub signer: SigningKey,
    pub admin_token: String,
}

/// Reads `path`; makes it when it is missing and `may_create`. A key that
/// enrolled devices rely on is never made again: `may_create` is false once
/// the data dir has a registry, and a missing file is then an error that
/// names it.
fn read_or_create(
    path: &Path,
    secret: bool,
    may_create: bool,
    make: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_create => {
            let b = make()?;
            write_atomic(path, &b, secret).with_context(|| format!("writing {}", path.display()))?;
            Ok(b)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} is missing, but this data dir has a registry: enrolled devices trust the key it held. \
             Restore it from a backup; making a new one would orphan every device.",
            path.display()
        ),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Random bytes from the system.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new().fill(&mut b).expect("system random source");
    b
}

impl Keys {
    /// Loads the keys in `dir`. On a first start (`first`: no registry yet)
    /// the missing ones are made; after that only the admin token may be
    /// made again (nothing outside the data dir depends on it).
    pub fn load_or_create(dir: &Path, fleet: &str, first: bool) -> Result<Self> {
        let ca_key_path = dir.join("ca.key");
        let ca_cert_path = dir.join("ca.crt");
        if first && ca_key_path.exists() != ca_cert_path.exists() {
            bail!(
                "only one of {} and {} exists: restore both from a backup, or remove both to make a new fleet CA",
                ca_key_path.display(),
                ca_cert_path.display()
            );
        }
        let ca = if !ca_key_path.exists() && !ca_cert_path.exists() && first {
            let (ca, key) = FleetCa::generate(fleet)?;
            write_atomic(&ca_key_path, &key, true).context("writing ca.key")?;
            write_atomic(&ca_cert_path, ca.cert_der(), false).context("writing ca.crt")?;
            ca
        } else {
            let cert = read_or_create(&ca_cert_path, false, false, || unreachable!())?;
            let key = read_or_create(&ca_key_path, true, false, || unreachable!())?;
            FleetCa::load(&cert, &key).context("loading the fleet CA")?
        };
        let signer_der = read_or_create(&dir.join("registry.key"), true, first, || Ok(SigningKey::generate()?.1))?;
        let signer = SigningKey::from_pkcs8(&signer_der).context("loading registry.key")?;
        let token =
            read_or_create(&dir.join("admin.token"), true, true, || Ok(hex::encode(random::<32>()).into_bytes()))?;
        let admin_token = String::from_utf8(token).context("admin.token is not text")?.trim().to_owned();
        if admin_token.is_empty() {
            bail!(
                "{} is empty: put a token in it, or delete it to have a new one made",
                dir.join("admin.token").display()
            );
        }
        Ok(Self { ca, signer, admin_token })
    }
}

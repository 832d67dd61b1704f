//! The coordinator's identity on disk: the fleet CA, the registry signing
//! key and the admin token, made on first start and reused after.

use anyhow::{Context, Result};
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

fn read_or_create(path: &Path, secret: bool, make: impl FnOnce() -> Result<Vec<u8>>) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let b = make()?;
            write_atomic(path, &b, secret).with_context(|| format!("writing {}", path.display()))?;
            Ok(b)
        }
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
    /// Loads the keys in `dir`, creating any that are missing.
    pub fn load_or_create(dir: &Path, fleet: &str) -> Result<Self> {
        let ca_key_path = dir.join("ca.key");
        let ca_cert_path = dir.join("ca.crt");
        let ca = if ca_key_path.exists() && ca_cert_path.exists() {
            let cert = std::fs::read(&ca_cert_path).context("reading ca.crt")?;
            let key = std::fs::read(&ca_key_path).context("reading ca.key")?;
            FleetCa::load(&cert, &key).context("loading the fleet CA")?
        } else {
            let (ca, key) = FleetCa::generate(fleet)?;
            write_atomic(&ca_key_path, &key, true).context("writing ca.key")?;
            write_atomic(&ca_cert_path, ca.cert_der(), false).context("writing ca.crt")?;
            ca
        };
        let signer_der = read_or_create(&dir.join("registry.key"), true, || Ok(SigningKey::generate()?.1))?;
        let signer = SigningKey::from_pkcs8(&signer_der).context("loading registry.key")?;
        let token = read_or_create(&dir.join("admin.token"), true, || Ok(hex::encode(random::<32>()).into_bytes()))?;
        let admin_token = String::from_utf8(token).context("admin.token is not text")?.trim().to_owned();
        Ok(Self { ca, signer, admin_token })
    }
}

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// Why a textual id did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// A device id must be 1–64 characters of `a-z`, `0-9`, `-` and `_`.
    #[error("invalid device id {0:?}: use 1-64 characters of a-z, 0-9, '-' and '_'")]
    DeviceId(String),
    /// A model reference must read `NAME:VERSION` with a positive integer version.
    #[error("invalid model reference {0:?}: expected NAME:VERSION, e.g. iris:1")]
    ModelRef(String),
    /// A model name must be 1–64 characters of `a-z`, `A-Z`, `0-9`, `-`, `_` and `.`.
    #[error("invalid model name {0:?}: use 1-64 characters of letters, digits, '-', '_' and '.'")]
    ModelName(String),
    /// A digest must be 64 hexadecimal characters.
    #[error("invalid sha256 digest {0:?}: expected 64 hex characters")]
    Digest(String),
}

/// A device's identity in the fleet; also the common name of its certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct DeviceId(String);

impl DeviceId {
    /// Validates `s` as a device id.
    pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok { Ok(Self(s)) } else { Err(IdError::DeviceId(s)) }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        DeviceId::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DeviceId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        DeviceId::new(s)
    }
}

/// Checks a model name: 1–64 characters of letters, digits, `-`, `_` and `.`.
pub(crate) fn valid_model_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// `NAME:VERSION`, naming one registered version of a model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModelRef {
    /// The model's name.
    pub name: String,
    /// Its version, counting from 1.
    pub version: u32,
}

impl ModelRef {
    /// Validates the name and builds a reference.
    pub fn new(name: impl Into<String>, version: u32) -> Result<Self, IdError> {
        let name = name.into();
        if !valid_model_name(&name) {
            return Err(IdError::ModelName(name));
        }
        Ok(Self { name, version })
    }

    /// Checks a model name on its own.
    pub fn check_name(name: &str) -> Result<(), IdError> {
        if valid_model_name(name) { Ok(()) } else { Err(IdError::ModelName(name.to_owned())) }
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.version)
    }
}

impl FromStr for ModelRef {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let err = || IdError::ModelRef(s.to_owned());
        let (name, version) = s.rsplit_once(':').ok_or_else(err)?;
        let version: u32 = version.parse().map_err(|_| err())?;
        if version == 0 || !valid_model_name(name) {
            return Err(err());
        }
        Ok(Self { name: name.to_owned(), version })
    }
}

/// A SHA-256 digest: the address of an artifact. Hex in text and JSON, raw
/// bytes on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Digest(pub [u8; 32]);

impl Sha256Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Sha256Digest {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| IdError::Digest(s.to_owned()))?;
        Ok(Self(out))
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&self.to_hex()) } else { self.0.serialize(s) }
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(Self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ref_parses_and_rejects() {
        let r: ModelRef = "iris-mlp:12".parse().unwrap();
        assert_eq!((r.name.as_str(), r.version), ("iris-mlp", 12));
        assert_eq!(r.to_string(), "iris-mlp:12");
        for bad in ["iris", "iris:", ":3", "iris:0", "iris:-1", "ir is:1", "iris:1.5"] {
            assert!(bad.parse::<ModelRef>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn device_id_rules() {
        assert!(DeviceId::new("cam-0042").is_ok());
        assert!(DeviceId::new("").is_err());
        assert!(DeviceId::new("Cam").is_err());
        assert!(DeviceId::new("a/b").is_err());
        assert!(DeviceId::new("x".repeat(65)).is_err());
    }

    #[test]
    fn digest_hex_roundtrip() {
        let d = Sha256Digest::of(b"tern");
        assert_eq!(d.to_hex().parse::<Sha256Digest>().unwrap(), d);
        assert!("zz".parse::<Sha256Digest>().is_err());
    }
}

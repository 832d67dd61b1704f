//! Signing and verification of model manifests with the registry's Ed25519
//! key. The coordinator signs; the agent verifies with the public key it was
//! given at enrollment and refuses anything else. [`tuf`] holds the same
//! trust in TUF's format.

pub mod tuf;

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};
use tern_proto::{ManifestEncoding, ModelManifest, SignedManifest};

/// Why signing or verification failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// The stored private key is not a valid PKCS#8 Ed25519 key.
    #[error("registry signing key is malformed: {0}")]
    BadKey(String),
    /// The manifest was signed by a key other than the trusted one.
    #[error("manifest signed by unknown key {got} (trusted key is {want})")]
    UnknownKey {
        /// Key id in the manifest.
        got: String,
        /// Key id of the trusted key.
        want: String,
    },
    /// The signature does not match the manifest bytes.
    #[error("manifest signature is invalid")]
    BadSignature,
    /// The signed bytes are not a manifest.
    #[error("signed manifest body is malformed: {0}")]
    Malformed(String),
    /// The manifest cannot be encoded for signing in the requested encoding.
    #[error("cannot sign manifest: {0}")]
    Encode(String),
    /// The random number generator failed.
    #[error("cannot generate a key: system random source failed")]
    Rng,
}

/// The registry's private signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl SigningKey {
    /// Generates a new key; returns it with its PKCS#8 encoding for storage.
    pub fn generate() -> Result<(Self, Vec<u8>), TrustError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| TrustError::Rng)?;
        let key = Self::from_pkcs8(pkcs8.as_ref())?;
        Ok((key, pkcs8.as_ref().to_vec()))
    }

    /// Loads a key from its PKCS#8 encoding.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, TrustError> {
        Ed25519KeyPair::from_pkcs8(der).map(|pair| Self { pair }).map_err(|e| TrustError::BadKey(e.to_string()))
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey(k)
    }

    /// Signs raw bytes (TUF metadata's canonical form).
    pub fn sign_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        self.pair.sign(bytes).as_ref().to_vec()
    }

    /// Signs `manifest` encoded as `encoding` (postcard for agents that speak
    /// wire version 1, canonical JSON otherwise).
    pub fn sign(&self, manifest: &ModelManifest, encoding: ManifestEncoding) -> Result<SignedManifest, TrustError> {
        let body = manifest.signed_bytes(encoding).map_err(|e| TrustError::Encode(e.to_string()))?;
        let signature = self.pair.sign(&body).as_ref().to_vec();
        Ok(SignedManifest { encoding, body, key_id: self.verifying_key().key_id(), signature })
    }
}

/// A public key trusted to sign manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyingKey(pub [u8; 32]);

impl VerifyingKey {
    /// First 8 bytes of the SHA-256 of the key, which manifests carry.
    pub fn key_id(&self) -> [u8; 8] {
        let d = Sha256::digest(self.0);
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        id
    }

    /// Checks the signature over the exact signed bytes, then decodes them.
    pub fn verify(&self, signed: &SignedManifest) -> Result<ModelManifest, TrustError> {
        if signed.key_id != self.key_id() {
            return Err(TrustError::UnknownKey { got: hex(&signed.key_id), want: hex(&self.key_id()) });
        }
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&signed.body, &signed.signature)
            .map_err(|_| TrustError::BadSignature)?;
        ModelManifest::from_signed_bytes(&signed.body, signed.encoding)
            .map_err(|e| TrustError::Malformed(e.to_string()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tern_proto::{DType, ModelFormat, Sha256Digest, TensorSpec};

    fn manifest() -> ModelManifest {
        ModelManifest {
            name: "iris".into(),
            version: 3,
            sha256: Sha256Digest::of(b"model"),
            size: 5,
            format: ModelFormat::Onnx,
            inputs: vec![TensorSpec { name: "X".into(), dtype: DType::F32, shape: vec![None, Some(4)] }],
            outputs: vec![],
            created_at: 1_700_000_000,
            selftest: None,
            update: None,
        }
    }

    const BOTH: [ManifestEncoding; 2] = [ManifestEncoding::Postcard, ManifestEncoding::CanonicalJson];

    #[test]
    fn sign_then_verify() {
        let (key, pkcs8) = SigningKey::generate().unwrap();
        let again = SigningKey::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(key.verifying_key(), again.verifying_key());
        for encoding in BOTH {
            let signed = key.sign(&manifest(), encoding).unwrap();
            assert_eq!(again.verifying_key().verify(&signed).unwrap(), manifest());
        }
    }

    #[test]
    fn the_encoding_is_part_of_what_verifies() {
        // Bytes signed as one encoding and presented as the other do not
        // decode to a manifest, even though the signature is good.
        let (key, _) = SigningKey::generate().unwrap();
        let mut signed = key.sign(&manifest(), ManifestEncoding::CanonicalJson).unwrap();
        signed.encoding = ManifestEncoding::Postcard;
        assert!(matches!(key.verifying_key().verify(&signed), Err(TrustError::Malformed(_))));
    }

    #[test]
    fn other_key_is_refused() {
        let (a, _) = SigningKey::generate().unwrap();
        let (b, _) = SigningKey::generate().unwrap();
        let signed = a.sign(&manifest(), ManifestEncoding::CanonicalJson).unwrap();
        let err = b.verifying_key().verify(&signed).unwrap_err();
        assert!(matches!(err, TrustError::UnknownKey { .. }), "{err}");
        // Even with the key id forged to match, the signature does not verify.
        let mut forged = signed;
        forged.key_id = b.verifying_key().key_id();
        assert_eq!(b.verifying_key().verify(&forged), Err(TrustError::BadSignature));
    }

    #[test]
    fn malformed_key_is_refused() {
        assert!(matches!(SigningKey::from_pkcs8(b"not a key"), Err(TrustError::BadKey(_))));
    }

    proptest! {
        #[test]
        fn any_tampering_is_detected(idx in any::<prop::sample::Index>(), flip in 1u8..=255, json in any::<bool>()) {
            let (key, _) = SigningKey::generate().unwrap();
            let encoding = if json { ManifestEncoding::CanonicalJson } else { ManifestEncoding::Postcard };
            let mut signed = key.sign(&manifest(), encoding).unwrap();
            let total = signed.body.len() + signed.signature.len();
            let i = idx.index(total);
            if i < signed.body.len() { signed.body[i] ^= flip } else { signed.signature[i - signed.body.len()] ^= flip }
            prop_assert_eq!(key.verifying_key().verify(&signed), Err(TrustError::BadSignature));
        }
    }
}

//! Signing and verification of model manifests with the registry's Ed25519
//! key. The coordinator signs; the agent verifies with the public key it was
//! given at enrollment and refuses anything else. [`tuf`] holds the same
//! trust in TUF's format.

pub mod tuf;

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};
use tern_proto::{DesiredState, DeviceId, ManifestEncoding, ModelManifest, SignedManifest};

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
    /// A desired state's signature is not the registry key's over the
    /// statement for this device and generation.
    #[error("desired state signature is invalid (not signed for this device and generation by the registry key)")]
    BadStateSignature,
    /// A TUF root's introduction is not signed by the registry key.
    #[error("TUF root 1 is not introduced by the registry key")]
    BadRootIntro,
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

    /// Signs `state` for `device` (wire version 4's [`tern_proto::SignedDesired`]).
    pub fn sign_state(&self, device: &DeviceId, state: &DesiredState) -> Vec<u8> {
        self.sign_bytes(&state.statement(device))
    }

    /// Introduces TUF root 1 to agents that trust only this key.
    pub fn sign_root_intro(&self, root: &[u8]) -> Vec<u8> {
        self.sign_bytes(&tern_proto::root_intro_statement(root))
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

    /// Checks that `signature` is this key's over `state` for `device`.
    pub fn verify_state(&self, device: &DeviceId, state: &DesiredState, signature: &[u8]) -> Result<(), TrustError> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&state.statement(device), signature)
            .map_err(|_| TrustError::BadStateSignature)
    }

    /// Checks that `signature` introduces `root` (see [`SigningKey::sign_root_intro`]).
    pub fn verify_root_intro(&self, root: &[u8], signature: &[u8]) -> Result<(), TrustError> {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&tern_proto::root_intro_statement(root), signature)
            .map_err(|_| TrustError::BadRootIntro)
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
            alternative: None,
            baseline: None,
            capture: None,
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
    fn a_state_verifies_only_for_its_device_generation_and_manifests() {
        let (key, _) = SigningKey::generate().unwrap();
        let vk = key.verifying_key();
        let dev: DeviceId = "cam-1".parse().unwrap();
        let m = key.sign(&manifest(), ManifestEncoding::CanonicalJson).unwrap();
        let state = DesiredState { generation: 7, models: vec![m.clone()] };
        let sig = key.sign_state(&dev, &state);
        assert_eq!(vk.verify_state(&dev, &state, &sig), Ok(()));
        let other: DeviceId = "cam-2".parse().unwrap();
        assert_eq!(vk.verify_state(&other, &state, &sig), Err(TrustError::BadStateSignature));
        let older = DesiredState { generation: 6, ..state.clone() };
        assert_eq!(vk.verify_state(&dev, &older, &sig), Err(TrustError::BadStateSignature));
        let empty = DesiredState { generation: 7, models: vec![] };
        assert_eq!(vk.verify_state(&dev, &empty, &sig), Err(TrustError::BadStateSignature));
        let mut swapped = state.clone();
        swapped.models[0].body.push(b' ');
        assert_eq!(vk.verify_state(&dev, &swapped, &sig), Err(TrustError::BadStateSignature));
        // A manifest signature is not a state signature, nor the reverse.
        assert_eq!(vk.verify_state(&dev, &state, &m.signature), Err(TrustError::BadStateSignature));
        let intro = key.sign_root_intro(b"{root}");
        assert_eq!(vk.verify_root_intro(b"{root}", &intro), Ok(()));
        assert_eq!(vk.verify_root_intro(b"{root2}", &intro), Err(TrustError::BadRootIntro));
        assert_eq!(vk.verify_state(&dev, &state, &intro), Err(TrustError::BadStateSignature));
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

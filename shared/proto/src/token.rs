//! The enrollment token a person copies from `tern fleet token` to a device.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "tern1_";

/// Why a token string is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The text is not a Tern enrollment token at all.
    #[error("malformed enrollment token: {0}")]
    Malformed(String),
}

/// What an enrollment token carries: a one-time secret, and the SHA-256 of
/// the fleet CA certificate, so the device can tell the real coordinator
/// from anyone else before it sends anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollTokenText {
    /// The one-time secret; the coordinator stores only its hash.
    pub secret: [u8; 16],
    /// SHA-256 of the fleet CA certificate (DER).
    pub ca_sha256: [u8; 32],
    /// Expiry (Unix seconds), so a device can refuse early with a clear message.
    pub expires_at: u64,
}

impl EnrollTokenText {
    /// `tern1_` followed by unpadded base64url of the postcard encoding.
    pub fn encode(&self) -> String {
        let bytes = postcard::to_allocvec(self).expect("token encodes");
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// Parses a token, ignoring surrounding whitespace.
    pub fn decode(text: &str) -> Result<Self, TokenError> {
        let text = text.trim();
        let body = text
            .strip_prefix(PREFIX)
            .ok_or_else(|| TokenError::Malformed(format!("expected it to start with {PREFIX:?}")))?;
        let bytes = URL_SAFE_NO_PAD.decode(body).map_err(|e| TokenError::Malformed(format!("not base64url: {e}")))?;
        let (token, rest) = postcard::take_from_bytes::<Self>(&bytes)
            .map_err(|e| TokenError::Malformed(format!("truncated or altered ({e})")))?;
        if !rest.is_empty() {
            return Err(TokenError::Malformed("trailing bytes".into()));
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(secret in any::<[u8; 16]>(), ca in any::<[u8; 32]>(), exp in any::<u64>()) {
            let t = EnrollTokenText { secret, ca_sha256: ca, expires_at: exp };
            prop_assert_eq!(EnrollTokenText::decode(&format!(" {}\n", t.encode())).unwrap(), t);
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,200}") {
            let _ = EnrollTokenText::decode(&s);
            let _ = EnrollTokenText::decode(&format!("tern1_{s}"));
        }
    }

    #[test]
    fn bad_tokens_say_why() {
        assert!(EnrollTokenText::decode("hello").unwrap_err().to_string().contains("start with"));
        assert!(EnrollTokenText::decode("tern1_!!").unwrap_err().to_string().contains("base64"));
        assert!(EnrollTokenText::decode("tern1_AAAA").unwrap_err().to_string().contains("truncated"));
    }
}

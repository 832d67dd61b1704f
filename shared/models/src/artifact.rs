//! `.tbm`: `"TBM" | version u8 | header length u32 LE | postcard(Family) | burnpack record`.

use burn::store::ModuleRecord;
use burn::tensor::{Bytes, Device};

use crate::families::{BuiltIn, Family, SpecError};

/// First bytes of every built-in model artifact.
pub const MAGIC: &[u8; 3] = b"TBM";
const VERSION: u8 = 1;
const MAX_HEADER: usize = 64 * 1024;

/// Why bytes are not a loadable built-in model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArtifactError {
    /// The bytes do not start with [`MAGIC`].
    #[error("not a Tern built-in model (no \"TBM\" magic)")]
    Magic,
    /// A format version this build does not read.
    #[error("built-in model format version {0}; this build reads version {VERSION}")]
    Version(u8),
    /// The header is cut short, too long or not a family description.
    #[error("bad built-in model header: {0}")]
    Header(String),
    /// The family's shape is out of bounds.
    #[error("bad model shape: {0}")]
    Spec(#[from] SpecError),
    /// The weights are unreadable or do not fit the family's shape.
    #[error("bad weights: {0}")]
    Weights(String),
}

/// A built-in model with the family description it was built from.
#[derive(Debug)]
pub struct Artifact {
    /// Family and shape.
    pub family: Family,
    /// The module with its weights.
    pub model: BuiltIn,
}

impl Artifact {
    /// Serializes the family and the model's weights.
    pub fn encode(family: &Family, model: BuiltIn) -> Result<Vec<u8>, ArtifactError> {
        let header = postcard::to_allocvec(family).map_err(|e| ArtifactError::Header(e.to_string()))?;
        let record = model.into_record().into_bytes().map_err(|e| ArtifactError::Weights(e.to_string()))?;
        let mut out = Vec::with_capacity(8 + header.len() + record.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&record);
        Ok(out)
    }

    /// Reads the family and weights, checking the shape before allocating
    /// the model and every weight tensor against it. The artifact's buffer
    /// becomes the weights' buffer (no copy of it is made), and it is freed
    /// once the model holds its weights.
    pub fn decode(bytes: impl Into<Vec<u8>>, device: &Device) -> Result<Self, ArtifactError> {
        let mut bytes = bytes.into();
        let (family, header_len) = split(&bytes)?;
        bytes.drain(..header_len);
        let record = ModuleRecord::from_bytes(Bytes::from_bytes_vec(bytes))
            .map_err(|e| ArtifactError::Weights(e.to_string()))?;
        if record.len() != family.layers().len() * 2 {
            return Err(ArtifactError::Weights(format!(
                "{} tensors for {} layers with biases",
                record.len(),
                family.layers().len()
            )));
        }
        let model = BuiltIn::zeroed(&family, device)?.load_record(record).map_err(ArtifactError::Weights)?;
        Ok(Artifact { family, model })
    }

    /// Reads only the family description.
    pub fn family(bytes: &[u8]) -> Result<Family, ArtifactError> {
        Ok(split(bytes)?.0)
    }
}

/// The checked family, and where the weights start.
fn split(bytes: &[u8]) -> Result<(Family, usize), ArtifactError> {
    if !bytes.starts_with(MAGIC) {
        return Err(ArtifactError::Magic);
    }
    let Some(&[version, a, b, c, d]) = bytes.get(3..8).map(|s| <&[u8; 5]>::try_from(s).expect("5 bytes")) else {
        return Err(ArtifactError::Header("cut short".into()));
    };
    if version != VERSION {
        return Err(ArtifactError::Version(version));
    }
    let len = u32::from_le_bytes([a, b, c, d]) as usize;
    if len > MAX_HEADER || bytes.len() < 8 + len {
        return Err(ArtifactError::Header(format!("header of {len} bytes in an artifact of {}", bytes.len())));
    }
    let family: Family = postcard::from_bytes(&bytes[8..8 + len]).map_err(|e| ArtifactError::Header(e.to_string()))?;
    family.validate()?;
    Ok((family, 8 + len))
}

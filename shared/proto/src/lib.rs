//! Tern's wire protocol: the messages agents and the coordinator exchange, the
//! ids and model manifest they carry, and the versioned, length-prefixed frame
//! codec that encodes them with postcard. Pure data and codecs; no I/O.

mod frame;
mod ids;
mod manifest;
mod msg;
mod tensor;
mod token;

pub use frame::{
    FrameDecoder, FrameError, FrameHeader, HEADER_LEN, MAGIC, MAX_FRAME_LEN, decode_frame, decode_payload, encode_frame,
};
pub use ids::{DeviceId, IdError, ModelRef, Sha256Digest};
pub use manifest::{DType, ModelFormat, ModelManifest, SignedManifest, TensorSpec};
pub use msg::{
    ArtifactHeader, DesiredState, EnrollRequest, EnrollResponse, ErrorCode, FetchArtifact, Hello, Message, ModelState,
    ModelStatus, StatusReport, Welcome, WireError,
};
pub use tensor::{TENSORS_MEDIA_TYPE, Tensor, TensorData, decode_tensors, encode_tensors};
pub use token::{EnrollTokenText, TokenError};

/// The version of the wire protocol, carried in every frame header.
///
/// A peer refuses frames of a version it does not speak; the number changes
/// whenever the encoding of any [`Message`] changes incompatibly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WireVersion(pub u16);

impl WireVersion {
    /// The version this build speaks.
    pub const CURRENT: WireVersion = WireVersion(1);
}

impl std::fmt::Display for WireVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// The QUIC application protocol name (ALPN) of wire version 1.
pub const ALPN: &[u8] = b"tern/1";

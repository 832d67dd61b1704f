//! Frames: `MAGIC (2) | wire version (u16 LE) | payload length (u32 LE) | postcard payload`.

use crate::WireVersion;
use crate::msg::Message;

/// The two bytes every frame starts with.
pub const MAGIC: [u8; 2] = *b"TN";
/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 8;
/// The largest payload any peer accepts (1 MiB). Artifacts travel as raw
/// stream bytes after an [`crate::ArtifactHeader`], never inside a frame.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Why bytes did not make a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first two bytes are not [`MAGIC`]: the peer does not speak Tern.
    #[error("not a Tern frame (bad magic {0:02x?})")]
    BadMagic([u8; 2]),
    /// The frame is of a wire version this build does not speak.
    #[error("unsupported wire version {got} (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version in the frame.
        got: WireVersion,
        /// Version of this build.
        supported: WireVersion,
    },
    /// The declared payload length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The payload is not a valid postcard [`Message`].
    #[error("malformed frame payload: {0}")]
    Payload(String),
    /// A message could not be encoded (it exceeds the limit, usually).
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Wire version of the frame.
    pub version: WireVersion,
    /// Payload length that follows the header.
    pub len: usize,
}

impl FrameHeader {
    /// Parses and checks a header against the current version and `max`.
    pub fn parse(bytes: &[u8; HEADER_LEN], max: usize) -> Result<Self, FrameError> {
        let magic = [bytes[0], bytes[1]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = WireVersion(u16::from_le_bytes([bytes[2], bytes[3]]));
        if version != WireVersion::CURRENT {
            return Err(FrameError::UnsupportedVersion { got: version, supported: WireVersion::CURRENT });
        }
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(Self { version, len })
    }
}

/// Encodes `msg` as one frame of the current wire version.
pub fn encode_frame(msg: &Message) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&WireVersion::CURRENT.0.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let out = postcard::to_extend(msg, out).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::Encode(format!(
            "{} message of {len} bytes exceeds the frame limit of {MAX_FRAME_LEN} bytes",
            msg.kind()
        )));
    }
    let mut out = out;
    out[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Decodes a payload that a header announced.
pub fn decode_payload(payload: &[u8]) -> Result<Message, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(|e| FrameError::Payload(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Payload(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

/// Decodes one frame from the start of `bytes`. `Ok(None)` means more bytes
/// are needed; otherwise returns the message and how many bytes it used.
pub fn decode_frame(bytes: &[u8], max: usize) -> Result<Option<(Message, usize)>, FrameError> {
    let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::parse(head, max)?;
    let end = HEADER_LEN + header.len;
    if bytes.len() < end {
        return Ok(None);
    }
    Ok(Some((decode_payload(&bytes[HEADER_LEN..end])?, end)))
}

/// Incremental decoder for a byte stream that arrives in arbitrary pieces.
///
/// After an error the stream is out of sync, so the decoder keeps returning
/// that error: the caller must close the stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder that refuses payloads above `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { buf: Vec::new(), max, failed: None }
    }

    /// Appends bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one is buffered.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match decode_frame(&self.buf, self.max) {
            Ok(Some((msg, used))) => {
                self.buf.drain(..used);
                Ok(Some(msg))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                Err(e)
            }
        }
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    fn sample() -> Message {
        Message::FetchArtifact(FetchArtifact { sha256: Sha256Digest::of(b"x"), offset: 7 })
    }

    #[test]
    fn header_layout_is_stable() {
        let f = encode_frame(&sample()).unwrap();
        assert_eq!(&f[..2], b"TN");
        assert_eq!(u16::from_le_bytes([f[2], f[3]]), 1);
        assert_eq!(u32::from_le_bytes([f[4], f[5], f[6], f[7]]) as usize, f.len() - HEADER_LEN);
    }

    #[test]
    fn oversize_frame_is_refused_before_reading_payload() {
        let mut f = encode_frame(&sample()).unwrap();
        f[4..8].copy_from_slice(&(MAX_FRAME_LEN as u32 + 1).to_le_bytes());
        let err = decode_frame(&f[..HEADER_LEN], MAX_FRAME_LEN).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len: MAX_FRAME_LEN + 1, max: MAX_FRAME_LEN });
        assert!(err.to_string().contains("exceeds the limit"));
    }

    #[test]
    fn oversize_message_is_refused_at_encode() {
        let big = Message::Error(WireError::new(ErrorCode::Internal, "x".repeat(MAX_FRAME_LEN)));
        assert!(matches!(encode_frame(&big), Err(FrameError::Encode(_))));
    }

    #[test]
    fn other_version_and_magic_are_refused() {
        let mut f = encode_frame(&sample()).unwrap();
        f[2] = 9;
        assert!(matches!(
            decode_frame(&f, MAX_FRAME_LEN),
            Err(FrameError::UnsupportedVersion { got: WireVersion(9), .. })
        ));
        f[0] = b'X';
        assert!(matches!(decode_frame(&f, MAX_FRAME_LEN), Err(FrameError::BadMagic(_))));
    }

    #[test]
    fn trailing_payload_bytes_are_refused() {
        let mut f = encode_frame(&sample()).unwrap();
        f.push(0);
        let len = (f.len() - HEADER_LEN) as u32;
        f[4..8].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(decode_frame(&f, MAX_FRAME_LEN), Err(FrameError::Payload(_))));
    }

    #[test]
    fn decoder_stays_failed_after_garbage() {
        let mut d = FrameDecoder::new(MAX_FRAME_LEN);
        d.push(b"GARBAGE!");
        assert!(d.next_message().is_err());
        d.push(&encode_frame(&sample()).unwrap());
        assert!(d.next_message().is_err());
    }
}

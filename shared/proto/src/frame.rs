//! Frames: `MAGIC (2) | wire version (u16 LE) | payload length (u32 LE) | postcard payload`.
//! The payload is the postcard encoding of the message set of that version:
//! [`crate::v1::Message`] for version 1, [`Message`] for the current one.

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
    /// The frame is of another wire version than the one the connection
    /// negotiated.
    #[error("frame of wire version {got} on a {session} connection")]
    WrongVersion {
        /// Version in the frame.
        got: WireVersion,
        /// The connection's version.
        session: WireVersion,
    },
    /// A version this build does not speak was asked for.
    #[error("wire version {0} is not one this build speaks")]
    UnsupportedVersion(WireVersion),
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
    /// Parses and checks a header against the connection's `version` and `max`.
    pub fn parse(bytes: &[u8; HEADER_LEN], max: usize, session: WireVersion) -> Result<Self, FrameError> {
        let magic = [bytes[0], bytes[1]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let version = WireVersion(u16::from_le_bytes([bytes[2], bytes[3]]));
        if version != session {
            return Err(FrameError::WrongVersion { got: version, session });
        }
        let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(Self { version, len })
    }
}

/// Encodes `msg` as one frame of wire `version`.
pub fn encode_frame(msg: &Message, version: WireVersion) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.0.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let encoded = match version {
        WireVersion::V1 => {
            let old = crate::v1::Message::try_from(msg).map_err(FrameError::Encode)?;
            postcard::to_extend(&old, out)
        }
        v if v.is_supported() && msg.since() > v => {
            return Err(FrameError::Encode(format!("{} is not in wire {v}", msg.kind())));
        }
        v if v.is_supported() => postcard::to_extend(msg, out),
        other => return Err(FrameError::UnsupportedVersion(other)),
    };
    let out = encoded.map_err(|e| FrameError::Encode(e.to_string()))?;
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

fn take<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(|e| FrameError::Payload(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Payload(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}

/// Decodes a payload of wire `version` that a header announced.
pub fn decode_payload(payload: &[u8], version: WireVersion) -> Result<Message, FrameError> {
    match version {
        WireVersion::V1 => Ok(take::<crate::v1::Message>(payload)?.into()),
        v if v.is_supported() => {
            let msg: Message = take(payload)?;
            if msg.since() > version {
                return Err(FrameError::Payload(format!("{} is not in wire {version}", msg.kind())));
            }
            Ok(msg)
        }
        other => Err(FrameError::UnsupportedVersion(other)),
    }
}

/// Decodes one frame of wire `version` from the start of `bytes`.
/// `Ok(None)` means more bytes are needed; otherwise returns the message and
/// how many bytes it used.
pub fn decode_frame(bytes: &[u8], max: usize, version: WireVersion) -> Result<Option<(Message, usize)>, FrameError> {
    let Some(head) = bytes.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::parse(head, max, version)?;
    let end = HEADER_LEN + header.len;
    if bytes.len() < end {
        return Ok(None);
    }
    Ok(Some((decode_payload(&bytes[HEADER_LEN..end], version)?, end)))
}

/// Incremental decoder for a byte stream that arrives in arbitrary pieces.
/// It keeps what it was given, so a reader built on it loses nothing when a
/// read is cancelled; [`FrameDecoder::want`] says how many bytes complete
/// the frame in progress, so a reader that reads at most that much never
/// holds more than one frame, nor reads past it into raw bytes that follow.
///
/// After an error the stream is out of sync, so the decoder keeps returning
/// that error: the caller must close the stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
    version: WireVersion,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder of wire `version` frames that refuses payloads above `max` bytes.
    pub fn new(max: usize, version: WireVersion) -> Self {
        Self { buf: Vec::new(), max, version, failed: None }
    }

    /// Appends bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// How many more bytes complete the frame in progress (the header first,
    /// then the payload it announces); 0 once a whole frame is buffered or
    /// the stream failed.
    pub fn want(&self) -> usize {
        if self.failed.is_some() {
            return 0;
        }
        let Some(head) = self.buf.first_chunk::<HEADER_LEN>() else {
            return HEADER_LEN - self.buf.len();
        };
        match FrameHeader::parse(head, self.max, self.version) {
            Ok(h) => (HEADER_LEN + h.len).saturating_sub(self.buf.len()),
            Err(_) => 0,
        }
    }

    /// The next complete message, if one is buffered.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match decode_frame(&self.buf, self.max, self.version) {
            Ok(Some((msg, used))) => {
                self.buf.drain(..used);
                // A large frame's buffer is not kept for the life of the stream.
                if self.buf.is_empty() && self.buf.capacity() > 64 << 10 {
                    self.buf = Vec::new();
                }
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

    const V: WireVersion = WireVersion::CURRENT;

    fn sample() -> Message {
        Message::FetchArtifact(FetchArtifact { sha256: Sha256Digest::of(b"x"), offset: 7 })
    }

    #[test]
    fn header_layout_is_stable() {
        for v in WireVersion::SUPPORTED {
            let f = encode_frame(&sample(), *v).unwrap();
            assert_eq!(&f[..2], b"TN");
            assert_eq!(u16::from_le_bytes([f[2], f[3]]), v.0);
            assert_eq!(u32::from_le_bytes([f[4], f[5], f[6], f[7]]) as usize, f.len() - HEADER_LEN);
        }
    }

    #[test]
    fn oversize_frame_is_refused_before_reading_payload() {
        let mut f = encode_frame(&sample(), V).unwrap();
        f[4..8].copy_from_slice(&(MAX_FRAME_LEN as u32 + 1).to_le_bytes());
        let err = decode_frame(&f[..HEADER_LEN], MAX_FRAME_LEN, V).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len: MAX_FRAME_LEN + 1, max: MAX_FRAME_LEN });
        assert!(err.to_string().contains("exceeds the limit"));
    }

    #[test]
    fn oversize_message_is_refused_at_encode() {
        let big = Message::Error(WireError::new(ErrorCode::Internal, "x".repeat(MAX_FRAME_LEN)));
        assert!(matches!(encode_frame(&big, V), Err(FrameError::Encode(_))));
    }

    #[test]
    fn quality_and_capture_records_are_not_in_wire_8() {
        let q = crate::QualityWindow {
            model: "m".into(),
            version: 1,
            seq: 0,
            millis: 1,
            counts: crate::QualityCounts::Values { n: 1, sum: 1.0, sum_abs: 1.0, sum_sq: 1.0 },
        };
        let record = crate::TelemetryRecord { id: 1, at_ms: 0, body: crate::TelemetryBody::Quality(q) };
        let msg = Message::Telemetry(crate::TelemetryBatch { stream: 1, dropped: 0, records: vec![record] });
        assert!(matches!(encode_frame(&msg, WireVersion::V8), Err(FrameError::Encode(_))));
        let f = encode_frame(&msg, WireVersion::V9).unwrap();
        assert_eq!(decode_frame(&f, MAX_FRAME_LEN, WireVersion::V9).unwrap().unwrap().0, msg);
        // Relabelled as wire 8, it is refused after decoding.
        let mut f8 = f.clone();
        f8[2] = 8;
        assert!(matches!(decode_frame(&f8, MAX_FRAME_LEN, WireVersion::V8), Err(FrameError::Payload(_))));
    }

    #[test]
    fn other_version_and_magic_are_refused() {
        let mut f = encode_frame(&sample(), V).unwrap();
        f[2] = 10;
        assert_eq!(
            decode_frame(&f, MAX_FRAME_LEN, V).unwrap_err(),
            FrameError::WrongVersion { got: WireVersion(10), session: V }
        );
        f[0] = b'X';
        assert!(matches!(decode_frame(&f, MAX_FRAME_LEN, V), Err(FrameError::BadMagic(_))));
        // A frame of one supported version on a connection of another.
        let old = encode_frame(&sample(), WireVersion::V1).unwrap();
        assert!(matches!(decode_frame(&old, MAX_FRAME_LEN, V), Err(FrameError::WrongVersion { .. })));
        assert_eq!(encode_frame(&sample(), WireVersion(10)), Err(FrameError::UnsupportedVersion(WireVersion(10))));
    }

    #[test]
    fn trailing_payload_bytes_are_refused() {
        let mut f = encode_frame(&sample(), V).unwrap();
        f.push(0);
        let len = (f.len() - HEADER_LEN) as u32;
        f[4..8].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(decode_frame(&f, MAX_FRAME_LEN, V), Err(FrameError::Payload(_))));
    }

    #[test]
    fn decoder_stays_failed_after_garbage() {
        let mut d = FrameDecoder::new(MAX_FRAME_LEN, V);
        d.push(b"GARBAGE!");
        assert!(d.next_message().is_err());
        d.push(&encode_frame(&sample(), V).unwrap());
        assert!(d.next_message().is_err());
        assert_eq!(d.want(), 0);
    }

    #[test]
    fn want_never_asks_past_the_frame() {
        let f = encode_frame(&sample(), V).unwrap();
        let mut d = FrameDecoder::new(MAX_FRAME_LEN, V);
        assert_eq!(d.want(), HEADER_LEN);
        d.push(&f[..3]);
        assert_eq!(d.want(), HEADER_LEN - 3);
        d.push(&f[3..HEADER_LEN]);
        assert_eq!(d.want(), f.len() - HEADER_LEN);
        d.push(&f[HEADER_LEN..]);
        assert_eq!(d.want(), 0);
        assert_eq!(d.next_message().unwrap(), Some(sample()));
        assert_eq!(d.want(), HEADER_LEN);
        // A header that announces 1 MiB asks for it but holds only what came.
        let mut big = f[..HEADER_LEN].to_vec();
        big[4..8].copy_from_slice(&(MAX_FRAME_LEN as u32).to_le_bytes());
        d.push(&big);
        assert_eq!(d.want(), MAX_FRAME_LEN);
        assert_eq!(d.buffered(), HEADER_LEN);
    }
}

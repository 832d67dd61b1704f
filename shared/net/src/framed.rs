use crate::NetError;
use quinn::{ReadError, RecvStream, SendStream};
use tern_proto::{FrameDecoder, MAX_FRAME_LEN, Message, WireVersion, encode_frame};

/// Writes one frame of wire `version`.
pub async fn write_msg(send: &mut SendStream, msg: &Message, version: WireVersion) -> Result<(), NetError> {
    let frame = encode_frame(msg, version)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads frames of one wire version from a stream, as their bytes come.
///
/// [`FrameReader::next`] is cancel-safe: the bytes of a frame in progress
/// live in the reader, not in the future, so a `select!` that drops a
/// pending read loses nothing. The reader asks the stream for at most the
/// bytes that complete the current frame, so it holds no more than what
/// arrived (never the length a header announces), and it never reads past a
/// frame into the raw bytes that may follow it (an artifact after its header).
pub struct FrameReader {
    recv: RecvStream,
    decoder: FrameDecoder,
}

impl FrameReader {
    /// A reader of wire `version` frames of at most [`MAX_FRAME_LEN`] bytes.
    pub fn new(recv: RecvStream, version: WireVersion) -> Self {
        Self::with_limit(recv, version, MAX_FRAME_LEN)
    }

    /// A reader that refuses frames above `max` bytes (less than the
    /// protocol allows, for a peer that has not authenticated).
    pub fn with_limit(recv: RecvStream, version: WireVersion, max: usize) -> Self {
        Self { recv, decoder: FrameDecoder::new(max.min(MAX_FRAME_LEN), version) }
    }

    /// The next message; `Ok(None)` when the peer finished the stream
    /// cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Message>, NetError> {
        loop {
            if let Some(msg) = self.decoder.next_message()? {
                return Ok(Some(msg));
            }
            let want = self.decoder.want();
            match self.recv.read_chunk(want, true).await.map_err(read_error)? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None if self.decoder.buffered() == 0 => return Ok(None),
                None => return Err(NetError::Truncated),
            }
        }
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.decoder.buffered()
    }

    /// The stream, positioned right after the last frame read.
    pub fn into_stream(self) -> RecvStream {
        self.recv
    }
}

fn read_error(e: ReadError) -> NetError {
    match e {
        // Keep the reason: "connection lost" alone tells nobody anything.
        ReadError::ConnectionLost(c) => NetError::Connection(c),
        other => NetError::Read(other.to_string()),
    }
}

use crate::NetError;
use quinn::{ReadError, ReadExactError, RecvStream, SendStream};
use tern_proto::{FrameHeader, HEADER_LEN, MAX_FRAME_LEN, Message, decode_payload, encode_frame};

/// Writes one frame.
pub async fn write_msg(send: &mut SendStream, msg: &Message) -> Result<(), NetError> {
    let frame = encode_frame(msg)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame. `Ok(None)` when the peer finished the stream cleanly
/// between frames. The payload length is checked against the limit before
/// any payload byte is buffered.
pub async fn read_msg(recv: &mut RecvStream) -> Result<Option<Message>, NetError> {
    let mut head = [0u8; HEADER_LEN];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(_)) => return Err(NetError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(read_error(e)),
    }
    let header = FrameHeader::parse(&head, MAX_FRAME_LEN)?;
    let mut payload = vec![0u8; header.len];
    match recv.read_exact(&mut payload).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(_)) => return Err(NetError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(read_error(e)),
    }
    Ok(Some(decode_payload(&payload)?))
}

fn read_error(e: ReadError) -> NetError {
    match e {
        // Keep the reason: "connection lost" alone tells nobody anything.
        ReadError::ConnectionLost(c) => NetError::Connection(c),
        other => NetError::Read(other.to_string()),
    }
}

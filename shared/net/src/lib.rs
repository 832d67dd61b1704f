//! Tern's transports: the fleet PKI (device keys, the fleet CA), rustls
//! configurations for mutual-TLS QUIC, and length-prefixed `tern-proto`
//! frames over quinn streams.

mod framed;
mod pki;
mod tls;

pub use framed::{FrameReader, write_msg};
#[cfg(feature = "ca")]
pub use pki::FleetCa;
pub use pki::{DeviceKey, ca_fingerprint};
pub use tls::{
    BROKER_NAME, COORDINATOR_CLIENT, COORDINATOR_NAME, DEVICE_STREAMS, Liveness, admit_device, client_endpoint,
    device_client_config, device_client_config_at_least, device_client_config_speaking, enroll_client_config,
    enroll_client_config_speaking, mqtt_address, mqtt_client_config, peer_cert, server_config, wire_version,
};

/// Transport and certificate errors.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A frame could not be encoded or decoded.
    #[error(transparent)]
    Frame(#[from] tern_proto::FrameError),
    /// The QUIC connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Connecting failed before a handshake could start.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// Writing to a stream failed.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from a stream failed.
    #[error("stream read: {0}")]
    Read(String),
    /// The peer closed the stream in the middle of a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
    /// A certificate, key or TLS configuration is unusable.
    #[error("tls: {0}")]
    Tls(String),
    /// Making or signing a certificate failed.
    #[error("certificate: {0}")]
    Pki(String),
    /// A local socket could not be opened.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

impl From<rustls::Error> for NetError {
    fn from(e: rustls::Error) -> Self {
        NetError::Tls(e.to_string())
    }
}

impl From<rcgen::Error> for NetError {
    fn from(e: rcgen::Error) -> Self {
        NetError::Pki(e.to_string())
    }
}

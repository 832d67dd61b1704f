use crate::NetError;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ClientConfig, Connection, Endpoint, IdleTimeout, ServerConfig, TransportConfig, VarInt};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tern_proto::WireVersion;

/// The name every coordinator certificate carries and every agent checks,
/// whatever address it dials: devices trust the fleet CA, not DNS.
pub const COORDINATOR_NAME: &str = "coordinator.tern";

/// The name MQTT brokers' certificates carry and the fleet's MQTT clients
/// check (`FleetCa::issue_broker`).
pub const BROKER_NAME: &str = "broker.tern";

/// The subject (and MQTT client id) of the coordinator's own MQTT client:
/// brokers let it publish and subscribe under every device's topics.
pub const COORDINATOR_CLIENT: &str = "client.coordinator.tern";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The longest idle time the coordinator allows a connection: a
/// connection idles out after the lower of both sides' limits, and agents
/// ask for less (see [`Liveness`]).
const SERVER_IDLE: u32 = 120_000;

/// How an agent keeps its connection alive: it sends a keep-alive after
/// `keep_alive` without traffic, and takes the connection for dead after
/// `idle` without hearing from the coordinator. Every keep-alive costs
/// about 60 bytes each way: at 25 s about 200 kB a day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Time without traffic after which the agent sends a keep-alive.
    pub keep_alive: Duration,
    /// Time without hearing from the peer after which the connection is dead.
    pub idle: Duration,
}

impl Default for Liveness {
    /// A keep-alive every 25 s (within the UDP mappings of most NATs; one
    /// that forgets sooner costs the coordinator its way to the device only
    /// until the next one, as QUIC follows the new address), dead after 60 s.
    fn default() -> Self {
        Liveness { keep_alive: Duration::from_secs(25), idle: Duration::from_secs(60) }
    }
}
/// How much a peer may send on one stream before we have read it: control
/// frames are small, and the coordinator reads each stream as it arrives
/// (larger ones flow as it reads). Received data is held in the packets it
/// came in, a few times its own size: measured, a 64 KiB window cost about
/// 270 KiB per connection that filled it.
const SERVER_STREAM_WINDOW: u32 = 16 << 10;
/// ... and on all streams of a connection it has not yet authenticated
/// (an enrollment request is about 1 KiB).
const SERVER_ANONYMOUS_WINDOW: u32 = 16 << 10;
/// Streams an enrolled device may have open at once (control + downloads).
pub const DEVICE_STREAMS: u32 = 16;
/// What an enrolled device may have in flight towards the coordinator.
const DEVICE_WINDOW: u32 = 1 << 20;
/// What the coordinator may have in flight towards an agent, per download
/// stream and in all: artifacts stream at this window, and it bounds what
/// a device buffers.
const CLIENT_STREAM_WINDOW: u32 = 1 << 20;
const CLIENT_WINDOW: u32 = 4 << 20;

/// The coordinator's transport: before a connection has shown a device
/// certificate it may open one bidirectional stream (to enroll), no
/// unidirectional ones and no datagrams, and have little in flight;
/// [`admit_device`] raises that for an authenticated device. quinn's
/// defaults (100 streams each way, ~1.25 MB per stream, an unbounded
/// connection window) are for peers one trusts.
fn server_transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    t.stream_receive_window(VarInt::from_u32(SERVER_STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(SERVER_ANONYMOUS_WINDOW));
    t.datagram_receive_buffer_size(None);
    // Agents keep their sessions alive; the coordinator does not keep
    // anyone's connection alive for them.
    t.keep_alive_interval(None);
    // No path MTU probing, either way: its probes (up to about 1.45 kB each,
    // again every 10 minutes) cost a metered agent about 5.7 kB a session,
    // and datagrams of 1200 bytes cost a download about 1 % more headers.
    t.mtu_discovery_config(None);
    t.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(SERVER_IDLE))));
    Arc::new(t)
}

/// The agent's transport: it accepts no streams and no datagrams from the
/// coordinator, and bounds what a download may have in flight.
fn client_transport(liveness: Liveness) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.max_concurrent_bidi_streams(VarInt::from_u32(0));
    t.stream_receive_window(VarInt::from_u32(CLIENT_STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CLIENT_WINDOW));
    t.datagram_receive_buffer_size(None);
    // See `server_transport`.
    t.mtu_discovery_config(None);
    t.keep_alive_interval(Some(liveness.keep_alive));
    // Below the coordinator's limit, which bounds it anyway.
    let idle = u32::try_from(liveness.idle.as_millis()).unwrap_or(u32::MAX).min(SERVER_IDLE);
    t.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(idle))));
    Arc::new(t)
}

/// Lifts the anonymous limits on a connection whose peer showed a device
/// certificate: up to [`DEVICE_STREAMS`] streams and 1 MiB in flight.
pub fn admit_device(conn: &Connection) {
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(DEVICE_STREAMS));
    conn.set_receive_window(VarInt::from_u32(DEVICE_WINDOW));
}

fn alpn(versions: &[WireVersion]) -> Vec<Vec<u8>> {
    versions.iter().map(|v| v.alpn()).collect()
}

/// The wire version the TLS handshake settled on (the application protocol
/// both sides offered, the server's first choice).
pub fn wire_version(conn: &Connection) -> Result<WireVersion, NetError> {
    let data = conn.handshake_data().ok_or_else(|| NetError::Tls("handshake not complete".into()))?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .map_err(|_| NetError::Tls("not a rustls connection".into()))?;
    let protocol = data.protocol.ok_or_else(|| NetError::Tls("the peer named no application protocol".into()))?;
    WireVersion::from_alpn(&protocol).filter(|v| v.is_supported()).ok_or_else(|| {
        NetError::Tls(format!("application protocol {:?} is not one we speak", String::from_utf8_lossy(&protocol)))
    })
}

fn roots(ca_der: &[u8]) -> Result<Arc<RootCertStore>, NetError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    Ok(Arc::new(roots))
}

fn key(der: &[u8]) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec()))
}

/// The coordinator's QUIC server configuration, speaking `versions`
/// (newest first; the first one a client also offers is used).
///
/// Clients that present a certificate must chain to the fleet CA or the
/// handshake fails. Clients without one are let through the handshake, and
/// the coordinator allows them nothing but enrollment.
pub fn server_config(
    cert_der: &[u8],
    key_der: &[u8],
    ca_der: &[u8],
    versions: &[WireVersion],
) -> Result<ServerConfig, NetError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let chain = vec![CertificateDer::from(cert_der.to_vec()), CertificateDer::from(ca_der.to_vec())];
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key(key_der))?;
    tls.alpn_protocols = alpn(versions);
    let quic = QuicServerConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(server_transport());
    // Handshakes not yet accepted: a few, with little buffered for each.
    config.max_incoming(1024).incoming_buffer_size(64 << 10).incoming_buffer_size_total(8 << 20);
    Ok(config)
}

fn client(tls: rustls::ClientConfig, versions: &[WireVersion], liveness: Liveness) -> Result<ClientConfig, NetError> {
    let mut tls = tls;
    tls.alpn_protocols = alpn(versions);
    let quic = QuicClientConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = ClientConfig::new(Arc::new(quic));
    config.transport_config(client_transport(liveness));
    Ok(config)
}

/// An enrolled device's configuration: trusts only the fleet CA, presents
/// the device certificate, and offers every wire version this build speaks.
pub fn device_client_config(ca_der: &[u8], cert_der: &[u8], key_der: &[u8]) -> Result<ClientConfig, NetError> {
    device_client_config_speaking(ca_der, cert_der, key_der, WireVersion::SUPPORTED)
}

/// The same, offering only `versions` (what an older agent would offer).
pub fn device_client_config_speaking(
    ca_der: &[u8],
    cert_der: &[u8],
    key_der: &[u8],
    versions: &[WireVersion],
) -> Result<ClientConfig, NetError> {
    device_config(ca_der, cert_der, key_der, versions, 0, Liveness::default())
}

/// An enrolled device's configuration that checks the coordinator's
/// certificate at `time_floor` (Unix seconds) when the clock reads earlier:
/// a device without a real-time clock reads 1970 after every boot, and
/// would otherwise find every certificate not yet valid. The floor is a
/// time the device knows has passed (see the agent's `identity/time-floor`);
/// while it is stale, a certificate that expired since is still taken.
/// The connection is kept alive as `liveness` says.
pub fn device_client_config_at_least(
    ca_der: &[u8],
    cert_der: &[u8],
    key_der: &[u8],
    time_floor: u64,
    liveness: Liveness,
) -> Result<ClientConfig, NetError> {
    device_config(ca_der, cert_der, key_der, WireVersion::SUPPORTED, time_floor, liveness)
}

fn device_config(
    ca_der: &[u8],
    cert_der: &[u8],
    key_der: &[u8],
    versions: &[WireVersion],
    time_floor: u64,
    liveness: Liveness,
) -> Result<ClientConfig, NetError> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots(ca_der)?, provider())
        .build()
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AtLeast { inner, floor: time_floor, name: None }))
        .with_client_auth_cert(vec![CertificateDer::from(cert_der.to_vec())], key(key_der))?;
    client(tls, versions, liveness)
}

/// The TLS configuration of an MQTT client of the fleet (an agent, or the
/// coordinator with its own client certificate): TLS 1.3, the fleet CA
/// only, and the broker's certificate checked for [`BROKER_NAME`] whatever
/// address it was reached at (the embedded broker's and the one `tern
/// broker mosquitto-config` issues carry it), at `time_floor` as
/// [`device_client_config_at_least`] does.
pub fn mqtt_client_config(
    ca_der: &[u8],
    cert_der: &[u8],
    key_der: &[u8],
    time_floor: u64,
) -> Result<rustls::ClientConfig, NetError> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots(ca_der)?, provider())
        .build()
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let name = ServerName::try_from(BROKER_NAME).map_err(|e| NetError::Tls(e.to_string()))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AtLeast { inner, floor: time_floor, name: Some(name) }))
        .with_client_auth_cert(vec![CertificateDer::from(cert_der.to_vec())], key(key_der))?)
}

/// WebPKI verification of the server, at the later of the clock and a floor.
#[derive(Debug)]
struct AtLeast {
    inner: Arc<WebPkiServerVerifier>,
    floor: u64,
    /// The name checked in place of the one connected to.
    name: Option<ServerName<'static>>,
}

impl ServerCertVerifier for AtLeast {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let now =
            if now.as_secs() < self.floor { UnixTime::since_unix_epoch(Duration::from_secs(self.floor)) } else { now };
        let server_name = self.name.as_ref().unwrap_or(server_name);
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The configuration for enrolling: no client certificate yet, and the
/// coordinator must present a chain containing the CA whose SHA-256 the
/// enrollment token pins.
pub fn enroll_client_config(ca_pin: [u8; 32]) -> Result<ClientConfig, NetError> {
    enroll_client_config_speaking(ca_pin, WireVersion::SUPPORTED)
}

/// The same, offering only `versions`.
pub fn enroll_client_config_speaking(ca_pin: [u8; 32], versions: &[WireVersion]) -> Result<ClientConfig, NetError> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin: ca_pin, provider: provider() }))
        .with_no_client_auth();
    client(tls, versions, Liveness::default())
}

/// Verifies the server's chain against the one CA certificate it presents
/// whose fingerprint matches the pin, with full WebPKI path validation.
#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|c| crate::ca_fingerprint(c) == self.pin).ok_or_else(|| {
            rustls::Error::General("coordinator's certificate is not from the CA pinned by the enrollment token".into())
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The leaf certificate the peer presented, if any.
pub fn peer_cert(conn: &Connection) -> Option<Vec<u8>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().map(|c| c.to_vec())
}

/// A client endpoint on an ephemeral port of the address family of `remote`.
pub fn client_endpoint(remote: SocketAddr) -> Result<Endpoint, NetError> {
    let local: SocketAddr = if remote.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
    Ok(Endpoint::client(local)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FleetCa;

    fn verifier(ca: &FleetCa, floor: u64) -> AtLeast {
        let inner =
            WebPkiServerVerifier::builder_with_provider(roots(ca.cert_der()).unwrap(), provider()).build().unwrap();
        AtLeast { inner, floor, name: None }
    }

    fn at(v: &AtLeast, cert: &[u8], name: &str, clock: u64) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        let now = UnixTime::since_unix_epoch(Duration::from_secs(clock));
        v.verify_server_cert(&CertificateDer::from(cert.to_vec()), &[], &name, &[], now)
    }

    #[test]
    fn the_floor_only_moves_the_time_of_an_otherwise_full_check() {
        let (ca, _) = FleetCa::generate("t").unwrap();
        let (cert, _) = ca.issue_server(&[]).unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let clock_1970 = 86_400;
        assert!(at(&verifier(&ca, 0), &cert, COORDINATOR_NAME, clock_1970).is_err(), "not valid yet in 1970");
        assert!(at(&verifier(&ca, now), &cert, COORDINATOR_NAME, clock_1970).is_ok());
        // A clock past the floor is used as it reads.
        assert!(at(&verifier(&ca, now), &cert, COORDINATOR_NAME, now + 900 * 86_400).is_err(), "expired");
        // The floor changes the time, nothing else.
        assert!(at(&verifier(&ca, now + 900 * 86_400), &cert, COORDINATOR_NAME, clock_1970).is_err(), "expired");
        assert!(at(&verifier(&ca, now), &cert, "evil.tern", clock_1970).is_err(), "another name");
        let (other, _) = FleetCa::generate("other").unwrap();
        let (foreign, _) = other.issue_server(&[]).unwrap();
        assert!(at(&verifier(&ca, now), &foreign, COORDINATOR_NAME, clock_1970).is_err(), "another CA");
    }
}

/// The host and port of an MQTT broker URL, `mqtts://HOST:PORT` (an IPv6
/// host in brackets); the host may be empty (the agent then uses the host
/// it reaches the coordinator at).
pub fn mqtt_address(url: &str) -> Result<(String, u16), NetError> {
    let bad = |why: &str| NetError::Tls(format!("MQTT broker URL {url:?}: {why} (expected mqtts://HOST:PORT)"));
    let rest = url.strip_prefix("mqtts://").ok_or_else(|| bad("not mqtts://"))?;
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.contains(['/', '@', '?', '#', '[', ']']) || port == 0 {
        return Err(bad("not a host and port"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod mqtt_url_tests {
    use super::mqtt_address;

    #[test]
    fn broker_urls_are_host_and_port() {
        assert_eq!(mqtt_address("mqtts://broker.local:8883").unwrap(), ("broker.local".into(), 8883));
        assert_eq!(mqtt_address("mqtts://[::1]:8883").unwrap(), ("::1".into(), 8883));
        assert_eq!(mqtt_address("mqtts://:8883").unwrap(), (String::new(), 8883));
        for bad in ["mqtt://h:1", "mqtts://h", "mqtts://h:x", "mqtts://h:0", "mqtts://u@h:1", "mqtts://h/x:1"] {
            assert!(mqtt_address(bad).is_err(), "{bad}");
        }
    }
}

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

/// The name every coordinator certificate carries and every agent checks,
/// whatever address it dials: devices trust the fleet CA, not DNS.
pub const COORDINATOR_NAME: &str = "coordinator.tern";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(20_000))));
    Arc::new(t)
}

fn roots(ca_der: &[u8]) -> Result<Arc<RootCertStore>, NetError> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    Ok(Arc::new(roots))
}

fn key(der: &[u8]) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.to_vec()))
}

/// The coordinator's QUIC server configuration.
///
/// Clients that present a certificate must chain to the fleet CA or the
/// handshake fails. Clients without one are let through the handshake, and
/// the coordinator allows them nothing but enrollment.
pub fn server_config(cert_der: &[u8], key_der: &[u8], ca_der: &[u8]) -> Result<ServerConfig, NetError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let chain = vec![CertificateDer::from(cert_der.to_vec()), CertificateDer::from(ca_der.to_vec())];
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key(key_der))?;
    tls.alpn_protocols = vec![tern_proto::ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}

fn client(tls: rustls::ClientConfig) -> Result<ClientConfig, NetError> {
    let mut tls = tls;
    tls.alpn_protocols = vec![tern_proto::ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut config = ClientConfig::new(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}

/// An enrolled device's configuration: trusts only the fleet CA and
/// presents the device certificate.
pub fn device_client_config(ca_der: &[u8], cert_der: &[u8], key_der: &[u8]) -> Result<ClientConfig, NetError> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_der)?)
        .with_client_auth_cert(vec![CertificateDer::from(cert_der.to_vec())], key(key_der))?;
    client(tls)
}

/// The configuration for enrolling: no client certificate yet, and the
/// coordinator must present a chain containing the CA whose SHA-256 the
/// enrollment token pins.
pub fn enroll_client_config(ca_pin: [u8; 32]) -> Result<ClientConfig, NetError> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCa { pin: ca_pin, provider: provider() }))
        .with_no_client_auth();
    client(tls)
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

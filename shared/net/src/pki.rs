use crate::NetError;
use rcgen::{CertificateParams, DnType, KeyPair};
use sha2::{Digest, Sha256};

/// SHA-256 of a DER certificate: what an enrollment token pins.
pub fn ca_fingerprint(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

/// A device's private key (ECDSA P-256), made on the device and never sent.
pub struct DeviceKey {
    pair: KeyPair,
}

impl DeviceKey {
    /// Makes a new key.
    pub fn generate() -> Result<Self, NetError> {
        Ok(Self { pair: KeyPair::generate()? })
    }

    /// Loads a key from its PKCS#8 DER encoding.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, NetError> {
        Ok(Self { pair: KeyPair::try_from(der)? })
    }

    /// The PKCS#8 DER encoding, for the device's key file.
    pub fn pkcs8_der(&self) -> Vec<u8> {
        self.pair.serialize_der()
    }

    /// A certificate signing request for this key. The coordinator sets the
    /// subject itself; `hint` only makes the request readable in logs.
    pub fn csr(&self, hint: &str) -> Result<Vec<u8>, NetError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, hint);
        Ok(params.serialize_request(&self.pair)?.der().to_vec())
    }
}

#[cfg(feature = "ca")]
pub use ca::FleetCa;

#[cfg(feature = "ca")]
mod ca {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyUsagePurpose,
        SanType,
    };
    use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
    use time::{Duration, OffsetDateTime};

    /// The fleet's certificate authority: it signs device certificates at
    /// enrollment and the coordinator's own server certificate.
    pub struct FleetCa {
        cert_der: Vec<u8>,
        issuer: Issuer<'static, KeyPair>,
    }

    /// A client certificate's parameters: `subject` as its common name,
    /// client authentication only, valid from an hour ago for `days`.
    fn client_params(subject: &str, days: i64) -> Result<CertificateParams, NetError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, subject);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(days);
        Ok(params)
    }

    impl FleetCa {
        /// Makes a new CA; returns it with its private key (PKCS#8 DER) to store.
        pub fn generate(fleet: &str) -> Result<(Self, Vec<u8>), NetError> {
            let key = KeyPair::generate()?;
            let key_der = key.serialize_der();
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, format!("Tern fleet CA ({fleet})"));
            params.distinguished_name.push(DnType::OrganizationName, "Tern");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::hours(1);
            params.not_after = now + Duration::days(365 * 20);
            let cert = params.self_signed(&key)?;
            let cert_der = cert.der().to_vec();
            Ok((Self::load(&cert_der, &key_der)?, key_der))
        }

        /// Loads a CA from its certificate and key.
        pub fn load(cert_der: &[u8], key_der: &[u8]) -> Result<Self, NetError> {
            let key = KeyPair::try_from(key_der)?;
            let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert_der.to_vec()), key)?;
            Ok(Self { cert_der: cert_der.to_vec(), issuer })
        }

        /// The CA certificate, DER.
        pub fn cert_der(&self) -> &[u8] {
            &self.cert_der
        }

        /// Signs a device certificate for the key in `csr_der`, with
        /// `device_id` as the subject whatever the request asked for.
        pub fn issue_device(&self, csr_der: &[u8], device_id: &str, days: i64) -> Result<Vec<u8>, NetError> {
            let der = CertificateSigningRequestDer::from(csr_der);
            let mut csr = CertificateSigningRequestParams::from_der(&der)?;
            let mut params = client_params(device_id, days)?;
            params.distinguished_name.push(DnType::OrganizationName, "Tern device");
            params.subject_alt_names = vec![SanType::DnsName(format!("{device_id}.device.tern").try_into()?)];
            csr.params = params;
            Ok(csr.signed_by(&self.issuer)?.der().to_vec())
        }

        /// Makes a client key and certificate with `name` as its subject
        /// (the coordinator's own MQTT client, [`crate::COORDINATOR_CLIENT`]:
        /// not a device id, so no enrolled device can be it).
        pub fn issue_client(&self, name: &str, days: i64) -> Result<(Vec<u8>, Vec<u8>), NetError> {
            let key = KeyPair::generate()?;
            let cert = client_params(name, days)?.signed_by(&key, &self.issuer)?;
            Ok((cert.der().to_vec(), key.serialize_der()))
        }

        /// Makes the coordinator's server key and certificate, valid for
        /// [`crate::COORDINATOR_NAME`] and `extra_names`.
        pub fn issue_server(&self, extra_names: &[String]) -> Result<(Vec<u8>, Vec<u8>), NetError> {
            self.issue_server_named(crate::COORDINATOR_NAME, extra_names)
        }

        /// Makes an MQTT broker's server key and certificate, valid for
        /// [`crate::BROKER_NAME`] (which MQTT clients of the fleet check)
        /// and `extra_names`, not for the coordinator's name: a broker's
        /// key cannot pass for the coordinator.
        pub fn issue_broker(&self, extra_names: &[String]) -> Result<(Vec<u8>, Vec<u8>), NetError> {
            self.issue_server_named(crate::BROKER_NAME, extra_names)
        }

        fn issue_server_named(&self, name: &str, extra_names: &[String]) -> Result<(Vec<u8>, Vec<u8>), NetError> {
            let key = KeyPair::generate()?;
            let mut names = vec![name.to_owned()];
            names.extend(extra_names.iter().cloned());
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.use_authority_key_identifier_extension = true;
            let now = OffsetDateTime::now_utc();
            // Valid from the CA's own start: a device that lost its clock
            // checks it at the last time it knew (no earlier than its
            // enrollment), which may be before this coordinator's start.
            let (_, ca) = x509_parser::parse_x509_certificate(&self.cert_der)
                .map_err(|e| NetError::Tls(format!("the fleet CA certificate: {e}")))?;
            params.not_before = OffsetDateTime::from_unix_timestamp(ca.validity().not_before.timestamp())
                .map_err(|e| NetError::Tls(format!("the fleet CA certificate: {e}")))?;
            params.not_after = now + Duration::days(825);
            let cert = params.signed_by(&key, &self.issuer)?;
            Ok((cert.der().to_vec(), key.serialize_der()))
        }
    }
}

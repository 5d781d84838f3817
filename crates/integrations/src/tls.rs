//! TLS for the database providers: rustls on aws-lc-rs, the workspace's
//! one crypto provider. `verify-full` checks the chain (the system's roots,
//! or the integration's `ca_cert`) and the host name; `require` encrypts
//! without checking the certificate, as libpq's `sslmode=require` does.

use crate::provider::ProviderError;
use crate::sql::SslMode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::{Arc, LazyLock};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: LazyLock<Arc<rustls::crypto::CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    PROVIDER.clone()
}

/// The system's trusted roots, read once.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: LazyLock<Arc<RootCertStore>> = LazyLock::new(|| {
        let mut roots = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        Arc::new(roots)
    });
    ROOTS.clone()
}

/// The trust anchors of a PEM text.
pub fn roots_of(pem: &str) -> Result<RootCertStore, ProviderError> {
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let certificate =
            certificate.map_err(|error| ProviderError::invalid("config.ca_cert", format!("not PEM: {error}")))?;
        roots
            .add(certificate)
            .map_err(|error| ProviderError::invalid("config.ca_cert", format!("not a CA certificate: {error}")))?;
    }
    if roots.is_empty() {
        return Err(ProviderError::invalid("config.ca_cert", "holds no certificate"));
    }
    Ok(roots)
}

/// The client configuration of an `sslmode` (unused for `disable`).
pub fn client_config(mode: SslMode, ca_cert: Option<&str>) -> Result<ClientConfig, ProviderError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| ProviderError::Unreachable(error.to_string()))?;
    Ok(match (mode, ca_cert) {
        (SslMode::VerifyFull, Some(pem)) => builder.with_root_certificates(roots_of(pem)?).with_no_client_auth(),
        (SslMode::VerifyFull, None) | (SslMode::Disable, _) => {
            builder.with_root_certificates(system_roots()).with_no_client_auth()
        }
        (SslMode::Require, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider())))
            .with_no_client_auth(),
    })
}

/// `sslmode=require`: any certificate, but the handshake's signatures are
/// still checked (the channel is encrypted to whoever holds the key).
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

//! The one TLS client configuration of the sidecar (providers, PostgreSQL):
//! rustls on ring, the built-in (webpki) roots plus a configured CA file.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{pem::PemObject, CertificateDer};

/// A rustls client configuration trusting the webpki roots and the PEM
/// certificates of `ca_file`; errors name `field` and the file.
pub fn client_config(ca_file: Option<&Path>, field: &str) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("{field}: cannot read {}: {e}", path.display()))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{field}: {}: {e}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("{field}: {} holds no PEM certificate", path.display());
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| anyhow::anyhow!("{field}: {}: {e}", path.display()))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

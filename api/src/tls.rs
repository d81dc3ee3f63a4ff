//! TLS for everything that talks to the controllers: `stratactl`, agents, controllers calling
//! their peers, tests and benchmarks. rustls with the `ring` provider, passed explicitly (the
//! process-wide default provider is never installed, so nothing depends on which provider a
//! dependency happens to enable).
//!
//! Certificates and keys are PEM files, read with `rustls-pki-types`' `PemObject`
//! (<https://docs.rs/rustls-pki-types/1/rustls_pki_types/pem/trait.PemObject.html>). A client
//! trusts exactly the CA it is given (`--ca-cert`): no system roots, since a cluster's
//! certificates come from its own CA (`deploy/dev-ca.sh` makes one for development).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// The crypto provider every TLS config here is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM file (a leaf, then its chain).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|error| file_error(path, error))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(path, error))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|error| file_error(path, error))
}

/// The CA certificates of a PEM file as a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|error| file_error(path, format!("not a usable CA certificate: {error}")))?;
    }
    Ok(roots)
}

/// A certificate and its key, as a client presents it for mutual TLS.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Identity {
    /// Both or neither of `--tls-cert` and `--tls-key`.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Option<Identity>, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(Identity {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            })),
            (None, None) => Ok(None),
            _ => Err(TlsError::Config(
                "--tls-cert and --tls-key go together".to_string(),
            )),
        }
    }
}

/// A client config that trusts the CA in `ca_cert` and, given an identity, presents it.
/// HTTP/1.1 only, as the controllers serve.
pub fn client_config(
    ca_cert: &Path,
    identity: Option<&Identity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = load_roots(ca_cert)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(identity) => builder
            .with_client_auth_cert(load_certs(&identity.cert)?, load_key(&identity.key)?)
            .map_err(|error| file_error(&identity.key, error))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The client side of a connection to the controllers: plain HTTP or TLS with a config.
#[derive(Clone, Debug, Default)]
pub enum Transport {
    #[default]
    Plain,
    Tls(Arc<rustls::ClientConfig>),
}

impl Transport {
    /// From the flags every client shares: `--ca-cert` turns TLS on; `--tls-cert` and
    /// `--tls-key` add a client certificate (for controllers that require one).
    pub fn from_flags(
        ca_cert: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Transport, TlsError> {
        let identity = Identity::from_flags(cert, key)?;
        match ca_cert {
            Some(ca_cert) => Ok(Transport::Tls(Arc::new(client_config(
                ca_cert,
                identity.as_ref(),
            )?))),
            None if identity.is_some() => Err(TlsError::Config(
                "--tls-cert needs --ca-cert (the CA that signed the controllers' certificates)"
                    .to_string(),
            )),
            None => Ok(Transport::Plain),
        }
    }

    /// The URL scheme: `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        match self {
            Transport::Plain => "http",
            Transport::Tls(_) => "https",
        }
    }

    /// `builder` with this transport's TLS config, if any.
    pub fn apply(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        match self {
            Transport::Plain => builder,
            // reqwest takes a rustls::ClientConfig as it is:
            // https://docs.rs/reqwest/0.12/reqwest/struct.ClientBuilder.html#method.use_preconfigured_tls
            Transport::Tls(config) => builder.use_preconfigured_tls((**config).clone()),
        }
    }
}

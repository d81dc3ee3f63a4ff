//! TLS for everything that talks to the controllers: `stratactl`, agents, controllers calling
//! their peers, tests and benchmarks. rustls with the `ring` provider, passed explicitly (the
//! process-wide default provider is never installed, so nothing depends on which provider a
//! dependency happens to enable).
//!
//! Certificates and keys are PEM files, read with `rustls-pki-types`' `PemObject`
//! (<https://docs.rs/rustls-pki-types/1/rustls_pki_types/pem/trait.PemObject.html>). A client
//! trusts exactly the CA it is given (`--ca-cert`): no system roots, since a cluster's
//! certificates come from its own CA (`deploy/dev-ca.sh` makes one for development).
//!
//! A node's own certificate and key (`--tls-cert`, `--tls-key`) follow their files: each
//! handshake, server or client side, checks whether either file changed and, if so, reads
//! the pair again (`FileIdentity`), as etcd re-reads its certificate files on handshakes. A
//! rotated certificate is served from the next connection on, with no restart; a pair that
//! does not load (a half-written file, a key not of the certificate) leaves the last good one
//! in use until the files change again. CAs are read at start.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};

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

/// What identifies a file's current content without reading it: device, inode (a rename
/// into place is a new one), modification time and length.
type FileStamp = Option<(u64, u64, std::time::SystemTime, u64)>;

fn stamp(path: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((
        metadata.dev(),
        metadata.ino(),
        metadata.modified().ok()?,
        metadata.len(),
    ))
}

/// The certificate and key of an `Identity`, re-read when their files change (see the
/// module's notes). One serves as the certificate resolver of a server config and of client
/// configs alike.
#[derive(Debug)]
pub struct FileIdentity {
    files: Identity,
    provider: Arc<CryptoProvider>,
    current: RwLock<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files' stamps when `key` was read, and the last stamps that failed to load.
    stamps: (FileStamp, FileStamp),
    failed: Option<(FileStamp, FileStamp)>,
}

impl FileIdentity {
    /// Reads the pair: an error if it does not load or the key is not the certificate's.
    pub fn load(files: &Identity) -> Result<Arc<FileIdentity>, TlsError> {
        let provider = provider();
        let stamps = (stamp(&files.cert), stamp(&files.key));
        let key = read_pair(files, &provider)?;
        Ok(Arc::new(FileIdentity {
            files: files.clone(),
            provider,
            current: RwLock::new(Loaded {
                key,
                stamps,
                failed: None,
            }),
        }))
    }

    /// The pair to present now: the files' current content when it changed and loads,
    /// else the last good pair.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let stamps = (stamp(&self.files.cert), stamp(&self.files.key));
        {
            let loaded = self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if loaded.stamps == stamps || loaded.failed == Some(stamps) {
                return loaded.key.clone();
            }
        }
        let mut loaded = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match read_pair(&self.files, &self.provider) {
            Ok(key) => {
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                *loaded = Loaded {
                    key,
                    stamps,
                    failed: None,
                };
            }
            Err(error) => {
                if loaded.failed != Some(stamps) {
                    tracing::warn!(%error, "TLS certificate files changed but do not load; the previous certificate stays in use");
                }
                loaded.failed = Some(stamps);
            }
        }
        loaded.key.clone()
    }
}

fn read_pair(files: &Identity, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = CertifiedKey::from_der(load_certs(&files.cert)?, load_key(&files.key)?, provider)
        .map_err(|error| {
            file_error(
                &files.key,
                format!("not the key of {}: {error}", files.cert.display()),
            )
        })?;
    Ok(Arc::new(key))
}

impl ResolvesServerCert for FileIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for FileIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client config that trusts the CA in `ca_cert` and, given an identity, presents it
/// (following its files). HTTP/1.1 only, as the controllers serve.
pub fn client_config(
    ca_cert: &Path,
    identity: Option<&Identity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let identity = identity.map(FileIdentity::load).transpose()?;
    client_config_with(ca_cert, identity)
}

/// `client_config` presenting an identity already loaded (a controller shares its own
/// between its server and its peer calls).
pub fn client_config_with(
    ca_cert: &Path,
    identity: Option<Arc<FileIdentity>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = load_roots(ca_cert)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(identity) => builder.with_client_cert_resolver(identity),
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

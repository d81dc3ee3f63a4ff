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
//! in use until the files change again. CA files are followed the same way, on both sides
//! (`FileServerVerifier`, `FileClientVerifier`), so a CA can be rotated by first adding the
//! new CA to every bundle, then moving the certificates, then dropping the old CA.

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

/// A value built from files and built again when one of them changed: `get` stats the files
/// (a few microseconds, once per handshake) and rebuilds when their stamps differ from the
/// last build's; a build that fails leaves the last good value in use, and is not tried again
/// until the files change once more.
struct Followed<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    build: Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>,
    state: RwLock<FollowedState<T>>,
}

struct FollowedState<T> {
    value: Arc<T>,
    stamps: Vec<FileStamp>,
    failed: Option<Vec<FileStamp>>,
}

impl<T> std::fmt::Debug for Followed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Followed")
            .field("what", &self.what)
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl<T> Followed<T> {
    /// Builds the first value: an error if it does not build.
    fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Followed<T>, TlsError> {
        let stamps = paths.iter().map(|path| stamp(path)).collect();
        let value = Arc::new(build()?);
        Ok(Followed {
            what,
            paths,
            build: Box::new(build),
            state: RwLock::new(FollowedState {
                value,
                stamps,
                failed: None,
            }),
        })
    }

    fn get(&self) -> Arc<T> {
        let stamps: Vec<FileStamp> = self.paths.iter().map(|path| stamp(path)).collect();
        {
            let state = self
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if state.stamps == stamps || state.failed.as_ref() == Some(&stamps) {
                return state.value.clone();
            }
        }
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (self.build)() {
            Ok(value) => {
                tracing::info!(what = self.what, files = ?self.paths, "TLS files reloaded");
                *state = FollowedState {
                    value: Arc::new(value),
                    stamps,
                    failed: None,
                };
            }
            Err(error) => {
                if state.failed.as_ref() != Some(&stamps) {
                    tracing::warn!(what = self.what, %error, "TLS files changed but do not load; the previous ones stay in use");
                }
                state.failed = Some(stamps);
            }
        }
        state.value.clone()
    }
}

/// The certificate and key of an `Identity`, re-read when their files change (see the
/// module's notes). One serves as the certificate resolver of a server config and of client
/// configs alike.
#[derive(Debug)]
pub struct FileIdentity(Followed<CertifiedKey>);

impl FileIdentity {
    /// Reads the pair: an error if it does not load or the key is not the certificate's.
    pub fn load(files: &Identity) -> Result<Arc<FileIdentity>, TlsError> {
        let provider = provider();
        let pair = files.clone();
        let followed = Followed::new(
            "certificate",
            vec![files.cert.clone(), files.key.clone()],
            move || read_pair(&pair, &provider),
        )?;
        Ok(Arc::new(FileIdentity(followed)))
    }

    /// The pair to present now: the files' current content when it changed and loads,
    /// else the last good pair.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.get()
    }
}

fn read_pair(files: &Identity, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    CertifiedKey::from_der(load_certs(&files.cert)?, load_key(&files.key)?, provider).map_err(
        |error| {
            file_error(
                &files.key,
                format!("not the key of {}: {error}", files.cert.display()),
            )
        },
    )
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

/// The handshake signature checks of a verifier wrapping a followed WebPKI verifier
/// (`self.0`): the same three methods in `ServerCertVerifier` and `ClientCertVerifier`.
macro_rules! delegate_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.get().verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.0.get().verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.get().supported_verify_schemes()
        }
    };
}

/// rustls' WebPKI verification of a server's certificate against the CAs of a file, the file
/// followed like a `FileIdentity` (a CA bundle can gain the next CA before the certificates
/// move to it, and lose the old one after). Every check is `WebPkiServerVerifier`'s.
#[derive(Debug)]
pub struct FileServerVerifier(Followed<Arc<rustls::client::WebPkiServerVerifier>>);

impl FileServerVerifier {
    pub fn load(ca_cert: &Path) -> Result<Arc<FileServerVerifier>, TlsError> {
        let path = ca_cert.to_path_buf();
        let followed = Followed::new("CA", vec![path.clone()], move || {
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(load_roots(&path)?),
                provider(),
            )
            .build()
            .map_err(|error| file_error(&path, error))
        })?;
        Ok(Arc::new(FileServerVerifier(followed)))
    }
}

impl rustls::client::danger::ServerCertVerifier for FileServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.0
            .get()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    delegate_signature_checks!();
}

/// rustls' WebPKI verification of client certificates (mutual TLS, every client must present
/// one) against the CAs of a file, the file followed like a `FileIdentity`. It sends no CA
/// names in its certificate request (hints are optional: clients present the certificate
/// they have).
#[derive(Debug)]
pub struct FileClientVerifier(Followed<Arc<dyn rustls::server::danger::ClientCertVerifier>>);

impl FileClientVerifier {
    pub fn load(client_ca: &Path) -> Result<Arc<FileClientVerifier>, TlsError> {
        let path = client_ca.to_path_buf();
        let followed = Followed::new("client CA", vec![path.clone()], move || {
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(load_roots(&path)?),
                provider(),
            )
            .build()
            .map_err(|error| file_error(&path, error))
        })?;
        Ok(Arc::new(FileClientVerifier(followed)))
    }
}

impl rustls::server::danger::ClientCertVerifier for FileClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.0
            .get()
            .verify_client_cert(end_entity, intermediates, now)
    }

    delegate_signature_checks!();
}

/// A client config that trusts the CAs in `ca_cert` and, given an identity, presents it
/// (both following their files). HTTP/1.1 only, as the controllers serve.
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
    // `dangerous()` only because the verifier is our own type; what it checks is exactly
    // `WebPkiServerVerifier`'s, as `with_root_certificates` would set up.
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(FileServerVerifier::load(ca_cert)?);
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

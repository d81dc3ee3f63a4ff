//! TLS of the API and peer port (`--tls-cert`, `--tls-key`, `--client-ca`, `--ca-cert`): the
//! server side (a `tokio_rustls::TlsAcceptor`) and the transport of this node's peer calls.
//! Both use rustls with the `ring` provider (`strata_api::tls::provider`), and present this
//! node's certificate through one `strata_api::tls::FileIdentity`, which follows the files.
//!
//! Mutual TLS follows rustls' `WebPkiClientVerifier`
//! (<https://docs.rs/rustls/0.23/rustls/server/struct.WebPkiClientVerifier.html>): with
//! `--client-ca` a client without a certificate, or with one another CA signed, fails the
//! handshake, before any request is read. Authorization stays with the bearer tokens and node
//! credentials: a certificate proves membership of the cluster's PKI, a token what its holder
//! may do.

use std::sync::Arc;

use anyhow::Context;
use strata_api::tls::{self, Identity, Transport};

use crate::Config;

/// How this node talks: whether it serves TLS, and with what it calls its peers.
#[derive(Clone)]
pub struct TlsSetup {
    /// `None`: plain HTTP (`--insecure-http`).
    pub acceptor: Option<tokio_rustls::TlsAcceptor>,
    pub peers: Transport,
}

impl TlsSetup {
    /// From the configuration: refused when neither TLS nor `--insecure-http` is chosen.
    pub fn from_config(config: &Config) -> anyhow::Result<TlsSetup> {
        let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
            anyhow::ensure!(
                config.insecure_http,
                "give --tls-cert and --tls-key (see deploy/dev-ca.sh), or --insecure-http to serve plain HTTP"
            );
            return Ok(TlsSetup {
                acceptor: None,
                peers: Transport::Plain,
            });
        };
        let builder = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &config.client_ca {
            Some(client_ca) => {
                // WebPkiClientVerifier's checks, against the CA file as it is at each
                // handshake (`strata_api::tls::FileClientVerifier`).
                let verifier = tls::FileClientVerifier::load(client_ca)
                    .with_context(|| format!("client CA {}", client_ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let identity = Identity {
            cert: cert.clone(),
            key: key.clone(),
        };
        // Followed on every handshake: a rotated certificate needs no restart.
        let identity = tls::FileIdentity::load(&identity).with_context(|| {
            format!("certificate {} with key {}", cert.display(), key.display())
        })?;
        let mut server = builder.with_cert_resolver(identity.clone());
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let ca = config
            .ca_cert
            .as_ref()
            .or(config.client_ca.as_ref())
            .context(
                "give --ca-cert (or --client-ca): the CA peers' certificates are checked against",
            )?;
        let peers = Transport::Tls(Arc::new(tls::client_config_with(ca, Some(identity))?));
        Ok(TlsSetup {
            acceptor: Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))),
            peers,
        })
    }
}

//! Connections to PostgreSQL, for the shared ledger and the `postgres` backend alike: the pool,
//! tokio-postgres through deadpool, TLS through the broker's one rustls
//! (on ring). The connector is ours, about sixty lines, instead of `tokio-postgres-rustls`,
//! which would add an X.509 parser (eight crates) only to compute SCRAM channel binding; the
//! server's certificate is verified here in full either way, which is what channel binding
//! would otherwise make up for.

use crate::config::PostgresConfig;
use crate::secret::SecretString;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

/// The pool for `cfg`, with the password read at start (never logged: only its presence is).
/// Connections open lazily. `what` names the config table in errors (`ledger`, `backends.db`).
pub fn pool(cfg: &PostgresConfig, password: Option<&SecretString>, what: &str) -> Result<Pool, String> {
    let mut pg = settings(cfg, password);
    let manager_config = ManagerConfig { recycling_method: RecyclingMethod::Fast };
    let manager = if cfg.tls {
        pg.ssl_mode(tokio_postgres::config::SslMode::Require);
        Manager::from_config(pg, RustlsConnect::new(cfg, what)?, manager_config)
    } else {
        pg.ssl_mode(tokio_postgres::config::SslMode::Disable);
        Manager::from_config(pg, tokio_postgres::NoTls, manager_config)
    };
    let wait = Duration::from_millis(cfg.statement_timeout_ms);
    Pool::builder(manager)
        .max_size(cfg.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(wait))
        .create_timeout(Some(wait))
        .recycle_timeout(Some(wait))
        .build()
        .map_err(|e| format!("{what}: {e}"))
}

/// The connection settings for `cfg`: where, who, and the server-side statement timeout.
pub fn settings(cfg: &PostgresConfig, password: Option<&SecretString>) -> tokio_postgres::Config {
    let mut pg = tokio_postgres::Config::new();
    pg.host(&cfg.host)
        .port(cfg.port)
        .user(&cfg.user)
        .dbname(&cfg.dbname)
        .application_name("ephemera")
        // The server gives up on a statement after this long; the client waits a little longer
        // (`Shared::timed`) so a server that vanished does not hold a request forever.
        .options(format!("-c statement_timeout={}", cfg.statement_timeout_ms))
        .connect_timeout(Duration::from_millis(cfg.statement_timeout_ms))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    if let Some(password) = password {
        pg.password(password.expose());
    }
    pg
}

/// rustls with exactly the roots of `ca_file`: verify-full (chain and host name) or nothing.
#[derive(Clone)]
struct RustlsConnect(Arc<rustls::ClientConfig>);

impl RustlsConnect {
    fn new(cfg: &PostgresConfig, what: &str) -> Result<RustlsConnect, String> {
        let Some(ca_file) = &cfg.ca_file else { return Err(format!("{what}.ca_file: required with TLS")) };
        let mut roots = rustls::RootCertStore::empty();
        let certs =
            CertificateDer::pem_file_iter(ca_file).map_err(|e| format!("{what}.ca_file {}: {e}", ca_file.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("{what}.ca_file {}: {e}", ca_file.display()))?;
            roots.add(cert).map_err(|e| format!("{what}.ca_file {}: {e}", ca_file.display()))?;
        }
        if roots.is_empty() {
            return Err(format!("{what}.ca_file {}: no certificate in it", ca_file.display()));
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{what}: TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(RustlsConnect(Arc::new(config)))
    }
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = RustlsConnectOne;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnectOne> {
        let name =
            ServerName::try_from(domain.to_string()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(RustlsConnectOne { config: self.0.clone(), name })
    }
}

pub struct RustlsConnectOne {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnectOne
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let stream = tokio_rustls::TlsConnector::from(self.config).connect(self.name, stream).await?;
            Ok(TlsStream(stream))
        })
    }
}

pub struct TlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

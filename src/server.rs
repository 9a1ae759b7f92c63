//! Start-up and shutdown: config → App → listener, background refreshers and the reaper.
//! The binary and the integration tests start the broker through the same [`start`].

use crate::app::policies::{LivePolicies, PolicySource};
use crate::app::{App, Parts};
use crate::audit::Audit;
use crate::clock::Clock;
use crate::config::{BackendConfig, Config, StoreConfig};
use crate::dev::{DEV_POLICY, DevIssuer};
use crate::identity::Verifier;
use crate::identity::jwks::http_client;
use crate::ledger::{Event, FileStore, FileStoreOptions, LeaseStore, PgStore, RetryPolicy, StorageWrap};
use crate::mint::keys::FileKeys;
use crate::mint::{BackendWrap, Backends};
use crate::policy::LoadContext;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Options {
    pub config: Config,
    pub dev: bool,
    pub clock: Arc<dyn Clock>,
    /// Fault injection for tests: wraps the journal's storage (e.g. to fail writes like a full
    /// disk) and named backends (e.g. to fail revocations). `None` in production.
    pub faults: Option<Faults>,
}

/// Test hooks for faults a real part cannot be made to produce on demand.
#[derive(Default)]
pub struct Faults {
    pub storage: Option<StorageWrap>,
    pub backend: Option<Arc<BackendWrap>>,
}

impl Options {
    pub fn new(config: Config, dev: bool, clock: Arc<dyn Clock>) -> Options {
        Options { config, dev, clock, faults: None }
    }
}

/// A started broker.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets in-flight requests finish, stops background tasks, flushes the
    /// journal. Live leases stay live: their jobs are still running, and the next start resumes
    /// them.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.server).await;
        self.background.iter().for_each(JoinHandle::abort);
        if let Err(e) = self.app.store().flush().await {
            tracing::error!(error = %e, "lease store flush at shutdown failed");
        }
    }

    /// Runs until SIGTERM or Ctrl-C, then shuts down gracefully.
    pub async fn until_signal(self) {
        wait_for_signal().await;
        tracing::info!("shutting down: finishing in-flight requests");
        self.shutdown().await;
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Builds everything and starts serving. Refuses to start on any config or policy error.
pub async fn start(options: Options) -> Result<Running, String> {
    crate::identity::provider::install_crypto();
    let Options { mut config, dev, clock, faults } = options;
    let mut faults = faults.unwrap_or_default();
    let listener = bind(&config, dev).await?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (dev_issuer, builtin) = if dev { dev_mode(&mut config, addr)? } else { (None, Vec::new()) };
    let policies = load_policies(&config, dev, builtin, clock.now())?;
    let audit = open_audit(&config, dev)?;
    config.hooks.load_secrets().map_err(|errs| format!("refusing to start: {}", errs.join("; ")))?;
    let store = open_store(&config, faults.storage.take()).await?;
    let keys = FileKeys::new(&config.data_dir);
    let mut backends = Backends::from_config(&config, &keys, &clock, store.exclusive()).await?;
    if let Some(wrap) = &faults.backend {
        backends.wrap(wrap.as_ref());
    }
    let verifier = Verifier::new(&config.issuers, &http_client(), &clock)?;
    let app = Arc::new(App::new(Parts {
        verifier,
        policies,
        backends,
        store,
        clock,
        public_url: config.public_url.clone(),
        admin_token_sha256: config.admin_token_sha256,
        dev: dev_issuer,
        hooks: config.hooks.clone(),
        audit,
        limits: crate::limits::Limits::new(&config.limits, &config.issuers),
    }));
    let (tx, rx) = oneshot::channel::<()>();
    let bounds = crate::http::Bounds::from_config(&config.limits);
    let server = tokio::spawn(crate::http::serve(listener, crate::http::router(app.clone()), bounds, rx));
    let background = spawn_background(&app, &config);
    tracing::info!(%addr, policies = app.policies().current().len(), issuers = config.issuers.len(), dev, "ephemera started");
    Ok(Running { addr, app, shutdown: Some(tx), server, background })
}

/// The listener. `--dev` serves an unauthenticated token issuer, so loopback only.
async fn bind(config: &Config, dev: bool) -> Result<tokio::net::TcpListener, String> {
    if dev && !config.listen.ip().is_loopback() {
        return Err(format!(
            "--dev serves an unauthenticated token issuer, so it listens on loopback only, not {}",
            config.listen
        ));
    }
    tokio::net::TcpListener::bind(config.listen).await.map_err(|e| format!("cannot listen on {}: {e}", config.listen))
}

/// `serve --dev`: the in-process issuer standing in for every platform's, a `jwt`
/// backend, the built-in `dev` policy, an admin token and an audit file in the data directory.
fn dev_mode(config: &mut Config, addr: SocketAddr) -> Result<(Option<Arc<DevIssuer>>, Vec<Builtin>), String> {
    config.public_url = format!("http://{addr}");
    crate::mint::keys::create_private_dir(&config.data_dir)
        .map_err(|e| format!("data dir {}: {e}", config.data_dir.display()))?;
    let issuer = Arc::new(DevIssuer::load_or_generate(&config.data_dir, &config.public_url)?);
    config.issuers = issuer.issuer_configs(&config.public_url);
    config.backends.entry("jwt".into()).or_insert_with(BackendConfig::default_jwt);
    if config.admin_token_sha256.is_none() {
        config.admin_token_sha256 = Some(dev_admin_token(&config.data_dir)?);
    }
    // Dev mode audits into its data directory unless told otherwise: the walkthrough shows it.
    config.audit.get_or_insert_with(|| crate::config::AuditConfig {
        file: config.data_dir.join(DEV_AUDIT_FILE),
        claims: crate::config::DEFAULT_AUDIT_CLAIMS.iter().map(|c| (*c).to_string()).collect(),
    });
    Ok((Some(issuer), vec![("dev".into(), DEV_POLICY.into())]))
}

/// A built-in policy: (name, YAML).
type Builtin = (String, String);

/// Loads and lints every policy; any error refuses the start.
fn load_policies(
    config: &Config,
    dev: bool,
    builtin: Vec<Builtin>,
    now: crate::clock::UnixSeconds,
) -> Result<LivePolicies, String> {
    // `serve --dev` works from any directory: without a policies directory it serves `dev` alone.
    let policies_dir = if dev && !config.policies_dir.exists() {
        tracing::warn!(dir = %config.policies_dir.display(), "no policies directory; serving the built-in `dev` policy only");
        None
    } else {
        Some(config.policies_dir.clone())
    };
    let source = PolicySource { dir: policies_dir, builtin, ctx: LoadContext::from_config(config) };
    let policies = source
        .load()
        .map_err(|list| format!("refusing to start: {} policy error(s):\n  {}", list.len(), list.join("\n  ")))?;
    Ok(LivePolicies::new(policies, source, now))
}

fn open_audit(config: &Config, dev: bool) -> Result<Audit, String> {
    match &config.audit {
        Some(audit) => Audit::open(audit, &config.replica_id).map_err(|e| format!("refusing to start: {e}")),
        None => {
            if !dev {
                tracing::warn!("no [audit] file configured: exchanges, denials and revocations are not audited");
            }
            Ok(Audit::disabled())
        }
    }
}

/// `ephemera ledger export`: every lease of the configured store in its current state and every
/// replay key still guarded, one JSON record per line ([`Event`]), to `out`. Returns how many
/// records. Run it with the brokers on that store stopped: a file store's journal is the
/// broker's own, and leases issued after the export would not move.
pub async fn export_ledger(config: &Config, out: &mut dyn std::io::Write) -> Result<usize, String> {
    let store = open_store(config, None).await?;
    let records = store.export().await.map_err(|e| e.0)?;
    for record in &records {
        serde_json::to_writer(&mut *out, record).map_err(|e| format!("writing the export: {e}"))?;
        out.write_all(b"\n").map_err(|e| format!("writing the export: {e}"))?;
    }
    out.flush().map_err(|e| format!("writing the export: {e}"))?;
    Ok(records.len())
}

/// Records per transaction of `ledger import`: a failed import keeps what committed before, and
/// running it again adds only what is missing.
const IMPORT_CHUNK: usize = 10_000;

/// What `ledger import` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Imported {
    pub records: usize,
    pub new_leases: usize,
}

/// `ephemera ledger import`: what `export` wrote, into the configured store. A lease or replay
/// key already there is kept as it is, so an interrupted import can be run again. A line that
/// does not parse stops the import before anything of its chunk is written, naming its line.
pub async fn import_ledger(config: &Config, input: &mut dyn std::io::BufRead) -> Result<Imported, String> {
    let store = open_store(config, None).await?;
    let mut done = Imported::default();
    let mut chunk: Vec<Event> = Vec::with_capacity(IMPORT_CHUNK);
    let mut line = String::new();
    let mut number = 0usize;
    loop {
        line.clear();
        let read = input.read_line(&mut line).map_err(|e| format!("reading the import: {e}"))?;
        number += 1;
        if read > 0 && !line.trim().is_empty() {
            // The parse error names the line and column, never the record's text.
            let record: Event =
                serde_json::from_str(&line).map_err(|e| format!("line {number}: not a ledger record: {e}"))?;
            chunk.push(record);
        }
        if chunk.len() == IMPORT_CHUNK || (read == 0 && !chunk.is_empty()) {
            done.new_leases += store.import(&chunk).await.map_err(|e| e.0)?;
            done.records += chunk.len();
            chunk.clear();
        }
        if read == 0 {
            break;
        }
    }
    store.flush().await.map_err(|e| e.0)?;
    Ok(done)
}

/// The lease store: the file store under `data_dir/ledger`, replayed before anything is served,
/// or the shared database, migrated to this binary's schema.
async fn open_store(config: &Config, wrap: Option<StorageWrap>) -> Result<Box<dyn LeaseStore>, String> {
    if let StoreConfig::Postgres(pg) = &config.ledger.store {
        let password = pg.read_password()?;
        let store = PgStore::open(pg, password.as_ref(), &config.replica_id, RetryPolicy::default()).await?;
        return Ok(Box::new(store));
    }
    let dir = config.data_dir.join("ledger");
    crate::mint::keys::create_private_dir(&dir).map_err(|e| format!("ledger directory {}: {e}", dir.display()))?;
    let options = FileStoreOptions {
        retry: RetryPolicy::default(),
        compact_bytes: config.ledger.compact_bytes,
        compact_ratio: config.ledger.compact_ratio,
    };
    Ok(Box::new(FileStore::open(&dir, options, wrap)?))
}

/// One key refresher per issuer, the reaper (which first resumes the ledger) and the reloader.
fn spawn_background(app: &Arc<App>, config: &Config) -> Vec<JoinHandle<()>> {
    let mut background: Vec<JoinHandle<()>> =
        app.verifier().issuers().map(|i| tokio::spawn(i.jwks.clone().run_refresh())).collect();
    background.push(tokio::spawn(reaper(app.clone(), config.ledger.reap_interval_secs)));
    background.push(tokio::spawn(reloader(app.clone(), config.reload_watch_secs)));
    background
}

/// Dev mode's admin token: generated once into `data_dir/admin-token` (0600), like `vault
/// server -dev`'s root token, and kept across restarts with the same data directory.
fn dev_admin_token(data_dir: &std::path::Path) -> Result<[u8; 32], String> {
    let path = data_dir.join(DEV_ADMIN_TOKEN_FILE);
    if !path.exists() {
        let token = crate::ids::b64url(&crate::ids::random::<32>());
        crate::mint::keys::write_private_file(&path, token.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let token = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, token.trim().as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    Ok(out)
}

/// Where `serve --dev` writes its audit events (unless `[audit]` names a file), in the data directory.
pub const DEV_AUDIT_FILE: &str = "audit.jsonl";

/// Where `serve --dev` keeps its admin token, inside the data directory.
pub const DEV_ADMIN_TOKEN_FILE: &str = "admin-token";

/// Reloads the policies on SIGHUP (and reopens the audit file, for logrotate), and when the
/// policies directory changes (polled every `watch_secs`; `None`: SIGHUP only).
async fn reloader(app: Arc<App>, watch_secs: Option<i64>) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    let mut hangup: Option<()> = None;
    let period = Duration::from_secs(u64::try_from(watch_secs.unwrap_or(0).max(1)).unwrap_or(2));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the set was just loaded
    loop {
        let forced = tokio::select! {
            _ = async {
                #[cfg(unix)]
                match hangup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
                #[cfg(not(unix))]
                std::future::pending::<()>().await
            } => true,
            _ = tick.tick(), if watch_secs.is_some() => false,
        };
        if forced {
            tracing::info!("SIGHUP: reloading policies, reopening the audit file");
            if let Err(e) = app.audit().reopen().await {
                tracing::error!(error = %e, "audit file not reopened; still writing to the old one");
            }
        }
        app.reload_policies(forced).await;
    }
}

/// Resumes the ledger (pending revocations, passed expiries), then reaps: due expiries and
/// retries every second, housekeeping every `reap_interval` (`App::reap_due`, `App::housekeep`).
async fn reaper(app: Arc<App>, interval_secs: i64) {
    app.resume().await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0_i64;
    loop {
        tick.tick().await;
        app.reap_due().await;
        ticks += 1;
        if ticks >= interval_secs.max(1) {
            ticks = 0;
            app.housekeep().await;
        }
    }
}

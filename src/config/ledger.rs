//! `[ledger]`: where leases live. The file journal under `data_dir` (the default), or a shared
//! PostgreSQL database for several replicas.

use super::file::Errors;
use crate::secret::SecretString;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// `[ledger]`, validated.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub store: StoreConfig,
    pub reap_interval_secs: i64,
    /// The journal is compacted once this many bytes were appended since the last compaction
    /// began, and at least `compact_ratio` times its snapshot.
    pub compact_bytes: u64,
    pub compact_ratio: f64,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The embedded journal under `data_dir/ledger`.
    File,
    Postgres(PostgresConfig),
}

impl StoreConfig {
    pub fn is_shared(&self) -> bool {
        matches!(self, StoreConfig::Postgres(_))
    }
}

/// `store = "postgres"`: the connection, already taken apart. The password is never in here: it
/// lives in `password_file` and is read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    /// `sslmode=verify-full` (the default): TLS, the server's certificate checked against
    /// `ca_file` and its name against `host`. `false` only with an explicit `sslmode=disable`.
    pub tls: bool,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub pool_size: usize,
    pub statement_timeout_ms: u64,
    /// How long a replica's claim on a revocation holds: work claimed by a replica that died
    /// mid-attempt is taken over by another this long after the claim. Longer than any
    /// backend's upstream timeout, or a slow attempt is tried twice (harmless: revocation is
    /// idempotent, but it costs an upstream call).
    pub claim_timeout_secs: i64,
}

impl PostgresConfig {
    /// A config from a URL alone, with the defaults (tools and tests; the broker reads
    /// `[ledger]`).
    pub fn from_url(text: &str) -> Result<PostgresConfig, String> {
        parse_url(text)
    }

    /// The password in `password_file`, read now (at start: a rotated file is read by the next
    /// start). `None` without a file (trust or certificate authentication).
    pub fn read_password(&self) -> Result<Option<SecretString>, String> {
        let Some(file) = &self.password_file else { return Ok(None) };
        super::read_secret_file(file).map(Some).map_err(|e| format!("ledger.password_file: {e}"))
    }

    /// Where it connects, for log lines and errors: never a password (the URL cannot hold one).
    pub fn display(&self) -> String {
        let tls = if self.tls { "tls" } else { "no tls" };
        format!("postgres://{}@{}:{}/{} ({tls})", self.user, self.host, self.port, self.dbname)
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLedger {
    reap_interval: Option<String>,
    compact_bytes: Option<u64>,
    compact_ratio: Option<f64>,
    store: Option<String>,
    url: Option<String>,
    password_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    pool_size: Option<usize>,
    statement_timeout: Option<String>,
    claim_timeout: Option<String>,
}

const MAX_POOL: usize = 256;

impl RawLedger {
    pub(super) fn validate(&self, base: &Path, errs: &mut Errors) -> LedgerConfig {
        let reap_interval_secs = errs.duration("ledger.reap_interval", self.reap_interval.as_deref(), 5);
        let store = match self.store.as_deref() {
            None | Some("file") => {
                for (set, key) in [
                    (self.url.is_some(), "url"),
                    (self.password_file.is_some(), "password_file"),
                    (self.ca_file.is_some(), "ca_file"),
                    (self.pool_size.is_some(), "pool_size"),
                    (self.statement_timeout.is_some(), "statement_timeout"),
                    (self.claim_timeout.is_some(), "claim_timeout"),
                ] {
                    if set {
                        errs.0.push(format!("ledger.{key}: only for store = \"postgres\""));
                    }
                }
                StoreConfig::File
            }
            Some("postgres") => self.postgres(base, errs).map_or(StoreConfig::File, StoreConfig::Postgres),
            Some(other) => {
                errs.0.push(format!(
                    "ledger.store: `{}` is not a store (\"file\" or \"postgres\")",
                    crate::clock::truncate(other, 40)
                ));
                StoreConfig::File
            }
        };
        let compact_ratio = self.compact_ratio.unwrap_or(0.5);
        // Not a number, or a ratio so small a compaction follows every append: refused.
        if !(0.01..=100.0).contains(&compact_ratio) {
            errs.0.push("ledger.compact_ratio: between 0.01 and 100 (appends between compactions, as a share of the last snapshot)".into());
        }
        LedgerConfig {
            store,
            reap_interval_secs,
            compact_bytes: self.compact_bytes.unwrap_or(64 * 1024 * 1024),
            compact_ratio,
        }
    }

    fn postgres(&self, base: &Path, errs: &mut Errors) -> Option<PostgresConfig> {
        let Some(url) = self.url.as_deref() else {
            errs.0.push("ledger.url: required with store = \"postgres\"".into());
            return None;
        };
        let pool_size = self.pool_size.unwrap_or(16);
        if !(1..=MAX_POOL).contains(&pool_size) {
            errs.0.push(format!("ledger.pool_size: between 1 and {MAX_POOL}"));
        }
        let timeout_secs = errs.duration("ledger.statement_timeout", self.statement_timeout.as_deref(), 5);
        if !(1..=600).contains(&timeout_secs) {
            errs.0.push("ledger.statement_timeout: between 1s and 10m".into());
        }
        let claim_timeout_secs = errs.duration("ledger.claim_timeout", self.claim_timeout.as_deref(), 60);
        if !(1..=3600).contains(&claim_timeout_secs) {
            errs.0.push("ledger.claim_timeout: between 1s and 1h".into());
        }
        let parsed = parse_url(url).map_err(|e| errs.0.push(format!("ledger.url: {e}"))).ok()?;
        if parsed.tls && self.ca_file.is_none() {
            // rustls is given exactly the roots we are told about: a database certificate is
            // almost always from a private CA, and trusting every public CA would let anyone
            // with a certificate for the host name stand in for the database.
            errs.0.push(
                "ledger.ca_file: required with sslmode=verify-full (the CA that signed the database's certificate)"
                    .into(),
            );
        }
        Some(PostgresConfig {
            password_file: self.password_file.as_ref().map(|p| base.join(p)),
            ca_file: self.ca_file.as_ref().map(|p| base.join(p)),
            pool_size,
            statement_timeout_ms: u64::try_from(timeout_secs.max(1)).unwrap_or(5) * 1000,
            claim_timeout_secs,
            ..parsed
        })
    }
}

/// A connection as a `[backends.NAME] type = "postgres"` names it (`at` is that table): the
/// same URL rules and TLS requirement as the ledger's.
pub(super) fn backend_connection(
    at: &str,
    url: &str,
    (password_file, ca_file): (Option<&Path>, Option<&Path>),
    timeout_secs: i64,
    base: &Path,
    errs: &mut Errors,
) -> Option<PostgresConfig> {
    let parsed = parse_url(url).map_err(|e| errs.0.push(format!("{at}.url: {e}"))).ok()?;
    if parsed.tls && ca_file.is_none() {
        errs.0.push(format!(
            "{at}.ca_file: required with sslmode=verify-full (the CA that signed the database's certificate)"
        ));
    }
    Some(PostgresConfig {
        password_file: password_file.map(|p| base.join(p)),
        ca_file: ca_file.map(|p| base.join(p)),
        pool_size: 4,
        statement_timeout_ms: u64::try_from(timeout_secs.clamp(1, 600)).unwrap_or(10) * 1000,
        claim_timeout_secs: 60,
        ..parsed
    })
}

/// `postgres://user@host:port/dbname?sslmode=…`, checked. Errors never repeat the URL (it might
/// hold a password someone pasted in).
fn parse_url(text: &str) -> Result<PostgresConfig, String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err("must start with postgres://".into());
    }
    // A password in the URL ends up in shell history, process lists and config repositories.
    if url.password().is_some() {
        return Err("a password in the URL is not allowed: put it in password_file".into());
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err("a host is required (postgres://user@host:5432/dbname)".into()),
    };
    let user = percent_encoding::percent_decode_str(url.username()).decode_utf8_lossy().to_string();
    if user.is_empty() {
        return Err("a user is required (postgres://user@host:5432/dbname)".into());
    }
    let path = url.path().trim_start_matches('/');
    let dbname = percent_encoding::percent_decode_str(path).decode_utf8_lossy().to_string();
    let dbname = if dbname.is_empty() { user.clone() } else { dbname };
    let mut tls = true;
    for (key, value) in url.query_pairs() {
        match (&*key, &*value) {
            ("sslmode", "verify-full") => tls = true,
            ("sslmode", "disable") => tls = false,
            // libpq's other modes either fall back to plain text (allow, prefer: a downgrade an
            // attacker on the path chooses) or encrypt without checking who answers (require,
            // verify-ca: a stand-in database with any certificate, or any certificate of the CA).
            ("sslmode", other) => {
                return Err(format!(
                    "sslmode={} does not verify the database: use sslmode=verify-full (with ca_file), or \
                     sslmode=disable on a private network",
                    crate::clock::truncate(other, 20)
                ));
            }
            (other, _) => {
                return Err(format!(
                    "unknown parameter `{}` (only sslmode; the password goes in password_file)",
                    crate::clock::truncate(other, 40)
                ));
            }
        }
    }
    Ok(PostgresConfig {
        host,
        port: url.port().unwrap_or(5432),
        user,
        dbname,
        tls,
        password_file: None,
        ca_file: None,
        pool_size: 16,
        statement_timeout_ms: 5000,
        claim_timeout_secs: 60,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(toml_text: &str) -> Result<LedgerConfig, Vec<String>> {
        let raw: RawLedger = toml::from_str(toml_text).map_err(|e| vec![e.to_string()])?;
        let mut errs = Errors::default();
        let out = raw.validate(Path::new("/etc/ephemera"), &mut errs);
        if errs.0.is_empty() { Ok(out) } else { Err(errs.0) }
    }

    #[test]
    fn a_postgres_store_is_taken_apart_with_verified_tls_by_default() {
        let c = ledger(
            "store = \"postgres\"\nurl = \"postgres://eph@db.internal/ledger\"\nca_file = \"ca.pem\"\n\
             password_file = \"pw\"\npool_size = 4\nstatement_timeout = \"2s\"\n",
        )
        .unwrap();
        let StoreConfig::Postgres(pg) = c.store else { panic!("not postgres") };
        assert_eq!(
            (pg.host.as_str(), pg.port, pg.user.as_str(), pg.dbname.as_str()),
            ("db.internal", 5432, "eph", "ledger")
        );
        assert!(pg.tls);
        assert_eq!(pg.ca_file.as_deref(), Some(Path::new("/etc/ephemera/ca.pem")));
        assert_eq!((pg.pool_size, pg.statement_timeout_ms), (4, 2000));
        assert_eq!(pg.display(), "postgres://eph@db.internal:5432/ledger (tls)");
    }

    #[test]
    fn a_password_in_the_url_is_refused_without_repeating_it() {
        let errs = ledger("store = \"postgres\"\nurl = \"postgres://eph:hunter2@db/x?sslmode=disable\"\n").unwrap_err();
        let text = errs.join("\n");
        assert!(text.contains("password_file"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn sslmodes_that_do_not_verify_the_database_are_refused() {
        for mode in ["require", "prefer", "allow", "verify-ca"] {
            let errs =
                ledger(&format!("store = \"postgres\"\nurl = \"postgres://e@db/x?sslmode={mode}\"\nca_file = \"c\"\n"))
                    .unwrap_err();
            assert!(errs.join("\n").contains("does not verify the database"), "{mode}: {errs:?}");
        }
        let errs = ledger("store = \"postgres\"\nurl = \"postgres://e@db/x\"\n").unwrap_err();
        assert!(errs.join("\n").contains("ledger.ca_file: required"), "{errs:?}");
        let c = ledger("store = \"postgres\"\nurl = \"postgres://e@127.0.0.1:6543/x?sslmode=disable\"\n").unwrap();
        assert!(matches!(c.store, StoreConfig::Postgres(PostgresConfig { tls: false, port: 6543, .. })));
    }

    #[test]
    fn postgres_keys_without_the_postgres_store_are_errors() {
        let errs = ledger("url = \"postgres://e@db/x\"\npool_size = 3\n").unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(ledger("store = \"mysql\"\n").unwrap_err()[0].contains("not a store"));
        assert!(ledger("store = \"postgres\"\n").unwrap_err()[0].contains("ledger.url: required"));
        let errs =
            ledger("store = \"postgres\"\nurl = \"postgres://e@db/x?sslmode=disable&password=x\"\n").unwrap_err();
        assert!(errs[0].contains("unknown parameter `password`"), "{errs:?}");
    }
}

//! audit: one JSON line per exchange, denial, revocation and reload, on its own sink (a file).
//!
//! The sink fails closed for issuing: when an exchange's event cannot be written, the exchange
//! fails with 503 and whatever it minted is revoked (Vault does the same with its audit devices).
//! Ending a lease never waits on the audit sink: a revocation that could not be audited is still a
//! revocation, and its failure to audit is logged.
//!
//! Events carry fingerprints (SHA-256) of secrets, never a secret, and only the claims named in
//! the configured allowlist. Each event is one `write(2)` on a file opened with `O_APPEND`, so
//! concurrent brokers or a log shipper never see interleaved lines. `reopen()` (on SIGHUP) follows
//! a logrotate rename.

use crate::claims::Claims;
use crate::config::AuditConfig;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

pub struct Audit {
    sink: Option<Sink>,
    claims: Vec<String>,
    /// Events that could not be written (a metric).
    pub failures: AtomicU64,
}

struct Sink {
    path: PathBuf,
    file: Mutex<File>,
}

impl Audit {
    /// No sink: events are dropped (the server warns at start).
    pub fn disabled() -> Audit {
        Audit { sink: None, claims: Vec::new(), failures: AtomicU64::new(0) }
    }

    /// Opens (creating, mode 0600) the configured file for appending.
    pub fn open(config: &AuditConfig) -> Result<Audit, String> {
        let file = open_append(&config.file)?;
        Ok(Audit {
            sink: Some(Sink { path: config.file.clone(), file: Mutex::new(file) }),
            claims: config.claims.clone(),
            failures: AtomicU64::new(0),
        })
    }

    /// The file events go to, when there is one.
    pub fn path(&self) -> Option<&Path> {
        self.sink.as_ref().map(|s| s.path.as_path())
    }

    pub fn is_enabled(&self) -> bool {
        self.sink.is_some()
    }

    /// The allowlisted claims of a claim set, serialised straight from it (no copy): the
    /// exchange's hot path.
    pub fn selected<'a>(&'a self, claims: &'a Claims) -> Selected<'a> {
        Selected { names: &self.claims, claims }
    }

    /// Writes one event as one line. `Err` when the sink cannot take it (the caller decides
    /// whether that fails the request); always `Ok` without a sink.
    pub fn write(&self, event: &impl serde::Serialize) -> Result<(), String> {
        let Some(sink) = &self.sink else { return Ok(()) };
        let mut line = serde_json::to_vec(event).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let mut file = sink.file.lock().unwrap_or_else(PoisonError::into_inner);
        // One write_all of the whole line: with O_APPEND the line lands at the end in one piece.
        // A short write (a full disk) leaves a partial line; the next event starts on a new line
        // only if we say so, so a failed write is followed by a newline attempt.
        match file.write_all(&line) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = file.write_all(b"\n");
                self.failures.fetch_add(1, Ordering::Relaxed);
                Err(format!("audit file {}: {e}", sink.path.display()))
            }
        }
    }

    /// Reopens the file at its path (after logrotate moved it away).
    pub fn reopen(&self) -> Result<(), String> {
        let Some(sink) = &self.sink else { return Ok(()) };
        let fresh = open_append(&sink.path)?;
        *sink.file.lock().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File, String> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // The trail says who got what: not for every local user to read.
        options.mode(0o600);
    }
    options.open(path).map_err(|e| format!("cannot open the audit file {}: {e}", path.display()))
}

/// [`Audit::selected`]: a map of the allowlisted claims that the claim set carries.
pub struct Selected<'a> {
    names: &'a [String],
    claims: &'a Claims,
}

impl serde::Serialize for Selected<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for name in self.names {
            if let Some(value) = self.claims.get(name) {
                map.serialize_entry(name, value)?;
            }
        }
        map.end()
    }
}

//! The `ssh` backend: OpenSSH user certificates signed by the broker's CA, for the principals,
//! critical options and extensions a grant names, valid until the lease's credentials end.
//!
//! Minting: the job's own public key (`ssh_public_key` in the exchange; parsed strictly by
//! `ssh_format::parse_public_key`) or a key pair generated here, whose private key the job gets
//! once in the reply. The certificate is encoded by hand ([`cert`]) and signed with `ring`; its
//! key id names the lease and the job, so sshd's log line of every login leads back to both.
//!
//! Revocation: `expiry` (the certificate lives out its validity), or `krl`: ending the lease
//! puts the certificate's serial in the backend's revoked set, which `GET /v1/ssh/krl` serves as
//! a KRL ([`krl`]) until the certificate expires. The set lives in memory; the ledger rebuilds it
//! ([`Backend::learn_ended`]) at start-up and, on a shared store, from the other replicas at
//! every reaper pass.

mod cert;
mod keys;
mod krl;

use super::{Backend, BoxFuture, Credential, MintContext, MintError, Minted, Revocation, RevokeHandle};
use crate::clock::{Clock, UnixSeconds, rfc3339};
use crate::config::{SshBackendConfig, SshRevocation};
use crate::policy::{Grant, GrantedCredential, ResolvedSpec};
use crate::ssh_format::parse_public_key;
use keys::{CaKey, JobKey};
use serde_json::{Value, json};
use std::sync::Arc;

/// How far back a certificate's validity starts: a server whose clock is behind the broker's
/// by up to this much still takes it at once.
pub const CLOCK_SKEW_SECS: i64 = 60;

pub struct SshBackend {
    name: String,
    ca: CaKey,
    revocation: SshRevocation,
    /// Serials of ended leases' certificates that have not expired (`krl` only).
    revoked: krl::Revoked,
    clock: Arc<dyn Clock>,
}

impl SshBackend {
    /// Reads the CA key (a missing, encrypted or unsupported one stops the start, naming the file).
    pub fn new(name: &str, cfg: &SshBackendConfig, clock: Arc<dyn Clock>) -> Result<SshBackend, String> {
        let file = &cfg.ca_key_file;
        let bytes = std::fs::read(file).map_err(|e| format!("ca_key_file {}: {e}", file.display()))?;
        let ca = CaKey::from_pem(&bytes).map_err(|e| format!("ca_key_file {} {e}", file.display()))?;
        Ok(SshBackend {
            name: name.to_string(),
            ca,
            revocation: cfg.revocation,
            revoked: krl::Revoked::default(),
            clock,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The CA's public key line, for servers' `TrustedUserCAKeys` (`GET /v1/ssh/ca.pub`).
    pub fn ca_public_key_line(&self) -> String {
        self.ca.public().to_line(&format!("ephemera-{}", self.name))
    }

    /// Does this backend revoke through the KRL (`revocation = "krl"`)?
    pub fn publishes_krl(&self) -> bool {
        self.revocation == SshRevocation::Krl
    }

    /// Serials of revoked certificates that have not expired at `now`, ascending.
    pub fn revoked_serials(&self, now: UnixSeconds) -> Vec<u64> {
        self.revoked.live(now)
    }

    fn mint_now(&self, grant: &Grant, cred: &GrantedCredential, ctx: MintContext<'_>) -> Result<Minted, MintError> {
        let ResolvedSpec::Ssh { principals, force_command, source_address, extensions } = &cred.spec else {
            return Err(MintError::new(format!("grant `{}` is not an ssh grant", cred.name)));
        };
        let key_id = format!("ephemera {} {}", ctx.lease_id, grant.identity().job());
        let (key, private_key) = match ctx.ssh_public_key {
            Some(line) => (parse_public_key(line).map_err(|e| bad_public_key(&e))?, None),
            None => {
                let job = JobKey::generate(&key_id).map_err(MintError::new)?;
                (job.public, Some(job.private_openssh))
            }
        };
        let serial = random_serial().map_err(MintError::new)?;
        let valid_after = (ctx.now - CLOCK_SKEW_SECS).max(0);
        let valid_before = grant.expires_at();
        let nonce: [u8; 32] = random().map_err(MintError::new)?;
        let request = cert::Request {
            key: &key,
            serial,
            key_id: &key_id,
            principals,
            valid_after: u64::try_from(valid_after).unwrap_or(0),
            valid_before: u64::try_from(valid_before).unwrap_or(0),
            force_command: force_command.as_deref(),
            source_address: source_address.as_deref(),
            extensions,
        };
        let blob = cert::certify(&request, &self.ca, &nonce).map_err(MintError::new)?;
        Ok(Minted {
            credential: Credential {
                kind: "ssh",
                revocation: self.revocation(),
                expires_at: valid_before,
                public: vec![
                    ("certificate", json!(cert::line(&key, &blob, &key_id))),
                    ("public_key", json!(key.to_line(""))),
                    ("principals", json!(principals)),
                    // A string: a JSON number above 2^53 loses digits in JavaScript.
                    ("serial", json!(serial.to_string())),
                    ("key_id", json!(key_id)),
                    ("valid_after", json!(rfc3339(valid_after))),
                    ("valid_before", json!(rfc3339(valid_before))),
                ],
                secrets: private_key.map(|k| ("private_key", k)).into_iter().collect(),
            },
            handle: RevokeHandle {
                backend: cred.backend.clone(),
                data: json!({"serial": serial.to_string(), "valid_before": valid_before, "lease": ctx.lease_id}),
            },
        })
    }

    /// Puts a certificate's serial in the revoked set (`krl`); `expiry` revokes nothing.
    fn record_revoked(&self, handle: &RevokeHandle) -> Result<(), MintError> {
        if !self.publishes_krl() {
            return Ok(());
        }
        let (serial, valid_before) = handle_serial(&handle.data)
            .ok_or_else(|| MintError::new(format!("malformed ssh revoke handle of backend `{}`", self.name)))?;
        self.revoked.add(serial, valid_before, self.clock.now());
        Ok(())
    }
}

/// One KRL covering every `ssh` backend that revokes through it: one certificates section per
/// CA key, listing the serials every such backend with that key has revoked (two backends may
/// share a CA, and a server trusting it must see both). `None` when no backend publishes one.
pub fn krl(backends: &[Arc<SshBackend>], now: UnixSeconds) -> Option<Vec<u8>> {
    let mut by_ca: Vec<(&[u8], Vec<u64>)> = Vec::new();
    for backend in backends.iter().filter(|b| b.publishes_krl()) {
        let ca = backend.ca.public().blob();
        let serials = backend.revoked_serials(now);
        match by_ca.iter_mut().find(|(known, _)| *known == ca) {
            Some((_, listed)) => listed.extend(serials),
            None => by_ca.push((ca, serials)),
        }
    }
    if by_ca.is_empty() {
        return None;
    }
    for (_, serials) in &mut by_ca {
        serials.sort_unstable();
        serials.dedup();
    }
    Some(krl::encode(&by_ca, now, "ephemera: certificates of ended leases"))
}

/// (serial, valid_before) of a revoke handle.
fn handle_serial(data: &Value) -> Option<(u64, UnixSeconds)> {
    let serial = data.get("serial")?.as_str()?.parse::<u64>().ok()?;
    Some((serial, data.get("valid_before")?.as_i64()?))
}

/// The job's key is the caller's own input: a 400 at the exchange endpoint catches it first
/// (`ssh_format::parse_public_key`, the same check), so this is the backstop.
fn bad_public_key(why: &str) -> MintError {
    MintError::advise(format!("ssh_public_key {why}"), format!("`ssh_public_key` {why}"))
}

/// A random non-zero serial: a serial names a certificate in the KRL, and OpenSSH ignores 0
/// there. Random rather than counted, so replicas never coordinate and a serial says nothing
/// about how many certificates there are; two certificates of one CA share one with odds of
/// about n²/2⁶⁵, and then revoking one also refuses the other (never the other way round).
fn random_serial() -> Result<u64, String> {
    loop {
        let serial = u64::from_be_bytes(random()?);
        if serial != 0 {
            return Ok(serial);
        }
    }
}

fn random<const N: usize>() -> Result<[u8; N], String> {
    ring::rand::generate::<[u8; N]>(&ring::rand::SystemRandom::new())
        .map(|r| r.expose())
        .map_err(|_| "no randomness".to_string())
}

impl Backend for SshBackend {
    fn kind(&self) -> &'static str {
        "ssh"
    }

    /// `immediate` with a KRL: dead once the servers have fetched it again (docs/ssh.md says how
    /// often that should be); `expiry` without.
    fn revocation(&self) -> Revocation {
        match self.revocation {
            SshRevocation::Krl => Revocation::Immediate,
            SshRevocation::Expiry => Revocation::Expiry,
        }
    }

    fn mint<'a>(
        &'a self,
        grant: &'a Grant,
        cred: &'a GrantedCredential,
        ctx: MintContext<'a>,
    ) -> BoxFuture<'a, Result<Minted, MintError>> {
        Box::pin(async move { self.mint_now(grant, cred, ctx) })
    }

    fn revoke<'a>(&'a self, handle: &'a RevokeHandle) -> BoxFuture<'a, Result<(), MintError>> {
        Box::pin(async move { self.record_revoked(handle) })
    }

    /// Expired serials leave the set.
    fn maintain<'a>(&'a self, now: UnixSeconds) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            self.revoked.live(now);
        })
    }

    fn learns_ended(&self) -> bool {
        self.publishes_krl()
    }

    fn learn_ended(&self, handle: &RevokeHandle) {
        if let Err(e) = self.record_revoked(handle) {
            tracing::warn!(backend = %self.name, error = %e.detail, "an ended lease's certificate is not in the KRL");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_never_zero_and_handles_carry_them_as_text() {
        for _ in 0..1000 {
            assert_ne!(random_serial().unwrap(), 0);
        }
        let data = json!({"serial": u64::MAX.to_string(), "valid_before": 5, "lease": "lse_x"});
        assert_eq!(handle_serial(&data), Some((u64::MAX, 5)));
        assert_eq!(handle_serial(&json!({"serial": 7, "valid_before": 5})), None, "a number is not what mint writes");
        assert_eq!(handle_serial(&json!({"serial": "-1", "valid_before": 5})), None);
    }

    #[test]
    fn a_key_that_is_not_one_is_the_callers_fault_with_advice() {
        let err = bad_public_key("is a certificate: send the public key itself");
        assert_eq!(err.advice.as_deref(), Some("`ssh_public_key` is a certificate: send the public key itself"));
    }
}

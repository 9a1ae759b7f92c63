//! What the `ssh` backends publish: the CA public key servers trust, and the KRL of the
//! certificates of ended leases (`http`'s `/v1/ssh/*`).

use super::App;
use crate::error::Error;
use std::sync::atomic::Ordering;

impl App {
    /// The CA public key line of the `ssh` backend named `backend`, or of the only one when none
    /// is named. Not found: no such `ssh` backend. Several and none named: the caller must say.
    pub fn ssh_ca_public_key(&self, backend: Option<&str>) -> Result<String, Error> {
        let all = self.backends.ssh();
        let chosen = match backend {
            Some(name) => all.iter().find(|b| b.name() == name),
            None if all.len() > 1 => {
                return Err(Error::BadRequest(
                    "several ssh backends are configured: name one with `?backend=NAME`".into(),
                ));
            }
            None => all.first(),
        };
        chosen.map(|b| format!("{}\n", b.ca_public_key_line())).ok_or(Error::NotFound)
    }

    /// One KRL for every `ssh` backend with `revocation = "krl"`. Not found when there is none:
    /// a server told to fetch a KRL from a broker that revokes by expiry only must fail loudly,
    /// not receive an empty list. Unavailable until the ledger is resumed: a KRL served before
    /// then would lack the revocations made before the start, and servers would drop them.
    pub fn ssh_krl(&self) -> Result<Vec<u8>, Error> {
        if !self.resumed.load(Ordering::Acquire) {
            return Err(Error::Unavailable("KRL asked for before the ledger was resumed".into()));
        }
        self.backends.ssh_krl(self.now()).ok_or(Error::NotFound)
    }
}

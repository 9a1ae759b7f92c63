//! The `ssh` backend: OpenSSH user certificates signed by the broker's CA (issue 17). Not built
//! yet: configuring it refuses the start.

use super::{Backend, BoxFuture, MintContext, MintError, Minted, Revocation, RevokeHandle};
use crate::clock::Clock;
use crate::config::SshBackendConfig;
use crate::policy::{Grant, GrantedCredential};
use std::sync::Arc;

pub struct SshBackend {
    name: String,
}

impl SshBackend {
    pub fn new(name: &str, _cfg: &SshBackendConfig, _clock: Arc<dyn Clock>) -> Result<SshBackend, String> {
        Err(format!("backend {name}: type = \"ssh\" is not built yet"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Backend for SshBackend {
    fn kind(&self) -> &'static str {
        "ssh"
    }

    fn revocation(&self) -> Revocation {
        Revocation::Expiry
    }

    fn mint<'a>(
        &'a self,
        _grant: &'a Grant,
        _cred: &'a GrantedCredential,
        _ctx: MintContext<'a>,
    ) -> BoxFuture<'a, Result<Minted, MintError>> {
        Box::pin(async { Err(MintError::new("type = \"ssh\" is not built yet")) })
    }

    fn revoke<'a>(&'a self, _handle: &'a RevokeHandle) -> BoxFuture<'a, Result<(), MintError>> {
        Box::pin(async { Ok(()) })
    }
}

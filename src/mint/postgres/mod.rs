//! The `postgres` backend: a login role per lease (issue 17). Not built
//! yet: configuring it refuses the start.

use super::{Backend, BoxFuture, MintContext, MintError, Minted, Revocation, RevokeHandle};
use crate::clock::Clock;
use crate::config::PostgresRolesConfig;
use crate::policy::{Grant, GrantedCredential};
use std::sync::Arc;

pub struct PostgresBackend {
    name: String,
}

impl PostgresBackend {
    pub fn new(name: &str, _cfg: &PostgresRolesConfig, _clock: Arc<dyn Clock>) -> Result<PostgresBackend, String> {
        Err(format!("backend {name}: type = \"ssh\" is not built yet"))
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Backend for PostgresBackend {
    fn kind(&self) -> &'static str {
        "postgres"
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

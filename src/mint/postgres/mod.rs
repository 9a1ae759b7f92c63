//! The `postgres` backend: a PostgreSQL login role per lease, member of exactly the group roles
//! its grant names, dropped the moment the lease ends (issue 17).
//!
//! Minting, in one transaction on the broker's admin connection: check what the group roles
//! would hand over (never a superuser, `CREATEROLE`, replication or `BYPASSRLS` role, directly or
//! through their own memberships, nor one of the predefined roles that reach the server's files
//! or programs), then `CREATE ROLE` with a random password given as a SCRAM-SHA-256 verifier
//! computed here (the password itself never reaches the server, so no `log_statement` setting
//! logs it), `VALID UNTIL` the lease's end, a `CONNECTION LIMIT`, and no attribute beyond
//! `LOGIN`; then `GRANT` each group role. The role's comment names its lease and when it was
//! made, so a role left behind by a crash is found and dropped ([`PostgresBackend::orphans`]).
//!
//! Revocation (`immediate`): `ALTER ROLE … NOLOGIN` (no new session), `pg_terminate_backend`
//! for every session it has (the credential is dead from here on), then the role's objects
//! dropped or reassigned (`owned_objects`) and `DROP ROLE`.

mod scram;

use super::{Backend, BoxFuture, Credential, MintContext, MintError, Minted, Orphan, Revocation, RevokeHandle};
use crate::clock::{UnixSeconds, rfc3339};
use crate::config::{OwnedObjects, PostgresRolesConfig};
use crate::pg_names::{forbidden_group_role, login_role, quote_ident, quote_literal};
use crate::policy::{Grant, GrantedCredential, ResolvedSpec};
use crate::secret::SecretString;
use deadpool_postgres::Pool;
use serde_json::{Value, json};

/// The comment on every role this backend creates: `ephemera lease=<id> created=<unix time>`.
const COMMENT_PREFIX: &str = "ephemera lease=";

pub struct PostgresBackend {
    name: String,
    cfg: PostgresRolesConfig,
    pool: Pool,
    /// `host:port` of the `dsn`.
    dsn_host: String,
}

impl PostgresBackend {
    pub fn new(name: &str, cfg: &PostgresRolesConfig) -> Result<PostgresBackend, String> {
        let password = cfg.connection.read_password().map_err(|e| e.replace("ledger.", ""))?;
        let pool = crate::pg_connect::pool(&cfg.connection, password.as_ref(), &format!("backends.{name}"))?;
        let c = &cfg.connection;
        let host = if c.host.contains(':') { format!("[{}]", c.host) } else { c.host.clone() };
        Ok(PostgresBackend {
            name: name.to_string(),
            dsn_host: cfg.dsn_host.clone().unwrap_or_else(|| format!("{host}:{}", c.port)),
            cfg: cfg.clone(),
            pool,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, MintError> {
        self.pool
            .get()
            .await
            .map_err(|e| MintError::new(format!("{}: no connection: {e}", self.cfg.connection.display())))
    }

    async fn mint_now(
        &self,
        grant: &Grant,
        cred: &GrantedCredential,
        ctx: MintContext<'_>,
    ) -> Result<Minted, MintError> {
        let ResolvedSpec::Postgres { roles, database } = &cred.spec else {
            return Err(MintError::new(format!("grant `{}` is not a postgres grant", cred.name)));
        };
        // A renewal mints again under the same lease: a random suffix keeps each role's name its own.
        let suffix = crate::secret::hex(&crate::ids::random::<3>());
        let Some(role) = login_role(&self.cfg.role_prefix, ctx.lease_id, &suffix) else {
            return Err(MintError::new(format!("lease id {} makes no role name", ctx.lease_id)));
        };
        let lease_end = grant.renew_until().unwrap_or(grant.expires_at());
        let password = SecretString::new(crate::ids::b64url(&crate::ids::random::<32>()));
        let verifier = scram::verifier(password.expose());
        let (Some(verifier), Some(until), Some(comment)) = (
            quote_literal(&verifier),
            quote_literal(&rfc3339(lease_end)),
            quote_literal(&format!("{COMMENT_PREFIX}{} created={}", ctx.lease_id, ctx.now)),
        ) else {
            return Err(MintError::new("a literal held a NUL"));
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.sql_error("BEGIN", &e))?;
        self.check_group_roles(&tx, roles).await?;
        let ident = quote_ident(&role);
        // Nothing but LOGIN: every attribute that could reach past the group roles is off, and
        // INHERIT (the default) so the job uses its group roles' privileges without SET ROLE.
        let create = format!(
            "CREATE ROLE {ident} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT \
             CONNECTION LIMIT {} VALID UNTIL {until} PASSWORD {verifier}",
            self.cfg.connection_limit
        );
        // The broker becomes a member of the role it made (not the other way round): revoking
        // must `DROP OWNED BY` it, which PostgreSQL allows only to the role's members.
        let mut statements =
            vec![create, format!("COMMENT ON ROLE {ident} IS {comment}"), format!("GRANT {ident} TO CURRENT_USER")];
        statements.extend(roles.iter().map(|g| format!("GRANT {} TO {ident}", quote_ident(g))));
        for statement in &statements {
            tx.batch_execute(statement).await.map_err(|e| self.sql_error("CREATE ROLE / GRANT", &e))?;
        }
        tx.commit().await.map_err(|e| self.sql_error("COMMIT", &e))?;

        let dbname = database.clone().unwrap_or_else(|| self.cfg.connection.dbname.clone());
        let sslmode = if self.cfg.connection.tls { "verify-full" } else { "disable" };
        let dsn = format!(
            "postgresql://{role}:{}@{}/{}?sslmode={sslmode}",
            password.expose(),
            self.dsn_host,
            percent_encoding::utf8_percent_encode(&dbname, percent_encoding::NON_ALPHANUMERIC)
        );
        Ok(Minted {
            credential: Credential {
                kind: "postgres",
                revocation: Revocation::Immediate,
                expires_at: lease_end,
                public: vec![
                    ("username", json!(role)),
                    ("host", json!(self.dsn_host)),
                    ("database", json!(dbname)),
                    ("roles", json!(roles)),
                ],
                secrets: vec![("password", password), ("dsn", SecretString::new(dsn))],
            },
            handle: RevokeHandle { backend: cred.backend.clone(), data: json!({"role": role}) },
        })
    }

    /// Every group role exists, and none of them, nor any role they are members of, is a
    /// superuser or has `CREATEROLE`, `REPLICATION` or `BYPASSRLS`, or is a forbidden predefined
    /// role. Attack: a group role that is itself a member of a powerful role hands that power to
    /// every job granted the group; the policy only names the group.
    async fn check_group_roles(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        roles: &[String],
    ) -> Result<(), MintError> {
        let rows = tx
            .query(
                "WITH RECURSIVE reached(oid) AS ( \
                   SELECT oid FROM pg_roles WHERE rolname = ANY($1) \
                   UNION SELECT m.roleid FROM pg_auth_members m JOIN reached r ON m.member = r.oid) \
                 SELECT r.rolname, r.rolsuper, r.rolcreaterole, r.rolreplication, r.rolbypassrls \
                 FROM pg_roles r JOIN reached USING (oid)",
                &[&roles],
            )
            .await
            .map_err(|e| self.sql_error("reading the group roles", &e))?;
        let names: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        if let Some(missing) = roles.iter().find(|r| !names.contains(r)) {
            return Err(MintError::advise(
                format!("group role {missing} does not exist"),
                format!("the group role `{missing}` does not exist in the database: create it, or correct the grant"),
            ));
        }
        for row in &rows {
            let name: String = row.get(0);
            let attributes = [(1, "SUPERUSER"), (2, "CREATEROLE"), (3, "REPLICATION"), (4, "BYPASSRLS")];
            let power = attributes.iter().find(|(i, _)| row.get::<_, bool>(*i)).map(|(_, a)| a.to_string());
            let power = power.or_else(|| forbidden_group_role(&name).map(str::to_string));
            if let Some(power) = power {
                return Err(MintError::advise(
                    format!("group role closure reaches {name} ({power})"),
                    format!(
                        "the grant's group roles reach `{name}` ({power}), which a job must never hold: grant a \
                         role with only the privileges the job needs"
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn revoke_now(&self, handle: &RevokeHandle) -> Result<(), MintError> {
        let Some(role) = handle.data.get("role").and_then(Value::as_str) else {
            return Err(MintError::new("malformed postgres revoke handle"));
        };
        // Attack: a handle altered in the ledger must not name a role outside this backend's.
        if !role.starts_with(&self.cfg.role_prefix) || crate::pg_names::check_identifier(role).is_err() {
            return Err(MintError::new(format!("revoke handle names `{role}`, not a role of this backend")));
        }
        let client = self.client().await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .map_err(|e| self.sql_error("reading the role", &e))?;
        if exists.is_none() {
            return Ok(()); // dropped before (a retry, or the orphan sweep)
        }
        let ident = quote_ident(role);
        // No new session from here on; then every open one ends. The credential is dead now.
        client
            .batch_execute(&format!("ALTER ROLE {ident} NOLOGIN"))
            .await
            .map_err(|e| self.sql_error("NOLOGIN", &e))?;
        client
            .query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", &[&role])
            .await
            .map_err(|e| self.sql_error("terminating the role's sessions", &e))?;
        let owned = match self.cfg.owned_objects {
            OwnedObjects::Drop => format!("DROP OWNED BY {ident}"),
            OwnedObjects::Reassign => format!("REASSIGN OWNED BY {ident} TO CURRENT_USER; DROP OWNED BY {ident}"),
        };
        client.batch_execute(&owned).await.map_err(|e| self.sql_error("its objects", &e))?;
        client.batch_execute(&format!("DROP ROLE IF EXISTS {ident}")).await.map_err(|e| self.sql_error("DROP ROLE", &e))
    }

    async fn orphans_now(&self, now: UnixSeconds) -> Vec<Orphan> {
        let client = match self.client().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(backend = %self.name, error = %e.detail, "orphan roles not looked for");
                return Vec::new();
            }
        };
        let rows = client
            .query(
                "SELECT r.rolname, shobj_description(r.oid, 'pg_authid') FROM pg_roles r WHERE starts_with(r.rolname, $1)",
                &[&self.cfg.role_prefix],
            )
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(backend = %self.name, error = %e, "orphan roles not looked for");
                return Vec::new();
            }
        };
        rows.iter()
            .filter_map(|row| {
                let role: String = row.get(0);
                let comment: Option<String> = row.get(1);
                let (lease, created) = parse_comment(comment.as_deref()?)?;
                (created + self.cfg.orphan_grace_secs <= now).then(|| Orphan {
                    lease_id: lease,
                    handle: RevokeHandle { backend: self.name.clone(), data: json!({"role": role}) },
                })
            })
            .collect()
    }

    fn sql_error(&self, what: &str, e: &tokio_postgres::Error) -> MintError {
        let text = match e.as_db_error() {
            Some(db) => format!("{} {}", db.code().code(), db.message()),
            None => e.to_string(),
        };
        MintError::new(format!("{}: {what}: {}", self.cfg.connection.display(), crate::clock::truncate(&text, 300)))
    }
}

/// `ephemera lease=<id> created=<unix time>` → (id, time).
fn parse_comment(comment: &str) -> Option<(String, UnixSeconds)> {
    let rest = comment.strip_prefix(COMMENT_PREFIX)?;
    let (lease, created) = rest.split_once(" created=")?;
    Some((lease.to_string(), created.parse().ok()?))
}

impl Backend for PostgresBackend {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn revocation(&self) -> Revocation {
        Revocation::Immediate
    }

    fn mint<'a>(
        &'a self,
        grant: &'a Grant,
        cred: &'a GrantedCredential,
        ctx: MintContext<'a>,
    ) -> BoxFuture<'a, Result<Minted, MintError>> {
        Box::pin(self.mint_now(grant, cred, ctx))
    }

    fn revoke<'a>(&'a self, handle: &'a RevokeHandle) -> BoxFuture<'a, Result<(), MintError>> {
        Box::pin(self.revoke_now(handle))
    }

    fn orphans<'a>(&'a self, now: UnixSeconds) -> BoxFuture<'a, Vec<Orphan>> {
        Box::pin(self.orphans_now(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_roles_comment_names_its_lease_and_birth() {
        assert_eq!(
            parse_comment("ephemera lease=lse_01AB created=1700000000"),
            Some(("lse_01AB".into(), 1_700_000_000))
        );
        assert_eq!(parse_comment("someone else's role"), None);
        assert_eq!(parse_comment("ephemera lease=lse_x created=soon"), None);
    }
}

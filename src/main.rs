//! The `ephemera` command line. Parsing only; the work is in the library.

use clap::{Args, Parser, Subcommand};
use ephemera::clock::{Clock, SystemClock};
use ephemera::config::Config;
use ephemera::policy::{LoadContext, PolicySet, lint, testing};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// jemalloc instead of glibc's malloc: an exchange makes a few hundred small, short-lived
/// allocations across threads (hyper, serde, the journal and audit buffers), and glibc's arenas
/// cost about a fifth of the broker's CPU there. Measured in one session with `scripts/bench
/// --broker` (docs/benchmarks.md): CPU per exchange −20 % or more; with a million live leases,
/// less RSS and a faster replay than glibc. mimalloc matched it on exchanges but kept 35 % more
/// RSS after a replay and replayed half as fast, so it is not used.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "ephemera",
    version,
    about = "CI/CD credential broker: OIDC job tokens in, job-scoped short-lived credentials out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker.
    Serve(ServeArgs),
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Development helpers for a running `serve --dev` broker.
    #[command(subcommand)]
    Dev(DevCommand),
    /// Move the ledger between stores (from the file journal to PostgreSQL, say). Stop the
    /// brokers on the source store first.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Exchange this job's OIDC ID token for the credentials a policy grants (prints them on stdout).
    #[command(after_help = EXCHANGE_HELP)]
    Exchange(ExchangeArgs),
    /// Revoke this job's leases (or one of them) before they expire.
    #[command(after_help = EXIT_CODES_HELP)]
    Revoke(RevokeArgs),
    /// Renew a lease and print its fresh AWS session for an AWS config profile's
    /// `credential_process` (the AWS CLI and SDKs run it again whenever the session expires).
    #[command(after_help = EXIT_CODES_HELP)]
    CredentialProcess(LeaseFileArgs),
    /// Renew a lease and print one of its fresh credentials (a broker JWT's token, or the
    /// credential as JSON), for tools that read a token from a command.
    #[command(after_help = EXIT_CODES_HELP)]
    Token {
        #[command(flatten)]
        lease: LeaseFileArgs,
        /// The grant name, as in the reply's `credentials`.
        #[arg(long, value_name = "NAME")]
        credential: String,
    },
}

/// The exit codes of `exchange` and `revoke` (docs/cli.md), for their `--help`.
macro_rules! exit_codes_help {
    () => {
        "\
Exit codes:
  0  success
  1  any other failure (bad reply, no token, no single `aws` credential for credential-process, ...)
  2  usage error
  3  denied by the policy (403 policy_denied)
  4  invalid ID token (401)
  5  broker unreachable, timed out (30 s), or answered 5xx / 429: worth retrying with a fresh token
Errors go to stderr as `ephemera: <code>: <message> (request <request_id>)`; the token is never printed."
    };
}

const EXIT_CODES_HELP: &str = exit_codes_help!();

const EXCHANGE_HELP: &str = concat!(
    "\
Formats:
  json                the broker's reply as is (lease id, expiry, every credential)
  env                 `export NAME='value'` lines for POSIX sh: `eval \"$(ephemera exchange ...)\"`
  credential-process  the AWS CLI / SDK external-process JSON for the single `aws` credential:
                      credential_process = ephemera exchange --broker URL --policy NAME --format credential-process
  github-env          the same variables as `env`, in $GITHUB_ENV's heredoc form (append it to $GITHUB_ENV;
                      masking the values with ::add-mask:: is the caller's job, the GitHub action does it)
  git-credential      git's credential-helper lines for the single `github` credential (a GitHub App token):
                      ephemera exchange ... --format git-credential > \"$RUNNER_TEMP/gh.cred\"
                      git -c credential.helper='!f() { test \"$1\" = get && cat \"$RUNNER_TEMP/gh.cred\"; }; f' push

",
    exit_codes_help!()
);

/// Where the job's OIDC ID token comes from.
#[derive(Args)]
struct TokenArgs {
    /// Read the ID token from this environment variable.
    #[arg(long, value_name = "VAR", default_value = ephemera::client::DEFAULT_TOKEN_ENV)]
    token_env: String,
    /// Read the ID token from this file instead (surrounding whitespace is ignored).
    #[arg(long, value_name = "FILE", conflicts_with = "token_env")]
    token_file: Option<PathBuf>,
}

impl TokenArgs {
    fn source(self) -> ephemera::client::TokenSource {
        match self.token_file {
            Some(path) => ephemera::client::TokenSource::File(path),
            None => ephemera::client::TokenSource::Env(self.token_env),
        }
    }
}

#[derive(Args)]
struct ExchangeArgs {
    /// The broker's base URL, e.g. https://ephemera.example.com.
    #[arg(long, value_name = "URL")]
    broker: String,
    /// The policy to exchange under.
    #[arg(long, value_name = "NAME")]
    policy: String,
    #[command(flatten)]
    token: TokenArgs,
    /// Lease lifetime, e.g. 10m (default and maximum: the policy's).
    #[arg(long, value_name = "D")]
    ttl: Option<String>,
    /// Output format (see below).
    #[arg(long, default_value = "json", value_parser = clap::builder::PossibleValuesParser::new(["json", "env", "credential-process", "github-env", "git-credential"]))]
    format: String,
    /// Also write the lease's renewal details here (mode 0600), for `credential-process` and
    /// `token`; the policy must allow renewal (`renew` in the policy).
    #[arg(long, value_name = "F")]
    lease_file: Option<PathBuf>,
    /// For an `ssh` grant: certify this OpenSSH public key (e.g. ~/.ssh/id_ed25519.pub) instead
    /// of having the broker generate a key pair.
    #[arg(long, value_name = "FILE")]
    ssh_public_key: Option<PathBuf>,
}

#[derive(Args)]
struct LeaseFileArgs {
    /// The lease file `ephemera exchange --lease-file` wrote.
    #[arg(long, value_name = "F")]
    lease_file: PathBuf,
}

#[derive(Args)]
struct RevokeArgs {
    /// The broker's base URL, e.g. https://ephemera.example.com.
    #[arg(long, value_name = "URL")]
    broker: String,
    /// Revoke only this lease (default: every lease of the token's job).
    #[arg(long, value_name = "ID")]
    lease: Option<String>,
    #[command(flatten)]
    token: TokenArgs,
}

#[derive(Args)]
struct ServeArgs {
    /// Config file (default: ./ephemera.toml when it exists, else built-in defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Development mode: loopback only, in-process dev issuers, a built-in `dev` policy.
    #[arg(long)]
    dev: bool,
    /// Address to listen on (dev default: 127.0.0.1:8080).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory (dev default: a fresh temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Parse and lint every policy (the server runs the same code), reporting every finding with
    /// file, policy, rule id, field and a fix. Exit status: 0 no errors, 1 any error (or, with
    /// --strict, any warning).
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "text", value_parser = clap::builder::PossibleValuesParser::new(["text", "json"]))]
        format: String,
        /// Fail on warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// Show every deny and match rule of a policy against a claim set, and the decision.
    /// Nothing is minted. Exit status: 0 allow, 3 deny, 1 error.
    Explain {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        policy: String,
        /// A JSON file of claims (e.g. the claims the GitHub Action saved on a denial).
        #[arg(long)]
        claims: PathBuf,
        /// The issuer the claims come from (default: the configured issuer whose url is the
        /// claims' `iss`, else the policy's own issuer).
        #[arg(long)]
        issuer: Option<String>,
        /// A JSON file of an agent's claims (its actor token's): every actor rule is evaluated
        /// against it, and the rule that admits it is named.
        #[arg(long)]
        actor_claims: Option<PathBuf>,
        /// The issuer the actor's claims come from (default: the configured issuer whose url
        /// is their `iss`).
        #[arg(long, requires = "actor_claims")]
        actor_issuer: Option<String>,
        /// `text` or `json`.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Run the policy test cases (`<policies dir>/tests/*.yaml`): each case's claims decided by
    /// its policy as an exchange would decide them. Exit status: 0 all pass, 1 otherwise.
    Test {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The directory of test files (default: `tests` in the policies directory).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[arg(long, default_value = "text", value_parser = clap::builder::PossibleValuesParser::new(["text", "json"]))]
        format: String,
    },
    /// Ask a running broker which live leases a policy change would end, before rolling it out
    /// (admin `POST /v1/policies/diff`). The directory is sent whole, as the new set. Nothing
    /// changes. Exit status: 0 when the broker would accept the set, 1 when it would refuse it.
    Diff {
        /// The broker's base URL.
        #[arg(long, value_name = "URL")]
        broker: String,
        /// The candidate policies directory.
        #[arg(long, value_name = "DIR", default_value = "policies")]
        dir: PathBuf,
        /// The environment variable holding the admin token (never on the command line).
        #[arg(long, value_name = "VAR", default_value = "EPHEMERA_ADMIN_TOKEN")]
        admin_token_env: String,
        /// `text` or `json`.
        #[arg(long, default_value = "text", value_parser = clap::builder::PossibleValuesParser::new(["text", "json"]))]
        format: String,
    },
    /// Print the JSON Schema of policy files (committed as policies/schema.json), for editors.
    Schema {
        /// Print the schema of policy test files instead (policies/tests/schema.json).
        #[arg(long)]
        tests: bool,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Print every lease of the configured store (in its current state) and every replay key
    /// still guarded, as JSON lines on stdout.
    Export {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Load what `export` printed into the configured store, from FILE or stdin. Leases already
    /// there are kept as they are, so an interrupted import can be run again.
    Import {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The export (default: stdin).
        file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DevCommand {
    /// Print a token from a running dev broker's in-process issuer.
    Token {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        broker: String,
        /// JSON file whose claims override the defaults (e.g. a fixture).
        #[arg(long)]
        claims: Option<PathBuf>,
        /// Which stand-in issuer signs: github, gitlab, buildkite, circleci, azure-pipelines,
        /// bitbucket, jenkins, or agents (an AI agent's identity token, for `actor_token`).
        #[arg(long, default_value = "github")]
        issuer: String,
    },
}

/// `println!` for the server's banner, ignoring a closed stdout: a broker must not die because
/// whoever started it stopped reading its output (`println!` panics on EPIPE).
macro_rules! say {
    () => {{
        let _ = std::io::Write::write_all(&mut std::io::stdout(), b"\n");
    }};
    ($($arg:tt)*) => {{
        let _ = std::io::Write::write_fmt(&mut std::io::stdout(), format_args!("{}\n", format_args!($($arg)*)));
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    ephemera::install_crypto();
    let result = match cli.command {
        Command::Exchange(args) => return client_command(exchange(args)),
        Command::Revoke(args) => return client_command(revoke(args)),
        Command::CredentialProcess(args) => {
            return client_command(async move { ephemera::client::credential_process_renewed(&args.lease_file).await });
        }
        Command::Token { lease, credential } => {
            return client_command(async move { ephemera::client::token(&lease.lease_file, &credential).await });
        }
        Command::Serve(args) => serve(args),
        Command::Policy(PolicyCommand::Diff { broker, dir, admin_token_env, format }) => {
            return client_command(async move {
                let admin = ephemera::client::TokenSource::Env(admin_token_env);
                ephemera::client::policy_diff(&broker, &dir, &admin, format == "json").await
            });
        }
        Command::Policy(PolicyCommand::Check { config, format, strict }) => {
            return policy_check(config.as_deref(), &format, strict);
        }
        Command::Policy(PolicyCommand::Explain {
            config,
            policy,
            claims,
            issuer,
            actor_claims,
            actor_issuer,
            format,
        }) => {
            let actor = actor_claims.as_deref().map(|path| (path, actor_issuer.as_deref()));
            return policy_explain(config.as_deref(), &policy, &claims, issuer.as_deref(), actor, &format);
        }
        Command::Policy(PolicyCommand::Test { config, dir, format }) => {
            return policy_test(config.as_deref(), dir.as_deref(), &format);
        }
        Command::Policy(PolicyCommand::Schema { tests }) => {
            write_stdout(&if tests { testing::test_schema() } else { ephemera::policy::policy_schema() })
        }
        Command::Dev(DevCommand::Token { broker, claims, issuer }) => dev_token(&broker, claims.as_deref(), &issuer),
        Command::Ledger(command) => ledger(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(message),
    }
}

/// A command's failure: its message on stderr, exit 1.
fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("ephemera: {message}");
    ExitCode::FAILURE
}

async fn exchange(args: ExchangeArgs) -> Result<String, ephemera::client::Failure> {
    let format = ephemera::client::Format::parse(&args.format)
        .map_err(|message| ephemera::client::Failure { exit: ephemera::client::EXIT_USAGE, message })?;
    let token = args.token.source();
    let request = ephemera::client::ExchangeArgs {
        broker: &args.broker,
        policy: &args.policy,
        token: &token,
        ttl: args.ttl.as_deref(),
        lease_file: args.lease_file.as_deref(),
        ssh_public_key: args.ssh_public_key.as_deref(),
    };
    ephemera::client::exchange(&request, format).await
}

async fn revoke(args: RevokeArgs) -> Result<String, ephemera::client::Failure> {
    ephemera::client::revoke(&args.broker, args.lease.as_deref(), &args.token.source()).await
}

/// Runs a client command: its output on stdout, or its failure on stderr with its exit code.
fn client_command(work: impl std::future::Future<Output = Result<String, ephemera::client::Failure>>) -> ExitCode {
    let result = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(work),
        Err(e) => Err(ephemera::client::Failure {
            exit: ephemera::client::EXIT_OTHER,
            message: format!("cannot start the runtime: {e}"),
        }),
    };
    match result {
        Ok(text) => match write_stdout(&text) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ephemera: {e}");
                ExitCode::from(ephemera::client::EXIT_OTHER)
            }
        },
        Err(failure) => {
            eprintln!("ephemera: {}", failure.message);
            ExitCode::from(failure.exit)
        }
    }
}

/// JSON log lines on stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .fmt_fields(ephemera::log_format::JsonFields)
        .event_format(ephemera::log_format::JsonLine)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

fn load_config(path: Option<&Path>) -> Result<Config, String> {
    Config::load(path).map(|(c, _)| c).map_err(|errs| format!("invalid config:\n  {}", errs.join("\n  ")))
}

fn ledger(command: LedgerCommand) -> Result<(), String> {
    match command {
        LedgerCommand::Export { config } => {
            let config = load_config(config.as_deref())?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let records = runtime()?.block_on(ephemera::server::export_ledger(&config, &mut out))?;
            eprintln!("ephemera: exported {records} records");
        }
        LedgerCommand::Import { config, file } => {
            let config = load_config(config.as_deref())?;
            let mut input: Box<dyn std::io::BufRead> = match &file {
                Some(path) => Box::new(std::io::BufReader::new(
                    std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?,
                )),
                None => Box::new(std::io::stdin().lock()),
            };
            let done = runtime()?.block_on(ephemera::server::import_ledger(&config, &mut input))?;
            eprintln!("ephemera: imported {} records, {} new leases", done.records, done.new_leases);
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let mut config = load_config(args.config.as_deref())?;
    // Dev mode without --data-dir gets a fresh directory, removed again on a clean shutdown.
    let mut temporary_data_dir = None;
    if args.dev {
        config.listen = args.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        config.data_dir = match args.data_dir {
            Some(dir) => dir,
            None => {
                let dir = fresh_temp_dir()?;
                temporary_data_dir = Some(dir.clone());
                dir
            }
        };
    } else {
        if let Some(listen) = args.listen {
            config.listen = listen;
        }
        if let Some(dir) = args.data_dir {
            config.data_dir = dir;
        }
    }
    let data_dir = config.data_dir.clone();
    runtime()?.block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let running = ephemera::server::start(ephemera::server::Options::new(config, args.dev, clock)).await?;
        if args.dev {
            print_dev_banner(&running.url(), &data_dir, running.app.audit().path());
        } else {
            say!("ephemera listening on {}", running.url());
        }
        running.until_signal().await;
        if let Some(dir) = temporary_data_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    })
}

fn fresh_temp_dir() -> Result<PathBuf, String> {
    let dir =
        std::env::temp_dir().join(format!("ephemera-dev-{}", ephemera::secret::hex(&ephemera::ids::random::<6>())));
    ephemera::mint::keys::create_private_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn print_dev_banner(url: &str, data_dir: &Path, audit: Option<&Path>) {
    let exe = std::env::current_exe().map_or_else(|_| "ephemera".to_string(), |p| p.display().to_string());
    say!("ephemera listening on {url}");
    say!(
        "dev mode: loopback only; in-process issuers (github, gitlab, buildkite, circleci, azure-pipelines, bitbucket, jenkins, and agents for AI agents) at {url}/dev/...; data in {}",
        data_dir.display()
    );
    say!("policies: the example policies plus `dev`, which the default dev token satisfies (grants a JWT named `api`)");
    say!();
    say!("Try it (POSIX sh):");
    // The reply holds a live JWT: it goes into the data directory (0700), not a shared /tmp path.
    let reply = shell_quote(&data_dir.join("exchange.json").display().to_string());
    say!("  TOKEN=$({} dev token --broker {url})", shell_quote(&exe));
    say!(
        "  curl -s -X POST {url}/v1/exchange -H \"Authorization: Bearer $TOKEN\" -d '{{\"policy\":\"dev\"}}' | tee {reply}"
    );
    say!("  JWT=$(sed -n 's/.*\"token\":\"\\([^\"]*\\)\".*/\\1/p' {reply})");
    say!("  curl -s -X POST {url}/v1/introspect --data-urlencode \"token=$JWT\"");
    say!("  curl -s -X POST {url}/v1/revoke -H \"Authorization: Bearer $TOKEN\" -d '{{}}'");
    say!("  curl -s -X POST {url}/v1/introspect --data-urlencode \"token=$JWT\"");
    say!();
    say!("An AI agent acting for the job gets a token for one tool server (RFC 8693, docs/token-exchange.md):");
    say!(
        "  curl -s {url}/oauth/token -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange -d subject_token=\"$({exe} dev token --broker {url})\" -d subject_token_type=urn:ietf:params:oauth:token-type:id_token -d actor_token=\"$({exe} dev token --broker {url} --issuer agents)\" -d actor_token_type=urn:ietf:params:oauth:token-type:jwt -d audience=dev -d resource=https://mcp.dev.ephemera.invalid -d scope=repo:read",
        exe = shell_quote(&exe)
    );
    say!();
    let admin = shell_quote(&data_dir.join(ephemera::server::DEV_ADMIN_TOKEN_FILE).display().to_string());
    say!("Operator console: {url}/ui/ (sign in with the admin token: cat {admin})");
    say!();
    say!("Admin API (leases, revoke by job or filter):");
    say!("  curl -s {url}/v1/leases -H \"Authorization: Bearer $(cat {admin})\"");
    say!();
    if let Some(audit) = audit {
        say!("Audit events (one JSON line per exchange, denial, revocation, reload):");
        say!("  tail -f {}", shell_quote(&audit.display().to_string()));
        say!();
    }
}

/// The config and its policies, for the commands that evaluate them (`explain`, `test`).
fn load_policies(config: Option<&Path>) -> Result<(Config, PolicySet), String> {
    let config = load_config(config)?;
    let set = PolicySet::load(Some(&config.policies_dir), &[], &LoadContext::from_config(&config))
        .map_err(|errors| format!("{} policy error(s); run `ephemera policy check`", errors.len()))?;
    Ok((config, set))
}

/// Single-quotes a word for POSIX sh.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

fn policy_explain(
    config: Option<&Path>,
    name: &str,
    claims: &Path,
    issuer: Option<&str>,
    actor: Option<(&Path, Option<&str>)>,
    format: &str,
) -> ExitCode {
    let (config, set) = match load_policies(config) {
        Ok(loaded) => loaded,
        Err(e) => return fail(e),
    };
    let Some(policy) = set.get(name) else {
        return fail(format!("no policy named `{name}` in {}", config.policies_dir.display()));
    };
    let read_claims = |path: &Path| -> Result<ephemera::claims::Claims, String> {
        std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: not a JSON object of claims: {e}", path.display()))
    };
    let claims = match read_claims(claims) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let actor = match actor.map(|(path, issuer)| read_claims(path).map(|c| (c, issuer))).transpose() {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let issuer = issuer.map_or_else(|| policy.claims_issuer(&claims, &config.issuers), str::to_string);
    let actor_issuer = actor.as_ref().map(|(c, named)| match named {
        Some(name) => name.to_string(),
        None => ephemera::policy::issuer_of(c, &config.issuers),
    });
    let actor = actor.as_ref().zip(actor_issuer.as_deref()).map(|((c, _), issuer)| (issuer, c));
    let trace = policy.explain_with_actor(&issuer, &claims, actor);
    let text = match format {
        "json" => serde_json::to_string_pretty(&trace).unwrap_or_default() + "\n",
        _ => trace.render(),
    };
    if let Err(e) = write_stdout(&text) {
        return fail(e);
    }
    if trace.decision == "allow" { ExitCode::SUCCESS } else { ExitCode::from(3) }
}

/// `policy check`: the lint report on stdout; exit 1 when it is not ok.
fn policy_check(config: Option<&Path>, format: &str, strict: bool) -> ExitCode {
    let config = match load_config(config) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let report = lint::check_dir(&config.policies_dir, &LoadContext::from_config(&config), strict);
    if let Err(e) = write_stdout(&if format == "json" { report.to_json() } else { report.render_text() }) {
        return fail(e);
    }
    if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// `policy test`: the report on stdout; exit 1 when a case fails or a file or case cannot load.
fn policy_test(config: Option<&Path>, dir: Option<&Path>, format: &str) -> ExitCode {
    let (config, policies) = match load_policies(config) {
        Ok(loaded) => loaded,
        Err(e) => return fail(e),
    };
    let dir = dir.map_or_else(|| config.policies_dir.join("tests"), Path::to_path_buf);
    let ctx = testing::Context { policies: &policies, issuers: &config.issuers };
    let report = match testing::Suite::load(&dir, &ctx) {
        Ok(suite) => suite.run(&policies),
        Err(message) => return fail(message),
    };
    if let Err(e) = write_stdout(&if format == "json" { report.render_json() } else { report.render_text() }) {
        return fail(e);
    }
    if report.is_success() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// A report on stdout: an error (not `print!`'s panic) when whoever reads it has gone away.
fn write_stdout(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| format!("cannot write the output: {e}"))
}

fn dev_token(broker: &str, claims: Option<&Path>, issuer: &str) -> Result<(), String> {
    let claims: Option<serde_json::Value> = match claims {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Some(serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?)
        }
        None => None,
    };
    let body = serde_json::json!({"issuer": issuer, "claims": claims});
    let url = format!("{}/dev/token", broker.trim_end_matches('/'));
    runtime()?.block_on(async {
        let resp = reqwest::Client::new().post(&url).json(&body).send().await.map_err(|e| {
            format!("cannot reach the dev broker at {broker}: {e} (is `ephemera serve --dev` running?)")
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("the broker answered {status}: {}", text.trim()));
        }
        print!("{text}");
        Ok(())
    })
}

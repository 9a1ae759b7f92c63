//! The `ephemera` command line. Parsing only; the work is in the library.

use clap::{Args, Parser, Subcommand};
use ephemera::clock::{Clock, SystemClock};
use ephemera::config::Config;
use ephemera::policy::{LoadContext, PolicySet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

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
    /// Parse and check every policy, reporting every error with file and field.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
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
        /// Which stand-in issuer signs: github or gitlab.
        #[arg(long, default_value = "github")]
        issuer: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    ephemera::install_crypto();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Policy(PolicyCommand::Check { config }) => policy_check(config.as_deref()),
        Command::Dev(DevCommand::Token { broker, claims, issuer }) => dev_token(&broker, claims.as_deref(), &issuer),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ephemera: {message}");
            ExitCode::FAILURE
        }
    }
}

/// JSON log lines on stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_current_span(true)
        .with_span_list(false)
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
            print_dev_banner(&running.url(), &data_dir);
        } else {
            println!("ephemera listening on {}", running.url());
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
    ephemera::mint::jwt::create_private_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn print_dev_banner(url: &str, data_dir: &Path) {
    let exe = std::env::current_exe().map_or_else(|_| "ephemera".to_string(), |p| p.display().to_string());
    println!("ephemera listening on {url}");
    println!(
        "dev mode: loopback only; in-process issuers `github` and `gitlab` at {url}/dev/...; data in {}",
        data_dir.display()
    );
    println!(
        "policies: the example policies plus `dev`, which the default dev token satisfies (grants a JWT named `api`)"
    );
    println!();
    println!("Try it (POSIX sh):");
    // The reply holds a live JWT: it goes into the data directory (0700), not a shared /tmp path.
    let reply = shell_quote(&data_dir.join("exchange.json").display().to_string());
    println!("  TOKEN=$({} dev token --broker {url})", shell_quote(&exe));
    println!(
        "  curl -s -X POST {url}/v1/exchange -H \"Authorization: Bearer $TOKEN\" -d '{{\"policy\":\"dev\"}}' | tee {reply}"
    );
    println!("  JWT=$(sed -n 's/.*\"token\":\"\\([^\"]*\\)\".*/\\1/p' {reply})");
    println!("  curl -s -X POST {url}/v1/introspect --data-urlencode \"token=$JWT\"");
    println!("  curl -s -X POST {url}/v1/revoke -H \"Authorization: Bearer $TOKEN\" -d '{{}}'");
    println!("  curl -s -X POST {url}/v1/introspect --data-urlencode \"token=$JWT\"");
    println!();
    let admin = shell_quote(&data_dir.join(ephemera::server::DEV_ADMIN_TOKEN_FILE).display().to_string());
    println!("Admin API (leases, revoke by job or filter):");
    println!("  curl -s {url}/v1/leases -H \"Authorization: Bearer $(cat {admin})\"");
    println!();
}

/// Single-quotes a word for POSIX sh.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

fn policy_check(config: Option<&Path>) -> Result<(), String> {
    let config = load_config(config)?;
    match PolicySet::load(Some(&config.policies_dir), &[], &LoadContext::from_config(&config)) {
        Ok(set) => {
            println!("ok: {} policies in {} ({})", set.len(), config.policies_dir.display(), set.names().join(", "));
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                println!("error: {e}");
            }
            Err(format!("{} policy error(s)", errors.len()))
        }
    }
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

//! `moto_server` (the `moto[server]` Python package: a real implementation of the AWS API) as a
//! child process on a free loopback port ([`Moto`]), for the AWS backend tests. `scripts/test`
//! installs a pinned moto into `.venv` and exports `EPHEMERA_MOTO_SERVER`.
//!
//! Test-side AWS calls ([`Moto::create_role`], [`Moto::get_role_policy`],
//! [`Moto::list_role_policies`]) go through boto3 in the same venv (it comes with moto), one
//! short Python process per call (≈0.3–0.5 s, mostly Python and boto3 start-up).
// Compiled into every test binary that has `mod common;`; a failed expectation is a failed test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// The account moto puts everything in.
pub const ACCOUNT: &str = "123456789012";
/// Readiness polling: at most this many tries, this far apart (15 s).
const READY_TRIES: u32 = 300;
const READY_INTERVAL: Duration = Duration::from_millis(50);
/// How many ports to try when moto exits because its port was taken (a lost race with another process).
const START_ATTEMPTS: u32 = 3;
/// Timeouts of one request to the moto API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared start of every boto3 snippet: `sys.argv[1]` is the endpoint, `iam` a client for it.
const PRELUDE: &str = r#"
import json, sys
import boto3
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
"#;

const CREATE_ROLE: &str = r#"
trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
         "Principal": {"AWS": "arn:aws:iam::123456789012:root"}, "Action": "sts:AssumeRole"}]}
print(iam.create_role(RoleName=sys.argv[2], AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"])
"#;

/// Prints the document as JSON, or `null` when the role or the policy does not exist.
const GET_ROLE_POLICY: &str = r#"
try:
    doc = iam.get_role_policy(RoleName=sys.argv[2], PolicyName=sys.argv[3])["PolicyDocument"]
except iam.exceptions.NoSuchEntityException:
    doc = None
if isinstance(doc, str):
    doc = json.loads(doc)
print(json.dumps(doc))
"#;

const LIST_ROLE_POLICIES: &str = r#"
names = []
for page in iam.get_paginator("list_role_policies").paginate(RoleName=sys.argv[2]):
    names.extend(page["PolicyNames"])
print(json.dumps(names))
"#;

/// A running `moto_server` on 127.0.0.1, killed on drop. All state is in memory; [`Moto::reset`]
/// clears it.
pub struct Moto {
    /// `http://127.0.0.1:PORT`: the endpoint URL for every AWS service.
    pub endpoint: String,
    pub port: u16,
    child: Child,
    /// The venv's `python` (next to `moto_server`), with boto3.
    python: PathBuf,
    /// moto_server's stdout and stderr.
    log_path: PathBuf,
    _dir: TempDir,
}

impl Moto {
    /// Starts `moto_server` on a free loopback port and waits until it answers.
    ///
    /// The binary is `$EPHEMERA_MOTO_SERVER`, else `<crate>/.venv/bin/moto_server`; panics if neither
    /// exists.
    pub fn start() -> Moto {
        let bin = moto_server_path();
        let python = bin.parent().unwrap().join("python");
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = free_port();
            let dir = tempfile::tempdir().unwrap();
            let log_path = dir.path().join("moto_server.log");
            let log = File::create(&log_path).unwrap();
            let child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
            // From here on, dropping `moto` (on success by the caller, on failure here) kills it.
            let mut moto = Moto {
                endpoint: format!("http://127.0.0.1:{port}"),
                port,
                child,
                python: python.clone(),
                log_path,
                _dir: dir,
            };
            let mut exited = None;
            for _ in 0..READY_TRIES {
                if let Ok((200, _)) = moto.request("GET", "/moto-api/") {
                    return moto;
                }
                exited = moto.child.try_wait().unwrap();
                if exited.is_some() {
                    break;
                }
                std::thread::sleep(READY_INTERVAL);
            }
            let log = moto.log();
            match exited {
                None => panic!(
                    "moto_server on port {port} did not answer GET /moto-api/ within {:?}; log:\n{log}",
                    READY_INTERVAL * READY_TRIES
                ),
                // Another process took the port between free_port() and moto's bind: try another.
                Some(status) if log.contains("Address already in use") => {
                    last_log = format!("moto_server exited ({status}):\n{log}");
                }
                Some(status) => panic!("moto_server exited ({status}) before answering; log:\n{log}"),
            }
        }
        panic!("moto_server did not start after {START_ATTEMPTS} attempts; last {last_log}")
    }

    /// Clears all state in moto (`POST /moto-api/reset`).
    pub fn reset(&self) {
        match self.request("POST", "/moto-api/reset") {
            Ok((200, _)) => {}
            other => panic!("POST {}/moto-api/reset: {other:?}", self.endpoint),
        }
    }

    /// Creates an IAM role that `arn:aws:iam::123456789012:root` may assume; returns its ARN
    /// (`arn:aws:iam::123456789012:role/<name>`).
    pub fn create_role(&self, name: &str) -> String {
        self.boto3(CREATE_ROLE, &[name]).trim().to_string()
    }

    /// The inline policy `policy` of role `role`, or `None` if the role or the policy does not exist.
    pub fn get_role_policy(&self, role: &str, policy: &str) -> Option<Value> {
        let out = self.boto3(GET_ROLE_POLICY, &[role, policy]);
        match serde_json::from_str(&out).unwrap_or_else(|e| panic!("get_role_policy output {out:?}: {e}")) {
            Value::Null => None,
            doc => Some(doc),
        }
    }

    /// The names of the inline policies of role `role` (panics if the role does not exist).
    pub fn list_role_policies(&self, role: &str) -> Vec<String> {
        let out = self.boto3(LIST_ROLE_POLICIES, &[role]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("list_role_policies output {out:?}: {e}"))
    }

    /// Runs a Python snippet in the venv after [`PRELUDE`] (`iam`: a boto3 IAM client for this moto;
    /// `sys.argv[2..]`: `args`) and returns its stdout; panics, with its stderr, if it fails.
    pub fn boto3(&self, script: &str, args: &[&str]) -> String {
        let out = Command::new(&self.python)
            .arg("-c")
            .arg(format!("{PRELUDE}{script}"))
            .arg(&self.endpoint)
            .args(args)
            // Only the explicit endpoint, region and keys count, never the developer's AWS setup.
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_DEFAULT_PROFILE")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.python.display()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            panic!(
                "boto3 snippet {args:?} failed ({}):\n{}\n{stdout}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        stdout
    }

    /// moto_server's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// One HTTP/1.0 request with an empty body: the status code and the whole response.
    fn request(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        write!(stream, "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\r\n", self.port)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let response = String::from_utf8_lossy(&response).into_owned();
        // "HTTP/1.1 200 OK"
        let status = response
            .lines()
            .next()
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
        Ok((status, response))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `$EPHEMERA_MOTO_SERVER` if it exists, else `<crate>/.venv/bin/moto_server` if it exists.
fn moto_server_path() -> PathBuf {
    let from_env = std::env::var_os("EPHEMERA_MOTO_SERVER").map(PathBuf::from);
    let in_venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server");
    from_env.iter().chain([&in_venv]).find(|path| path.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "moto_server not found: run scripts/test (it installs moto into .venv) \
             (looked at EPHEMERA_MOTO_SERVER={from_env:?} and {})",
            in_venv.display()
        )
    })
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

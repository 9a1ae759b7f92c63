//! A real OpenSSH server ([`Sshd`]: Debian's `openssh-server`, started as root on a free
//! loopback port in a temp dir with its own host key) trusting a CA and reading a KRL, the real
//! `ssh` client to log in with ([`Sshd::login`]), and `ssh-keygen` ([`ssh_keygen`]).
//! `scripts/test` installs openssh-server; a missing `sshd` fails the test, naming the package.
// Compiled into every test binary that has `mod common;`; a failed expectation is a failed test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// sshd re-executes itself, so it must be started by its absolute path.
pub const SSHD: &str = "/usr/sbin/sshd";
/// The one user tests log in as: root, with `PermitRootLogin prohibit-password` (certificates
/// only) and an `AuthorizedPrincipalsFile` naming which principals may be root. No test user
/// is created on the machine.
pub const USER: &str = "root";
/// Readiness polling: at most this many tries, this far apart (10 s).
const READY_TRIES: u32 = 200;
const READY_INTERVAL: Duration = Duration::from_millis(50);
/// How many ports to try when sshd exits because its port was taken (a lost race).
const START_ATTEMPTS: u32 = 3;

/// A running `sshd -D -e`, killed on drop.
pub struct Sshd {
    pub port: u16,
    child: Child,
    pub dir: TempDir,
    log_path: PathBuf,
}

impl Sshd {
    /// sshd trusting `ca_pub` (`TrustedUserCAKeys`), refusing what `krl` revokes (`RevokedKeys`),
    /// and letting in as root a certificate that names one of `principals`.
    pub fn start(ca_pub: &str, krl: &[u8], principals: &[&str]) -> Sshd {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} not found: install Debian's openssh-server (scripts/test does: apt-get install openssh-server)"
        );
        let uid = Command::new("id").arg("-u").output().expect("id -u runs").stdout;
        assert_eq!(String::from_utf8_lossy(&uid).trim(), "0", "the sshd tests run as root (as scripts/test and CI do)");
        // Privilege separation needs its empty directory (the package's service creates it).
        std::fs::create_dir_all("/run/sshd").unwrap();
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            ssh_keygen(&["-q", "-t", "ed25519", "-N", "", "-f", &d.join("host_ed25519").display().to_string()]);
            std::fs::write(d.join("ca.pub"), ca_pub).unwrap();
            std::fs::write(d.join("revoked.krl"), krl).unwrap();
            std::fs::write(d.join("principals"), principals.join("\n") + "\n").unwrap();
            let port = free_port();
            std::fs::write(d.join("sshd_config"), config(d, port)).unwrap();
            let log_path = d.join("sshd.log");
            let log = std::fs::File::create(&log_path).unwrap();
            let child = Command::new(SSHD)
                .args(["-D", "-e", "-f"])
                .arg(d.join("sshd_config"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawning {SSHD}: {e}"));
            let mut sshd = Sshd { port, child, dir, log_path };
            for _ in 0..READY_TRIES {
                if sshd.log().contains("Server listening on 127.0.0.1")
                    && TcpStream::connect(("127.0.0.1", port)).is_ok()
                {
                    return sshd;
                }
                if let Some(status) = sshd.child.try_wait().unwrap() {
                    last_log = format!("sshd exited ({status}):\n{}", sshd.log());
                    break;
                }
                std::thread::sleep(READY_INTERVAL);
            }
            if !last_log.contains("Address already in use") {
                panic!("sshd did not start on port {port}: {last_log}{}", sshd.log());
            }
        }
        panic!("sshd did not start after {START_ATTEMPTS} attempts; last {last_log}")
    }

    /// Replaces the KRL sshd reads (it reads `RevokedKeys` again at every authentication), the
    /// way an operator's cron job should: a new file renamed over the old one.
    pub fn write_krl(&self, krl: &[u8]) {
        let next = self.dir.path().join("revoked.krl.next");
        std::fs::write(&next, krl).unwrap();
        std::fs::rename(next, self.dir.path().join("revoked.krl")).unwrap();
    }

    /// The real `ssh` client as root@127.0.0.1 with the private key `key`, running `command`;
    /// nothing from the machine's or the user's ssh config, no agent. The certificate is
    /// `KEY-cert.pub`, which `ssh -i KEY` loads by itself (as docs/ssh.md tells jobs).
    pub fn login(&self, key: &Path, command: &str) -> Output {
        let cert = format!("{}-cert.pub", key.display());
        assert!(Path::new(&cert).exists(), "no certificate beside the key: {cert}");
        Command::new("ssh")
            .args(["-F", "/dev/null", "-i"])
            .arg(key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"])
            .args(["-o", "LogLevel=ERROR", "-p", &self.port.to_string(), &format!("{USER}@127.0.0.1"), command])
            .stdin(Stdio::null())
            .output()
            .expect("the ssh client runs")
    }

    /// sshd's log so far (`-e`: everything it would send to syslog).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server for tests only: certificates from one CA, for root, nothing else.
fn config(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "Port {port}\n\
         ListenAddress 127.0.0.1\n\
         HostKey {d}/host_ed25519\n\
         PidFile {d}/sshd.pid\n\
         TrustedUserCAKeys {d}/ca.pub\n\
         RevokedKeys {d}/revoked.krl\n\
         AuthorizedPrincipalsFile {d}/principals\n\
         AuthorizedKeysFile none\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         UsePAM no\n\
         StrictModes no\n\
         PermitRootLogin prohibit-password\n\
         LogLevel VERBOSE\n"
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `ssh-keygen ARGS` with `TZ=UTC` (it prints validity times in local time); panics naming the
/// arguments and stderr when it fails.
pub fn ssh_keygen(args: &[&str]) -> String {
    let out = ssh_keygen_output(args);
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `ssh-keygen ARGS` as it ran, whatever its exit status.
pub fn ssh_keygen_output(args: &[&str]) -> Output {
    Command::new("ssh-keygen").args(args).env("TZ", "UTC").stdin(Stdio::null()).output().expect("ssh-keygen runs")
}

/// Writes `text` to `path` readable by its owner only (ssh refuses a private key others can read).
pub fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

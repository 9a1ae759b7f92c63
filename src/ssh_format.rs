//! OpenSSH formats as the `ssh` backend, its policies and the exchange endpoint use them, as pure
//! functions: certificate fields (principals, critical options, extensions; PROTOCOL.certkeys),
//! public keys as a job sends them ([`parse_public_key`]), and the wire encoding under all of it
//! ([`wire`]).

pub mod wire;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use wire::{Reader, Writer};

/// The extensions a grant may give. Certificates carry none by default (OpenSSH's `ssh-keygen`
/// grants all the `permit-*` ones unless told not to; a job's certificate should not forward an
/// agent or ports, or run `~/.ssh/rc`, unless its policy says so).
pub const EXTENSIONS: [&str; 6] = [
    "no-touch-required",
    "permit-X11-forwarding",
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-pty",
    "permit-user-rc",
];

/// A principal (a user name on the servers): letters, digits, `.`, `_`, `-`, `@`, 1 to 128.
/// Attack: a comma or a space would read as a list (`AuthorizedPrincipalsFile`, `ssh-keygen -n`),
/// a control character as the end of a line.
pub fn is_principal(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// `force-command`: printable text without control characters, at most 1,024 bytes.
pub fn check_force_command(command: &str) -> Result<(), String> {
    if command.is_empty() || command.len() > 1024 || command.chars().any(char::is_control) {
        return Err("must be 1 to 1,024 printable characters".into());
    }
    Ok(())
}

/// `source-address`: comma-separated CIDR blocks or addresses, as `sshd` reads them.
pub fn check_source_address(list: &str) -> Result<(), String> {
    let ok = !list.is_empty()
        && list.split(',').all(|entry| {
            let (addr, bits) = entry.split_once('/').map_or((entry, None), |(a, b)| (a, Some(b)));
            let Ok(ip) = addr.parse::<std::net::IpAddr>() else { return false };
            let max = if ip.is_ipv4() { 32 } else { 128 };
            bits.is_none_or(|b| b.parse::<u8>().is_ok_and(|b| b <= max))
        });
    if ok { Ok(()) } else { Err("must be comma-separated addresses or CIDR blocks, e.g. 10.0.0.0/8,192.0.2.7".into()) }
}

/// The key types the broker certifies, and signs with: the two `ring` implements. RSA is not
/// among them (a job makes its own key, and Ed25519 is what `ssh-keygen` makes by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Ed25519,
    EcdsaP256,
}

impl Algorithm {
    /// The key type's name on the wire and in a public key line.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ssh-ed25519",
            Algorithm::EcdsaP256 => "ecdsa-sha2-nistp256",
        }
    }

    /// The name of a certificate for a key of this type (PROTOCOL.certkeys).
    pub fn cert_name(self) -> &'static str {
        match self {
            Algorithm::Ed25519 => "ssh-ed25519-cert-v01@openssh.com",
            Algorithm::EcdsaP256 => "ecdsa-sha2-nistp256-cert-v01@openssh.com",
        }
    }

    fn from_name(name: &[u8]) -> Option<Algorithm> {
        [Algorithm::Ed25519, Algorithm::EcdsaP256].into_iter().find(|a| a.name().as_bytes() == name)
    }
}

/// The curve name inside an `ecdsa-sha2-nistp256` key.
pub const NISTP256: &str = "nistp256";

/// A public key line longer than this is refused before it is decoded (an Ed25519 line is about
/// 100 bytes, a P-256 one about 200, with a comment).
pub const MAX_PUBLIC_KEY_LINE: usize = 4096;

/// A public key the broker can certify, checked: its wire blob holds exactly one well-formed key
/// of a supported type (an Ed25519 key of 32 bytes; a P-256 point on the curve).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    algorithm: Algorithm,
    blob: Vec<u8>,
}

impl PublicKey {
    /// An Ed25519 public key from its 32 bytes.
    pub fn ed25519(key: &[u8; 32]) -> PublicKey {
        let mut w = Writer::new();
        w.string(Algorithm::Ed25519.name()).string(key);
        PublicKey { algorithm: Algorithm::Ed25519, blob: w.into_bytes() }
    }

    /// A P-256 public key from its uncompressed point (`04 || x || y`), checked to be on the curve.
    pub fn ecdsa_p256(point: &[u8]) -> Result<PublicKey, String> {
        check_p256_point(point)?;
        let mut w = Writer::new();
        w.string(Algorithm::EcdsaP256.name()).string(NISTP256).string(point);
        Ok(PublicKey { algorithm: Algorithm::EcdsaP256, blob: w.into_bytes() })
    }

    /// The key in a wire blob (what a public key line's base64 holds).
    pub fn from_blob(blob: &[u8]) -> Result<PublicKey, String> {
        let mut r = Reader::new(blob);
        let name = r.string().map_err(|_| "not an SSH public key".to_string())?;
        let Some(algorithm) = Algorithm::from_name(name) else {
            return Err(refused_type(name));
        };
        let malformed = || format!("not a well-formed {} key", algorithm.name());
        match algorithm {
            Algorithm::Ed25519 => {
                let key = r.string().map_err(|_| malformed())?;
                r.finish().map_err(|_| malformed())?;
                let key: &[u8; 32] = key.try_into().map_err(|_| malformed())?;
                Ok(PublicKey::ed25519(key))
            }
            Algorithm::EcdsaP256 => {
                let curve = r.string().map_err(|_| malformed())?;
                let point = r.string().map_err(|_| malformed())?;
                r.finish().map_err(|_| malformed())?;
                if curve != NISTP256.as_bytes() {
                    return Err(malformed());
                }
                PublicKey::ecdsa_p256(point)
            }
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The wire blob: the key type's name, then its fields.
    pub fn blob(&self) -> &[u8] {
        &self.blob
    }

    /// The fields after the type's name (a certificate carries them after its nonce).
    pub fn fields(&self) -> &[u8] {
        &self.blob[4 + self.algorithm.name().len()..]
    }

    /// `SHA256:…`, as `ssh-keygen -l` and sshd's log print it: safe to show and to log.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.blob)
    }

    /// `ssh-ed25519 AAAA… comment`, as in `authorized_keys` or `TrustedUserCAKeys`.
    pub fn to_line(&self, comment: &str) -> String {
        let line = format!("{} {}", self.algorithm.name(), STANDARD.encode(&self.blob));
        if comment.is_empty() { line } else { format!("{line} {comment}") }
    }
}

/// `SHA256:` and the unpadded base64 of the blob's SHA-256 (OpenSSH's fingerprint).
pub fn fingerprint(blob: &[u8]) -> String {
    format!("SHA256:{}", STANDARD_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, blob)))
}

/// A public key line as a job sends it: `ssh-ed25519 AAAA… [comment]`, one line, at most
/// [`MAX_PUBLIC_KEY_LINE`] bytes, canonical base64, the type named outside the same as inside,
/// nothing after the key in its blob. A certificate, an `authorized_keys` line with options, a
/// private key, or a key of another type is refused. The errors never quote the text: it may
/// be anything a caller pasted (a private key, say).
pub fn parse_public_key(line: &str) -> Result<PublicKey, String> {
    if line.len() > MAX_PUBLIC_KEY_LINE {
        return Err(format!("is longer than {MAX_PUBLIC_KEY_LINE} bytes; send one public key line"));
    }
    let line = line.trim();
    if line.chars().any(char::is_control) {
        return Err("must be one public key line, `ssh-ed25519 AAAA… [comment]`".into());
    }
    let mut words = line.split_ascii_whitespace();
    let (Some(kind), Some(data)) = (words.next(), words.next()) else {
        return Err("must be a public key line, `ssh-ed25519 AAAA… [comment]`".into());
    };
    let blob = STANDARD.decode(data).map_err(|_| "is not a public key line: its key is not base64".to_string())?;
    let key = PublicKey::from_blob(&blob)?;
    if kind != key.algorithm.name() {
        return Err(format!("names a key type other than the {} key it holds", key.algorithm.name()));
    }
    Ok(key)
}

/// Why a key of this type is refused, naming the type only when it is one OpenSSH knows (never
/// caller text).
fn refused_type(name: &[u8]) -> String {
    let text = std::str::from_utf8(name).unwrap_or_default();
    if text.ends_with("-cert-v01@openssh.com") {
        return "is a certificate: send the public key itself (ssh-ed25519 or ecdsa-sha2-nistp256)".into();
    }
    const KNOWN: [&str; 6] = [
        "ssh-rsa",
        "ssh-dss",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    match KNOWN.iter().find(|k| **k == text) {
        Some(known) => format!(
            "is a {known} key; the broker certifies ssh-ed25519 and ecdsa-sha2-nistp256 keys (`ssh-keygen -t ed25519`), \
             or send none to have a key pair generated"
        ),
        None => "is not a public key of a type the broker certifies (ssh-ed25519, ecdsa-sha2-nistp256)".into(),
    }
}

/// Attack: a point off the curve in a certificate is useless to its holder but says the broker
/// certified garbage; checked by an ECDH agreement, which `ring` only completes with a valid
/// peer point.
fn check_p256_point(point: &[u8]) -> Result<(), String> {
    use ring::agreement::{ECDH_P256, EphemeralPrivateKey, UnparsedPublicKey, agree_ephemeral};
    let invalid = || "not a well-formed ecdsa-sha2-nistp256 key (its point is not on the curve)".to_string();
    if point.len() != 65 || point[0] != 4 {
        return Err(invalid());
    }
    let rng = ring::rand::SystemRandom::new();
    let ours = EphemeralPrivateKey::generate(&ECDH_P256, &rng).map_err(|_| "no randomness".to_string())?;
    agree_ephemeral(ours, &UnparsedPublicKey::new(&ECDH_P256, point), |_| ()).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_options_and_addresses_that_could_say_more_are_refused() {
        assert!(is_principal("deploy") && is_principal("octo-org.deploy@prod"));
        for bad in ["", "a,b", "a b", "a\nb", "*", &"x".repeat(129)] {
            assert!(!is_principal(bad), "{bad:?}");
        }
        assert!(check_force_command("/usr/local/bin/deploy --env prod").is_ok());
        assert!(check_force_command("a\nb").is_err() && check_force_command("").is_err());
        assert!(check_source_address("10.0.0.0/8,192.0.2.7,::1/128").is_ok());
        for bad in ["", "10.0.0.0/33", "example.com", "10.0.0.0/8,", "*"] {
            assert!(check_source_address(bad).is_err(), "{bad:?}");
        }
    }

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/keys/ssh/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn ed25519_and_p256_keys_from_ssh_keygen_parse_and_round_trip() {
        for (file, algorithm) in [("user-ed25519.pub", Algorithm::Ed25519), ("user-ecdsa.pub", Algorithm::EcdsaP256)] {
            let line = fixture(file);
            let key = parse_public_key(&line).unwrap();
            assert_eq!(key.algorithm(), algorithm);
            assert_eq!(key.to_line("job"), line.trim(), "re-encoded exactly as ssh-keygen wrote it");
            assert_eq!(PublicKey::from_blob(key.blob()).unwrap(), key);
            assert!(key.fingerprint().starts_with("SHA256:") && key.fingerprint().len() == 50);
        }
        let key = parse_public_key(&fixture("user-ed25519.pub")).unwrap();
        assert_eq!(key.fields().len(), 4 + 32, "the key's one string after its type");
        assert!(parse_public_key(&format!("  {}  \n", fixture("user-ed25519.pub").trim())).is_ok(), "outer space");
        let bare = fixture("user-ed25519.pub").rsplit_once(' ').unwrap().0.to_string();
        assert!(parse_public_key(&bare).is_ok(), "no comment");
    }

    #[test]
    fn certificates_other_types_and_garbage_are_refused_without_quoting_them() {
        let ed = fixture("user-ed25519.pub");
        let (kind, rest) = ed.split_once(' ').unwrap();
        let (data, _) = rest.split_once(' ').unwrap();
        let mut tampered = STANDARD.decode(data).unwrap();
        tampered.push(0);
        let cases: Vec<(String, &str)> = vec![
            (fixture("user-ed25519-cert.pub"), "is a certificate"),
            (fixture("user-rsa.pub"), "is a ssh-rsa key"),
            (format!("ecdsa-sha2-nistp256 {data} job"), "names a key type other than"),
            (format!("{kind} {}", STANDARD.encode(&tampered)), "not a well-formed ssh-ed25519 key"),
            (format!("{kind} {}", &data[..data.len() - 1]), "not base64"),
            (format!("{kind} {data}x"), "not base64"),
            (format!("command=\"sh\" {ed}"), "not base64"),
            (format!("{ed}{ed}"), "one public key line"),
            (kind.to_string(), "must be a public key line"),
            ("-----BEGIN OPENSSH PRIVATE KEY-----".to_string(), "not base64"),
            ("x".repeat(MAX_PUBLIC_KEY_LINE + 1), "longer than"),
            (format!("{kind} {}", STANDARD.encode(b"\0\0\0\x07unknown")), "not a public key of a type"),
        ];
        for (line, says) in cases {
            let err = parse_public_key(&line).unwrap_err();
            assert!(err.contains(says), "{line:?}: {err}");
            assert!(!err.contains(&data[16..40]), "quoted the key: {err}");
        }
    }

    #[test]
    fn a_p256_point_off_the_curve_is_refused() {
        let key = parse_public_key(&fixture("user-ecdsa.pub")).unwrap();
        let mut point = key.fields()[4 + NISTP256.len() + 4..].to_vec();
        assert!(PublicKey::ecdsa_p256(&point).is_ok());
        point[64] ^= 1;
        assert!(PublicKey::ecdsa_p256(&point).unwrap_err().contains("not on the curve"));
        assert!(PublicKey::ecdsa_p256(&point[..33]).is_err(), "a compressed point is not what OpenSSH sends");
    }
}

//! OpenSSH user certificates (PROTOCOL.certkeys), encoded by hand and signed by the CA with
//! `ring`: the whole certificate up to its signature field is what the CA signs.

use super::keys::CaKey;
use crate::ssh_format::PublicKey;
use crate::ssh_format::wire::Writer;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// `SSH2_CERT_TYPE_USER`: a certificate a client logs in with (2 would be a host's).
const USER_CERT: u32 = 1;

/// What one certificate says. Principals, options and extensions are already checked names
/// (`ssh_format`), so nothing here can name more than the grant does.
pub struct Request<'a> {
    pub key: &'a PublicKey,
    pub serial: u64,
    pub key_id: &'a str,
    pub principals: &'a [String],
    /// Seconds since the epoch, as sshd compares them with its own clock.
    pub valid_after: u64,
    pub valid_before: u64,
    pub force_command: Option<&'a str>,
    pub source_address: Option<&'a str>,
    pub extensions: &'a [String],
}

/// The signed certificate's wire blob.
pub fn certify(request: &Request<'_>, ca: &CaKey, nonce: &[u8; 32]) -> Result<Vec<u8>, String> {
    let mut w = Writer::new();
    w.string(request.key.algorithm().cert_name()).string(nonce).raw(request.key.fields());
    w.u64(request.serial).u32(USER_CERT).string(request.key_id);
    w.string(packed_strings(request.principals));
    w.u64(request.valid_after).u64(request.valid_before);
    w.string(critical_options(request.force_command, request.source_address));
    w.string(extensions(request.extensions));
    w.string(""); // reserved
    w.string(ca.public().blob());
    let signature = ca.sign(w.bytes())?;
    w.string(signature);
    Ok(w.into_bytes())
}

/// The certificate as one line, as `ssh-keygen -s` writes `*-cert.pub`.
pub fn line(key: &PublicKey, blob: &[u8], comment: &str) -> String {
    format!("{} {} {comment}", key.algorithm().cert_name(), STANDARD.encode(blob))
}

/// `valid principals`: the names, each a string, one after another.
fn packed_strings(names: &[String]) -> Vec<u8> {
    let mut w = Writer::new();
    for name in names {
        w.string(name);
    }
    w.into_bytes()
}

/// Each option's data is itself a string holding the value; OpenSSH wants them sorted by name
/// (`force-command` before `source-address`).
fn critical_options(force_command: Option<&str>, source_address: Option<&str>) -> Vec<u8> {
    let mut w = Writer::new();
    for (name, value) in [("force-command", force_command), ("source-address", source_address)] {
        if let Some(value) = value {
            w.string(name).string(Writer::new().string(value).bytes());
        }
    }
    w.into_bytes()
}

/// Flag extensions: a name and empty data each, sorted by name, once.
fn extensions(names: &[String]) -> Vec<u8> {
    let mut sorted: Vec<&String> = names.iter().collect();
    sorted.sort();
    sorted.dedup();
    let mut w = Writer::new();
    for name in sorted {
        w.string(name).string("");
    }
    w.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::super::keys::tests::{fixture, verifies};
    use super::*;
    use crate::ssh_format::wire::Reader;

    fn strings(bytes: &[u8]) -> Vec<String> {
        let mut r = Reader::new(bytes);
        let mut out = Vec::new();
        while !r.is_empty() {
            out.push(r.text().unwrap().to_string());
        }
        out
    }

    #[test]
    fn a_certificate_reads_back_field_by_field_and_its_signature_covers_every_field() {
        for ca_file in ["ca-ed25519", "ca-ecdsa"] {
            let ca = CaKey::from_pem(&fixture(ca_file)).unwrap();
            let line = String::from_utf8(fixture("user-ecdsa.pub")).unwrap();
            let key = crate::ssh_format::parse_public_key(&line).unwrap();
            let principals = ["deploy".to_string(), "web".to_string()];
            let extensions = ["permit-pty".to_string(), "permit-X11-forwarding".to_string()];
            let request = Request {
                key: &key,
                serial: u64::MAX - 1,
                key_id: "ephemera lse_1 github:74:1:1:1",
                principals: &principals,
                valid_after: 1_796_000_000,
                valid_before: 1_796_000_600,
                force_command: Some("/usr/local/bin/deploy --prod"),
                source_address: Some("10.0.0.0/8"),
                extensions: &extensions,
            };
            let blob = certify(&request, &ca, &[7; 32]).unwrap();
            let mut r = Reader::new(&blob);
            assert_eq!(r.text().unwrap(), "ecdsa-sha2-nistp256-cert-v01@openssh.com");
            assert_eq!(r.string().unwrap(), [7; 32]);
            assert_eq!(r.raw(key.fields().len()).unwrap(), key.fields());
            assert_eq!((r.u64().unwrap(), r.u32().unwrap()), (u64::MAX - 1, USER_CERT));
            assert_eq!(r.text().unwrap(), "ephemera lse_1 github:74:1:1:1");
            assert_eq!(strings(r.string().unwrap()), principals);
            assert_eq!((r.u64().unwrap(), r.u64().unwrap()), (1_796_000_000, 1_796_000_600));
            let options = strings(r.string().unwrap());
            assert_eq!(options[0], "force-command");
            assert_eq!(strings(options[1].as_bytes()), ["/usr/local/bin/deploy --prod"]);
            assert_eq!(
                (options[2].as_str(), strings(options[3].as_bytes())),
                ("source-address", vec!["10.0.0.0/8".into()])
            );
            assert_eq!(strings(r.string().unwrap()), ["permit-X11-forwarding", "", "permit-pty", ""], "sorted by name");
            assert!(r.string().unwrap().is_empty(), "reserved");
            assert_eq!(r.string().unwrap(), ca.public().blob());
            let signed_len = blob.len() - r.rest().len();
            let signature = r.string().unwrap();
            assert!(r.finish().is_ok());
            assert!(verifies(ca.public(), &blob[..signed_len], signature), "{ca_file}");
            let mut tampered = blob[..signed_len].to_vec();
            tampered[60] ^= 1;
            assert!(!verifies(ca.public(), &tampered, signature), "{ca_file}: the signature covers the fields");
            assert!(line_starts_right(&key, &blob));
        }
    }

    fn line_starts_right(key: &PublicKey, blob: &[u8]) -> bool {
        line(key, blob, "ephemera lse_1").starts_with("ecdsa-sha2-nistp256-cert-v01@openssh.com AAAA")
    }

    #[test]
    fn no_options_and_no_extensions_are_empty_strings() {
        assert!(critical_options(None, None).is_empty());
        assert!(extensions(&[]).is_empty());
        assert_eq!(strings(&critical_options(None, Some("::1"))), ["source-address", "\0\0\0\x03::1"]);
    }
}

//! The `ssh` backend's keys: the CA's private key as an operator hands it over — OpenSSH's own
//! format (`openssh-key-v1`, what `ssh-keygen` writes), unencrypted, or PKCS#8 PEM; Ed25519 or
//! ECDSA P-256 — and the key pair the broker generates for a job that sends no public key
//! (Ed25519, written in OpenSSH's format so `ssh -i` reads it as it is).

use crate::secret::SecretString;
use crate::ssh_format::wire::{Reader, Writer};
use crate::ssh_format::{Algorithm, NISTP256, PublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};

/// What every OpenSSH private key starts with (PROTOCOL.key).
const OPENSSH_MAGIC: &[u8] = b"openssh-key-v1\0";
/// The PEM label of an OpenSSH private key.
const OPENSSH_LABEL: &str = "OPENSSH PRIVATE KEY";
/// OpenSSH pads the private section to the cipher's block size; 8 for `none`.
const BLOCK: usize = 8;

/// The CA: signs certificates, and its public key is what servers trust.
pub struct CaKey {
    signer: Signer,
    public: PublicKey,
    rng: SystemRandom,
}

enum Signer {
    Ed25519(Ed25519KeyPair),
    EcdsaP256(EcdsaKeyPair),
}

impl CaKey {
    /// A key file's bytes. The errors say what the file is and how to make it one the broker
    /// reads; they never quote the file.
    pub fn from_pem(bytes: &[u8]) -> Result<CaKey, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| not_pem())?;
        let (label, der) = pem(text)?;
        match label {
            OPENSSH_LABEL => from_openssh(&der),
            "PRIVATE KEY" => from_pkcs8(&der),
            "ENCRYPTED PRIVATE KEY" => {
                Err("is encrypted with a passphrase (PKCS#8), and the broker cannot be given one: \
                 decrypt a copy with `openssl pkcs8 -in FILE -out COPY` and let only the broker read it"
                    .into())
            }
            "EC PRIVATE KEY" => Err("is a SEC1 `EC PRIVATE KEY`: convert it to PKCS#8 with \
                 `openssl pkcs8 -topk8 -nocrypt -in FILE -out COPY`"
                .into()),
            _ => Err(format!(
                "is a PEM `{}`, not an Ed25519 or ECDSA P-256 private key",
                crate::clock::truncate(label, 40)
            )),
        }
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The SSH signature blob of `data`: the algorithm's name, then the signature (for ECDSA,
    /// `r` and `s` as mpints; RFC 5656 §3.1.2).
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        let mut w = Writer::new();
        match &self.signer {
            Signer::Ed25519(pair) => {
                w.string(Algorithm::Ed25519.name()).string(pair.sign(data));
            }
            Signer::EcdsaP256(pair) => {
                // FIXED signing gives r || s, 32 bytes each, big-endian: no DER to take apart.
                let sig = pair.sign(&self.rng, data).map_err(|_| "ECDSA signing failed".to_string())?;
                let (r, s) = sig.as_ref().split_at(32);
                let mut inner = Writer::new();
                inner.mpint(r).mpint(s);
                w.string(Algorithm::EcdsaP256.name()).string(inner.bytes());
            }
        }
        Ok(w.into_bytes())
    }
}

fn not_pem() -> String {
    "is not a PEM private key (`-----BEGIN OPENSSH PRIVATE KEY-----` as `ssh-keygen` writes it, or \
     `-----BEGIN PRIVATE KEY-----`)"
        .into()
}

/// A PEM document's label and its body, decoded: one `BEGIN`/`END` pair with the same label,
/// canonical base64 between them, no headers.
fn pem(text: &str) -> Result<(&str, Vec<u8>), String> {
    let mut lines = text.lines().map(str::trim).skip_while(|l| l.is_empty());
    let label = lines
        .next()
        .and_then(|l| l.strip_prefix("-----BEGIN "))
        .and_then(|l| l.strip_suffix("-----"))
        .ok_or_else(not_pem)?;
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    for line in lines.by_ref() {
        if line == end {
            let der = STANDARD.decode(&body).map_err(|_| format!("is a PEM `{label}` whose body is not base64"))?;
            return Ok((label, der));
        }
        body.push_str(line);
    }
    Err(format!("is a PEM `{label}` without its END line"))
}

/// PROTOCOL.key: the header, one public key, and the private section (check integers, the key
/// again with its secret, a comment, padding `1, 2, 3, …`).
fn from_openssh(der: &[u8]) -> Result<CaKey, String> {
    let bad = || "is not a well-formed OpenSSH private key".to_string();
    let rest = der.strip_prefix(OPENSSH_MAGIC).ok_or_else(bad)?;
    let mut r = Reader::new(rest);
    let (cipher, kdf) = (r.text().map_err(|_| bad())?, r.text().map_err(|_| bad())?);
    r.string().map_err(|_| bad())?; // kdf options
    if cipher != "none" || kdf != "none" {
        return Err("is encrypted with a passphrase, and the broker cannot be given one: remove it from a copy \
                    with `ssh-keygen -p -N '' -f COPY` and let only the broker read that copy"
            .into());
    }
    if r.u32().map_err(|_| bad())? != 1 {
        return Err("holds more than one key; give the broker a file with the CA key alone".into());
    }
    let public_blob = r.string().map_err(|_| bad())?;
    let private = r.string().map_err(|_| bad())?;
    r.finish().map_err(|_| bad())?;
    let public = ca_public_key(public_blob)?;
    let mut p = Reader::new(private);
    let (check1, check2) = (p.u32().map_err(|_| bad())?, p.u32().map_err(|_| bad())?);
    if check1 != check2 || p.string().map_err(|_| bad())? != public.algorithm().name().as_bytes() {
        return Err(bad());
    }
    let signer = match public.algorithm() {
        Algorithm::Ed25519 => {
            let (key, secret) = (p.string().map_err(|_| bad())?, p.string().map_err(|_| bad())?);
            // The secret is seed || public key; ring checks that the seed makes that key.
            let (seed, again) = secret.split_at_checked(32).ok_or_else(bad)?;
            let key32: &[u8; 32] = key.try_into().map_err(|_| bad())?;
            if again != key || PublicKey::ed25519(key32) != public {
                return Err(bad());
            }
            Signer::Ed25519(Ed25519KeyPair::from_seed_and_public_key(seed, key).map_err(|_| bad())?)
        }
        Algorithm::EcdsaP256 => {
            let (curve, point) = (p.string().map_err(|_| bad())?, p.string().map_err(|_| bad())?);
            let scalar = p.mpint().map_err(|_| bad())?;
            if curve != NISTP256.as_bytes() || scalar.len() > 32 {
                return Err(bad());
            }
            let mut d = [0u8; 32];
            d[32 - scalar.len()..].copy_from_slice(scalar);
            let pair = EcdsaKeyPair::from_private_key_and_public_key(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &d,
                point,
                &SystemRandom::new(),
            )
            .map_err(|_| bad())?;
            if pair.public_key().as_ref() != point || PublicKey::ecdsa_p256(point)? != public {
                return Err(bad());
            }
            Signer::EcdsaP256(pair)
        }
    };
    p.string().map_err(|_| bad())?; // comment
    let padding = p.rest();
    if padding.len() >= BLOCK || padding.iter().enumerate().any(|(i, b)| usize::from(*b) != i + 1) {
        return Err(bad());
    }
    Ok(CaKey { signer, public, rng: SystemRandom::new() })
}

/// The public half an OpenSSH key file names: a CA must be Ed25519 or P-256.
fn ca_public_key(blob: &[u8]) -> Result<PublicKey, String> {
    PublicKey::from_blob(blob).map_err(|_| {
        let name = Reader::new(blob).text().unwrap_or_default();
        let shown = if name.len() <= 40 && name.bytes().all(|b| b.is_ascii_graphic()) { name } else { "?" };
        format!(
            "is a `{shown}` key; the CA key must be ssh-ed25519 or ecdsa-sha2-nistp256 (`ssh-keygen -t ed25519 -f ca`)"
        )
    })
}

fn from_pkcs8(der: &[u8]) -> Result<CaKey, String> {
    let rng = SystemRandom::new();
    if let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng) {
        let public = PublicKey::ecdsa_p256(pair.public_key().as_ref())?;
        return Ok(CaKey { signer: Signer::EcdsaP256(pair), public, rng });
    }
    // OpenSSL writes Ed25519 PKCS#8 v1, without the public key: "maybe unchecked" takes it.
    if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
        let key: &[u8; 32] = pair.public_key().as_ref().try_into().map_err(|_| "an Ed25519 key of 32 bytes")?;
        let public = PublicKey::ed25519(key);
        return Ok(CaKey { signer: Signer::Ed25519(pair), public, rng });
    }
    Err("is a PKCS#8 key, but not Ed25519 or ECDSA P-256".into())
}

/// A key pair the broker made for a job: the public key it certifies, and the private key in
/// OpenSSH's format (unencrypted: it is handed over once, inside the exchange reply).
pub struct JobKey {
    pub public: PublicKey,
    pub private_openssh: SecretString,
}

impl JobKey {
    /// A fresh Ed25519 key pair; `comment` goes into the private key file.
    pub fn generate(comment: &str) -> Result<JobKey, String> {
        let rng = SystemRandom::new();
        let fail = |_| "no randomness for a key pair".to_string();
        let seed: [u8; 32] = ring::rand::generate(&rng).map_err(fail)?.expose();
        let check: [u8; 4] = ring::rand::generate(&rng).map_err(fail)?.expose();
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| "Ed25519 key generation failed")?;
        let key: [u8; 32] = pair.public_key().as_ref().try_into().map_err(|_| "an Ed25519 key of 32 bytes")?;
        let public = PublicKey::ed25519(&key);
        Ok(JobKey {
            private_openssh: openssh_private_key(&public, &key, &seed, u32::from_be_bytes(check), comment),
            public,
        })
    }
}

/// PROTOCOL.key, unencrypted, as `ssh-keygen -t ed25519 -N ''` writes it.
fn openssh_private_key(public: &PublicKey, key: &[u8; 32], seed: &[u8; 32], check: u32, comment: &str) -> SecretString {
    let mut private = Writer::new();
    private.u32(check).u32(check).string(Algorithm::Ed25519.name()).string(key);
    private.string([&seed[..], &key[..]].concat()).string(comment);
    let mut pad = 1u8;
    while !private.bytes().len().is_multiple_of(BLOCK) {
        private.u8(pad);
        pad += 1;
    }
    let mut file = Writer::new();
    file.raw(OPENSSH_MAGIC).string("none").string("none").string("").u32(1);
    file.string(public.blob()).string(private.bytes());
    let body = STANDARD.encode(file.bytes());
    let mut pem = format!("-----BEGIN {OPENSSH_LABEL}-----\n");
    // OpenSSH wraps at 70 columns; base64 is ASCII, so byte chunks are whole characters.
    for chunk in body.as_bytes().chunks(70) {
        pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {OPENSSH_LABEL}-----\n"));
    SecretString::new(pem)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, ED25519, UnparsedPublicKey};

    pub fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/keys/ssh/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Checks an SSH signature blob over `data` against `key` with ring's verifier.
    pub fn verifies(key: &PublicKey, data: &[u8], signature: &[u8]) -> bool {
        let mut sig = Reader::new(signature);
        let (name, body) = (sig.text().unwrap(), sig.string().unwrap());
        assert!(sig.finish().is_ok() && name == key.algorithm().name());
        let mut fields = Reader::new(key.fields());
        match key.algorithm() {
            Algorithm::Ed25519 => UnparsedPublicKey::new(&ED25519, fields.string().unwrap()).verify(data, body).is_ok(),
            Algorithm::EcdsaP256 => {
                fields.string().unwrap();
                let point = fields.string().unwrap();
                let mut rs = Reader::new(body);
                let (r, s) = (rs.mpint().unwrap(), rs.mpint().unwrap());
                let mut fixed = [0u8; 64];
                fixed[32 - r.len()..32].copy_from_slice(r);
                fixed[64 - s.len()..].copy_from_slice(s);
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(data, &fixed).is_ok()
            }
        }
    }

    #[test]
    fn ca_keys_as_ssh_keygen_and_openssl_write_them_load_and_sign() {
        for (file, algorithm) in [
            ("ca-ed25519", Algorithm::Ed25519),
            ("ca-ecdsa", Algorithm::EcdsaP256),
            ("ca-ecdsa.pk8.pem", Algorithm::EcdsaP256),
            ("ca-ed25519.pk8.pem", Algorithm::Ed25519),
        ] {
            let ca = CaKey::from_pem(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(ca.public().algorithm(), algorithm, "{file}");
            let signature = ca.sign(b"signed bytes").unwrap();
            assert!(verifies(ca.public(), b"signed bytes", &signature), "{file}");
            assert!(!verifies(ca.public(), b"other bytes", &signature), "{file}");
        }
    }

    #[test]
    fn encrypted_rsa_and_damaged_ca_keys_are_refused_saying_what_to_do() {
        let ed = String::from_utf8(fixture("ca-ed25519")).unwrap();
        let damaged = {
            let (head, body) = ed.split_once('\n').unwrap();
            let mut der =
                STANDARD.decode(body.lines().filter(|l| !l.starts_with("-----")).collect::<String>()).unwrap();
            let at = der.len() - 40; // inside the private section's secret
            der[at] ^= 1;
            format!("{head}\n{}\n-----END OPENSSH PRIVATE KEY-----\n", STANDARD.encode(der))
        };
        let cases: [(Vec<u8>, &str); 8] = [
            (fixture("ca-encrypted"), "ssh-keygen -p -N ''"),
            (fixture("ca-encrypted.pk8.pem"), "openssl pkcs8 -in FILE"),
            (fixture("ca-rsa"), "is a `ssh-rsa` key; the CA key must be"),
            (fixture("user-ed25519.pub"), "is not a PEM private key"),
            (ed.replace("-----END OPENSSH PRIVATE KEY-----", "").into_bytes(), "without its END line"),
            (damaged.into_bytes(), "not a well-formed OpenSSH private key"),
            (b"-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n".to_vec(), "openssl pkcs8 -topk8"),
            (b"\xff\xfe".to_vec(), "is not a PEM private key"),
        ];
        for (bytes, says) in cases {
            let err = CaKey::from_pem(&bytes).err().unwrap_or_else(|| panic!("accepted: {says}"));
            assert!(err.contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn a_generated_job_key_is_an_openssh_private_key_the_ca_reader_takes_back() {
        let job = JobKey::generate("ephemera lse_x").unwrap();
        let pem = job.private_openssh.expose();
        assert!(
            pem.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n")
                && pem.ends_with("-----END OPENSSH PRIVATE KEY-----\n")
        );
        assert!(pem.lines().all(|l| l.len() <= 70));
        // The reader checks the header, the check integers, seed against key, and the padding.
        let again = CaKey::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(again.public(), &job.public);
        assert_ne!(JobKey::generate("x").unwrap().public, job.public, "fresh each time");
    }
}

//! Where signing keys come from: the [`KeySource`] seam. Today every key is a file under the
//! data directory ([`FileKeys`]), generated there once. Several replicas must sign with the same
//! keys (a relying service verifies any replica's JWTs against one JWKS), so a shared source
//! implements the same trait.

use ring::rand::SystemRandom;
use ring::signature::{self as sig, EcdsaKeyPair};
use std::path::{Path, PathBuf};

pub trait KeySource: Send + Sync {
    /// The PKCS#8 bytes (DER or PEM) of the key named `name`. With `generate`, a fresh ES256
    /// key is made and kept first when there is none; without, a missing key is an error.
    fn pkcs8(&self, name: &Path, generate: bool) -> Result<Vec<u8>, String>;
}

/// Keys as files, named relative to a directory (an absolute name stays as it is).
pub struct FileKeys {
    dir: PathBuf,
}

impl FileKeys {
    pub fn new(dir: impl Into<PathBuf>) -> FileKeys {
        FileKeys { dir: dir.into() }
    }
}

impl KeySource for FileKeys {
    fn pkcs8(&self, name: &Path, generate: bool) -> Result<Vec<u8>, String> {
        let path = self.dir.join(name);
        if generate && !path.exists() {
            generate_key_file(&path)?;
        }
        std::fs::read(&path).map_err(|e| format!("signing key {}: {e}", path.display()))
    }
}

fn generate_key_file(path: &Path) -> Result<(), String> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&sig::ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .map_err(|_| "key generation failed".to_string())?;
    if let Some(dir) = path.parent() {
        create_private_dir(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    write_private_file(path, pkcs8.as_ref()).map_err(|e| format!("writing {}: {e}", path.display()))?;
    tracing::info!(path = %path.display(), "generated a new ES256 signing key");
    Ok(())
}

/// PEM (any label: the caller's parser decides what the DER holds) → DER; anything that does
/// not start like PEM is taken as DER already.
pub fn pem_to_der(bytes: &[u8]) -> Option<Vec<u8>> {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) if t.trim_start().starts_with("-----BEGIN") => t,
        _ => return Some(bytes.to_vec()),
    };
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).map(str::trim).collect();
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// A directory only the broker's user can read.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// A new file (never an existing one) readable only by the broker's user.
pub fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_key_is_generated_once_and_a_missing_one_is_an_error_without_generate() {
        let dir = tempfile::tempdir().unwrap();
        let keys = FileKeys::new(dir.path());
        let err = keys.pkcs8(Path::new("keys/a.pk8"), false).unwrap_err();
        assert!(err.contains("a.pk8"), "{err}");
        let first = keys.pkcs8(Path::new("keys/a.pk8"), true).unwrap();
        assert_eq!(keys.pkcs8(Path::new("keys/a.pk8"), true).unwrap(), first, "kept, not regenerated");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("keys/a.pk8")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

//! Ed25519 signatures that anchor heads outside the database (docs/AUDIT.md): key files,
//! the signature line of a JSONL export, and the signed head checkpoints the engine writes.
//!
//! The hash chain is unkeyed: anyone can rewrite a record and every hash after it. A
//! signature by a key the forger does not hold is what such a rewrite cannot reproduce.
//! What is signed is spelled out byte by byte here and in docs/EXPORT.md, so a verifier
//! needs no keel.

use crate::error::ReplayError;
use crate::format::hex32;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use std::path::Path;

/// First word of a private key file.
pub const SECRET_KEY_TAG: &str = "keel-ed25519-secret-key/v1";
/// First word of a public key file.
pub const PUBLIC_KEY_TAG: &str = "keel-ed25519-public-key/v1";
/// First line of the message an export's signature covers.
pub const EXPORT_SIG_DOMAIN: &str = "keel-export-signature/v1";
/// Longest key file read, in bytes (a key file is one short line).
const KEY_FILE_BYTES_MAX: u64 = 4096;

/// A private signing key (loaded from a key file written by [`write_keypair`]).
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey(public {})", self.public().hex())
    }
}

/// A public key: what a verifier holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Result<SecretKey, ReplayError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed)
            .map_err(|e| ReplayError::Invalid(format!("cannot read the system's random source: {e}")))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The signature of `msg`, hex (128 digits).
    pub fn sign_hex(&self, msg: &[u8]) -> String {
        hex::encode(self.0.sign(msg).to_bytes())
    }

    /// Reads a private key file.
    pub fn load(path: &Path) -> Result<SecretKey, ReplayError> {
        let seed = read_key_file(path, SECRET_KEY_TAG)?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }
}

impl keel_engine::HeadSigner for SecretKey {
    fn alg(&self) -> &'static str {
        "ed25519"
    }
    fn public_hex(&self) -> String {
        self.public().hex()
    }
    fn sign_hex(&self, msg: &[u8]) -> String {
        SecretKey::sign_hex(self, msg)
    }
}

impl PublicKey {
    /// The key as 64 hex digits (what export signature lines and checkpoints name).
    pub fn hex(&self) -> String {
        hex32(self.0.as_bytes())
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<PublicKey> {
        let bytes = crate::format::parse_hash(s)?;
        VerifyingKey::from_bytes(&bytes).ok().map(PublicKey)
    }

    /// Reads a public key file (or a private one: its public half), or takes the argument
    /// as the key itself when it is 64 hex digits and no such file exists.
    pub fn load(arg: &Path) -> Result<PublicKey, ReplayError> {
        if !arg.exists() {
            if let Some(k) = arg.to_str().and_then(PublicKey::from_hex) {
                return Ok(k);
            }
        }
        let text = read_small(arg)?;
        if text.starts_with(SECRET_KEY_TAG) {
            return SecretKey::load(arg).map(|k| k.public());
        }
        let bytes = parse_key_text(arg, &text, PUBLIC_KEY_TAG)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| ReplayError::Invalid(format!("{}: not a valid Ed25519 public key", arg.display())))
    }

    /// Whether `sig_hex` is this key's signature of `msg`.
    pub fn verifies(&self, msg: &[u8], sig_hex: &str) -> bool {
        let Ok(bytes) = hex::decode(sig_hex) else { return false };
        let Ok(arr) = <[u8; 64]>::try_from(bytes.as_slice()) else { return false };
        self.0.verify(msg, &Signature::from_bytes(&arr)).is_ok()
    }
}

fn read_small(path: &Path) -> Result<String, ReplayError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| ReplayError::io(path, e))?;
    let mut text = String::new();
    f.take(KEY_FILE_BYTES_MAX)
        .read_to_string(&mut text)
        .map_err(|_| ReplayError::Invalid(format!("{}: not a keel key file", path.display())))?;
    Ok(text)
}

fn parse_key_text(path: &Path, text: &str, tag: &str) -> Result<[u8; 32], ReplayError> {
    let mut words = text.split_whitespace();
    let (Some(t), Some(h), None) = (words.next(), words.next(), words.next()) else {
        return Err(ReplayError::Invalid(format!(
            "{}: not a keel key file (expected `{tag} <64 hex>`)",
            path.display()
        )));
    };
    if t != tag {
        return Err(ReplayError::Invalid(format!("{}: a {t} file, expected a {tag} file", path.display())));
    }
    crate::format::parse_hash(h)
        .ok_or_else(|| ReplayError::Invalid(format!("{}: the key is not 64 lowercase hex digits", path.display())))
}

fn read_key_file(path: &Path, tag: &str) -> Result<[u8; 32], ReplayError> {
    let text = read_small(path)?;
    parse_key_text(path, &text, tag)
}

/// `path.pub`: where [`write_keypair`] puts the public key.
pub fn public_path(path: &Path) -> std::path::PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".pub");
    s.into()
}

/// Writes a new key pair: the private key to `path` (mode 0600, created, never replacing
/// anything) and the public key to `path.pub`. Refuses if either exists.
pub fn write_keypair(path: &Path) -> Result<PublicKey, ReplayError> {
    let key = SecretKey::generate()?;
    let pub_path = public_path(path);
    for p in [path, pub_path.as_path()] {
        if p.symlink_metadata().is_ok() {
            return Err(ReplayError::Invalid(format!("{} exists: not replacing a key file", p.display())));
        }
    }
    let secret = format!("{SECRET_KEY_TAG} {}\n", hex32(key.0.as_bytes()));
    create_new(path, secret.as_bytes(), 0o600)?;
    let public = format!("{PUBLIC_KEY_TAG} {}\n", key.public().hex());
    create_new(&pub_path, public.as_bytes(), 0o644)?;
    Ok(key.public())
}

fn create_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ReplayError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path).map_err(|e| ReplayError::io(path, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| ReplayError::io(path, e))
}

/// One run's line of a signed message: `run <id> <records> <head hex>\n`.
pub fn run_line(run: &str, records: u64, head: &str) -> String {
    format!("run {run} {records} {head}\n")
}

/// The message an export's signature covers, built incrementally: the domain line, the
/// header line's bytes as written (without its newline) and a newline, then one
/// [`run_line`] per `run_end` trailer, in file order.
#[derive(Clone, Debug)]
pub struct ExportMessage(Vec<u8>);

impl ExportMessage {
    /// Starts the message with the header line's bytes.
    pub fn new(header_line: &[u8]) -> ExportMessage {
        let mut m = format!("{EXPORT_SIG_DOMAIN}\n").into_bytes();
        m.extend_from_slice(header_line);
        m.push(b'\n');
        ExportMessage(m)
    }

    /// Adds a run's trailer.
    pub fn add_run(&mut self, run: &str, records: u64, head: &str) {
        self.0.extend_from_slice(run_line(run, records, head).as_bytes());
    }

    /// The bytes signed.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_with_its_key_only() -> Result<(), ReplayError> {
        let (a, b) = (SecretKey::generate()?, SecretKey::generate()?);
        let sig = a.sign_hex(b"heads");
        assert!(a.public().verifies(b"heads", &sig));
        assert!(!a.public().verifies(b"heads!", &sig));
        assert!(!b.public().verifies(b"heads", &sig));
        assert!(!a.public().verifies(b"heads", "zz"));
        Ok(())
    }

    #[test]
    fn keypair_files_round_trip_and_are_never_replaced() -> Result<(), ReplayError> {
        let dir = std::env::temp_dir().join(format!("keel-sign-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).map_err(|e| ReplayError::io(&dir, e))?;
        let path = dir.join("k");
        let public = write_keypair(&path)?;
        assert_eq!(SecretKey::load(&path)?.public(), public);
        assert_eq!(PublicKey::load(&public_path(&path))?, public);
        assert_eq!(PublicKey::load(Path::new(&public.hex()))?, public);
        assert!(write_keypair(&path).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).map_err(|e| ReplayError::io(&path, e))?.permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }
}

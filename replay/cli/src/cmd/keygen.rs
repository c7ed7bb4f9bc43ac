//! Makes an Ed25519 key pair: `keel keygen`; and the `--sign-key` option of the commands
//! that write signed head checkpoints (`keel work`, `keel serve`).

use crate::error::{CliError, CmdResult};
use crate::output::outln;
use clap::Args;
use keel_replay::sign::{public_path, write_keypair, SecretKey};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub(crate) struct KeygenArgs {
    /// Where to write the private key (mode 0600); the public key goes to PATH.pub.
    /// Neither may exist.
    #[arg(long, value_name = "PATH")]
    pub(crate) out: PathBuf,
}

pub(crate) fn run(a: KeygenArgs) -> CmdResult {
    let public = write_keypair(&a.out)?;
    outln!("private key: {} (keep it secret; mode 0600)", a.out.display())?;
    outln!("public key:  {} ({})", public_path(&a.out).display(), public.hex())?;
    Ok(ExitCode::SUCCESS)
}

/// `--sign-key FILE` / `--checkpoint-every-ms MS` of `keel work` and `keel serve`.
#[derive(Args, Debug)]
pub(crate) struct SignKeyArgs {
    /// Sign head checkpoints of the whole database with this private key (from
    /// `keel keygen`): written when `--until-idle` ends, and periodically by a service.
    #[arg(long, value_name = "FILE")]
    pub(crate) sign_key: Option<PathBuf>,
    /// Interval between signed checkpoints of a service (with --sign-key).
    #[arg(long, value_name = "MS", default_value_t = keel_engine::CHECKPOINT_EVERY_MS_DEFAULT, requires = "sign_key")]
    pub(crate) checkpoint_every_ms: u64,
}

/// A loaded signing key and its checkpoint interval.
pub(crate) struct SignKey {
    pub(crate) key: SecretKey,
    pub(crate) every_ms: u64,
}

impl SignKeyArgs {
    /// The key, read before anything is opened (a bad key file is one line).
    pub(crate) fn load(&self) -> Result<Option<SignKey>, CliError> {
        let Some(path) = &self.sign_key else { return Ok(None) };
        if self.checkpoint_every_ms == 0 {
            return Err(CliError::Usage("--checkpoint-every-ms must be at least 1".into()));
        }
        Ok(Some(SignKey { key: SecretKey::load(path)?, every_ms: self.checkpoint_every_ms }))
    }
}

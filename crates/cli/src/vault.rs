//! `tally vault rotate-kek`: re-seal every credential's data key under a new
//! key-encryption key, with a progress bar, resumable: run it again with the
//! same two keys after an interruption and it finishes the rest. It runs on
//! a stopped server's data directory (a running server holds the old key in
//! memory), and never writes a plaintext.

use crate::data_dir::DataDir;
use crate::progress::Progress;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::ops::ControlFlow;
use std::path::PathBuf;
use tally_integrations::vault::{Kek, Keyring, Vault};

#[derive(Subcommand)]
pub enum VaultCommand {
    /// Re-seal every credential under a new key-encryption key (the server
    /// stopped). The current key comes from TALLY_VAULT_KEY or
    /// --vault-key-file; afterwards, start tally with the new one.
    RotateKek(RotateArgs),
}

#[derive(Args)]
pub struct RotateArgs {
    /// The current key's file (or TALLY_VAULT_KEY).
    #[arg(long)]
    vault_key_file: Option<PathBuf>,
    /// The new key's file (mode 0600, 32 bytes in base64), or TALLY_VAULT_NEW_KEY.
    #[arg(long)]
    new_key_file: Option<PathBuf>,
    /// Credentials re-sealed per transaction.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch: u32,
}

pub fn run(data_dir: &std::path::Path, command: VaultCommand) -> Result<()> {
    let data_dir = DataDir::existing(data_dir)?;
    match command {
        VaultCommand::RotateKek(args) => rotate(&data_dir, args),
    }
}

fn key(env: &str, file: Option<&PathBuf>, what: &str) -> Result<Kek> {
    match (std::env::var(env).ok().filter(|key| !key.trim().is_empty()), file) {
        (Some(key), _) => Kek::from_base64(&key).with_context(|| env.to_owned()),
        (None, Some(path)) => Kek::from_file(path).with_context(|| format!("the {what} key file")),
        (None, None) => bail!("no {what} key: set {env} or pass its file"),
    }
}

fn rotate(data_dir: &DataDir, args: RotateArgs) -> Result<()> {
    let path = data_dir.root().join("vault.db");
    if !path.exists() {
        bail!("{} has no vault: nothing to rotate", data_dir.root().display());
    }
    // A running server holds the projections' lock, and the old key.
    if let Err(tally_projections::ProjectionError::Locked { .. }) =
        tally_projections::Projections::open(&data_dir.projections(), &data_dir.events())
    {
        bail!("a server is running on {}: stop it first (it holds the old key in memory)", data_dir.root().display());
    }
    let old = key("TALLY_VAULT_KEY", args.vault_key_file.as_ref(), "current")?;
    let new = key("TALLY_VAULT_NEW_KEY", args.new_key_file.as_ref(), "new")?;
    if old.id() == new.id() {
        bail!("the new key is the current one");
    }
    let new_id = new.id().to_owned();
    let vault =
        Vault::open_with(&path, Keyring { active: new, retired: vec![old] }).context("cannot open the vault")?;
    let mut progress: Option<Progress> = None;
    let done = vault.rotate(args.batch as usize, |step| {
        progress
            .get_or_insert_with(|| Progress::counting("re-sealing", step.total, "credentials"))
            .update(step.done, step.total);
        ControlFlow::Continue(())
    })?;
    if let Some(progress) = progress {
        progress.finish();
    }
    println!(
        "re-sealed {} credentials under key {new_id}: start tally with the new key (TALLY_VAULT_KEY or --vault-key-file)",
        done.total
    );
    Ok(())
}

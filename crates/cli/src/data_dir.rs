//! The data directory: where each file lives, and the checks that keep the
//! operator and auditor commands from creating anything where they were
//! pointed by mistake.
//!
//! `serve` and `events import` create a missing directory and log; every
//! other command needs an existing log and refuses before it opens a file,
//! so that `tally audit verify` on a mistyped path leaves no empty database
//! behind.

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const EVENTS_FILE: &str = "events.db";
pub const PROJECTIONS_FILE: &str = "projections.db";
pub const KEYS_FILE: &str = "keys.db";
/// The alert reactor's checkpoint, members' watches and outbox.
const ALERTS_FILE: &str = "alerts.sqlite";
/// The webhook dispatcher's checkpoint, queues and delivery log.
const WEBHOOKS_FILE: &str = "webhooks.sqlite";
/// Written by `serve` once it listens, removed when it stops: how the CLI
/// finds the server that owns the projections.
pub const SERVER_FILE: &str = "server.json";

#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The directory as given, without looking at it (for `serve` and `import`).
    pub fn new(root: &Path) -> DataDir {
        DataDir { root: root.to_path_buf() }
    }

    /// The directory, which must exist and hold an event log. Creates nothing.
    pub fn existing(root: &Path) -> Result<DataDir> {
        let data_dir = DataDir::new(root);
        if !root.exists() {
            bail!("the data directory {} does not exist", root.display());
        }
        if !root.is_dir() {
            bail!("the data directory {} is not a directory", root.display());
        }
        let events = data_dir.events();
        if !events.is_file() {
            bail!(
                "{} does not exist, so {} is not a tally data directory (start `tally serve` there, or `tally events import` a log)",
                events.display(),
                root.display()
            );
        }
        Ok(data_dir)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn events(&self) -> PathBuf {
        self.root.join(EVENTS_FILE)
    }

    pub fn projections(&self) -> PathBuf {
        self.root.join(PROJECTIONS_FILE)
    }

    pub fn keys(&self) -> PathBuf {
        self.root.join(KEYS_FILE)
    }

    pub fn alerts(&self) -> PathBuf {
        self.root.join(ALERTS_FILE)
    }

    pub fn webhooks(&self) -> PathBuf {
        self.root.join(WEBHOOKS_FILE)
    }

    pub fn server_file(&self) -> PathBuf {
        self.root.join(SERVER_FILE)
    }

    /// Creates the directory if needed (for the commands that may).
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create the data directory {}", self.root.display()))
    }
}

/// Where a running server listens, as `serve` publishes it in [`SERVER_FILE`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerAddress {
    /// The base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub pid: u32,
}

impl ServerAddress {
    /// Written to a temporary file and renamed, so a reader never sees half of it.
    pub fn publish(&self, data_dir: &DataDir) -> Result<()> {
        let path = data_dir.server_file();
        let partial = data_dir.root().join(format!("{SERVER_FILE}.{}.tmp", self.pid));
        let json = serde_json::to_string(self).expect("a server address serialises");
        std::fs::write(&partial, json).with_context(|| format!("cannot write {}", partial.display()))?;
        std::fs::rename(&partial, &path).with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn read(data_dir: &DataDir) -> Result<ServerAddress> {
        let path = data_dir.server_file();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!("a server owns the projections, but its address file {} cannot be read", path.display())
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not a server address file", path.display()))
    }

    /// Removes the file if it is still this process's.
    pub fn withdraw(data_dir: &DataDir) {
        let path = data_dir.server_file();
        let ours = ServerAddress::read(data_dir).is_ok_and(|address| address.pid == std::process::id());
        if ours && let Err(error) = std::fs::remove_file(&path) {
            tracing::warn!(%error, path = %path.display(), "cannot remove the server address file");
        }
    }
}

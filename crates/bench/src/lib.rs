//! What the benchmark binaries (`tally-bench`, `tally-load`,
//! `tally-startup`, `tally-exec`, `tally-sources`) share.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A `tally serve` of a benchmark, killed and its data directory removed
/// when dropped.
pub struct TallyServer {
    pub child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    dir: PathBuf,
}

impl Drop for TallyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `tally serve` on a fresh data directory (`NAME-PID` in the temp
/// directory) and a free loopback port, reaching 127.0.0.1 only, with the
/// given admin and vault keys and `extra` flags; returns once it listens.
pub fn start_tally(
    tally: &Path,
    name: &str,
    admin_key: &str,
    vault_key: &str,
    extra: &[String],
) -> anyhow::Result<TallyServer> {
    use anyhow::Context as _;
    use std::io::BufRead;
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut child = Command::new(tally)
        .arg("--data-dir")
        .arg(&dir)
        .args(["serve", "--addr", "127.0.0.1:0", "--allow-private-targets", "127.0.0.1/32", "--outbound", "allow-list"])
        .args(["--health-check-interval-s", "0"])
        .args(extra)
        .env("TALLY_ADMIN_KEY", admin_key)
        .env("TALLY_VAULT_KEY", vault_key)
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", tally.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let base = loop {
        let Some(line) = lines.next() else { anyhow::bail!("tally exited before listening") };
        if let Some(address) = line?.strip_prefix("tally listening on ") {
            break address.trim().to_owned();
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok(TallyServer { child, base, dir })
}

/// `20000` → `20,000`, as in BENCHMARKS.md.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    grouped
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_are_grouped_by_three() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(1_000), "1,000");
        assert_eq!(super::thousands(20_000_000), "20,000,000");
    }
}

//! The real database servers the source tests query, each started once per
//! test binary by its script in `tests/servers/` (PostgreSQL 15 and MariaDB
//! from Debian's packages, nx-27017 and mockupdb from PyPI for MongoDB's
//! wire protocol), on a free loopback port, seeded, and stopped by the
//! script's watcher when this process exits. `bash .ci/test-servers`
//! installs them. A server that cannot start fails the test with the
//! script's reason: nothing is skipped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::LazyLock;

pub const PG_PASSWORD: &str = "pg-app-pw-7c1d93e0";
pub const MARIADB_PASSWORD: &str = "my-app-pw-4b8e21f6";

pub struct Database {
    pub port: u16,
    pub dir: PathBuf,
    /// The server's process, where the script names it.
    pub pid: Option<u32>,
}

fn servers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers")
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs a start script (`name PORT OWNER_PID extra…`) and reads its
/// `dir=… port=… pid=…` line.
pub fn start(script: &str, extra: &[&str]) -> Result<Database, String> {
    let port = free_port();
    let output = Command::new("bash")
        .arg(servers_dir().join(script))
        .arg(port.to_string())
        .arg(std::process::id().to_string())
        .args(extra)
        .output()
        .map_err(|error| format!("{script} could not run: {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "{script} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let field =
        |name: &str| text.split_whitespace().find_map(|part| part.strip_prefix(&format!("{name}=")).map(str::to_owned));
    Ok(Database {
        port,
        dir: PathBuf::from(field("dir").ok_or_else(|| format!("{script} printed no dir: {text}"))?),
        pid: field("pid").and_then(|pid| pid.parse().ok()),
    })
}

fn shared(cell: &'static LazyLock<Result<Database, String>>) -> &'static Database {
    match &**cell {
        Ok(database) => database,
        Err(reason) => panic!("the test server could not start: {reason}"),
    }
}

static POSTGRES: LazyLock<Result<Database, String>> = LazyLock::new(|| start("postgres.sh", &[]));
static MARIADB: LazyLock<Result<Database, String>> = LazyLock::new(|| start("mariadb.sh", &[]));
static MONGO: LazyLock<Result<Database, String>> = LazyLock::new(|| start("mongo.sh", &[]));
static MONGO_SCRIPTED: LazyLock<Result<Database, String>> = LazyLock::new(|| start("mongo.sh", &["script"]));

/// PostgreSQL 15, database `appdb` owned by `app` (tests/servers/postgres.sql).
pub fn postgres() -> &'static Database {
    shared(&POSTGRES)
}

/// MariaDB, database `appdb` for `app` (tests/servers/mariadb.sql).
pub fn mariadb() -> &'static Database {
    shared(&MARIADB)
}

/// nx-27017 with `shop` seeded (tests/servers/mongo_seed.py).
pub fn mongo() -> &'static Database {
    shared(&MONGO)
}

/// mockupdb answering as tests/servers/mongo_script.py says.
pub fn mongo_scripted() -> &'static Database {
    shared(&MONGO_SCRIPTED)
}

/// SQL as PostgreSQL's superuser over the private socket, rows as `a|b` lines.
pub fn psql(database: &Database, sql: &str) -> String {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path().join("bin/psql"))
        .find(|path| path.exists())
        .expect("psql is installed");
    let mut command = if nix_is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(bin);
        command
    } else {
        Command::new(bin)
    };
    let output = command
        .args(["-X", "-A", "-t", "-h"])
        .arg(&database.dir)
        .args(["-p", &database.port.to_string(), "-U", "postgres", "-d", "appdb", "-c", sql])
        .output()
        .expect("psql runs");
    assert!(output.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// SQL as MariaDB's root over the private socket, rows as tab-separated lines.
pub fn mariadb_sql(database: &Database, sql: &str) -> String {
    let output = Command::new("mariadb")
        .arg("--no-defaults")
        .arg(format!("--socket={}", database.dir.join("s").display()))
        .args(["-uroot", "-N", "-B", "appdb", "-e", sql])
        .output()
        .expect("mariadb runs");
    assert!(output.status.success(), "mariadb {sql}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|output| output.stdout.starts_with(b"0\n"))
}

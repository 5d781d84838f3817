//! Test support: the real `tally` binary on a fresh data directory and an
//! ephemeral loopback port, and a small HTTP client around it.

use reqwest::blocking::{Client, Response};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;
use tempfile::TempDir;

pub const ADMIN_KEY: &str = "tk_admin_test_0123456789abcdef";

/// The `tally` binary, built once per test run with the same profile as the
/// tests (so it shares their compiled dependencies).
pub fn tally_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let test_exe = std::env::current_exe().expect("test executable path");
        let profile_dir = test_exe.parent().and_then(Path::parent).expect("target/<profile>").to_owned();
        let target_dir = profile_dir.parent().expect("target dir").to_owned();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "tally-cli", "--bin", "tally", "--target-dir"])
            .arg(&target_dir)
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building the tally binary failed");
        profile_dir.join("tally")
    })
}

pub struct Server {
    child: Child,
    pub base: String,
    pub data_dir: TempDir,
    pub client: Client,
}

impl Server {
    /// `tally serve` with the test clock at `start`, on a fresh data dir.
    pub fn start_with_clock(start: &str) -> Server {
        Server::start(&["--test-clock", "--start", start])
    }

    pub fn start(extra: &[&str]) -> Server {
        let data_dir = TempDir::new().expect("temp dir");
        Server::start_in(data_dir, extra)
    }

    pub fn start_in(data_dir: TempDir, extra: &[&str]) -> Server {
        Server::start_with_env(data_dir, extra, &[])
    }

    /// With extra environment variables (Stripe settings, say).
    pub fn start_with_env(data_dir: TempDir, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Server::spawn(data_dir, extra, env, None)
    }

    /// With the server's logs (stderr) written to `log`.
    pub fn start_logged(extra: &[&str], env: &[(&str, &str)], log: &Path) -> Server {
        Server::spawn(TempDir::new().expect("temp dir"), extra, env, Some(log))
    }

    fn spawn(data_dir: TempDir, extra: &[&str], env: &[(&str, &str)], log: Option<&Path>) -> Server {
        let stderr = match log {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("log file")),
            None => Stdio::inherit(),
        };
        let mut child = Command::new(tally_binary())
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["serve", "--addr", "127.0.0.1:0", "--workers", "2"])
            .args(extra)
            .env("TALLY_ADMIN_KEY", ADMIN_KEY)
            .env("TALLY_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("tally starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            let line = lines.next().expect("tally printed its address before exiting").expect("utf-8");
            if let Some(address) = line.strip_prefix("tally listening on ") {
                break address.trim().to_owned();
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let client = Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
        Server { child, base, data_dir, client }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str, key: &str) -> Response {
        self.client.get(self.url(path)).bearer_auth(key).send().expect("request")
    }

    pub fn post(&self, path: &str, key: &str, body: &Value, idempotency_key: Option<&str>) -> Response {
        let mut request = self.client.post(self.url(path)).bearer_auth(key).json(body);
        if let Some(idempotency_key) = idempotency_key {
            request = request.header("Idempotency-Key", idempotency_key);
        }
        request.send().expect("request")
    }

    pub fn put(&self, path: &str, key: &str, body: &Value) -> Response {
        self.client.put(self.url(path)).bearer_auth(key).json(body).send().expect("request")
    }

    /// POST as admin with a fresh idempotency key; returns (status, body).
    pub fn admin_post(&self, path: &str, body: Value) -> (u16, Value) {
        let key = uuid_like();
        let response = self.post(path, ADMIN_KEY, &body, Some(&key));
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    pub fn admin_get(&self, path: &str) -> (u16, Value) {
        let response = self.get(path, ADMIN_KEY);
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// Wait until the read models reached the log's head (read-your-writes).
    pub fn sync(&self, member: &str) {
        let head = self.head_position();
        let (status, body) = self.admin_get(&format!("/v1/members/{member}/balance?min_position={head}"));
        assert_eq!(status, 200, "{body}");
    }

    /// The payloads of the log's events of one type, in log order (the
    /// first 1,000 events).
    pub fn events_of_type(&self, event_type: &str) -> Vec<Value> {
        let (_, feed) = self.admin_get("/v1/events?after=0&limit=1000");
        let events = feed["events"].as_array().expect("an event feed");
        events.iter().filter(|event| event["event_type"] == event_type).map(|event| event["payload"].clone()).collect()
    }

    /// [`Server::head_position`] less the alert reactor's own events: what
    /// requests wrote, when a test's requests also raise alerts.
    pub fn written(&self) -> u64 {
        let head = self.head_position();
        let alerts = (self.events_of_type("AlertTriggered").len() + self.events_of_type("AlertResolved").len()) as u64;
        head - alerts
    }

    /// The log's head once the alert reactor has looked at all of it and
    /// appended what it decided: a server at rest, whose head a test may
    /// compare before and after a request.
    pub fn head_position(&self) -> u64 {
        let alerts = |status: &Value| -> (u64, u64, u64, u64) {
            let reactor = status["reactors"]
                .as_array()
                .and_then(|reactors| reactors.iter().find(|reactor| reactor["name"] == "alerts"))
                .expect("the alert reactor's status");
            let number = |field: &str| reactor[field].as_u64().expect("a number");
            (status["head"].as_u64().expect("head"), number("lag"), number("pending"), number("passes"))
        };
        let (_, status) = self.admin_get("/v1/admin/projections");
        let (_, _, _, first_pass) = alerts(&status);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, status) = self.admin_get("/v1/admin/projections");
            let (head, lag, pending, passes) = alerts(&status);
            // Two passes more: one began after the first look.
            if passes >= first_pass + 2 && lag == 0 && pending == 0 {
                return head;
            }
            assert!(std::time::Instant::now() < deadline, "the alert reactor never caught up: {status}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Ask the process to stop (SIGTERM), wait for it, and check it exited
    /// cleanly; keeps the data directory.
    pub fn terminate(mut self) -> TempDir {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
        assert!(sent.success());
        let status = self.child.wait().expect("tally exits");
        assert!(status.success(), "tally exited with {status} after SIGTERM");
        std::mem::replace(&mut self.data_dir, TempDir::new().expect("temp dir"))
    }

    /// Kill the process at once (SIGKILL), keeping the data directory.
    pub fn kill(mut self) -> TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.data_dir, TempDir::new().expect("temp dir"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("key-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn plan(plan_id: &str, price: i64, monthly_credits: i64, rollover_max: i64, overage: Option<(i64, i64)>) -> Value {
    serde_json::json!({
        "plan_id": plan_id,
        "name": plan_id,
        "price": price,
        "currency": "USD",
        "monthly_credits": monthly_credits,
        "rollover": {"enabled": rollover_max > 0, "max_credits": rollover_max},
        "overage": match overage {
            Some((limit, unit_price)) => serde_json::json!({"allowed": true, "limit_credits": limit, "unit_price": unit_price}),
            None => serde_json::json!({"allowed": false, "limit_credits": 0, "unit_price": 0}),
        },
        "rate_limit_per_minute": 1000,
    })
}

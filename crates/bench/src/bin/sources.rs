//! `tally-sources`: what running a query on a database source through
//! tally costs beside running it with the driver directly (issue 21's
//! benchmark), per provider, in one run.
//!
//! 1. The test servers of `tests/servers/` (PostgreSQL 15, MariaDB, and
//!    nx-27017 for MongoDB's wire protocol) on free loopback ports, each
//!    with a table (collection) `big`; `bash .ci/test-servers` installs them.
//! 2. The real `tally serve` (release build) on a fresh data directory,
//!    reaching 127.0.0.1 only; `--members` members per provider, each with
//!    the integration and two saved queries, `small` (10 rows) and `large`
//!    (10,000 rows), never cached.
//! 3. Per provider and query, two closed-loop phases of `--seconds` with
//!    `--clients` clients: the driver directly (a pool as large as the
//!    clients), then tally over HTTP (each run charged).
//! 4. Memory, measured first, beside the answer's JSON size: the peak bytes
//!    the provider holds while it runs `large` (in this process, the
//!    provider called directly, every allocation counted), and the server's
//!    peak resident memory over its resting size while it answers the
//!    provider's first `large` run (the kernel's peak counter reset just
//!    before; freed memory is kept by the allocator, so only a first run
//!    shows).
//!
//! ```sh
//! bash .ci/test-servers && cargo build --release -p tally-cli -p tally-bench
//! target/release/tally-sources                 # 64 clients, 16 members, 5 s a phase
//! target/release/tally-sources --smoke         # CI: a second a phase, checks every answer
//! ```

use anyhow::{Context, Result, ensure};
use clap::Parser;
use serde_json::{Value, json};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Counts the bytes allocated now, and the peak since it was last reset.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let now = ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: std::alloc::Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { std::alloc::System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        if size > layout.size() {
            let now = ALLOCATED.fetch_add(size - layout.size(), Ordering::Relaxed) + size - layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        } else {
            ALLOCATED.fetch_sub(layout.size() - size, Ordering::Relaxed);
        }
        unsafe { std::alloc::System.realloc(pointer, layout, size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The provider run in this process on the `large` query: its answer's
/// JSON bytes, and the peak bytes allocated while it ran (after a warm-up
/// run that opened the pool).
async fn provider_peak(provider: Provider, port: u16) -> Result<(usize, usize)> {
    use tally_integrations::guard::Guard;
    let integration = provider.integration(port);
    let guard = Guard::allow_list_only(Guard::parse_allow_list("127.0.0.1/32").map_err(anyhow::Error::msg)?);
    let http = tally_integrations::http::GuardedHttp::new(guard);
    let credential = integration.get("credential").map(|fields| secrecy::SecretString::from(fields.to_string()));
    let call = tally_integrations::Call {
        config: &integration["config"],
        credential: credential.as_ref(),
        credential_key: "bench/memory/1".into(),
        limits: tally_integrations::Limits {
            timeout: Duration::from_secs(30),
            max_rows: LARGE,
            max_bytes: tally_integrations::provider::RESPONSE_BYTES_DEFAULT,
        },
        http: &http,
    };
    let spec: tally_integrations::query::QuerySpec = serde_json::from_value(provider.query(LARGE))?;
    let source = tally_integrations::provider(provider.name()).context("the provider is built in")?;
    let params = serde_json::Map::new();
    source.run(&call, &spec, &params).await.map_err(|error| anyhow::anyhow!("{error}"))?;
    let before = ALLOCATED.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let rows = source.run(&call, &spec, &params).await.map_err(|error| anyhow::anyhow!("{error}"))?;
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    ensure!(rows.rows.len() == LARGE, "{} rows", rows.rows.len());
    Ok((serde_json::to_string(&rows.rows)?.len(), peak))
}

const ADMIN_KEY: &str = "tally-sources-admin-key";
const VAULT_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
const PG_PASSWORD: &str = "pg-app-pw-7c1d93e0";
const MARIADB_PASSWORD: &str = "my-app-pw-4b8e21f6";
const LARGE: usize = 10_000;
const SMALL: usize = 10;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "target/release/tally")]
    tally: PathBuf,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 16)]
    members: usize,
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// postgres, mysql, mongodb (all when absent).
    #[arg(long)]
    provider: Vec<String>,
    /// A second a phase, few clients; fails on any unexpected answer.
    #[arg(long)]
    smoke: bool,
}

struct Database {
    port: u16,
}

/// Starts a test server with its script (stopped when this process exits).
fn start_database(script: &str) -> Result<Database> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/servers").join(script);
    let output = Command::new("bash")
        .arg(&path)
        .arg(port.to_string())
        .arg(std::process::id().to_string())
        .output()
        .with_context(|| format!("cannot run {}", path.display()))?;
    ensure!(output.status.success(), "{script}: {}", String::from_utf8_lossy(&output.stderr));
    Ok(Database { port })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Provider {
    Postgres,
    Mysql,
    Mongodb,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::Postgres => "postgres",
            Provider::Mysql => "mysql",
            Provider::Mongodb => "mongodb",
        }
    }

    fn integration(self, port: u16) -> Value {
        match self {
            Provider::Postgres | Provider::Mysql => json!({"provider": self.name(), "name": "bench",
                "config": {"host": "127.0.0.1", "port": port, "database": "appdb", "user": "app", "sslmode": "disable"},
                "credential": {"password": if self == Provider::Postgres { PG_PASSWORD } else { MARIADB_PASSWORD }}}),
            Provider::Mongodb => json!({"provider": "mongodb", "name": "bench",
                "config": {"hosts": [format!("127.0.0.1:{port}")], "database": "shop", "sslmode": "disable"}}),
        }
    }

    fn query(self, rows: usize) -> Value {
        match self {
            Provider::Postgres | Provider::Mysql => json!({"kind": "sql",
                "sql": format!("select id, label from big where id <= {rows} order by id"),
                "max_rows": rows, "cache_ttl_s": 0, "credits_base": 1}),
            Provider::Mongodb => json!({"kind": "find", "collection": "bench", "sort": {"_id": 1}, "limit": rows,
                "max_rows": rows, "cache_ttl_s": 0, "credits_base": 1}),
        }
    }
}

/// The driver, called directly, with a pool as large as the clients.
#[derive(Clone)]
enum Direct {
    Postgres(deadpool_postgres::Pool),
    Mysql(mysql_async::Pool),
    Mongodb(mongodb::Collection<mongodb::bson::Document>),
}

impl Direct {
    async fn new(provider: Provider, port: u16, clients: usize) -> Result<Direct> {
        Ok(match provider {
            Provider::Postgres => {
                let mut config = tokio_postgres::Config::new();
                config.host("127.0.0.1").port(port).dbname("appdb").user("app").password(PG_PASSWORD);
                let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
                Direct::Postgres(deadpool_postgres::Pool::builder(manager).max_size(clients).build()?)
            }
            Provider::Mysql => {
                let opts = mysql_async::OptsBuilder::default()
                    .ip_or_hostname("127.0.0.1")
                    .tcp_port(port)
                    .user(Some("app"))
                    .pass(Some(MARIADB_PASSWORD))
                    .db_name(Some("appdb"))
                    .pool_opts(
                        mysql_async::PoolOpts::default()
                            .with_constraints(mysql_async::PoolConstraints::new(0, clients).context("pool size")?),
                    );
                Direct::Mysql(mysql_async::Pool::new(opts))
            }
            Provider::Mongodb => {
                let uri = format!("mongodb://127.0.0.1:{port}/?directConnection=true&maxPoolSize={clients}");
                let client = mongodb::Client::with_uri_str(&uri).await?;
                Direct::Mongodb(client.database("shop").collection("bench"))
            }
        })
    }

    /// Runs the query; the rows read.
    async fn run(&self, rows: usize) -> Result<usize> {
        let sql = format!("select id, label from big where id <= {rows} order by id");
        Ok(match self {
            Direct::Postgres(pool) => pool.get().await?.query(&sql, &[]).await?.len(),
            Direct::Mysql(pool) => {
                use mysql_async::prelude::Queryable;
                let found: Vec<(i64, String)> = pool.get_conn().await?.query(sql).await?;
                found.len()
            }
            Direct::Mongodb(collection) => {
                let mut cursor = collection
                    .find(mongodb::bson::doc! {})
                    .sort(mongodb::bson::doc! {"_id": 1})
                    .limit(rows as i64)
                    .await?;
                let mut found = 0;
                while cursor.advance().await? {
                    found += 1;
                }
                found
            }
        })
    }
}

struct Report {
    label: String,
    per_s: f64,
    latencies: Vec<Duration>,
    failures: u64,
}

impl Report {
    fn quantile(&self, quantile: f64) -> Duration {
        let index = ((self.latencies.len() as f64 - 1.0) * quantile).round() as usize;
        self.latencies.get(index).copied().unwrap_or_default()
    }
}

/// A closed loop of `clients` for `seconds`: `call(client, ticket)` is one
/// request, true when it answered as it should.
async fn phase<F, Fut>(label: String, clients: usize, seconds: u64, call: F) -> Result<Report>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let call = Arc::new(call);
    let sequence = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (call, sequence, failures) = (call.clone(), sequence.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let ticket = sequence.fetch_add(1, Ordering::Relaxed);
                let begun = Instant::now();
                if !call(client, ticket).await {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                latencies.push(begun.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let report = Report {
        label,
        per_s: latencies.len() as f64 / elapsed,
        latencies,
        failures: failures.load(Ordering::Relaxed),
    };
    eprintln!("  done: {} ({:.0}/s)", report.label, report.per_s);
    Ok(report)
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|line| line.starts_with(field)).with_context(|| format!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).context("a number")?.parse()?)
}

async fn execute(client: &reqwest::Client, base: &str, member: &str, query: &str, key: &str) -> Result<(bool, usize)> {
    let answer = client
        .post(format!("{base}/v1/members/{member}/integrations/bench/queries/{query}/execute"))
        .bearer_auth(ADMIN_KEY)
        .header("Idempotency-Key", key)
        .json(&json!({}))
        .send()
        .await?;
    let ok = answer.status().is_success();
    Ok((ok, answer.bytes().await?.len()))
}

async fn setup(client: &reqwest::Client, base: &str, provider: Provider, port: u16, members: usize) -> Result<()> {
    for index in 0..members {
        let member = format!("{}{index:03}", provider.name());
        let call = |method: reqwest::Method, path: String, body: Value| {
            client
                .request(method, format!("{base}{path}"))
                .bearer_auth(ADMIN_KEY)
                .header("Idempotency-Key", format!("setup-{path}"))
                .json(&body)
                .send()
        };
        let mut answers = vec![
            call(reqwest::Method::PUT, format!("/v1/members/{member}"), json!({})).await?,
            call(
                reqwest::Method::POST,
                format!("/v1/members/{member}/credits/grants"),
                json!({"source": "promotional", "amount": 1_000_000_000}),
            )
            .await?,
            call(reqwest::Method::PUT, format!("/v1/members/{member}/integrations/bench"), provider.integration(port))
                .await?,
        ];
        for (name, rows) in [("small", SMALL), ("large", LARGE)] {
            let path = format!("/v1/members/{member}/integrations/bench/queries/{name}");
            answers.push(call(reqwest::Method::PUT, path, provider.query(rows)).await?);
        }
        for answer in answers {
            ensure!(answer.status().is_success(), "setup refused: {}", answer.text().await?);
        }
    }
    Ok(())
}

fn ms(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.tally.is_file(), "{} does not exist: cargo build --release -p tally-cli", args.tally.display());
    let (clients, members, seconds) =
        if args.smoke { (4, 2, 1) } else { (args.clients, args.members.max(1), args.seconds.max(1)) };
    let providers: Vec<Provider> = [Provider::Postgres, Provider::Mysql, Provider::Mongodb]
        .into_iter()
        .filter(|provider| args.provider.is_empty() || args.provider.iter().any(|name| name == provider.name()))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let server = tally_bench::start_tally(&args.tally, "tally-sources", ADMIN_KEY, VAULT_KEY, &[
                "--executions-max".to_owned(),
                clients.max(64).to_string(),
                "--executions-per-member".to_owned(),
                clients.max(4).to_string(),
            ])?;
        let client = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
        let mut reports = Vec::new();
        let mut memory = Vec::new();
        for provider in providers {
            let database = start_database(match provider {
                Provider::Postgres => "postgres.sh",
                Provider::Mysql => "mariadb.sh",
                Provider::Mongodb => "mongo.sh",
            })?;
            let direct = Direct::new(provider, database.port, clients).await?;
            if let Direct::Mongodb(collection) = &direct {
                let documents: Vec<_> = (1..=LARGE as i64)
                    .map(|id| mongodb::bson::doc! {"_id": id, "label": format!("{id:032x}")})
                    .collect();
                for batch in documents.chunks(1_000) {
                    collection.insert_many(batch.to_vec()).await?;
                }
            }
            setup(&client, &server.base, provider, database.port, members).await?;
            // The first large run of this provider, alone: tally's peak
            // memory over its resting size (freed memory is kept by the
            // allocator, so a later run would reuse it unseen).
            let member = format!("{}000", provider.name());
            execute(&client, &server.base, &member, "small", "warm-up").await?;
            let pid = server.child.id();
            let resting = status_kib(pid, "VmRSS")?;
            std::fs::write(format!("/proc/{pid}/clear_refs"), "5").context("resetting the peak (needs Linux)")?;
            let (ok, bytes) = execute(&client, &server.base, &member, "large", "measured").await?;
            ensure!(ok, "the measured run failed");
            let peak = status_kib(pid, "VmHWM")?;
            let (json_bytes, held) = provider_peak(provider, database.port).await?;
            memory.push((provider, bytes, peak.saturating_sub(resting) * 1024, json_bytes, held));
            eprintln!("tally-sources: {} with {clients} clients over {members} members, {seconds} s a phase", provider.name());
            for (query, rows) in [("small", SMALL), ("large", LARGE)] {
                let label = format!("{} {rows} rows, driver directly", provider.name());
                let pool = direct.clone();
                reports.push(
                    phase(label, clients, seconds, move |_, _| {
                        let pool = pool.clone();
                        async move { pool.run(rows).await.is_ok_and(|found| found == rows) }
                    })
                    .await?,
                );
                let label = format!("{} {rows} rows, through tally", provider.name());
                let (client, base) = (client.clone(), server.base.clone());
                reports.push(
                    phase(label, clients, seconds, move |index, ticket| {
                        let (client, base) = (client.clone(), base.clone());
                        async move {
                            let member = format!("{}{:03}", provider.name(), index % members);
                            execute(&client, &base, &member, query, &format!("{query}-{ticket}"))
                                .await
                                .is_ok_and(|(ok, _)| ok)
                        }
                    })
                    .await?,
                );
            }
        }
        println!("| phase | runs/s | p50 ms | p99 ms | failed |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for report in &reports {
            println!(
                "| {} | {:.0} | {} | {} | {} |",
                report.label,
                report.per_s,
                ms(report.quantile(0.5)),
                ms(report.quantile(0.99)),
                report.failures
            );
        }
        println!();
        println!("| provider | rows | tally p50 − driver p50, ms | as % of the driver's p50 |");
        println!("| --- | ---: | ---: | ---: |");
        for pair in reports.chunks(2) {
            let [direct, tally] = pair else { unreachable!("phases come in pairs") };
            let overhead = tally.quantile(0.5).saturating_sub(direct.quantile(0.5));
            let percent = 100.0 * overhead.as_secs_f64() / direct.quantile(0.5).as_secs_f64().max(1e-9);
            println!("| {} | | {} | {percent:.0} % |", tally.label, ms(overhead));
        }
        println!();
        println!("| provider | rows' JSON, bytes | provider's peak, bytes | ratio | answer over HTTP, bytes | server's peak RSS over resting, bytes | ratio |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (provider, bytes, extra, json_bytes, held) in &memory {
            println!(
                "| {} | {} | {} | {:.2} | {} | {} | {:.2} |",
                provider.name(),
                tally_bench::thousands(*json_bytes as u64),
                tally_bench::thousands(*held as u64),
                *held as f64 / *json_bytes as f64,
                tally_bench::thousands(*bytes as u64),
                tally_bench::thousands(*extra),
                *extra as f64 / *bytes as f64
            );
        }
        let failed: u64 = reports.iter().map(|report| report.failures).sum();
        ensure!(failed == 0, "{failed} runs failed");
        Ok(())
    })
}

//! `tally-exec`: what running a saved query through tally costs on top of
//! the source itself (issue 20's benchmark), all in one run so that the
//! figures are ratios of the same machine at the same moment.
//!
//! 1. An upstream on loopback that answers at once (a fixed JSON of seven
//!    rows, HTTP/1.1 keep-alive), started in this process.
//! 2. The real `tally serve` (release build) on a fresh data directory,
//!    allowed to reach 127.0.0.1 only; `--members` members per phase (fresh
//!    ones for each phase) with credits, each with a REST integration on the
//!    upstream and two saved queries: `miss` (`cache_ttl_s` 0: every run
//!    calls the source) and `hit` (an hour: after the first run, the cache
//!    answers).
//! 3. Closed-loop phases of `--seconds` each, `--clients` clients spread over
//!    the members (each a loop: send, wait for the answer, send again):
//!    the upstream called directly; executions of `miss`; executions of
//!    `hit`; `POST /v1/members/{m}/usage` (the plain durable write route).
//!    Every execution has a fresh `Idempotency-Key`, so each is charged.
//!
//! tally's own overhead on a miss is its latency minus the upstream's, per
//! percentile (the direct phase's percentiles stand for the upstream's).
//!
//! ```sh
//! cargo build --release -p tally-cli -p tally-bench
//! target/release/tally-exec                    # 64 clients, 16 members, 10 s a phase
//! target/release/tally-exec --smoke            # CI: a second a phase, checks every answer
//! ```

use anyhow::{Result, ensure};
use clap::Parser;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN_KEY: &str = "tally-exec-admin-key";
/// 32 bytes, base64: the vault's key for this run's throw-away data.
const VAULT_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
const ROWS: &str = r#"{"items":[{"day":1},{"day":2},{"day":3},{"day":4},{"day":5},{"day":6},{"day":7}]}"#;

#[derive(Parser)]
struct Args {
    /// The tally binary.
    #[arg(long, default_value = "target/release/tally")]
    tally: PathBuf,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long, default_value_t = 16)]
    members: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// A second a phase, few clients; fails on any unexpected answer.
    #[arg(long)]
    smoke: bool,
}

/// The upstream: answers every request with [`ROWS`], keeping the
/// connection open.
async fn upstream(listener: tokio::net::TcpListener) {
    let answer =
        format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ROWS}", ROWS.len());
    let answer: Arc<[u8]> = answer.into_bytes().into();
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let answer = answer.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut buffer = Vec::with_capacity(4096);
            let mut chunk = [0u8; 4096];
            loop {
                let Ok(read) = stream.read(&mut chunk).await else { return };
                if read == 0 {
                    return;
                }
                buffer.extend_from_slice(&chunk[..read]);
                // GET requests without bodies: one answer per header block.
                while let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
                    buffer.drain(..end + 4);
                    if stream.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// Each phase's members: fresh ones, so that no phase meets the state an
/// earlier one left (a member remembers its closed reservations).
fn member_of(phase: Phase, index: usize) -> String {
    format!("{}{index:03}", phase.prefix())
}

async fn setup(client: &reqwest::Client, base: &str, members: usize, upstream_port: u16) -> Result<()> {
    let all = [Phase::Miss, Phase::Hit, Phase::Usage]
        .into_iter()
        .flat_map(|phase| (0..members).map(move |index| member_of(phase, index)));
    for member in all {
        let call = |method: reqwest::Method, path: String, body: Value| {
            let key = format!("setup-{path}");
            client
                .request(method, format!("{base}{path}"))
                .bearer_auth(ADMIN_KEY)
                .header("Idempotency-Key", key)
                .json(&body)
                .send()
        };
        let answers = [
            call(reqwest::Method::PUT, format!("/v1/members/{member}"), json!({})).await?,
            call(
                reqwest::Method::POST,
                format!("/v1/members/{member}/credits/grants"),
                json!({"source": "promotional", "amount": 1_000_000_000}),
            )
            .await?,
            call(
                reqwest::Method::PUT,
                format!("/v1/members/{member}/integrations/source"),
                json!({"provider": "rest", "name": "Bench source",
                    "config": {"base_url": format!("http://127.0.0.1:{upstream_port}"), "auth": {"type": "none"}}}),
            )
            .await?,
        ];
        for answer in answers {
            ensure!(answer.status().is_success(), "setup refused: {}", answer.text().await?);
        }
        for (query, ttl) in [("miss", 0), ("hit", 3600)] {
            let spec = json!({"kind": "request", "request": {"path": "/rows"}, "rows_pointer": "/items",
                "cache_ttl_s": ttl, "credits_base": 1, "credits_per_1k_rows": 1, "max_rows": 1000});
            let path = format!("/v1/members/{member}/integrations/source/queries/{query}");
            let answer = call(reqwest::Method::PUT, path, spec).await?;
            ensure!(answer.status().is_success(), "query refused: {}", answer.text().await?);
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Upstream,
    Miss,
    Hit,
    Usage,
}

impl Phase {
    fn prefix(self) -> &'static str {
        match self {
            Phase::Upstream => "up",
            Phase::Miss => "miss",
            Phase::Hit => "hit",
            Phase::Usage => "usage",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Phase::Upstream => "upstream, called directly",
            Phase::Miss => "execute, cache miss",
            Phase::Hit => "execute, cache hit",
            Phase::Usage => "POST usage (plain route)",
        }
    }
}

struct Report {
    phase: Phase,
    per_s: f64,
    latencies: Vec<Duration>,
    failures: u64,
    cache_hits: u64,
}

impl Report {
    fn quantile(&self, quantile: f64) -> Duration {
        let index = ((self.latencies.len() as f64 - 1.0) * quantile).round() as usize;
        self.latencies.get(index).copied().unwrap_or_default()
    }
}

async fn run_phase(
    client: &reqwest::Client,
    base: &str,
    upstream_port: u16,
    phase: Phase,
    clients: usize,
    members: usize,
    seconds: u64,
) -> Result<Report> {
    let sequence = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let cache_hits = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for index in 0..clients {
        let (client, base, sequence) = (client.clone(), base.to_owned(), sequence.clone());
        let (failures, cache_hits) = (failures.clone(), cache_hits.clone());
        let member = member_of(phase, index % members);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let ticket = sequence.fetch_add(1, Ordering::Relaxed);
                let request = match phase {
                    Phase::Upstream => client.get(format!("http://127.0.0.1:{upstream_port}/rows")),
                    Phase::Miss | Phase::Hit => {
                        let query = if phase == Phase::Miss { "miss" } else { "hit" };
                        client
                            .post(format!("{base}/v1/members/{member}/integrations/source/queries/{query}/execute"))
                            .bearer_auth(ADMIN_KEY)
                            .header("Idempotency-Key", format!("{query}-{ticket}"))
                            .json(&json!({}))
                    }
                    Phase::Usage => client
                        .post(format!("{base}/v1/members/{member}/usage"))
                        .bearer_auth(ADMIN_KEY)
                        .header("Idempotency-Key", format!("usage-{ticket}"))
                        .json(
                            &json!({"usage_id": format!("u-{ticket}"), "metric": "bench", "quantity": 1, "credits": 1}),
                        ),
                };
                let started = Instant::now();
                let ok = match request.send().await {
                    Ok(response) => {
                        let ok = response.status().is_success();
                        let body = response.bytes().await.unwrap_or_default();
                        if body.windows(16).any(|window| window == br#""cache_hit":true"#) {
                            cache_hits.fetch_add(1, Ordering::Relaxed);
                        }
                        ok
                    }
                    Err(_) => false,
                };
                latencies.push(started.elapsed());
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok(Report {
        phase,
        per_s: latencies.len() as f64 / elapsed,
        latencies,
        failures: failures.load(Ordering::Relaxed),
        cache_hits: cache_hits.load(Ordering::Relaxed),
    })
}

fn ms(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.tally.is_file(), "{} does not exist: cargo build --release -p tally-cli", args.tally.display());
    let (clients, members, seconds) =
        if args.smoke { (4, 2, 1) } else { (args.clients, args.members.max(1), args.seconds.max(1)) };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let upstream_port = listener.local_addr()?.port();
        tokio::spawn(upstream(listener));
        let server = tally_bench::start_tally(
            &args.tally,
            "tally-exec",
            ADMIN_KEY,
            VAULT_KEY,
            &["--executions-max".to_owned(), clients.max(64).to_string()],
        )?;
        let client = reqwest::Client::builder().pool_max_idle_per_host(clients).build()?;
        setup(&client, &server.base, members, upstream_port).await?;
        eprintln!("tally-exec: {clients} clients over {members} members, {seconds} s a phase");
        let mut reports = Vec::new();
        for phase in [Phase::Upstream, Phase::Miss, Phase::Hit, Phase::Usage] {
            let report = run_phase(&client, &server.base, upstream_port, phase, clients, members, seconds).await?;
            eprintln!("  done: {} ({:.0}/s)", phase.label(), report.per_s);
            reports.push(report);
        }
        println!("| phase | requests/s | p50 ms | p99 ms | failed |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for report in &reports {
            println!(
                "| {} | {:.0} | {} | {} | {} |",
                report.phase.label(),
                report.per_s,
                ms(report.quantile(0.5)),
                ms(report.quantile(0.99)),
                report.failures
            );
        }
        let [direct, miss, hit, usage] = &reports[..] else { unreachable!("four phases") };
        let overhead = |quantile| miss.quantile(quantile).saturating_sub(direct.quantile(quantile));
        println!();
        println!(
            "tally's own overhead on a miss (its latency − the upstream's): p50 {} ms, p99 {} ms",
            ms(overhead(0.5)),
            ms(overhead(0.99))
        );
        println!("cache hits per second / usage route's: {:.2}", hit.per_s / usage.per_s);
        let failed: u64 = reports.iter().map(|report| report.failures).sum();
        ensure!(failed == 0, "{failed} requests failed");
        // Each client's first run of `hit` may miss (its member's result
        // not cached yet); the rest must hit.
        ensure!(
            hit.cache_hits + clients as u64 >= hit.latencies.len() as u64,
            "only {} of {} runs of `hit` were cache hits",
            hit.cache_hits,
            hit.latencies.len()
        );
        ensure!(miss.cache_hits == 0, "a run of `miss` was a cache hit");
        Ok(())
    })
}

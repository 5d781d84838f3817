//! `tally-followers`: what issue 23's followers of the log cost and do, on
//! release servers over loopback, in one run.
//!
//! 1. **Analytics on a large log.** A server on the test clock gets
//!    `--events` events (usage records in batches of 1,000, two events
//!    each, spread over 60 days, 1,000 members, five metrics, three
//!    integrations); once its read models caught up, each analytics route
//!    is asked `--requests` times for random members, one request at a
//!    time: p50, p99 and max.
//! 2. **The usage route with and without the followers.** Two fresh
//!    servers, one with `--no-alerts --no-webhooks`, one with both running
//!    and a webhook endpoint for each of the `--endpoints` members (to a
//!    receiver in this process); the same closed-loop load of single usage
//!    commands (`--clients` at once, `--seconds` each); the ratio.
//! 3. **Delivery.** On the server with followers, usage at `--rate`
//!    commands a second (open loop) for `--seconds` across the endpoints'
//!    members: deliveries a second and the delay from the event's
//!    `recorded_at` (the body's `created_at`) to its arrival, p50 and p99.
//!
//! ```sh
//! cargo build --release -p tally-cli -p tally-bench
//! target/release/tally-followers --tally target/release/tally
//! target/release/tally-followers --tally target/debug/tally --smoke   # CI: small, checks every answer
//! ```

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use reqwest::blocking::Client;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_bench::{TallyServer, start_tally, thousands};

const ADMIN_KEY: &str = "bench-admin-key";
const VAULT_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

#[derive(Parser)]
struct Args {
    /// The tally binary.
    #[arg(long, default_value = "target/release/tally")]
    tally: PathBuf,
    /// Events in the analytics log.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Requests to each analytics route.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Concurrent clients of the closed-loop comparison.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Seconds of each load phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Usage commands a second in the delivery phase.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Members with a webhook endpoint each.
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Small sizes, for CI; fails on any unexpected answer.
    #[arg(long)]
    smoke: bool,
    /// Skip the analytics phase.
    #[arg(long)]
    skip_analytics: bool,
}

fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(60)).pool_max_idle_per_host(64).build().expect("a client")
}

fn post(client: &Client, url: &str, body: &Value, key: Option<&str>) -> Result<Value> {
    let mut request = client.post(url).bearer_auth(ADMIN_KEY).json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send()?;
    let status = response.status();
    let answer: Value = response.json().unwrap_or(Value::Null);
    ensure!(status.is_success(), "POST {url}: {status} {answer}");
    Ok(answer)
}

fn get(client: &Client, url: &str) -> Result<Value> {
    let response = client.get(url).bearer_auth(ADMIN_KEY).send()?;
    let status = response.status();
    let answer: Value = response.json().unwrap_or(Value::Null);
    ensure!(status.is_success(), "GET {url}: {status} {answer}");
    Ok(answer)
}

fn percentile(sorted: &[Duration], quantile: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * quantile).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn ms(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1_000.0)
}

/// Phase 1: a log of `events` events over 60 days, then each route.
fn analytics(args: &Args) -> Result<()> {
    let server = start_tally(
        &args.tally,
        "tally-followers-analytics",
        ADMIN_KEY,
        VAULT_KEY,
        &[
            "--test-clock".to_owned(),
            "--start".to_owned(),
            "2026-01-01T12:00:00Z".to_owned(),
            "--no-webhooks".to_owned(),
        ],
    )?;
    let client = client();
    let base = &server.base;
    let members = if args.smoke { 20 } else { 1_000 };
    for member in 0..members {
        post(
            &client,
            &format!("{base}/v1/members/m{member}/credits/grants"),
            &json!({"source": "promotional", "amount": 1_000_000_000}),
            Some(&format!("fund-{member}")),
        )?;
    }
    let days = 60u64;
    let records = args.events / 2;
    let per_day = records.div_ceil(days);
    let started = Instant::now();
    let mut written = 0u64;
    let mut serial = 0u64;
    for day in 0..days {
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z")? + chrono::Duration::days(day as i64);
        post(&client, &format!("{base}/v1/admin/clock"), &json!({"now": now}), None)?;
        let mut left = per_day.min(records - written);
        while left > 0 {
            let batch = left.min(1_000);
            let records: Vec<Value> = (0..batch)
                .map(|_| {
                    serial += 1;
                    json!({"member_id": format!("m{}", serial % members), "usage_id": format!("u{serial}"),
                        "metric": format!("metric_{}", serial % 5), "credits": 1 + serial % 7,
                        "integration_id": format!("int{}", serial % 3), "query_id": "q1"})
                })
                .collect();
            let answer = post(&client, &format!("{base}/v1/usage/batch"), &json!({"records": records}), None)?;
            ensure!(answer["refused"] == 0, "records refused: {answer}");
            left -= batch;
            written += batch;
        }
    }
    let head = get(&client, &format!("{base}/v1/events?limit=1"))?["head"].as_u64().context("head")?;
    eprintln!("analytics: {} events written in {:.1} s", thousands(head), started.elapsed().as_secs_f64());
    // The read models catch up (and the alert reactor with them).
    let caught_up = Instant::now();
    loop {
        let status = get(&client, &format!("{base}/v1/admin/projections"))?;
        let behind =
            status["projectors"].as_array().context("projectors")?.iter().any(|projector| projector["lag"] != 0);
        if !behind {
            break;
        }
        ensure!(caught_up.elapsed() < Duration::from_secs(1_800), "the read models never caught up");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("analytics: read models caught up in {:.1} s", caught_up.elapsed().as_secs_f64());
    let routes: [(&str, &str); 6] = [
        ("usage, 30 days by day", "analytics/usage"),
        (
            "usage, 60 days by week and integration",
            "analytics/usage?from=2026-01-01&to=2026-03-01&granularity=week&group_by=integration",
        ),
        ("resources, top 10", "analytics/resources?from=2026-01-01&to=2026-03-01"),
        ("queries", "analytics/queries?from=2026-01-01&to=2026-03-01"),
        ("cost", "analytics/cost"),
        ("overview (operators)", ""),
    ];
    println!("| route ({} events, {} members) | requests | p50 ms | p99 ms | max ms |", thousands(head), members);
    println!("| --- | ---: | ---: | ---: | ---: |");
    let requests = if args.smoke { 20 } else { args.requests };
    for (label, route) in routes {
        let mut latencies = Vec::with_capacity(requests);
        for request in 0..requests {
            let member = (request * 7_919) % members as usize;
            let url = if route.is_empty() {
                format!("{base}/v1/analytics/overview")
            } else {
                format!("{base}/v1/members/m{member}/{route}")
            };
            let started = Instant::now();
            let answer = get(&client, &url)?;
            latencies.push(started.elapsed());
            if args.smoke && route.starts_with("analytics/usage") {
                ensure!(
                    answer["total"]["credits"].as_i64().unwrap_or(0) > 0 || route.contains("from"),
                    "no usage: {answer}"
                );
            }
        }
        latencies.sort();
        println!(
            "| {label} | {requests} | {} | {} | {} |",
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            ms(*latencies.last().unwrap_or(&Duration::ZERO))
        );
    }
    drop(server);
    Ok(())
}

/// A webhook receiver: HTTP/1.1 with keep-alive, answers 204, records each
/// delivery's delay from its `created_at`.
struct Receiver {
    url: String,
    delays: Arc<Mutex<Vec<Duration>>>,
    /// Distinct deliveries (by `webhook-id`).
    received: Arc<AtomicU64>,
    /// Arrivals of a `webhook-id` already seen.
    repeats: Arc<AtomicU64>,
}

impl Receiver {
    fn start() -> Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let delays = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(AtomicU64::new(0));
        let repeats = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let (delays_in, received_in, repeats_in) = (delays.clone(), received.clone(), repeats.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (delays, received, repeats, seen) =
                    (delays_in.clone(), received_in.clone(), repeats_in.clone(), seen.clone());
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().expect("a stream");
                    let mut reader = BufReader::new(stream);
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut length = 0usize;
                        let mut id = String::new();
                        loop {
                            let mut header = String::new();
                            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                                return;
                            }
                            if header.trim().is_empty() {
                                break;
                            }
                            if let Some((name, value)) = header.split_once(':') {
                                if name.eq_ignore_ascii_case("content-length") {
                                    length = value.trim().parse().unwrap_or(0);
                                } else if name.eq_ignore_ascii_case("webhook-id") {
                                    id = value.trim().to_owned();
                                }
                            }
                        }
                        let mut body = vec![0; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        let arrived = chrono::Utc::now();
                        if !seen.lock().expect("seen").insert(id) {
                            repeats.fetch_add(1, Ordering::SeqCst);
                        } else {
                            if let Ok(body) = serde_json::from_slice::<Value>(&body)
                                && let Some(created) = body["created_at"].as_str()
                                && let Ok(created) = chrono::DateTime::parse_from_rfc3339(created)
                            {
                                let delay =
                                    (arrived - created.with_timezone(&chrono::Utc)).to_std().unwrap_or_default();
                                delays.lock().expect("delays").push(delay);
                            }
                            received.fetch_add(1, Ordering::SeqCst);
                        }
                        if writer.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(Receiver { url, delays, received, repeats })
    }
}

/// Which followers a server of the comparison runs, and what its
/// endpoints ask for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Followers {
    None,
    /// Both, the endpoints asking for alerts only: no usage is delivered.
    AlertsOnlyDelivered,
    /// Both, every usage delivered.
    Both,
}

fn usage_server(
    args: &Args,
    name: &str,
    followers: Followers,
    receiver: &Receiver,
) -> Result<(TallyServer, Vec<String>)> {
    let extra: Vec<String> = match followers {
        Followers::None => vec!["--no-alerts".to_owned(), "--no-webhooks".to_owned()],
        _ => Vec::new(),
    };
    let event_types = match followers {
        Followers::Both => json!(["usage.recorded"]),
        _ => json!(["alert.triggered", "alert.resolved"]),
    };
    let server = start_tally(&args.tally, name, ADMIN_KEY, VAULT_KEY, &extra)?;
    let client = client();
    let members: Vec<String> = (0..args.endpoints).map(|index| format!("w{index}")).collect();
    for member in &members {
        post(
            &client,
            &format!("{}/v1/members/{member}/credits/grants", server.base),
            &json!({"source": "promotional", "amount": 1_000_000_000}),
            Some(&format!("fund-{member}")),
        )?;
        post(
            &client,
            &format!("{}/v1/members/{member}/webhook-endpoints", server.base),
            &json!({"url": receiver.url, "event_types": event_types}),
            None,
        )?;
    }
    Ok((server, members))
}

/// Closed loop: `clients` threads sending usage as fast as answered.
fn closed_loop(base: &str, members: &[String], clients: usize, seconds: u64, prefix: &str) -> Result<u64> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let threads: Vec<_> = (0..clients)
        .map(|thread| {
            let (base, members, done, failed, prefix) =
                (base.to_owned(), members.to_vec(), done.clone(), failed.clone(), prefix.to_owned());
            std::thread::spawn(move || {
                let client = client();
                let mut serial = 0u64;
                while Instant::now() < deadline {
                    serial += 1;
                    let member = &members[(thread + serial as usize) % members.len()];
                    let id = format!("{prefix}-{thread}-{serial}");
                    let body = json!({"usage_id": id, "metric": "api_calls", "credits": 1});
                    match post(&client, &format!("{base}/v1/members/{member}/usage"), &body, Some(&id)) {
                        Ok(_) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => {
                            eprintln!("{error}");
                            failed.store(true, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    ensure!(!failed.load(Ordering::SeqCst), "a usage command failed");
    Ok(done.load(Ordering::Relaxed))
}

/// Open loop at `rate` a second for `seconds`: returns commands sent.
fn open_loop(base: &str, members: &[String], rate: u64, seconds: u64) -> Result<u64> {
    let workers = 32u64;
    let total = rate * seconds;
    let start = Instant::now() + Duration::from_millis(50);
    let failed = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..workers)
        .map(|worker| {
            let (base, members, failed) = (base.to_owned(), members.to_vec(), failed.clone());
            std::thread::spawn(move || {
                let client = client();
                let mut ticket = worker;
                while ticket < total {
                    let at = start + Duration::from_secs_f64(ticket as f64 / rate as f64);
                    if let Some(wait) = at.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let member = &members[ticket as usize % members.len()];
                    let id = format!("open-{ticket}");
                    let body = json!({"usage_id": id, "metric": "api_calls", "credits": 1});
                    if let Err(error) = post(&client, &format!("{base}/v1/members/{member}/usage"), &body, Some(&id)) {
                        eprintln!("{error}");
                        failed.store(true, Ordering::SeqCst);
                        return;
                    }
                    ticket += workers;
                }
            })
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
    ensure!(!failed.load(Ordering::SeqCst), "a usage command failed");
    Ok(total)
}

fn usage_and_delivery(args: &Args) -> Result<()> {
    let seconds = if args.smoke { 1 } else { args.seconds };
    let clients = if args.smoke { 4 } else { args.clients };
    let receiver = Receiver::start()?;
    // The three servers run side by side and take the load in turns, a
    // round each, three rounds: drift of the machine falls on all three.
    let (bare, members) = usage_server(args, "tally-followers-bare", Followers::None, &receiver)?;
    let (quiet, _) = usage_server(args, "tally-followers-quiet", Followers::AlertsOnlyDelivered, &receiver)?;
    let (full, _) = usage_server(args, "tally-followers-full", Followers::Both, &receiver)?;
    let before = receiver.received.load(Ordering::SeqCst);
    let rounds = if args.smoke { 1 } else { 3 };
    let (mut without, mut running, mut with) = (0, 0, 0);
    for round in 0..rounds {
        without += closed_loop(&bare.base, &members, clients, seconds, &format!("bare{round}"))?;
        running += closed_loop(&quiet.base, &members, clients, seconds, &format!("quiet{round}"))?;
        with += closed_loop(&full.base, &members, clients, seconds, &format!("full{round}"))?;
    }
    drop(bare);
    drop(quiet);
    let per_second = |total: u64| thousands(total / (seconds * rounds));
    println!();
    println!(
        "| usage route, {clients} clients, {rounds} rounds of {seconds} s in turns, {} members | commands/s | ratio |",
        members.len()
    );
    println!("| --- | ---: | ---: |");
    println!("| without the alert reactor and the webhook sender | {} | 1 |", per_second(without));
    println!(
        "| with both running, an endpoint a member asking for alerts | {} | {:.3} |",
        per_second(running),
        running as f64 / without.max(1) as f64
    );
    println!(
        "| with both running, every usage delivered to its member's endpoint | {} | {:.3} |",
        per_second(with),
        with as f64 / without.max(1) as f64
    );
    // Every usage of the closed loop is delivered.
    let deadline = Instant::now() + Duration::from_secs(600);
    while receiver.received.load(Ordering::SeqCst) < before + with {
        ensure!(Instant::now() < deadline, "deliveries of the closed loop never all arrived");
        std::thread::sleep(Duration::from_millis(100));
    }
    receiver.delays.lock().expect("delays").clear();
    let before = receiver.received.load(Ordering::SeqCst);
    let rate = if args.smoke { 100 } else { args.rate };
    let started = Instant::now();
    let sent = open_loop(&full.base, &members, rate, seconds)?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while receiver.received.load(Ordering::SeqCst) < before + sent {
        ensure!(Instant::now() < deadline, "deliveries of the open loop never all arrived");
        std::thread::sleep(Duration::from_millis(20));
    }
    let elapsed = started.elapsed();
    let mut delays = receiver.delays.lock().expect("delays").clone();
    delays.sort();
    println!();
    println!("| deliveries at {rate} usage/s, {seconds} s, {} endpoints | value |", members.len());
    println!("| --- | ---: |");
    println!("| delivered | {} |", thousands(delays.len() as u64));
    println!(
        "| delivered a second (first send to last arrival) | {} |",
        thousands((delays.len() as f64 / elapsed.as_secs_f64()) as u64)
    );
    println!("| delay p50, ms | {} |", ms(percentile(&delays, 0.5)));
    println!("| delay p99, ms | {} |", ms(percentile(&delays, 0.99)));
    println!("| delay max, ms | {} |", ms(*delays.last().unwrap_or(&Duration::ZERO)));
    println!("| repeated arrivals (same `webhook-id`), whole run | {} |", receiver.repeats.load(Ordering::SeqCst));
    if args.smoke && (delays.len() as u64) < sent {
        bail!("{} deliveries for {sent} usage commands", delays.len());
    }
    drop(full);
    Ok(())
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        args.events = 4_000;
    }
    ensure!(args.tally.exists(), "{} does not exist: build it first", args.tally.display());
    if !args.skip_analytics {
        analytics(&args)?;
    }
    usage_and_delivery(&args)?;
    Ok(())
}

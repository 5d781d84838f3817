//! `tally-load`: an open-loop, fixed-rate HTTP load generator for a running
//! `tally serve`. It exists because oha sends one fixed body and header set,
//! while `POST /v1/members/{id}/usage` needs a fresh `usage_id` in the body
//! and a fresh `Idempotency-Key` header on every request (a repeated key is
//! answered from the idempotency record, a repeated usage id is rejected).
//!
//! # Open loop and coordinated omission
//!
//! A closed-loop generator (send, wait for the answer, send again) slows down
//! when the server does: the requests that would have met a stall are sent
//! late or not at all, so the stall hardly shows in the percentiles. That is
//! coordinated omission. Here request `i` of a step is *scheduled* at
//! `t0 + i / rate` whatever happened before it, and its latency is
//! `end of the answer's body − scheduled time`: time spent waiting for a free
//! connection counts, as in wrk2 and `oha --latency-correction`. (oha starts
//! the clock when its pacing timer fired, this tool at the ideal instant, so
//! the pacer's own lateness counts too; the notes print it.)
//!
//! # Layout
//!
//! - A pacer on its own OS thread releases tickets at their scheduled
//!   instants by adding permits to a semaphore. It sleeps with
//!   `std::thread::sleep` (high resolution) because tokio's timer has a 1 ms
//!   resolution: sleeping on it would add up to 1 ms to every latency, more
//!   than the whole p50 of a read on loopback.
//! - `--connections` tasks on a `--threads` tokio runtime each take a permit,
//!   then the next ticket from a shared counter, send its request, and record
//!   the latency. The reqwest client keeps one keep-alive connection per busy
//!   task, so at most `--connections` connections are open.
//! - At the step's deadline the pacer closes the semaphore: no request starts
//!   after it. Requests in flight then are awaited (at most
//!   `REQUEST_TIMEOUT`) and counted in "in flight at end", not in the
//!   achieved rate. Tickets released but never sent, because every connection
//!   was busy until the deadline, are counted as "unsent" in the notes: they
//!   have no latency, so a step with unsent tickets is past saturation and
//!   its percentiles understate.
//! - Achieved req/s counts 2xx answers completed before the deadline; the
//!   latency percentiles are over all 2xx answers. Other statuses and
//!   transport errors are counted, with a breakdown in the notes.
//!
//! Before the first step every member gets one promotional grant large
//! enough for all the usage the run will record (a grant also creates a
//! member that does not exist yet), and the pool is warmed with one request
//! per connection. With `--route both` the balance steps run first, so the
//! projections catching up on the usage steps' events do not disturb the
//! reads.
//!
//! `--route usage-batch` sends `--batch-records` usage records a request to
//! `POST /v1/members/{id}/usage/batch`; its rates are requests per second,
//! and the table's `records/s` column is what compares with the single
//! usage route (`--route writes` runs both, single first). A batch answered
//! 200 with any record refused counts as an error ("records refused"). Batch
//! steps use at most 4 connections, the batches the server runs at once.
//!
//! # Running
//!
//! ```sh
//! cargo build --release -p tally-cli -p tally-bench
//! TALLY_ADMIN_KEY=demo-admin-key target/release/tally --data-dir "$(mktemp -d)" \
//!   serve --demo --addr 127.0.0.1:18282 &
//! target/release/tally-load --route both --rates 1000,5000,10000,20000 --seconds 10
//! target/release/tally-load --route writes --rates 5000,10000 --seconds 10        # single usage, then batches
//! target/release/tally-load --route usage-batch --batch-records 100 --rates 50,100,200
//! target/release/tally-load --smoke   # 1 s at 200 req/s per route; fails on any error
//! ```
//!
//! The markdown table goes to stdout, progress and setup to stderr.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tally_bench::thousands;

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{Client, StatusCode, Url};
use tally_ledger::domain::limits::COMMAND_CREDITS_MAX;
use tally_ledger::domain::validate;
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use uuid::Uuid;

/// A request with no complete answer after this long counts as a transport error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bounds on the flags: a typo must not open a million sockets.
const RATE_PER_S_MAX: u32 = 1_000_000;
const SECONDS_MAX: u32 = 3_600;
const CONNECTIONS_MAX: u32 = 10_000;
const THREADS_MAX: u32 = 64;
const MEMBERS_MAX: usize = 10_000;
/// What each recorded usage says; one credit per request keeps the funding small.
const USAGE_METRIC: &str = "api_calls";
const USAGE_CREDITS: i64 = 1;
/// Credits granted to each member beyond what the planned usage needs.
const FUNDING_MARGIN_CREDITS: i64 = 1_000;
/// The first ticket is scheduled this long after the step is set up, so every
/// connection task is already waiting for it.
const STEP_LEAD: Duration = Duration::from_millis(20);
/// Quiet time between steps, so one step's backlog (the projections catching
/// up, the writer draining) does not land in the next.
const STEP_PAUSE: Duration = Duration::from_secs(1);
/// How many times setup reads a balance while the projections catch up on the grants.
const SETUP_READ_ATTEMPTS_MAX: u32 = 10;
const SMOKE_RATE_PER_S: u32 = 200;
const SMOKE_SECONDS: u32 = 1;
/// Records a smoke batch carries: the smoke run checks the route, not its speed.
const SMOKE_BATCH_RECORDS: u32 = 5;
/// Connections for batch steps: the server runs at most this many batches
/// at once (`tally_api::batch::USAGE_BATCHES_CONCURRENT_MAX`) and answers
/// 503 beyond them.
const BATCH_CONNECTIONS_MAX: u32 = 4;

#[derive(Parser, Debug)]
#[command(
    name = "tally-load",
    about = "Open-loop, fixed-rate HTTP load on a running tally server, latency corrected for coordinated omission"
)]
struct Args {
    /// Base URL of the server (plain http).
    #[arg(long, default_value = "http://127.0.0.1:18282")]
    url: String,
    /// Admin key, sent as `Authorization: Bearer <key>` (admin keys are not rate limited).
    #[arg(long, env = "TALLY_ADMIN_KEY", hide_env_values = true, default_value = "demo-admin-key")]
    admin_key: String,
    /// Members to load, chosen round-robin: a comma-separated list of ids, or a
    /// count N for `<member-prefix>0` … `<member-prefix>N-1`.
    #[arg(long, default_value = "16")]
    members: String,
    /// Prefix of the member ids when `--members` is a count.
    #[arg(long, default_value = "load-")]
    member_prefix: String,
    /// Offered rates in requests per second, one step each, in this order.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,20000",
        value_parser = clap::value_parser!(u32).range(1..=RATE_PER_S_MAX as i64))]
    rates: Vec<u32>,
    /// Seconds each step offers load.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=SECONDS_MAX as i64))]
    seconds: u32,
    /// Which route to load.
    #[arg(long, value_enum, default_value_t = RouteChoice::Both)]
    route: RouteChoice,
    /// Usage records per request of the batch route (1 to the server's 1,000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    batch_records: u32,
    /// Concurrent connections (one task each).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=CONNECTIONS_MAX as i64))]
    connections: u32,
    /// Worker threads of the generator's runtime (the pacer has one more).
    /// Two, like oha's default on the 2-core machine of BENCHMARKS.md.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=THREADS_MAX as i64))]
    threads: u32,
    /// 1 s at 200 req/s on every route (batches of 5 records) against `--url`; exits with an error if any
    /// request failed, answered non-2xx or was never sent.
    #[arg(long, conflicts_with_all = ["rates", "seconds"])]
    smoke: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RouteChoice {
    Usage,
    UsageBatch,
    Balance,
    /// Balance, then usage.
    Both,
    /// Usage, then usage batches: the two write routes side by side.
    Writes,
}

impl RouteChoice {
    /// Balance first: see the module documentation.
    fn routes(self) -> &'static [Route] {
        match self {
            RouteChoice::Usage => &[Route::Usage],
            RouteChoice::UsageBatch => &[Route::UsageBatch],
            RouteChoice::Balance => &[Route::Balance],
            RouteChoice::Both => &[Route::Balance, Route::Usage],
            RouteChoice::Writes => &[Route::Usage, Route::UsageBatch],
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Route {
    /// `POST /v1/members/{id}/usage`: a durable write through the single writer.
    Usage,
    /// `POST /v1/members/{id}/usage/batch`: many records, each its own command.
    UsageBatch,
    /// `GET /v1/members/{id}/balance`: a read from the read model.
    Balance,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Usage => "POST usage (durable write)",
            Route::UsageBatch => "POST usage/batch (durable writes)",
            Route::Balance => "GET balance (read model)",
        }
    }
}

/// The server and what every request needs, built once.
struct Target {
    client: Client,
    base: Url,
    members: Vec<String>,
    usage_urls: Vec<Url>,
    batch_urls: Vec<Url>,
    balance_urls: Vec<Url>,
    /// Usage records per batch request.
    batch_records: u32,
    /// Unique per process, so usage ids never repeat across runs on one data directory.
    run_id: String,
}

impl Target {
    fn new(base: Url, admin_key: &str, members: Vec<String>, batch_records: u32) -> Result<Target> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {admin_key}"))
            .context("the admin key must be printable ASCII without line breaks")?;
        authorization.set_sensitive(true);
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, authorization);
        let client = Client::builder()
            .default_headers(headers)
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .no_proxy()
            .build()
            .context("building the HTTP client")?;
        let member_url = |member: &str, route: &str| base.join(&format!("v1/members/{member}/{route}"));
        let usage_urls = members.iter().map(|member| member_url(member, "usage")).collect::<Result<_, _>>()?;
        let batch_urls = members.iter().map(|member| member_url(member, "usage/batch")).collect::<Result<_, _>>()?;
        let balance_urls = members.iter().map(|member| member_url(member, "balance")).collect::<Result<_, _>>()?;
        let run_id = Uuid::now_v7().simple().to_string();
        Ok(Target { client, base, members, usage_urls, batch_urls, balance_urls, batch_records, run_id })
    }

    /// Send ticket `ticket` of step `step`; the outcome once the whole body is read.
    async fn send(&self, route: Route, step: usize, ticket: u64) -> Result<Outcome, reqwest::Error> {
        let member_index = (ticket % self.members.len() as u64) as usize;
        let request = match route {
            Route::Balance => self.client.get(self.balance_urls[member_index].clone()),
            Route::Usage => {
                let usage_id = format!("{}-{step}-{ticket}", self.run_id);
                // The id holds only hex digits and '-': it needs no JSON escaping.
                let body = format!(
                    r#"{{"usage_id":"{usage_id}","metric":"{USAGE_METRIC}","quantity":1,"credits":{USAGE_CREDITS}}}"#
                );
                self.client
                    .post(self.usage_urls[member_index].clone())
                    .header("Idempotency-Key", usage_id)
                    .header(CONTENT_TYPE, "application/json")
                    .body(body)
            }
            Route::UsageBatch => {
                let records: Vec<String> = (0..self.batch_records)
                    .map(|record| {
                        format!(
                            r#"{{"usage_id":"{}-{step}-{ticket}-{record}","metric":"{USAGE_METRIC}","quantity":1,"credits":{USAGE_CREDITS}}}"#,
                            self.run_id
                        )
                    })
                    .collect();
                self.client
                    .post(self.batch_urls[member_index].clone())
                    .header(CONTENT_TYPE, "application/json")
                    .body(format!(r#"{{"records":[{}]}}"#, records.join(",")))
            }
        };
        let response = request.send().await?;
        let status = response.status();
        // The body is part of the answer's latency, and an unread body would close the connection.
        let body = response.bytes().await?;
        // A batch is answered 200 whatever its records' fates: all must be accepted.
        if matches!(route, Route::UsageBatch) && status.is_success() && !contains(&body, br#""refused":0,"#) {
            return Ok(Outcome::Failed("records refused"));
        }
        Ok(Outcome::Answered(status))
    }

    /// Usage records one request of `route` carries.
    fn records_per_request(&self, route: Route) -> u32 {
        match route {
            Route::Usage => 1,
            Route::UsageBatch => self.batch_records,
            Route::Balance => 0,
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// One step: a route at a fixed rate for a bounded time.
struct StepPlan {
    route: Route,
    /// Index of the step in the run; part of every usage id.
    step: usize,
    rate_per_s: u32,
    seconds: u32,
    /// When ticket 0 is due.
    start: Instant,
    /// No request starts at or after this instant.
    deadline: Instant,
    tickets_total: u64,
}

impl StepPlan {
    fn new(route: Route, step: usize, rate_per_s: u32, seconds: u32) -> StepPlan {
        let start = Instant::now() + STEP_LEAD;
        let deadline = start + Duration::from_secs(u64::from(seconds));
        let tickets_total = u64::from(rate_per_s) * u64::from(seconds);
        StepPlan { route, step, rate_per_s, seconds, start, deadline, tickets_total }
    }

    /// `start + ticket / rate`, in whole nanoseconds (no float drift over a long step).
    fn scheduled(&self, ticket: u64) -> Instant {
        let offset_ns = u128::from(ticket) * 1_000_000_000 / u128::from(self.rate_per_s);
        self.start + Duration::from_nanos(offset_ns as u64)
    }
}

#[derive(Clone, Copy)]
enum Outcome {
    Answered(StatusCode),
    /// A transport error: no complete answer. The kind, for the notes.
    Failed(&'static str),
}

struct Sample {
    latency: Duration,
    outcome: Outcome,
    finished_after_deadline: bool,
}

/// Release tickets at their scheduled instants until the deadline, then close
/// the semaphore. Returns, per wake-up that released tickets, how late the
/// earliest of them was.
fn pace(plan: &StepPlan, permits: &Semaphore) -> Vec<Duration> {
    let mut released = 0;
    let mut lateness = Vec::new();
    while released < plan.tickets_total {
        let now = Instant::now();
        let first_due = released;
        while released < plan.tickets_total && plan.scheduled(released) <= now {
            released += 1;
        }
        if released > first_due {
            lateness.push(now - plan.scheduled(first_due));
            permits.add_permits((released - first_due) as usize);
        }
        if released < plan.tickets_total {
            std::thread::sleep(plan.scheduled(released).saturating_duration_since(Instant::now()));
        }
    }
    std::thread::sleep(plan.deadline.saturating_duration_since(Instant::now()));
    permits.close();
    lateness
}

/// One connection: take a permit and the next ticket, send, record; until the
/// pacer closes the semaphore at the deadline.
async fn connection(
    target: Arc<Target>,
    plan: Arc<StepPlan>,
    permits: Arc<Semaphore>,
    tickets: Arc<AtomicU64>,
) -> Vec<Sample> {
    let mut samples = Vec::with_capacity(1_024);
    while let Ok(permit) = permits.acquire().await {
        permit.forget();
        let ticket = tickets.fetch_add(1, Ordering::Relaxed);
        if ticket >= plan.tickets_total || Instant::now() >= plan.deadline {
            break;
        }
        let outcome = match target.send(plan.route, plan.step, ticket).await {
            Ok(outcome) => outcome,
            Err(error) => Outcome::Failed(error_kind(&error)),
        };
        let finished = Instant::now();
        samples.push(Sample {
            latency: finished.saturating_duration_since(plan.scheduled(ticket)),
            outcome,
            finished_after_deadline: finished > plan.deadline,
        });
    }
    samples
}

fn error_kind(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connect"
    } else if error.is_body() || error.is_decode() {
        "body"
    } else if error.is_request() {
        "request"
    } else {
        "other"
    }
}

fn run_step(runtime: &Runtime, target: &Arc<Target>, plan: StepPlan, connections: u32) -> Result<StepReport> {
    let plan = Arc::new(plan);
    let permits = Arc::new(Semaphore::new(0));
    let tickets = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..connections)
        .map(|_| runtime.spawn(connection(target.clone(), plan.clone(), permits.clone(), tickets.clone())))
        .collect();
    let pacer = {
        let (plan, permits) = (plan.clone(), permits.clone());
        std::thread::Builder::new().name("pacer".to_owned()).spawn(move || pace(&plan, &permits))?
    };
    let samples = runtime.block_on(async {
        let mut samples = Vec::new();
        for task in tasks {
            samples.extend(task.await.context("a connection task failed")?);
        }
        anyhow::Ok(samples)
    })?;
    let lateness = pacer.join().map_err(|_| anyhow!("the pacer thread panicked"))?;
    Ok(StepReport::new(&plan, target.records_per_request(plan.route), samples, lateness))
}

#[derive(Clone, Copy)]
struct Percentiles {
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Percentiles {
    /// Nearest-rank percentiles; `None` without values.
    fn of(mut values: Vec<Duration>) -> Option<Percentiles> {
        values.sort_unstable();
        let rank = |fraction: f64| {
            let index = (fraction * values.len() as f64).ceil() as usize;
            values[index.clamp(1, values.len()) - 1]
        };
        let max = *values.last()?;
        Some(Percentiles { p50: rank(0.50), p99: rank(0.99), max })
    }
}

struct StepReport {
    route: Route,
    rate_per_s: u32,
    achieved_per_s: f64,
    /// Usage records per request (0 for reads).
    records_per_request: u32,
    latency: Option<Percentiles>,
    non_2xx: u64,
    errors: u64,
    in_flight_at_end: u64,
    unsent: u64,
    statuses: BTreeMap<u16, u64>,
    error_kinds: BTreeMap<&'static str, u64>,
    pacer_lateness: Option<Percentiles>,
}

impl StepReport {
    fn new(
        plan: &StepPlan,
        records_per_request: u32,
        samples: Vec<Sample>,
        pacer_lateness: Vec<Duration>,
    ) -> StepReport {
        let mut statuses = BTreeMap::new();
        let mut error_kinds = BTreeMap::new();
        let mut success_latencies = Vec::with_capacity(samples.len());
        let (mut successes_in_time, mut in_flight_at_end) = (0u64, 0u64);
        for sample in &samples {
            if sample.finished_after_deadline {
                in_flight_at_end += 1;
            }
            match sample.outcome {
                Outcome::Answered(status) => {
                    *statuses.entry(status.as_u16()).or_insert(0u64) += 1;
                    if status.is_success() {
                        success_latencies.push(sample.latency);
                        successes_in_time += u64::from(!sample.finished_after_deadline);
                    }
                }
                Outcome::Failed(kind) => *error_kinds.entry(kind).or_insert(0u64) += 1,
            }
        }
        let non_2xx = statuses.iter().filter(|(status, _)| !(200..300).contains(*status)).map(|(_, count)| count).sum();
        StepReport {
            route: plan.route,
            rate_per_s: plan.rate_per_s,
            achieved_per_s: successes_in_time as f64 / f64::from(plan.seconds),
            records_per_request,
            latency: Percentiles::of(success_latencies),
            non_2xx,
            errors: error_kinds.values().sum(),
            in_flight_at_end,
            unsent: plan.tickets_total - samples.len() as u64,
            statuses,
            error_kinds,
            pacer_lateness: Percentiles::of(pacer_lateness),
        }
    }

    /// For `--smoke`: a failure, a non-2xx answer, or no answer at all. A
    /// few tickets unsent (a stall of the machine at 200 req/s, a debug
    /// build) say nothing about correctness, so they do not fail it.
    fn failed(&self) -> bool {
        self.non_2xx > 0 || self.errors > 0 || self.latency.is_none()
    }

    fn table_row(&self) -> String {
        let cell = |select: fn(&Percentiles) -> Duration| match &self.latency {
            Some(latency) => milliseconds(select(latency)),
            None => "–".to_owned(),
        };
        let records = match self.records_per_request {
            0 => "–".to_owned(),
            records => thousands((self.achieved_per_s * f64::from(records)).round() as u64),
        };
        format!(
            "| {} | {} | {} | {records} | {} | {} | {} | {} | {} | {} |",
            self.route.label(),
            thousands(u64::from(self.rate_per_s)),
            thousands(self.achieved_per_s.round() as u64),
            cell(|latency| latency.p50),
            cell(|latency| latency.p99),
            cell(|latency| latency.max),
            self.non_2xx,
            self.errors,
            self.in_flight_at_end,
        )
    }

    fn note(&self) -> String {
        let statuses: Vec<String> = self.statuses.iter().map(|(status, count)| format!("{status}×{count}")).collect();
        let errors: Vec<String> = self.error_kinds.iter().map(|(kind, count)| format!("{kind}×{count}")).collect();
        let lateness = match &self.pacer_lateness {
            Some(lateness) => format!("p50 {} ms, max {} ms", milliseconds(lateness.p50), milliseconds(lateness.max)),
            None => "–".to_owned(),
        };
        format!(
            "- {} at {} req/s: statuses {}; errors {}; unsent {}; pacer lateness {lateness}",
            self.route.label(),
            thousands(u64::from(self.rate_per_s)),
            if statuses.is_empty() { "none".to_owned() } else { statuses.join(", ") },
            if errors.is_empty() { "none".to_owned() } else { errors.join(", ") },
            self.unsent,
        )
    }
}

const TABLE_HEADER: &str = "| route | offered req/s | achieved req/s | records/s | p50 ms | p99 ms | max ms | non-2xx | errors | in flight at end |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

fn milliseconds(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1_000.0)
}

/// `--members`: a count (ids made from the prefix) or a comma-separated list.
fn parse_members(members: &str, prefix: &str) -> Result<Vec<String>> {
    let ids: Vec<String> = match members.trim().parse::<usize>() {
        Ok(count) => {
            ensure!((1..=MEMBERS_MAX).contains(&count), "--members: a count must be 1 to {MEMBERS_MAX}");
            (0..count).map(|index| format!("{prefix}{index}")).collect()
        }
        Err(_) => members.split(',').map(|id| id.trim().to_owned()).collect(),
    };
    ensure!(ids.len() <= MEMBERS_MAX, "--members: at most {MEMBERS_MAX} members");
    for id in &ids {
        // The server's own rule for ids; it also keeps them safe in a URL path.
        validate::identifier("member", id).map_err(|error| anyhow!("--members: {id:?}: {error}"))?;
    }
    Ok(ids)
}

fn parse_base_url(url: &str) -> Result<Url> {
    let mut base = Url::parse(url).with_context(|| format!("--url {url:?} is not a URL"))?;
    ensure!(base.scheme() == "http", "--url must be plain http (this build of reqwest has no TLS): {url}");
    // A trailing slash makes `join` append to the path instead of replacing its last segment.
    if !base.path().ends_with('/') {
        base.set_path(&format!("{}/", base.path()));
    }
    Ok(base)
}

/// Credits each member needs for every usage the run will record, plus a margin.
fn funding_credits(target: &Target, routes: &[Route], rates: &[u32], seconds: u32) -> Result<i64> {
    let members_count = target.members.len();
    let records_per_step: u64 = routes.iter().map(|route| u64::from(target.records_per_request(*route))).sum();
    let usages_total: u64 =
        rates.iter().map(|rate| u64::from(*rate) * u64::from(seconds)).sum::<u64>() * records_per_step;
    let per_member = usages_total.div_ceil(members_count as u64) as i64 * USAGE_CREDITS + FUNDING_MARGIN_CREDITS;
    ensure!(
        per_member <= COMMAND_CREDITS_MAX,
        "each member would need {per_member} credits, more than one grant may give ({COMMAND_CREDITS_MAX}); use more --members"
    );
    Ok(per_member)
}

/// Grant every member its credits, then wait until the read model shows
/// them all, so the first step reads no 404.
async fn fund_members(target: &Target, credits: i64) -> Result<()> {
    let mut head_position = 0u64;
    for (member, url) in target.members.iter().zip(&target.usage_urls) {
        let grant_url = url.join("credits/grants")?;
        let response = target
            .client
            .post(grant_url.clone())
            .header("Idempotency-Key", format!("{}-fund-{member}", target.run_id))
            .json(&serde_json::json!({ "source": "promotional", "amount": credits }))
            .send()
            .await
            .with_context(|| format!("POST {grant_url}: is the server running?"))?;
        let status = response.status();
        let body = response.text().await.with_context(|| format!("reading the answer of POST {grant_url}"))?;
        ensure!(status == StatusCode::CREATED, "POST {grant_url} answered {status}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).context("the grant's answer is not JSON")?;
        let position =
            answer["position"].as_u64().ok_or_else(|| anyhow!("the grant's answer has no position: {body}"))?;
        head_position = head_position.max(position);
    }
    for url in &target.balance_urls {
        wait_for_balance(target, url, head_position).await?;
    }
    Ok(())
}

async fn wait_for_balance(target: &Target, url: &Url, min_position: u64) -> Result<()> {
    let mut read_url = url.clone();
    read_url.query_pairs_mut().append_pair("min_position", &min_position.to_string());
    for _attempt in 0..SETUP_READ_ATTEMPTS_MAX {
        let response = target.client.get(read_url.clone()).send().await.with_context(|| format!("GET {read_url}"))?;
        let status = response.status();
        let body = response.text().await.with_context(|| format!("reading the answer of GET {read_url}"))?;
        // 503 is `projection_lagging`: the server already waited; ask again.
        match status {
            StatusCode::OK => return Ok(()),
            StatusCode::SERVICE_UNAVAILABLE => continue,
            _ => bail!("GET {read_url} answered {status}: {body}"),
        }
    }
    bail!("GET {read_url}: the read models did not reach position {min_position}")
}

/// Open one connection per task before the first step, so the first
/// requests measured do not pay for TCP handshakes.
async fn warm_up(target: &Target, connections: u32) -> Result<()> {
    let url = target.base.join("healthz")?;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (client, url) = (target.client.clone(), url.clone());
        requests.spawn(async move { client.get(url).send().await?.bytes().await });
    }
    while let Some(result) = requests.join_next().await {
        result.context("a warm-up task failed")?.context("warming up the connections on GET /healthz")?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (rates, seconds) =
        if args.smoke { (vec![SMOKE_RATE_PER_S], SMOKE_SECONDS) } else { (args.rates, args.seconds) };
    let base = parse_base_url(&args.url)?;
    let members = parse_members(&args.members, &args.member_prefix)?;
    // The smoke run checks every route works, whatever `--route` says.
    let routes: &[Route] =
        if args.smoke { &[Route::Balance, Route::Usage, Route::UsageBatch] } else { args.route.routes() };
    let batch_records = if args.smoke { SMOKE_BATCH_RECORDS } else { args.batch_records };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads as usize)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let target = Arc::new(Target::new(base, &args.admin_key, members, batch_records)?);
    let credits = funding_credits(&target, routes, &rates, seconds)?;

    eprintln!(
        "tally-load: {} members, {seconds} s per step, {} connections, {} runtime threads, against {}",
        target.members.len(),
        args.connections,
        args.threads,
        target.base
    );
    runtime.block_on(fund_members(&target, credits))?;
    eprintln!("granted {credits} promotional credits to each member");
    runtime.block_on(warm_up(&target, args.connections))?;

    println!("{TABLE_HEADER}");
    let mut reports = Vec::new();
    for route in routes {
        for &rate_per_s in &rates {
            eprintln!("{} at {} req/s for {seconds} s …", route.label(), thousands(u64::from(rate_per_s)));
            let plan = StepPlan::new(*route, reports.len(), rate_per_s, seconds);
            let connections = match route {
                Route::UsageBatch => args.connections.min(BATCH_CONNECTIONS_MAX),
                _ => args.connections,
            };
            let report = run_step(&runtime, &target, plan, connections)?;
            println!("{}", report.table_row());
            std::io::stdout().flush()?;
            reports.push(report);
            std::thread::sleep(STEP_PAUSE);
        }
    }
    println!();
    println!(
        "Notes (latency from each request's scheduled instant; unsent = released but no free connection before the deadline):"
    );
    for report in &reports {
        println!("{}", report.note());
    }
    if args.smoke && reports.iter().any(StepReport::failed) {
        bail!("smoke run failed: some requests failed or answered non-2xx, or none succeeded (see the notes)");
    }
    Ok(())
}

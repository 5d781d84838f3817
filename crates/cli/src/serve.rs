//! `tally serve`: the ledger's writer, the projection runner, the scheduler
//! and the HTTP API in one process over one data directory.

use crate::data_dir::{DataDir, ServerAddress};
use crate::demo;
use actix_web::{App, HttpServer, web};
use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::Args;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;
use tally_api::AppState;
use tally_api::auth::KeyStore;
use tally_ledger::{Clock, Ledger, LedgerOptions, ManualClock, SystemClock};
use tally_projections::Projections;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Load the demo plans and members into an empty data directory.
    #[arg(long)]
    demo: bool,
    /// Run on a test clock that only `POST /v1/admin/clock` moves.
    #[arg(long)]
    test_clock: bool,
    /// Where the test clock starts (RFC 3339); now by default.
    #[arg(long, requires = "test_clock")]
    start: Option<DateTime<Utc>>,
    /// HTTP worker threads; the number of cores by default.
    #[arg(long)]
    workers: Option<usize>,
    /// A size budget for the event log, in bytes: past it, writes are
    /// refused with 503 as on a full disk (reads go on). No limit by default.
    #[arg(long, env = "TALLY_MAX_LOG_BYTES", value_parser = clap::value_parser!(u64).range(65_536..))]
    max_log_bytes: Option<u64>,
    /// The vault's key-encryption key: a file (mode 0600) holding 32 bytes
    /// in base64. `TALLY_VAULT_KEY` gives the key itself instead. Without
    /// either, integrations with credentials are refused (`--demo` makes
    /// one in the data directory and says so).
    #[arg(long)]
    vault_key_file: Option<std::path::PathBuf>,
    /// Private or loopback ranges integrations may reach, as CIDRs
    /// (`127.0.0.1/32,10.0.0.0/8`); none by default. Plain http is allowed
    /// to these ranges only.
    #[arg(long, env = "TALLY_ALLOW_PRIVATE_TARGETS")]
    allow_private_targets: Option<String>,
    /// What integrations may reach: `public` addresses (and the allow-list),
    /// or the `allow-list` only, looking up no name (for test and CI
    /// servers that must send nothing past their own machine).
    #[arg(long, env = "TALLY_OUTBOUND", value_enum, default_value = "public")]
    outbound: Outbound,
    /// Query executions one member may run at once; more wait up to 2 s,
    /// then get `too_many_executions` (429).
    #[arg(long, env = "TALLY_EXECUTIONS_PER_MEMBER", default_value_t = tally_api::execution::EXECUTIONS_PER_MEMBER_DEFAULT as u64,
        value_parser = clap::value_parser!(u64).range(1..=1024))]
    executions_per_member: u64,
    /// Seconds between two scheduled health probes of an integration
    /// (each jittered by up to a fifth); 0 turns the probes off.
    #[arg(long, env = "TALLY_HEALTH_CHECK_INTERVAL_S", default_value_t = tally_api::health::HEALTH_CHECK_INTERVAL_DEFAULT.as_secs(),
        value_parser = clap::value_parser!(u64).range(0..=86_400))]
    health_check_interval_s: u64,
    /// Query executions the whole server runs at once.
    #[arg(long, env = "TALLY_EXECUTIONS_MAX", default_value_t = tally_api::execution::EXECUTIONS_MAX_DEFAULT as u64,
        value_parser = clap::value_parser!(u64).range(1..=4096))]
    executions_max: u64,
    /// The installation's alert rules: a JSON file of settings over the
    /// built-in defaults, in the shape of `PUT /v1/members/{m}/alert-rules`
    /// (`{"low_balance": {"below_credits": 500}, …}`). Members' own
    /// overrides apply on top.
    #[arg(long, env = "TALLY_ALERT_RULES")]
    alert_rules: Option<std::path::PathBuf>,
    /// Run without the alert reactor (no alerts are raised; the routes
    /// still answer). For benchmarks, and for a second process on a copy.
    #[arg(long)]
    no_alerts: bool,
    /// Run without the webhook sender (deliveries wait in their queues).
    #[arg(long)]
    no_webhooks: bool,
}

/// The installation's alert rules: the built-in defaults, with the file's
/// settings over them; a setting out of range stops the start, naming it.
fn alert_defaults(file: Option<&Path>) -> Result<tally_notify::rules::RuleSet> {
    let defaults = tally_notify::rules::RuleSet::default();
    let Some(file) = file else { return Ok(defaults) };
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let overrides: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
    defaults
        .apply(&overrides)
        .map_err(|error| anyhow::anyhow!("{}: alert rule setting `{}` {}", file.display(), error.field, error.message))
}

/// How long the webhook sender rests between rounds, unless woken.
const WEBHOOKS_INTERVAL: Duration = Duration::from_millis(250);
/// The shortest time between two rounds of the webhook sender.
const WEBHOOKS_ROUND_MIN: Duration = Duration::from_millis(25);

/// How long the alert reactor rests once it caught up with the log.
const ALERTS_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Outbound {
    Public,
    AllowList,
}

/// Tells the CLI where to ask for work only the owner of the projections
/// may do (a rebuild). A wildcard address is reached on loopback.
fn publish_address(data_dir: &DataDir, bound: SocketAddr) -> Result<()> {
    let host = match bound.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let address =
        ServerAddress { url: format!("http://{}", SocketAddr::new(host, bound.port())), pid: std::process::id() };
    address.publish(data_dir)
}

/// How often the Stripe outbox looks for overage to send.
const OUTBOX_INTERVAL: Duration = Duration::from_secs(1);

/// How often the scheduler looks for due renewals, expiries and timeouts.
const SCHEDULER_INTERVAL: Duration = Duration::from_secs(5);

/// Tells the background threads to stop; one waiting between two rounds
/// hears it at once (a shutdown does not wait out a 5 s pause).
#[derive(Default)]
struct StopSignal {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl StopSignal {
    fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.wake.notify_all();
    }

    /// Waits up to `pause`; true once a stop was asked.
    fn wait(&self, pause: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(PoisonError::into_inner);
        let (stopped, _) =
            self.wake.wait_timeout_while(stopped, pause, |stopped| !*stopped).unwrap_or_else(PoisonError::into_inner);
        *stopped
    }
}

pub fn run(data_dir: &Path, args: ServeArgs) -> Result<()> {
    let data_dir = DataDir::new(data_dir);
    data_dir.create()?;
    let events_path = data_dir.events();
    let projections_path = data_dir.projections();
    let keys_path = data_dir.keys();

    let test_clock = args.test_clock.then(|| Arc::new(ManualClock::new(args.start.unwrap_or_else(Utc::now))));
    let clock: Arc<dyn Clock> = match &test_clock {
        Some(clock) => clock.clone(),
        None => Arc::new(SystemClock),
    };
    // The demo's data source, on a free loopback port (allow-listed below,
    // in demo mode only).
    let demo_upstream = match args.demo {
        true => Some(crate::demo_upstream::start()?),
        false => None,
    };
    let demo_base = demo_upstream.map(|address| format!("http://{address}"));
    if let Some(base) = &demo_base {
        if demo::load(&events_path, clock.now(), base)? {
            tracing::info!("loaded the demo: plans free, starter, pro, enterprise; members acme, globex, initech");
        } else {
            tracing::info!("the log is not empty; the demo was not loaded again");
        }
    }

    let mut options = LedgerOptions::default();
    options.store.max_log_bytes = args.max_log_bytes;
    let ledger = Arc::new(Ledger::open(&events_path, options, clock)?);
    if let Some(base) = &demo_base {
        demo::point_integrations(&ledger, base)?;
    }
    let projections = Arc::new(Projections::open(&projections_path, &events_path)?);
    // The read models serve only what is on disk.
    projections.hide_unsynced(ledger.visible_head());
    let runner = projections.start_runner()?;
    let admin_key = std::env::var("TALLY_ADMIN_KEY").ok().filter(|key| !key.is_empty());
    let (keys, generated) = KeyStore::open(&keys_path, admin_key.as_deref()).context("cannot open the key store")?;
    if let Some(key) = generated {
        // Printed once, to the terminal only: it is stored hashed.
        println!("admin key (shown once, store it now): {key}");
    }
    let mut app_state = AppState::new(ledger.clone(), projections.clone(), Arc::new(keys), test_clock.clone());
    app_state.stripe = stripe_settings()?;
    app_state.integrations = integration_settings(&data_dir, &args, demo_upstream)?;
    app_state.alerts.defaults = alert_defaults(args.alert_rules.as_deref())?;
    let alert_reactor =
        tally_notify::reactor::AlertReactor::open(&data_dir.alerts(), app_state.alerts.defaults.clone())
            .context("cannot open the alert reactor's file")?;
    let dispatcher = tally_notify::webhooks::Dispatcher::open(&data_dir.webhooks())
        .context("cannot open the webhook dispatcher's file")?;
    app_state.webhooks.dispatcher = Some(Arc::new(Mutex::new(dispatcher)));
    let stripe_api = app_state.stripe.api.clone();
    let state = web::Data::new(app_state);
    let state_for_shutdown = state.clone();

    let stop_scheduler = Arc::new(StopSignal::default());
    // The Stripe outbox: overage of Stripe-managed members, as invoice items.
    let outbox = stripe_api.map(|api| {
        let outbox = tally_stripe::Outbox::new(api, &data_dir.root().join("stripe-outbox.position"));
        let ledger = ledger.clone();
        let stop = stop_scheduler.clone();
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => return tracing::error!(%error, "the Stripe outbox cannot start"),
            };
            loop {
                match runtime.block_on(outbox.run_once(&ledger)) {
                    Ok(report) if report.invoice_items > 0 => {
                        tracing::info!(
                            items = report.invoice_items,
                            position = report.position,
                            "sent overage to Stripe"
                        )
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "the Stripe outbox will try again"),
                }
                if stop.wait(OUTBOX_INTERVAL) {
                    break;
                }
            }
        })
    });
    // The alert reactor: follows the log, appends alert episodes.
    let alerts = (!args.no_alerts).then(|| {
        let ledger = ledger.clone();
        let stop = stop_scheduler.clone();
        let progress = state.alerts.progress.clone();
        let mut reactor = alert_reactor;
        std::thread::spawn(move || {
            loop {
                let pass = reactor.run_once(&ledger).and_then(|mut report| {
                    report.absorb(reactor.sweep(&ledger, ledger.now())?);
                    Ok(report)
                });
                match pass {
                    Ok(report) if !report.raised.is_empty() || !report.resolved.is_empty() => {
                        tracing::info!(raised = ?report.raised, resolved = ?report.resolved, "alerts");
                    }
                    Ok(_) => {}
                    Err(error) => tracing::warn!(%error, "the alert reactor will try again"),
                }
                progress.passed(reactor.position(), reactor.outbox_len().unwrap_or(0));
                if stop.wait(Duration::ZERO) {
                    break;
                }
                progress.wait(ALERTS_INTERVAL);
            }
        })
    });
    // The webhook sender: drains the dispatcher's queues.
    let webhooks = (!args.no_webhooks).then(|| {
        let state = state.clone();
        let stop = stop_scheduler.clone();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async {
                let client = tally_api::webhooks::client(&state);
                let in_flight = Arc::new(tally_api::webhooks::InFlight::default());
                while !stop.wait(Duration::ZERO) {
                    tally_api::webhooks::send_round(&state, &client, &in_flight).await;
                    let _ = actix_web::rt::time::timeout(WEBHOOKS_INTERVAL, state.webhooks.wake.notified()).await;
                    // Writes ring the bell at their own pace: a round at
                    // most every few milliseconds takes them in together.
                    actix_web::rt::time::sleep(WEBHOOKS_ROUND_MIN).await;
                }
            });
        })
    });
    let scheduler = (test_clock.is_none()).then(|| {
        let ledger = ledger.clone();
        let stop = stop_scheduler.clone();
        std::thread::spawn(move || {
            loop {
                if let Err(error) = ledger.run_due() {
                    tracing::error!(%error, "scheduler sweep failed");
                }
                if stop.wait(SCHEDULER_INTERVAL) {
                    break;
                }
            }
        })
    });

    let health = (test_clock.is_none() && args.health_check_interval_s > 0).then(|| {
        let interval = Duration::from_secs(args.health_check_interval_s);
        // Looks for due integrations ten times per interval (at least every
        // second, at most every 30 s).
        let tick = (interval / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
        let state = state.clone();
        let stop = stop_scheduler.clone();
        std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => return tracing::error!(%error, "the health scheduler cannot start"),
            };
            // One `block_on` for the thread's whole life: the connections
            // this runtime opens (pooled in the HTTP client the API shares)
            // are driven by it, so it must never stand still.
            runtime.block_on(async {
                let stopping = || stop.wait(Duration::ZERO);
                let mut attempts = tally_api::health::Attempts::default();
                while !stopping() {
                    let probed = tally_api::health::sweep(&state, &mut attempts, interval, Utc::now(), stopping).await;
                    if probed > 0 {
                        tracing::debug!(probed, "scheduled health probes");
                    }
                    let next = std::time::Instant::now() + tick;
                    while std::time::Instant::now() < next && !stopping() {
                        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            });
        })
    });

    let addr = args.addr.clone();
    let workers = args.workers.unwrap_or_else(|| std::thread::available_parallelism().map(usize::from).unwrap_or(2));
    let served = actix_web::rt::System::new().block_on(async {
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(actix_web::middleware::from_fn(tally_api::observe))
                .configure(tally_api::configure)
                .default_service(web::to(tally_api::not_found))
        })
        .workers(workers)
        .client_request_timeout(Duration::from_secs(10))
        .shutdown_timeout(10)
        .bind(&addr)
        .with_context(|| format!("cannot listen on {addr}"))?;
        for bound in server.addrs() {
            tracing::info!(addr = %bound, "tally is listening");
            println!("tally listening on http://{bound}");
        }
        if let Some(bound) = server.addrs().first() {
            publish_address(&data_dir, *bound)?;
        }
        server.run().await.context("the HTTP server failed")
    });
    ServerAddress::withdraw(&data_dir);
    served?;

    tracing::info!("shutting down: stopping the scheduler and the projection runner, flushing the writer");
    stop_scheduler.stop();
    state_for_shutdown.alerts.progress.wake();
    if let Some(scheduler) = scheduler {
        let _ = scheduler.join();
    }
    if let Some(outbox) = outbox {
        let _ = outbox.join();
    }
    if let Some(health) = health {
        let _ = health.join();
    }
    for follower in [alerts, webhooks].into_iter().flatten() {
        let _ = follower.join();
    }
    runner.stop();
    drop(ledger);
    Ok(())
}

/// The vault (when a key is given, or made for the demo) and the guard's
/// allow-list. A vault that holds credentials but no key to open it: the
/// start is refused, never served in clear or silently empty.
fn integration_settings(
    data_dir: &DataDir,
    args: &ServeArgs,
    demo_upstream: Option<SocketAddr>,
) -> Result<tally_api::integrations::IntegrationSettings> {
    use tally_integrations::vault::{Kek, Vault};
    let vault_path = data_dir.root().join("vault.db");
    let demo_key = data_dir.root().join("vault.key");
    let kek = match (std::env::var("TALLY_VAULT_KEY").ok().filter(|key| !key.trim().is_empty()), &args.vault_key_file) {
        (Some(key), _) => Some(Kek::from_base64(&key).context("TALLY_VAULT_KEY")?),
        (None, Some(path)) => Some(Kek::from_file(path).context("--vault-key-file")?),
        (None, None) if args.demo && demo_key.exists() => Some(Kek::from_file(&demo_key)?),
        (None, None) if args.demo => {
            let kek = Kek::generate_file(&demo_key)?;
            tracing::warn!(path = %demo_key.display(), "demo: generated a vault key; keep it with the data directory, or credentials are lost");
            Some(kek)
        }
        (None, None) => None,
    };
    let vault = match kek {
        Some(kek) => Some(Arc::new(Vault::open(&vault_path, kek).context("cannot open the vault")?)),
        None if vault_path.exists() => anyhow::bail!(
            "{} holds credentials but no vault key was given: set TALLY_VAULT_KEY (32 bytes, base64) or pass --vault-key-file",
            vault_path.display()
        ),
        None => {
            tracing::info!(
                "no vault key: integrations with credentials are refused (set TALLY_VAULT_KEY or --vault-key-file)"
            );
            None
        }
    };
    let mut allowed = match &args.allow_private_targets {
        Some(text) => tally_integrations::guard::Guard::parse_allow_list(text)
            .map_err(|error| anyhow::anyhow!("--allow-private-targets: {error}"))?,
        None => Vec::new(),
    };
    if let Some(address) = demo_upstream {
        tracing::info!(%address, "demo: integrations may reach the demo upstream's loopback address");
        allowed.extend(
            tally_integrations::guard::Guard::parse_allow_list(&format!("{}/32", address.ip()))
                .map_err(|error| anyhow::anyhow!("the demo upstream's address: {error}"))?,
        );
    }
    use tally_integrations::guard::Guard;
    let outbound = match args.outbound {
        Outbound::Public => Guard::new(allowed.clone()),
        Outbound::AllowList => Guard::allow_list_only(allowed.clone()),
    };
    let slots =
        tally_api::execution::ExecutionSlots::new(args.executions_per_member as usize, args.executions_max as usize);
    Ok(tally_api::integrations::IntegrationSettings::new(vault, Guard::new(allowed), outbound).with_slots(slots))
}

/// Stripe settings from the environment: the webhook secret and tolerance,
/// and the API key and base URL for outbound calls.
fn stripe_settings() -> anyhow::Result<tally_api::stripe::StripeSettings> {
    let var = |name: &str| std::env::var(name).ok().filter(|value| !value.trim().is_empty());
    let mut settings = tally_api::stripe::StripeSettings::new();
    settings.webhook_secret = var("TALLY_STRIPE_WEBHOOK_SECRET");
    if let Some(tolerance) = var("TALLY_STRIPE_WEBHOOK_TOLERANCE_S") {
        settings.tolerance_s = tolerance
            .parse::<i64>()
            .ok()
            .filter(|seconds| (1..=86_400).contains(seconds))
            .ok_or_else(|| anyhow::anyhow!("TALLY_STRIPE_WEBHOOK_TOLERANCE_S must be 1 to 86400 seconds"))?;
    }
    if let Some(key) = var("TALLY_STRIPE_SECRET_KEY") {
        let base = var("TALLY_STRIPE_API_BASE");
        let api = tally_stripe::StripeApi::new(&key, base.as_deref())
            .map_err(|error| anyhow::anyhow!("cannot set up the Stripe client: {error}"))?;
        settings.api = Some(Arc::new(api));
    }
    if let Some(spent) = var("TALLY_STRIPE_REFUND_SPENT") {
        settings.refund_policy.spent = match spent.as_str() {
            "debt" => tally_ledger::domain::SpentRefund::Debt,
            "write_off" => tally_ledger::domain::SpentRefund::WriteOff,
            _ => anyhow::bail!("TALLY_STRIPE_REFUND_SPENT must be `debt` or `write_off`, not {spent:?}"),
        };
    }
    if let Some(take_back) = var("TALLY_STRIPE_REFUND_SUBSCRIPTION_CREDITS") {
        settings.refund_policy.subscription_credits = match take_back.as_str() {
            "true" => true,
            "false" => false,
            _ => anyhow::bail!("TALLY_STRIPE_REFUND_SUBSCRIPTION_CREDITS must be `true` or `false`, not {take_back:?}"),
        };
    }
    match &settings.webhook_secret {
        Some(_) => {
            tracing::info!(tolerance_s = settings.tolerance_s, "Stripe webhooks enabled at POST /v1/webhooks/stripe")
        }
        None => tracing::info!("Stripe webhooks disabled (TALLY_STRIPE_WEBHOOK_SECRET is not set)"),
    }
    Ok(settings)
}

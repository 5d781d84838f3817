//! `tally projections status | rebuild`.
//!
//! Status only reads: the projections file through read-only connections
//! and the log's head, so it works beside a running server. A rebuild needs
//! the process that owns the projections (DESIGN.md §5): the CLI itself when
//! no server holds their lock, otherwise the server, asked through
//! `POST /v1/admin/projections/rebuild` at the address it published in the
//! data directory, while the CLI polls `GET /v1/admin/projections` for the
//! progress bar. Either way the new generations are built beside the live
//! ones, which keep being served, and swapped in when they reach the head.

use crate::OutputFormat;
use crate::data_dir::{DataDir, ServerAddress};
use crate::progress::Progress;
use crate::table::{Align, Table, grouped};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tally_api::ops::{ProjectionsView, RebuildBody, RebuildView};
use tally_ledger::store::EventReader;
use tally_projections::{ProjectionError, Projections, ReadModels, builtin_projectors};

/// How often a remote rebuild's progress is polled.
const REMOTE_PROGRESS_POLL: Duration = Duration::from_millis(200);
/// How long one progress poll may take.
const REMOTE_PROGRESS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// Each projector's version, checkpoint, lag behind the log's head, and
    /// the digest of each of its read models.
    Status(StatusArgs),
    /// Replay the whole log into new tables beside the live ones and switch
    /// reads to them once they caught up, without downtime. When a server
    /// owns the projections, it is asked to do it (needs the admin key).
    Rebuild(RebuildArgs),
}

#[derive(Args)]
pub struct StatusArgs {
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["name", "all"]))]
pub struct RebuildArgs {
    /// A projector (credits, daily_usage, invoices, subscriptions,
    /// integrations, alerts, analytics) or one of its read models
    /// (credit_balances, credit_transactions, daily_usage_stats, invoices,
    /// subscriptions, integrations, query_executions, query_stats, alerts,
    /// analytics).
    name: Option<String>,
    /// Rebuild every projector.
    #[arg(long)]
    all: bool,
    /// The admin key, to ask a running server to rebuild.
    #[arg(long, env = "TALLY_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
}

pub fn run(data_dir: &std::path::Path, command: ProjectionsCommand) -> Result<()> {
    let data_dir = DataDir::existing(data_dir)?;
    match command {
        ProjectionsCommand::Status(args) => status(&data_dir, args.format),
        ProjectionsCommand::Rebuild(args) => {
            if let Some(name) = &args.name {
                check_name(name)?;
            }
            rebuild(&data_dir, args.name.as_deref(), args.admin_key.as_deref())
        }
    }
}

#[derive(Serialize)]
struct StatusView {
    head: u64,
    projectors: Vec<ProjectorStatusView>,
}

#[derive(Serialize)]
struct ProjectorStatusView {
    name: &'static str,
    version: u32,
    serving: bool,
    generation: Option<u64>,
    checkpoint: u64,
    lag: u64,
    /// A generation being built (a rebuild or an upgrade), with its checkpoint.
    build_checkpoint: Option<u64>,
    read_models: Vec<ReadModelView>,
}

#[derive(Serialize)]
struct ReadModelView {
    name: String,
    /// The checkpoint the digest was taken at; `None` when not served.
    position: Option<u64>,
    rows: Option<u64>,
    sha256: Option<String>,
}

fn status(data_dir: &DataDir, format: OutputFormat) -> Result<()> {
    let head = EventReader::open(&data_dir.events())?.head()?.position;
    let projectors = if data_dir.projections().exists() { projector_statuses(data_dir, head)? } else { Vec::new() };
    let view = StatusView { head, projectors };
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&view).expect("a status serialises")),
        OutputFormat::Table => print!("{}", render_status(&view, data_dir)),
    }
    Ok(())
}

fn projector_statuses(data_dir: &DataDir, head: u64) -> Result<Vec<ProjectorStatusView>> {
    let read_models = ReadModels::open(&data_dir.projections())?;
    let mut views = Vec::new();
    for status in read_models.status()? {
        let digests = if status.serving { read_models.digests_of_projector(status.name)? } else { Vec::new() };
        let read_model_views = status
            .read_models
            .iter()
            .map(|name| {
                let digest = digests.iter().find(|digest| digest.read_model == *name);
                ReadModelView {
                    name: (*name).to_owned(),
                    position: digest.map(|digest| digest.position),
                    rows: digest.map(|digest| digest.rows),
                    sha256: digest.map(|digest| digest.sha256.clone()),
                }
            })
            .collect();
        views.push(ProjectorStatusView {
            name: status.name,
            version: status.version,
            serving: status.serving,
            generation: status.generation,
            checkpoint: status.checkpoint,
            lag: head.saturating_sub(status.checkpoint),
            build_checkpoint: status.build.map(|build| build.checkpoint),
            read_models: read_model_views,
        });
    }
    Ok(views)
}

fn render_status(view: &StatusView, data_dir: &DataDir) -> String {
    let mut out = format!("log head: position {}\n", view.head);
    if view.projectors.is_empty() {
        out.push_str(&format!(
            "no read models yet: {} does not exist (`tally serve` or `tally projections rebuild --all` builds them)\n",
            data_dir.projections().display()
        ));
        return out;
    }
    let mut table = Table::new(&[
        ("PROJECTOR", Align::Left),
        ("VERSION", Align::Right),
        ("STATE", Align::Left),
        ("CHECKPOINT", Align::Right),
        ("LAG", Align::Right),
        ("READ MODEL", Align::Left),
        ("ROWS", Align::Right),
        ("DIGEST (SHA-256)", Align::Left),
    ]);
    for projector in &view.projectors {
        let state = match (projector.serving, projector.build_checkpoint) {
            (true, None) => "serving".to_owned(),
            (true, Some(checkpoint)) => format!("serving, rebuilding at {checkpoint}"),
            (false, Some(checkpoint)) => format!("building at {checkpoint}"),
            (false, None) => "not built".to_owned(),
        };
        for (index, read_model) in projector.read_models.iter().enumerate() {
            let first = index == 0;
            table.row(vec![
                if first { projector.name.to_owned() } else { String::new() },
                if first { projector.version.to_string() } else { String::new() },
                if first { state.clone() } else { String::new() },
                if first { projector.checkpoint.to_string() } else { String::new() },
                if first { grouped(projector.lag as i64) } else { String::new() },
                read_model.name.clone(),
                read_model.rows.map_or_else(|| "-".to_owned(), |rows| grouped(rows as i64)),
                read_model.sha256.clone().unwrap_or_else(|| "-".to_owned()),
            ]);
        }
    }
    out.push_str(&table.render(0));
    out
}

/// Refuses a name no built-in projector or read model has, before anything
/// is opened or asked.
fn check_name(name: &str) -> Result<()> {
    let projectors = builtin_projectors();
    let known = projectors.iter().any(|projector| projector.name() == name || projector.read_models().contains(&name));
    if known {
        return Ok(());
    }
    let names: Vec<String> = projectors
        .iter()
        .map(|projector| format!("{} ({})", projector.name(), projector.read_models().join(", ")))
        .collect();
    bail!("no projector or read model is named {name:?}; there are {}", names.join("; "))
}

fn rebuild(data_dir: &DataDir, name: Option<&str>, admin_key: Option<&str>) -> Result<()> {
    match Projections::open(&data_dir.projections(), &data_dir.events()) {
        Ok(projections) => rebuild_here(&projections, name),
        Err(ProjectionError::Locked { .. }) => rebuild_by_server(data_dir, name, admin_key),
        Err(error) => Err(error.into()),
    }
}

fn rebuild_here(projections: &Projections, name: Option<&str>) -> Result<()> {
    let mut progress = Progress::start("rebuilding", 0);
    let report = projections.rebuild(name, |step| progress.update(step.events_done, step.events_total));
    progress.finish();
    let report = report?;
    println!(
        "rebuilt {}: {} events in {:.1} s ({} events/s); live at position {}",
        report.projectors.join(", "),
        grouped(report.events as i64),
        report.elapsed_s,
        grouped(report.events_per_s as i64),
        report.position
    );
    Ok(())
}

fn rebuild_by_server(data_dir: &DataDir, name: Option<&str>, admin_key: Option<&str>) -> Result<()> {
    let address = ServerAddress::read(data_dir)?;
    let Some(admin_key) = admin_key else {
        bail!(
            "a running server (pid {}, {}) owns the projections; set TALLY_ADMIN_KEY or pass --admin-key so that it can be asked to rebuild",
            address.pid,
            address.url
        );
    };
    let client = reqwest::blocking::Client::builder().timeout(None).build().context("cannot make an HTTP client")?;
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = Arc::clone(&stop);
        let url = format!("{}/v1/admin/projections", address.url);
        let admin_key = admin_key.to_owned();
        let name = name.map(str::to_owned);
        std::thread::spawn(move || poll_progress(&url, &admin_key, name.as_deref(), &stop))
    };
    let response = client
        .post(format!("{}/v1/admin/projections/rebuild", address.url))
        .bearer_auth(admin_key)
        .json(&RebuildBody { projector: name.map(str::to_owned) })
        .send();
    stop.store(true, Ordering::SeqCst);
    let progress = poller.join().map_err(|_| anyhow!("the progress thread panicked"))?;
    let response =
        response.with_context(|| format!("cannot reach the server at {} (pid {})", address.url, address.pid));
    let response = match response {
        Ok(response) if response.status().is_success() => response,
        Ok(response) => {
            progress.finish();
            let status = response.status();
            let body: serde_json::Value = response.json().unwrap_or_default();
            let detail = body["detail"].as_str().unwrap_or("no detail");
            bail!("the server at {} refused the rebuild: {status}: {detail}", address.url);
        }
        Err(error) => {
            progress.finish();
            return Err(error);
        }
    };
    let report: RebuildView = response.json().context("the server's rebuild answer does not decode")?;
    let mut progress = progress;
    progress.update(report.position, report.position);
    progress.finish();
    println!(
        "rebuilt {} (by the server, pid {}): {} events in {:.1} s ({} events/s); live at position {}",
        report.projectors.join(", "),
        address.pid,
        grouped(report.events as i64),
        report.elapsed_s,
        grouped(report.events_per_s as i64),
        report.position
    );
    Ok(())
}

/// Draws the progress of a rebuild the server runs, from its status route:
/// the lowest checkpoint of the generations being built, against the head.
/// Returns the progress for the caller to complete.
fn poll_progress(url: &str, admin_key: &str, name: Option<&str>, stop: &AtomicBool) -> Progress {
    let mut progress = Progress::start("rebuilding (by the server)", 0);
    let Ok(client) = reqwest::blocking::Client::builder().timeout(REMOTE_PROGRESS_TIMEOUT).build() else {
        return progress;
    };
    let mut done = 0;
    while !stop.load(Ordering::SeqCst) {
        let view = client.get(url).bearer_auth(admin_key).send().ok().and_then(|response| {
            response.status().is_success().then(|| response.json::<ProjectionsView>().ok()).flatten()
        });
        if let Some(view) = view {
            let building = view
                .projectors
                .iter()
                .filter(|projector| {
                    name.is_none_or(|name| {
                        projector.name == name || projector.read_models.iter().any(|model| model == name)
                    })
                })
                .filter_map(|projector| projector.build.as_ref().map(|build| build.checkpoint))
                .min();
            done = building.unwrap_or(done);
            progress.update(done, view.head);
        }
        std::thread::sleep(REMOTE_PROGRESS_POLL);
    }
    progress
}

/// Used by `audit verify`: the live read models, owned by this process when
/// no server holds them, read beside the server otherwise.
pub enum LiveReadModels {
    /// No server runs: this process owns them and can bring them to the head.
    Owned(Projections),
    /// A server owns them; they are read through read-only connections.
    Shared(ReadModels),
}

impl LiveReadModels {
    pub fn open(data_dir: &DataDir) -> Result<LiveReadModels> {
        match Projections::open(&data_dir.projections(), &data_dir.events()) {
            Ok(projections) => Ok(LiveReadModels::Owned(projections)),
            Err(ProjectionError::Locked { .. }) => {
                Ok(LiveReadModels::Shared(ReadModels::open(&data_dir.projections())?))
            }
            Err(error) => Err(error.into()),
        }
    }

    pub fn read_models(&self) -> &ReadModels {
        match self {
            LiveReadModels::Owned(projections) => projections.read_models(),
            LiveReadModels::Shared(read_models) => read_models,
        }
    }

    /// Brings owned read models to the log's head; shared ones are the
    /// server's to move.
    pub fn catch_up(&self) -> Result<()> {
        if let LiveReadModels::Owned(projections) = self {
            projections.catch_up().map_err(|error| anyhow!("cannot bring the read models up to date: {error}"))?;
        }
        Ok(())
    }
}

//! `tally stripe replay`: apply kept Stripe events again. The replay runs in
//! the server that owns the data directory (it holds the writer and the
//! Stripe settings): this command asks it, through
//! `POST /v1/admin/stripe/replay` at the address it published, as
//! `tally projections rebuild` does.

use crate::OutputFormat;
use crate::data_dir::{DataDir, ServerAddress};
use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use tally_ledger::domain::validate;

#[derive(Subcommand)]
pub enum StripeCommand {
    /// Run kept Stripe events through the ledger again, through the running
    /// server: every unprocessed event (after an upgrade or a catalog fix),
    /// or with `--customer` the events ignored because that customer was
    /// linked to no member (link it first), in Stripe's order. Exactly once:
    /// an event applied before is answered from its record.
    Replay(ReplayArgs),
}

#[derive(Args)]
pub struct ReplayArgs {
    /// A Stripe customer id (`cus_…`) linked to a member since its events arrived.
    #[arg(long)]
    customer: Option<String>,
    /// The admin key, to ask the running server.
    #[arg(long, env = "TALLY_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
}

pub fn run(data_dir: &std::path::Path, command: StripeCommand) -> Result<()> {
    let data_dir = DataDir::existing(data_dir)?;
    match command {
        StripeCommand::Replay(args) => replay(&data_dir, args),
    }
}

fn replay(data_dir: &DataDir, args: ReplayArgs) -> Result<()> {
    if let Some(customer) = &args.customer {
        validate::identifier("customer", customer).map_err(|error| anyhow!("--customer: {error}"))?;
    }
    let address = ServerAddress::read(data_dir).map_err(|_| {
        anyhow!(
            "no server runs on {}: the replay runs in the server, which holds the writer; start `tally serve` on this data directory",
            data_dir.root().display()
        )
    })?;
    let Some(admin_key) = args.admin_key else {
        bail!("set TALLY_ADMIN_KEY or pass --admin-key so that the server (pid {}) can be asked", address.pid);
    };
    let mut url = format!("{}/v1/admin/stripe/replay", address.url);
    if let Some(customer) = &args.customer {
        // An identifier needs no escaping in a query.
        url.push_str(&format!("?customer={customer}"));
    }
    let client = reqwest::blocking::Client::builder().timeout(None).build().context("cannot make an HTTP client")?;
    let response = client
        .post(&url)
        .bearer_auth(admin_key)
        .send()
        .with_context(|| format!("cannot reach the server at {} (pid {})", address.url, address.pid))?;
    let status = response.status();
    let body: serde_json::Value = response.json().context("the server's replay answer is not JSON")?;
    if !status.is_success() {
        let detail = body["detail"].as_str().unwrap_or("no detail");
        bail!("the server at {} refused the replay: {status}: {detail}", address.url);
    }
    match args.format {
        OutputFormat::Json => println!("{body}"),
        OutputFormat::Table => {
            let count = |field: &str| body[field].as_u64().unwrap_or(0);
            println!(
                "replayed {} events{}: {} applied, {} ignored, {} still unprocessed, {} refused",
                count("replayed"),
                args.customer.map(|customer| format!(" of {customer}")).unwrap_or_default(),
                count("applied"),
                count("ignored"),
                count("still_unprocessed"),
                count("refused"),
            );
        }
    }
    Ok(())
}

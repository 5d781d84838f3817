//! `tally stripe replay`: apply kept Stripe events again; `tally stripe
//! sync`: backfill from an existing Stripe account. Both run in the server
//! that owns the data directory (it holds the writer and the Stripe
//! settings): this command asks it, through `POST /v1/admin/stripe/replay`
//! and `…/sync` at the address it published, as `tally projections
//! rebuild` does.

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
    /// Backfill from an existing Stripe account, through the running server
    /// (which needs TALLY_STRIPE_SECRET_KEY): every customer (or one, with
    /// `--customer`) is matched to its member (its link, else its
    /// `metadata.tally_member_id`; unmatched customers are listed, not
    /// guessed), and its live subscriptions, their paid current invoices
    /// and its open invoices are applied as the webhooks would. Safe to run
    /// again: what was applied is not applied twice.
    Sync(SyncArgs),
}

#[derive(Args)]
pub struct SyncArgs {
    /// Only this Stripe customer (`cus_…`).
    #[arg(long)]
    customer: Option<String>,
    /// Customers read from Stripe per request, 1 to 100.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(1..=100))]
    page_size: u8,
    /// The admin key, to ask the running server.
    #[arg(long, env = "TALLY_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
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
        StripeCommand::Sync(args) => sync(&data_dir, args),
    }
}

/// The running server's address and the admin key to ask it with.
fn server(data_dir: &DataDir, admin_key: Option<String>, what: &str) -> Result<(ServerAddress, String)> {
    let address = ServerAddress::read(data_dir).map_err(|_| {
        anyhow!(
            "no server runs on {}: the {what} runs in the server, which holds the writer; start `tally serve` on this data directory",
            data_dir.root().display()
        )
    })?;
    let Some(admin_key) = admin_key else {
        bail!("set TALLY_ADMIN_KEY or pass --admin-key so that the server (pid {}) can be asked", address.pid);
    };
    Ok((address, admin_key))
}

/// POSTs to the server; its answer, or its refusal as an error.
fn ask(address: &ServerAddress, admin_key: &str, path_and_query: &str, what: &str) -> Result<serde_json::Value> {
    let client = reqwest::blocking::Client::builder().timeout(None).build().context("cannot make an HTTP client")?;
    let response = client
        .post(format!("{}{path_and_query}", address.url))
        .bearer_auth(admin_key)
        .send()
        .with_context(|| format!("cannot reach the server at {} (pid {})", address.url, address.pid))?;
    let status = response.status();
    let body: serde_json::Value = response.json().with_context(|| format!("the server's {what} answer is not JSON"))?;
    if !status.is_success() {
        let detail = body["detail"].as_str().unwrap_or("no detail");
        bail!("the server at {} refused the {what}: {status}: {detail}", address.url);
    }
    Ok(body)
}

fn sync(data_dir: &DataDir, args: SyncArgs) -> Result<()> {
    if let Some(customer) = &args.customer {
        validate::identifier("customer", customer).map_err(|error| anyhow!("--customer: {error}"))?;
    }
    let (address, admin_key) = server(data_dir, args.admin_key, "sync")?;
    let mut progress = crate::progress::Progress::counting("stripe sync", u64::from(args.page_size), "customers");
    let mut customers: Vec<serde_json::Value> = Vec::new();
    let mut totals = [0u64; 4];
    let mut starting_after: Option<String> = None;
    loop {
        // Identifiers need no escaping in a query.
        let mut query = format!("/v1/admin/stripe/sync?limit={}", args.page_size);
        if let Some(customer) = &args.customer {
            query.push_str(&format!("&customer={customer}"));
        }
        if let Some(after) = &starting_after {
            query.push_str(&format!("&starting_after={after}"));
        }
        let page = ask(&address, &admin_key, &query, "sync")?;
        for (total, field) in totals.iter_mut().zip(["applied", "ignored", "unprocessed", "unmatched"]) {
            *total += page[field].as_u64().unwrap_or(0);
        }
        customers.extend(page["customers"].as_array().cloned().unwrap_or_default());
        let done = customers.len() as u64;
        let has_more = page["has_more"].as_bool().unwrap_or(false);
        progress.update(done, if has_more { done + u64::from(args.page_size) } else { done });
        starting_after = page["next_starting_after"].as_str().map(str::to_owned);
        if !has_more || starting_after.is_none() {
            break;
        }
    }
    progress.finish();
    let [applied, ignored, unprocessed, unmatched] = totals;
    match args.format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::json!({"customers": customers, "applied": applied, "ignored": ignored,
                "unprocessed": unprocessed, "unmatched": unmatched})
        ),
        OutputFormat::Table => {
            println!(
                "synced {} customers: {applied} objects applied, {ignored} ignored, {unprocessed} not applied, {unmatched} customers unmatched",
                customers.len()
            );
            for customer in &customers {
                let reasons = customer["reasons"].as_array().cloned().unwrap_or_default();
                if customer["matched_by"].is_null() || !reasons.is_empty() {
                    let who = match customer["member_id"].as_str() {
                        Some(member_id) => format!("member {member_id}"),
                        None => format!("unmatched, email {}", customer["email"].as_str().unwrap_or("none")),
                    };
                    println!("  {} ({who})", customer["customer_id"].as_str().unwrap_or("?"));
                    for reason in reasons {
                        println!("    {}", reason.as_str().unwrap_or(""));
                    }
                }
            }
        }
    }
    Ok(())
}

fn replay(data_dir: &DataDir, args: ReplayArgs) -> Result<()> {
    if let Some(customer) = &args.customer {
        validate::identifier("customer", customer).map_err(|error| anyhow!("--customer: {error}"))?;
    }
    let (address, admin_key) = server(data_dir, args.admin_key, "replay")?;
    let mut path = "/v1/admin/stripe/replay".to_owned();
    if let Some(customer) = &args.customer {
        // An identifier needs no escaping in a query.
        path.push_str(&format!("?customer={customer}"));
    }
    let body = ask(&address, &admin_key, &path, "replay")?;
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

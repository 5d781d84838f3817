//! `tally-saas`: what the SaaS presets (issue 22) cost beside the plain
//! `rest` provider reading the same rows, in one run, and how fast the
//! Airtable pacer lets a base be read.
//!
//! 1. A loopback double answering, from answers rendered once: the same
//!    `--rows` records as a JSON array (for `rest`), as one Salesforce
//!    query batch (`attributes`, `done`; a client-credentials token
//!    endpoint first), as a Google Sheets ValueRange with a header row
//!    (API key), and as Airtable pages of 100 following `offset`.
//! 2. Each provider called directly in this process (no server: the HTTP
//!    layer's cost is `tally-exec`'s), `--runs` runs after a warm-up, the
//!    median and p95 wall time of a run beside `rest`'s on the same rows.
//! 3. Airtable, whose pages are paced 210 ms apart per base (its limit is 5
//!    requests a second): the time of a run of `--airtable-rows`, beside
//!    the pacing floor (pages − 1) × 210 ms.
//!
//! ```sh
//! cargo build --release -p tally-bench && target/release/tally-saas
//! target/release/tally-saas --smoke     # CI: one run each, checks every answer
//! ```

use anyhow::{Context, Result, ensure};
use clap::Parser;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Rows a run (Salesforce answers them in one batch: at most 2,000).
    #[arg(long, default_value_t = 2_000)]
    rows: usize,
    #[arg(long, default_value_t = 50)]
    runs: usize,
    /// Rows of the Airtable run (100 a page).
    #[arg(long, default_value_t = 1_000)]
    airtable_rows: usize,
    /// One run each, few rows; fails on any unexpected answer.
    #[arg(long)]
    smoke: bool,
}

/// The double's answers, by path (the query string is ignored but for
/// Airtable's `offset`).
struct Answers {
    rest: String,
    salesforce: String,
    sheets: String,
    /// Airtable's pages, the n-th at `offset=itr{n}`.
    airtable: Vec<String>,
}

fn record(index: usize) -> (String, String, f64, bool) {
    (format!("006D{index:014}"), format!("Opportunity {index:05}"), index as f64 * 12.5, index.is_multiple_of(3))
}

impl Answers {
    fn render(rows: usize, airtable_rows: usize) -> Answers {
        let rest: Vec<Value> = (0..rows)
            .map(|index| {
                let (id, name, amount, closed) = record(index);
                json!({"Id": id, "Name": name, "Amount": amount, "IsClosed": closed})
            })
            .collect();
        let salesforce: Vec<Value> = (0..rows)
            .map(|index| {
                let (id, name, amount, closed) = record(index);
                json!({"attributes": {"type": "Opportunity", "url": format!("/services/data/v66.0/sobjects/Opportunity/{id}")},
                    "Id": id, "Name": name, "Amount": amount, "IsClosed": closed})
            })
            .collect();
        let mut values = vec![json!(["Id", "Name", "Amount", "IsClosed"])];
        values.extend((0..rows).map(|index| {
            let (id, name, amount, closed) = record(index);
            json!([id, name, amount, closed])
        }));
        let airtable = (0..airtable_rows.div_ceil(100))
            .map(|page| {
                let records: Vec<Value> = (page * 100..((page + 1) * 100).min(airtable_rows))
                    .map(|index| {
                        let (id, name, amount, closed) = record(index);
                        json!({"id": format!("rec{index:014}"), "createdTime": "2026-01-02T03:04:05.000Z",
                            "fields": {"Id": id, "Name": name, "Amount": amount, "IsClosed": closed}})
                    })
                    .collect();
                let mut body = json!({"records": records});
                if (page + 1) * 100 < airtable_rows {
                    body["offset"] = json!(format!("itr{}", page + 1));
                }
                body.to_string()
            })
            .collect();
        Answers {
            rest: Value::Array(rest).to_string(),
            salesforce: json!({"totalSize": rows, "done": true, "records": salesforce}).to_string(),
            sheets: json!({"range": "Sheet1!A1:D", "majorDimension": "ROWS", "values": values}).to_string(),
            airtable,
        }
    }

    fn answer(&self, port: u16, target: &str) -> String {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        match path {
            "/rest/rows" => self.rest.clone(),
            "/services/oauth2/token" => {
                json!({"access_token": "00DBENCH!token", "instance_url": format!("http://127.0.0.1:{port}"),
                    "token_type": "Bearer", "issued_at": "1558553873237"})
                .to_string()
            }
            "/services/data/v66.0/query" => self.salesforce.clone(),
            path if path.starts_with("/v4/spreadsheets/") => self.sheets.clone(),
            path if path.starts_with("/v0/") => {
                let page = query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("offset=itr"))
                    .and_then(|page| page.parse::<usize>().ok())
                    .unwrap_or(0);
                self.airtable.get(page).cloned().unwrap_or_else(|| "{\"records\":[]}".into())
            }
            _ => "{}".into(),
        }
    }
}

/// Serves the answers on a loopback port, a thread a connection.
fn serve(answers: Arc<Answers>) -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let answers = answers.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("a socket clones"));
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let mut length = 0;
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                            break;
                        }
                        if let Some(value) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    let _ = reader.read_exact(&mut body);
                    let answer = answers.answer(port, &target);
                    // One write: head and body apart would wait on delayed ACKs.
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                         Sforce-Limit-Info: api-usage=10/15000\r\n\r\n{answer}",
                        answer.len()
                    );
                    if (&stream).write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

struct Case {
    provider: &'static str,
    config: Value,
    credential: Option<Value>,
    query: Value,
}

fn cases(port: u16, rows: usize, airtable_rows: usize) -> Vec<Case> {
    let base = format!("http://127.0.0.1:{port}");
    vec![
        Case {
            provider: "rest",
            config: json!({"base_url": base}),
            credential: None,
            query: json!({"kind": "request", "request": {"path": "/rest/rows"}, "max_rows": rows}),
        },
        Case {
            provider: "salesforce",
            config: json!({"login_url": base}),
            credential: Some(json!({"client_id": "bench", "client_secret": "bench-secret"})),
            query: json!({"kind": "soql", "soql": "SELECT Id, Name, Amount, IsClosed FROM Opportunity", "max_rows": rows}),
        },
        Case {
            provider: "google_sheets",
            config: json!({"api_base_url": base, "spreadsheet_id": "bench"}),
            credential: Some(json!({"api_key": "bench-key"})),
            query: json!({"kind": "range", "range": "Sheet1!A1:D", "header_row": true, "max_rows": rows}),
        },
        Case {
            provider: "airtable",
            config: json!({"base_url": format!("{base}/v0"), "base_id": "appBENCH"}),
            credential: Some(json!({"token": "patBENCH"})),
            query: json!({"kind": "records", "table": "Opportunities", "max_rows": airtable_rows}),
        },
    ]
}

/// One run of a case: its rows and wall time.
async fn run(case: &Case, http: &tally_integrations::http::GuardedHttp, key: &str) -> Result<(usize, Duration)> {
    let credential = case.credential.as_ref().map(|fields| secrecy::SecretString::from(fields.to_string()));
    let spec: tally_integrations::query::QuerySpec = serde_json::from_value(case.query.clone())?;
    let call = tally_integrations::Call {
        config: &case.config,
        credential: credential.as_ref(),
        credential_key: format!("bench/{key}/1"),
        limits: tally_integrations::Limits {
            timeout: Duration::from_secs(60),
            max_rows: spec.max_rows as usize,
            max_bytes: tally_integrations::provider::RESPONSE_BYTES_DEFAULT,
        },
        http,
    };
    let provider = tally_integrations::provider(case.provider).context("the provider is built in")?;
    let started = Instant::now();
    let rows = provider.run(&call, &spec, &serde_json::Map::new()).await.map_err(|error| anyhow::anyhow!("{error}"))?;
    Ok((rows.rows.len(), started.elapsed()))
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.smoke {
        (args.rows, args.runs, args.airtable_rows) = (50, 1, 250);
    }
    ensure!((1..=2_000).contains(&args.rows), "--rows is 1 to 2,000 (one Salesforce batch)");
    let port = serve(Arc::new(Answers::render(args.rows, args.airtable_rows)))?;
    use tally_integrations::guard::Guard;
    let guard = Guard::allow_list_only(Guard::parse_allow_list("127.0.0.1/32").map_err(anyhow::Error::msg)?);
    let http = tally_integrations::http::GuardedHttp::new(guard);
    let cases = cases(port, args.rows, args.airtable_rows);

    println!("tally-saas: {} rows a run, {} runs after a warm-up, providers called in-process", args.rows, args.runs);
    println!("{:<14} {:>10} {:>10} {:>10} {:>10}", "provider", "p50 ms", "p95 ms", "µs/row", "× rest");
    let mut rest_p50 = None;
    for case in cases.iter().filter(|case| case.provider != "airtable") {
        let (warm, _) = run(case, &http, case.provider).await?;
        ensure!(warm == args.rows, "{}: {warm} rows, not {}", case.provider, args.rows);
        let mut times = Vec::with_capacity(args.runs);
        for _ in 0..args.runs {
            let (rows, took) = run(case, &http, case.provider).await?;
            ensure!(rows == args.rows, "{}: {rows} rows", case.provider);
            times.push(took);
        }
        times.sort();
        let p50 = quantile(&times, 0.5);
        let rest = *rest_p50.get_or_insert(p50);
        println!(
            "{:<14} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
            case.provider,
            ms(p50),
            ms(quantile(&times, 0.95)),
            p50.as_secs_f64() * 1e6 / args.rows as f64,
            p50.as_secs_f64() / rest.as_secs_f64()
        );
    }

    let airtable = cases.iter().find(|case| case.provider == "airtable").context("airtable")?;
    let (rows, took) = run(airtable, &http, "airtable").await?;
    ensure!(rows == args.airtable_rows, "airtable: {rows} rows, not {}", args.airtable_rows);
    let pages = args.airtable_rows.div_ceil(100);
    let floor = tally_integrations::airtable::REQUEST_INTERVAL * (pages as u32 - 1);
    println!(
        "airtable: {rows} rows in {pages} pages took {:.0} ms; the pacing floor is {:.0} ms ({:.0} rows/s a base)",
        ms(took),
        ms(floor),
        rows as f64 / took.as_secs_f64()
    );
    ensure!(took >= floor, "the pacer let {pages} pages through faster than its floor");
    Ok(())
}

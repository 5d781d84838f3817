//! A fake Stripe API on loopback, for tally's outbound calls: the only mock
//! in the suite, at the edge of the network. It answers `POST /v1/customers`
//! and `POST /v1/subscriptions` with Stripe's own example objects
//! (`fixtures/stripe/openapi-fixtures3`), made consistent, and records every
//! request it saw. For `tally stripe sync` it holds an account (customers,
//! subscriptions, invoices the test gives it) and lists it as Stripe does:
//! `GET /v1/customers` a page at a time (`limit`, `starting_after`,
//! `has_more`), `GET /v1/subscriptions?customer=` (not ended),
//! `GET /v1/invoices?customer=&status=`, and each object by id; it can
//! answer a rate limit (429) first, as Stripe does under load.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub idempotency_key: Option<String>,
    /// The form-encoded body, decoded into pairs.
    pub form: Vec<(String, String)>,
}

impl Seen {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
    }
}

#[derive(Default)]
struct Shared {
    seen: Vec<Seen>,
    /// When set, subscription creation fails with this status and error.
    fail_subscriptions: Option<(u16, Value)>,
    customers: u32,
    subscriptions: u32,
    invoice_items: u32,
    account: Account,
    /// Answer this many list requests with 429 before serving them.
    rate_limits: u32,
}

/// The objects the account lists, in Stripe's JSON.
#[derive(Default, Clone)]
pub struct Account {
    pub customers: Vec<Value>,
    pub subscriptions: Vec<Value>,
    pub invoices: Vec<Value>,
}

pub struct FakeStripe {
    pub base: String,
    shared: Arc<Mutex<Shared>>,
}

impl FakeStripe {
    pub fn start() -> FakeStripe {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}/", listener.local_addr().expect("address"));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let state = shared.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = state.clone();
                std::thread::spawn(move || serve(stream, &state));
            }
        });
        FakeStripe { base, shared }
    }

    pub fn fail_subscriptions(&self, status: u16, error: Value) {
        self.shared.lock().unwrap().fail_subscriptions = Some((status, error));
    }

    pub fn set_account(&self, account: Account) {
        self.shared.lock().unwrap().account = account;
    }

    pub fn rate_limit_next(&self, requests: u32) {
        self.shared.lock().unwrap().rate_limits = requests;
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().unwrap().seen.clone()
    }
}

fn serve(stream: TcpStream, shared: &Mutex<Shared>) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
        let mut length = 0;
        let mut idempotency_key = None;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "idempotency-key" => idempotency_key = Some(value.trim().to_owned()),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).expect("body");
        let form = form_urlencoded::parse(&body).map(|(key, value)| (key.into_owned(), value.into_owned())).collect();
        let seen = Seen { method, path, idempotency_key, form };
        let (status, answer) = answer(&seen, &mut shared.lock().unwrap());
        shared.lock().unwrap().seen.push(seen);
        let text = answer.to_string();
        let mut writer = stream.try_clone().expect("clone");
        let response = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

pub fn fixture(name: &str) -> Value {
    let path = format!("{}/fixtures/stripe/openapi-fixtures3/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("fixture JSON")
}

/// A Stripe list object of `data`.
fn list(url: &str, data: Vec<Value>, has_more: bool) -> Value {
    json!({"object": "list", "data": data, "has_more": has_more, "url": url})
}

fn missing(what: &str, id: &str) -> (u16, Value) {
    let message = format!("No such {what}: '{id}'");
    (404, json!({"error": {"type": "invalid_request_error", "code": "resource_missing", "message": message}}))
}

/// The GETs of `tally stripe sync`.
fn read(path: &str, query: &[(String, String)], shared: &mut Shared) -> (u16, Value) {
    let param = |name: &str| query.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
    let of_customer = |object: &&Value| param("customer").is_none_or(|customer| object["customer"] == customer);
    let account = &shared.account;
    let by_id = |objects: &[Value], id: &str| objects.iter().find(|object| object["id"] == id).cloned();
    match path.trim_start_matches("/v1/").split_once('/') {
        None if path == "/v1/customers" => {
            let limit: usize = param("limit").and_then(|limit| limit.parse().ok()).unwrap_or(10);
            let start = match param("starting_after") {
                Some(after) => {
                    account.customers.iter().position(|customer| customer["id"] == after).map_or(0, |at| at + 1)
                }
                None => 0,
            };
            let page: Vec<Value> = account.customers.iter().skip(start).take(limit).cloned().collect();
            let has_more = start + page.len() < account.customers.len();
            (200, list("/v1/customers", page, has_more))
        }
        None if path == "/v1/subscriptions" => {
            let live = |subscription: &&Value| subscription["status"] != "canceled";
            let data = account.subscriptions.iter().filter(of_customer).filter(live).cloned().collect();
            (200, list("/v1/subscriptions", data, false))
        }
        None if path == "/v1/invoices" => {
            let of_status = |invoice: &&Value| param("status").is_none_or(|status| invoice["status"] == status);
            let data = account.invoices.iter().filter(of_customer).filter(of_status).cloned().collect();
            (200, list("/v1/invoices", data, false))
        }
        Some(("customers", id)) => by_id(&account.customers, id).map_or_else(|| missing("customer", id), |c| (200, c)),
        Some(("invoices", id)) => by_id(&account.invoices, id).map_or_else(|| missing("invoice", id), |i| (200, i)),
        _ => (404, json!({"error": {"type": "invalid_request_error", "message": "Unrecognized request URL"}})),
    }
}

fn answer(seen: &Seen, shared: &mut Shared) -> (u16, Value) {
    if seen.method == "GET" {
        if shared.rate_limits > 0 {
            shared.rate_limits -= 1;
            let error = json!({"error": {"type": "invalid_request_error", "code": "rate_limit",
                "message": "Too many requests hit the API too quickly."}});
            return (429, error);
        }
        let (path, query) = seen.path.split_once('?').unwrap_or((seen.path.as_str(), ""));
        let query: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(key, value)| (key.into_owned(), value.into_owned()))
            .collect();
        return read(path, &query, shared);
    }
    match (seen.method.as_str(), seen.path.as_str()) {
        ("POST", "/v1/customers") => {
            shared.customers += 1;
            let mut customer = fixture("customer");
            customer["id"] = json!(format!("cus_fake_{}", shared.customers));
            customer["metadata"] = json!({"tally_member_id": seen.field("metadata[tally_member_id]")});
            (200, customer)
        }
        ("POST", "/v1/subscriptions") => {
            if let Some((status, error)) = &shared.fail_subscriptions {
                return (*status, error.clone());
            }
            shared.subscriptions += 1;
            let id = format!("sub_fake_{}", shared.subscriptions);
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
            let mut subscription = fixture("subscription");
            subscription["id"] = json!(id);
            subscription["customer"] = json!(seen.field("customer"));
            subscription["status"] = json!("active");
            subscription["cancel_at_period_end"] = json!(false);
            for field in ["cancel_at", "canceled_at", "ended_at", "trial_start", "trial_end"] {
                subscription[field] = Value::Null;
            }
            subscription["metadata"] = json!({"tally_member_id": seen.field("metadata[tally_member_id]")});
            let item = &mut subscription["items"]["data"][0];
            item["subscription"] = json!(id);
            item["price"]["id"] = json!(seen.field("items[0][price]"));
            item["current_period_start"] = json!(now);
            item["current_period_end"] = json!(now + 30 * 86_400);
            (200, subscription)
        }
        ("POST", "/v1/invoiceitems") => {
            shared.invoice_items += 1;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
            let amount: i64 = seen.field("amount").and_then(|amount| amount.parse().ok()).unwrap_or(0);
            let item = json!({
                "id": format!("ii_fake_{}", shared.invoice_items), "object": "invoiceitem",
                "amount": amount, "currency": seen.field("currency"), "customer": seen.field("customer"),
                "customer_account": null, "date": now, "description": seen.field("description"),
                "discountable": true, "discounts": null, "frozen_fields": null, "invoice": null,
                "invoicing_rules": null, "livemode": false, "metadata": {}, "net_amount": amount, "parent": null,
                "period": {"start": now, "end": now}, "pricing": null, "proration": false,
                "proration_details": null, "quantity": 1, "quantity_decimal": "1", "tax_rates": null, "test_clock": null
            });
            (200, item)
        }
        _ => (404, json!({"error": {"type": "invalid_request_error", "message": "Unrecognized request URL"}})),
    }
}

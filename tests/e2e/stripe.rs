//! Stripe through the real binary: signed webhooks (every fixture, every
//! signature failure), a subscription's whole life driven by Stripe events
//! built from the fixtures' shapes with consistent values, redelivery and
//! shuffled delivery, and outbound creation against a fake Stripe server.

use crate::fake_stripe::FakeStripe;
use crate::support::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use tempfile::TempDir;

const SECRET: &str = "whsec_e2e_test_secret";

fn stripe_server(clock: Option<&str>, extra_env: &[(&str, &str)]) -> Server {
    let mut env = vec![("TALLY_STRIPE_WEBHOOK_SECRET", SECRET)];
    env.extend_from_slice(extra_env);
    let args: Vec<&str> = match clock {
        Some(start) => vec!["--test-clock", "--start", start],
        None => Vec::new(),
    };
    Server::start_with_env(TempDir::new().unwrap(), &args, &env)
}

fn wall_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// POST raw bytes to the webhook with the given Stripe-Signature header.
fn post_raw(server: &Server, body: &[u8], signature: Option<&str>) -> (u16, Value) {
    let mut request = server.client.post(server.url("/v1/webhooks/stripe")).body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("Stripe-Signature", signature);
    }
    let response = request.send().expect("request");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

fn deliver_bytes(server: &Server, body: &[u8]) -> (u16, Value) {
    post_raw(server, body, Some(&tally_stripe::sign(body, SECRET, wall_now())))
}

fn deliver(server: &Server, event: &Value) -> (u16, Value) {
    deliver_bytes(server, event.to_string().as_bytes())
}

fn fixture_bytes(path: &str) -> Vec<u8> {
    std::fs::read(format!("{}/fixtures/stripe/{path}", env!("CARGO_MANIFEST_DIR"))).expect("fixture")
}

fn event_fixtures() -> Vec<String> {
    let mut files = Vec::new();
    for folder in ["composed", "genuine/stripe-dotnet", "genuine/supabase-stripe-sync-engine"] {
        let dir = format!("{}/fixtures/stripe/events/{folder}", env!("CARGO_MANIFEST_DIR"));
        for entry in std::fs::read_dir(dir).expect("fixture folder") {
            let name = entry.unwrap().file_name().into_string().unwrap();
            files.push(format!("events/{folder}/{name}"));
        }
    }
    files.sort();
    files
}

fn stripe_plan(plan_id: &str, price: i64, credits: i64, rollover: i64, price_id: &str) -> Value {
    let mut plan = plan(plan_id, price, credits, rollover, None);
    plan["stripe_price_id"] = json!(price_id);
    plan
}

// ---------------------------------------------------------------------------
// Signatures and fixtures
// ---------------------------------------------------------------------------

#[test]
fn every_signature_failure_is_a_400_with_its_reason_and_writes_nothing() {
    let server = stripe_server(None, &[]);
    let body = fixture_bytes("events/composed/invoice.paid.json");
    let head = server.head_position();
    let now = wall_now();
    let valid = tally_stripe::sign(&body, SECRET, now);
    let v1 = valid.split_once(",v1=").unwrap().1.to_owned();
    let cases: Vec<(Option<String>, &[u8], &str)> = vec![
        (None, &body, "missing_header"),
        (Some(String::new()), &body, "missing_header"),
        (Some("bad_header".into()), &body, "malformed_header"),
        (Some(format!("t=soon,v1={v1}")), &body, "malformed_header"),
        (Some(format!("t={now},v0={v1}")), &body, "no_v1_signature"),
        (Some(tally_stripe::sign(&body, "whsec_another_secret", now)), &body, "signature_mismatch"),
        (Some(valid.clone()), b"{\"id\":\"evt_tampered\"}", "signature_mismatch"),
        // A valid signature replayed after the tolerance: refused.
        (Some(tally_stripe::sign(&body, SECRET, now - 400)), &body, "timestamp_outside_tolerance"),
        (Some(tally_stripe::sign(&body, SECRET, now + 400)), &body, "timestamp_outside_tolerance"),
    ];
    for (header, payload, reason) in cases {
        let (status, problem) = post_raw(&server, payload, header.as_deref());
        assert_eq!((status, problem["code"].as_str()), (400, Some("invalid_signature")), "{header:?}: {problem}");
        assert_eq!(problem["reason"], reason, "{header:?}: {problem}");
    }
    assert_eq!(server.head_position(), head, "refused webhooks wrote nothing");
    // Rolled secret: the header carries a stale v1 first, then the good one.
    let rolled = format!("t={now},v1={},v1={v1}", "0".repeat(64));
    assert_eq!(post_raw(&server, &body, Some(&rolled)).0, 200);
    let (_, metrics) = (0, server.client.get(server.url("/metrics")).send().unwrap().text().unwrap());
    assert!(
        metrics.contains(
            "tally_stripe_webhooks_total{api_version=\"none\",outcome=\"invalid_signature\",parsed_by=\"none\"} 9"
        ),
        "{metrics}"
    );
}

#[test]
fn webhooks_are_refused_until_a_secret_is_configured() {
    let server = Server::start(&[]);
    let body = fixture_bytes("events/composed/invoice.paid.json");
    let (status, problem) = post_raw(&server, &body, Some(&tally_stripe::sign(&body, SECRET, wall_now())));
    assert_eq!((status, problem["code"].as_str()), (404, Some("stripe_not_configured")), "{problem}");
    // Nor can it read from Stripe without a secret key; a bad page size is refused first.
    let (status, problem) = server.admin_post("/v1/admin/stripe/sync?limit=101", json!(null));
    assert_eq!((status, problem["field"].as_str()), (422, Some("limit")), "{problem}");
    let (status, problem) = server.admin_post("/v1/admin/stripe/sync", json!(null));
    assert_eq!((status, problem["code"].as_str()), (404, Some("stripe_not_configured")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("TALLY_STRIPE_SECRET_KEY"), "{problem}");
}

/// Every fixture, signed, to a real server: once with no member linked
/// (everything acknowledged and recorded as ignored or unprocessed), once
/// with every fixture customer linked and every fixture price in the
/// catalog (each applied, or refused with a clear 4xx). Never a 5xx.
#[test]
fn every_fixture_event_is_accepted_or_refused_with_a_clear_4xx() {
    let files = event_fixtures();
    assert_eq!(files.len(), 16);

    let unlinked = stripe_server(None, &[]);
    for file in &files {
        let (status, answer) = deliver_bytes(&unlinked, &fixture_bytes(file));
        assert_eq!(status, 200, "{file}: {answer}");
        assert!(matches!(answer["status"].as_str(), Some("ignored" | "unprocessed")), "{file}: {answer}");
    }
    // Recorded on the intake stream, once each, even when delivered again.
    let head = unlinked.head_position();
    for file in &files {
        let (status, answer) = deliver_bytes(&unlinked, &fixture_bytes(file));
        assert_eq!(status, 200, "{file}: {answer}");
    }
    assert_eq!(unlinked.head_position(), head, "redelivered fixtures wrote nothing");
    assert_eq!(head, 16);
    let (_, events) = unlinked.admin_get("/v1/events?limit=100");
    let types: Vec<&str> =
        events["events"].as_array().unwrap().iter().map(|event| event["event_type"].as_str().unwrap()).collect();
    assert!(types.iter().all(|kind| *kind == "StripeEventIgnored" || *kind == "StripeEventUnprocessed"), "{types:?}");

    let linked = stripe_server(None, &[]);
    assert_eq!(
        linked.admin_post("/v1/plans", stripe_plan("fixture", 2_000, 1_000, 0, "price_1PgafmB7WZ01zgkW6dKueIc5")).0,
        201
    );
    assert_eq!(
        linked.admin_post("/v1/plans", stripe_plan("supabase", 0, 100, 0, "price_1IDQm5JDPojXS6LNM31hxKzp")).0,
        201
    );
    let customers = [
        ("composed", "cus_QXg1o8vcGmoR32", "USD"),
        ("sb1", "cus_IhGfebO16cMIGN", "EUR"),
        ("sb2", "cus_J7Mkgr8mvbl1eK", "USD"),
        ("sb3", "cus_JsuO3bmrj0QlAw", "USD"),
        ("sb4", "cus_JVhbiWW9p3F6wq", "USD"),
    ];
    for (member, customer, currency) in customers {
        let body = json!({"stripe_customer_id": customer, "currency": currency});
        assert_eq!(linked.put(&format!("/v1/members/{member}"), ADMIN_KEY, &body).status(), 200);
    }
    let mut outcomes = BTreeMap::new();
    for file in &files {
        let head = linked.head_position();
        let (status, answer) = deliver_bytes(&linked, &fixture_bytes(file));
        assert!(status == 200 || (400..500).contains(&status), "{file}: {status} {answer}");
        if status != 200 {
            assert!(answer["code"].is_string() && answer["detail"].is_string(), "{file}: {answer}");
            assert_eq!(linked.head_position(), head, "{file}: a refusal wrote nothing");
        }
        let outcome = answer["status"].as_str().or(answer["code"].as_str()).unwrap().to_owned();
        outcomes.insert(file.rsplit('/').next().unwrap().to_owned(), outcome);
    }
    // The composed subscription has its period backwards (a fixture value):
    // refused for good, so acknowledged and kept for an operator. Its
    // invoices are recorded.
    assert_eq!(outcomes["customer.subscription.created.json"], "unprocessed");
    assert_eq!(outcomes["invoice.finalized.json"], "applied");
    assert_eq!(outcomes["invoice.paid.json"], "applied");
    // A pre-basil (2020-03-02) subscription, read by the fallback.
    assert_eq!(outcomes["subscription_created.json"], "unprocessed", "EUR member, USD plan: {outcomes:?}");
    assert_eq!(outcomes["invoice_paid.json"], "applied");
    assert_eq!(outcomes["customer_updated.json"], "ignored");
    let (status, invoices) = linked.admin_get("/v1/members/composed/invoices?min_position=1");
    assert_eq!(status, 200, "{invoices}");
    linked.sync("composed");
    let (_, invoices) = linked.admin_get("/v1/members/composed/invoices");
    let invoice = &invoices["invoices"][0];
    assert_eq!((invoice["total"].as_i64(), invoice["status"].as_str()), (Some(1_000), Some("paid")), "{invoices}");

    // The metrics say which reader understood each event, and its API version:
    // an endpoint pinned to 2020-03-02 shows as read by the fallback.
    let metrics = linked.client.get(linked.url("/metrics")).send().unwrap().text().unwrap();
    let counted = |labels: &str| -> u64 {
        metrics
            .lines()
            .filter(|line| line.starts_with("tally_stripe_webhooks_total{") && line.contains(labels))
            .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert!(counted("api_version=\"2020-03-02\"") >= 1, "{metrics}");
    assert!(counted("parsed_by=\"fallback\"") >= 1, "{metrics}");
    assert!(counted("parsed_by=\"typed\"") >= 1, "{metrics}");
    let by_reader =
        counted("parsed_by=\"typed\"") + counted("parsed_by=\"fallback\"") + counted("parsed_by=\"unreadable\"");
    assert_eq!(by_reader, files.len() as u64, "one count per delivery: {metrics}");
}

// ---------------------------------------------------------------------------
// A subscription's life through Stripe
// ---------------------------------------------------------------------------

fn at(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text).unwrap().timestamp()
}

const P1: (&str, &str) = ("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z");
const P2: (&str, &str) = ("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z");

fn composed(name: &str) -> Value {
    serde_json::from_slice(&fixture_bytes(&format!("events/composed/{name}.json"))).unwrap()
}

struct Sub {
    status: &'static str,
    price: &'static str,
    period: (&'static str, &'static str),
    cancel_at_period_end: bool,
}

/// A subscription event in the composed fixture's shape, with consistent values.
fn subscription_event(id: &str, event_type: &str, created: &str, sub: Sub) -> Value {
    let mut event = composed("customer.subscription.created");
    event["id"] = json!(id);
    event["type"] = json!(event_type);
    event["created"] = json!(at(created));
    let object = &mut event["data"]["object"];
    object["id"] = json!("sub_life");
    object["customer"] = json!("cus_life");
    object["status"] = json!(sub.status);
    object["cancel_at_period_end"] = json!(sub.cancel_at_period_end);
    object["cancel_at"] = if sub.cancel_at_period_end { json!(at(sub.period.1)) } else { Value::Null };
    let ended = sub.status == "canceled";
    object["canceled_at"] = if ended { json!(at(created)) } else { Value::Null };
    object["ended_at"] = object["canceled_at"].clone();
    object["latest_invoice"] = Value::Null;
    let item = &mut object["items"]["data"][0];
    item["subscription"] = json!("sub_life");
    item["price"]["id"] = json!(sub.price);
    item["current_period_start"] = json!(at(sub.period.0));
    item["current_period_end"] = json!(at(sub.period.1));
    event
}

/// An invoice event in the composed fixture's shape, for the subscription.
struct Bill {
    invoice: &'static str,
    reason: &'static str,
    price: &'static str,
    amount: i64,
    period: (&'static str, &'static str),
}

fn invoice_event(id: &str, event_type: &str, created: &str, bill: Bill) -> Value {
    let Bill { invoice, reason, price, amount, period } = bill;
    let mut event = composed("invoice.paid");
    event["id"] = json!(id);
    event["type"] = json!(event_type);
    event["created"] = json!(at(created));
    let paid = event_type == "invoice.paid";
    let object = &mut event["data"]["object"];
    object["id"] = json!(invoice);
    object["customer"] = json!("cus_life");
    object["status"] = json!(if paid { "paid" } else { "open" });
    object["billing_reason"] = json!(reason);
    for field in ["total", "subtotal", "amount_due"] {
        object[field] = json!(amount);
    }
    object["amount_paid"] = json!(if paid { amount } else { 0 });
    object["amount_remaining"] = json!(if paid { 0 } else { amount });
    object["parent"] = json!({"type": "subscription_details", "quote_details": null,
        "subscription_details": {"metadata": null, "subscription": "sub_life"}});
    let line = &mut object["lines"]["data"][0];
    line["amount"] = json!(amount);
    line["subtotal"] = json!(amount);
    line["description"] = json!(format!("1 × {price}"));
    line["period"] = json!({"start": at(period.0), "end": at(period.1)});
    line["pricing"] = json!({"type": "price_details", "unit_amount_decimal": null,
        "price_details": {"price": price, "product": "prod_life"}});
    line["parent"] = json!({"type": "subscription_item_details", "invoice_item_details": null,
        "subscription_item_details": {"invoice_item": null, "proration": false, "proration_details": {"credited_items": null},
            "subscription": "sub_life", "subscription_item": "si_life"}});
    event
}

/// The life: created on basic, first invoice paid, an upgrade to plus, a
/// cancel at period end scheduled and taken back, the cycle invoice's
/// payment failing (past due), then paid (active again).
fn lifecycle() -> Vec<Value> {
    let active = |price, period| Sub { status: "active", price, period, cancel_at_period_end: false };
    let first =
        || Bill { invoice: "in_l1", reason: "subscription_create", price: "price_basic", amount: 1_000, period: P1 };
    let cycle =
        || Bill { invoice: "in_l2", reason: "subscription_cycle", price: "price_plus", amount: 2_000, period: P2 };
    vec![
        subscription_event(
            "evt_l01",
            "customer.subscription.created",
            "2026-01-01T00:00:10Z",
            active("price_basic", P1),
        ),
        invoice_event("evt_l02", "invoice.finalized", "2026-01-01T00:00:20Z", first()),
        invoice_event("evt_l03", "invoice.paid", "2026-01-01T00:00:30Z", first()),
        subscription_event(
            "evt_l04",
            "customer.subscription.updated",
            "2026-01-15T00:00:00Z",
            active("price_plus", P1),
        ),
        subscription_event(
            "evt_l05",
            "customer.subscription.updated",
            "2026-01-20T00:00:00Z",
            Sub { cancel_at_period_end: true, ..active("price_plus", P1) },
        ),
        subscription_event(
            "evt_l06",
            "customer.subscription.updated",
            "2026-01-25T00:00:00Z",
            active("price_plus", P1),
        ),
        invoice_event("evt_l07", "invoice.finalized", "2026-02-01T00:00:10Z", cycle()),
        invoice_event("evt_l08", "invoice.payment_failed", "2026-02-01T00:00:20Z", cycle()),
        subscription_event(
            "evt_l09",
            "customer.subscription.updated",
            "2026-02-01T00:00:30Z",
            Sub { status: "past_due", ..active("price_plus", P2) },
        ),
        invoice_event("evt_l10", "invoice.paid", "2026-02-03T00:00:00Z", cycle()),
        subscription_event(
            "evt_l11",
            "customer.subscription.updated",
            "2026-02-03T00:00:10Z",
            active("price_plus", P2),
        ),
    ]
}

fn life_server() -> Server {
    let server = stripe_server(Some("2026-01-01T00:00:00Z"), &[]);
    assert_eq!(server.admin_post("/v1/plans", stripe_plan("basic", 1_000, 1_000, 500, "price_basic")).0, 201);
    assert_eq!(server.admin_post("/v1/plans", stripe_plan("plus", 2_000, 3_000, 1_000, "price_plus")).0, 201);
    let response = server.put("/v1/members/life", ADMIN_KEY, &json!({"stripe_customer_id": "cus_life"}));
    assert_eq!(response.status(), 200);
    server
}

/// Each event delivered three times, in order or reversed: every delivery
/// applied (the first) or answered from its record.
fn deliver_three_times_each(server: &Server, mut events: Vec<Value>, reversed: bool) {
    if reversed {
        events.reverse();
    }
    for event in &events {
        for _ in 0..3 {
            let (status, answer) = deliver(server, event);
            assert_eq!((status, answer["status"].as_str()), (200, Some("applied")), "{}: {answer}", event["id"]);
        }
    }
}

fn set_clock(server: &Server, instant: &str) {
    let (status, answer) = server.admin_post("/v1/admin/clock", json!({"now": instant}));
    assert_eq!(status, 200, "{answer}");
}

fn created_of(event: &Value) -> String {
    chrono::DateTime::from_timestamp(event["created"].as_i64().unwrap(), 0).unwrap().to_rfc3339()
}

/// What a reader sees of the member: subscription, balance, invoices.
fn books(server: &Server) -> Value {
    server.sync("life");
    let (_, subscription) = server.admin_get("/v1/members/life/subscription");
    let (_, mut balance) = server.admin_get("/v1/members/life/balance");
    // Where the last change sits in the log depends on how many events got there.
    balance.as_object_mut().unwrap().remove("last_position");
    let (_, invoices) = server.admin_get("/v1/members/life/invoices");
    // tally numbers Stripe's invoices in arrival order: compare by Stripe's id.
    let mut invoices: Vec<Value> = invoices["invoices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|invoice| json!([invoice["stripe_invoice_id"], invoice["status"], invoice["total"]]))
        .collect();
    invoices.sort_by_key(|invoice| invoice.to_string());
    json!({
        "subscription": [subscription["status"], subscription["plan_id"], subscription["billing"],
            subscription["period_start"], subscription["period_end"], subscription["cancel_at_period_end"],
            subscription["stripe_subscription_id"]],
        "balance": balance,
        "invoices": invoices,
    })
}

/// Deliver the life in order, each event at its own instant on tally's
/// clock, each `deliveries` times; usage spends 300 credits on Jan 10.
fn live_through(server: &Server, deliveries: usize) {
    for event in lifecycle() {
        let created = created_of(&event);
        if created.as_str() >= "2026-01-10" && event["id"] == "evt_l04" {
            set_clock(server, "2026-01-10T00:00:00Z");
            let (status, used) = server
                .admin_post("/v1/members/life/usage", json!({"usage_id": "u1", "metric": "calls", "credits": 300}));
            assert_eq!(status, 201, "{used}");
        }
        set_clock(server, &created);
        for delivery in 0..deliveries {
            let (status, answer) = deliver(server, &event);
            assert_eq!((status, answer["status"].as_str()), (200, Some("applied")), "{}: {answer}", event["id"]);
            assert_eq!(answer["replayed"], delivery > 0, "{answer}");
        }
    }
}

#[test]
fn a_subscriptions_life_through_stripe_events() {
    let server = life_server();
    live_through(&server, 1);
    let books = books(&server);
    // Plus, active again in February's period, both invoices paid.
    assert_eq!(
        books["subscription"],
        json!(["active", "plus", "stripe", "2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z", false, "sub_life"]),
        "{books}"
    );
    assert_eq!(books["invoices"], json!([["in_l1", "paid", 1_000], ["in_l2", "paid", 2_000]]), "{books}");
    // January: 1,000 allocated (the paid create invoice), 300 spent, the
    // upgrade from Stripe grants nothing (Stripe prorates). At February's
    // close 700 roll over (plus's cap 1,000); February's paid cycle invoice
    // allocates plus's 3,000.
    assert_eq!(books["balance"]["available"], 3_700, "{books}");

    // Stripe ends it: the period closes now and allocation and rollover lapse.
    set_clock(&server, "2026-02-20T00:00:00Z");
    let deleted = subscription_event(
        "evt_l12",
        "customer.subscription.deleted",
        "2026-02-20T00:00:00Z",
        Sub { status: "canceled", price: "price_plus", period: P2, cancel_at_period_end: false },
    );
    let (status, answer) = deliver(&server, &deleted);
    assert_eq!((status, answer["status"].as_str()), (200, Some("applied")), "{answer}");
    let types: Vec<&str> =
        answer["events"].as_array().unwrap().iter().map(|event| event["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        ["StripeEventApplied", "CreditsExpired", "CreditsExpired", "SubscriptionPeriodClosed", "SubscriptionCanceled"]
    );
    let books_after = self::books(&server);
    assert_eq!(books_after["subscription"][0], "canceled");
    assert_eq!(books_after["balance"]["available"], 0);

    // The member's log names the Stripe event behind each change.
    let applied: Vec<String> = server
        .events_of_type("StripeEventApplied")
        .iter()
        .map(|payload| payload["stripe_event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(applied.len(), 12, "{applied:?}");
    assert_eq!((applied[0].as_str(), applied[11].as_str()), ("evt_l01", "evt_l12"));
}

#[test]
fn every_event_delivered_three_times_leaves_the_same_books_as_once() {
    let once = life_server();
    live_through(&once, 1);
    let thrice = life_server();
    live_through(&thrice, 3);
    assert_eq!(books(&once), books(&thrice));
    assert_eq!(once.head_position(), thrice.head_position(), "redeliveries appended nothing");
}

/// A tiny seeded shuffle (xorshift), so the orders are reproducible.
fn shuffled<T>(mut items: Vec<T>, mut seed: u64) -> Vec<T> {
    for index in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        items.swap(index, (seed % (index as u64 + 1)) as usize);
    }
    items
}

#[test]
fn shuffled_delivery_reaches_the_same_books_as_in_order() {
    // Everything arrives late, at one instant after the last event, as after
    // an outage: in order, then in three shuffled orders (plus reversed).
    let deliver_all = |events: Vec<Value>| {
        let server = life_server();
        set_clock(&server, "2026-02-03T01:00:00Z");
        for event in events {
            let (status, answer) = deliver(&server, &event);
            assert_eq!(status, 200, "{}: {answer}", event["id"]);
        }
        books(&server)
    };
    let expected = deliver_all(lifecycle());
    assert_eq!(expected["subscription"][0], "active", "{expected}");
    assert_eq!(expected["balance"]["available"], 3_000, "February's allocation only: {expected}");
    let mut reversed = lifecycle();
    reversed.reverse();
    assert_eq!(deliver_all(reversed), expected, "reversed");
    for seed in [7, 1_234, 987_654_321] {
        let order = shuffled(lifecycle(), seed);
        let ids: Vec<String> = order.iter().map(|event| event["id"].as_str().unwrap().to_owned()).collect();
        assert_eq!(deliver_all(order), expected, "order {ids:?}");
    }
}

#[test]
fn an_event_ignored_before_the_link_applies_when_sent_again_and_an_unknown_price_is_retried() {
    let server = stripe_server(Some("2026-01-01T00:00:00Z"), &[]);
    assert_eq!(server.admin_post("/v1/plans", stripe_plan("basic", 1_000, 1_000, 500, "price_basic")).0, 201);
    let created = subscription_event(
        "evt_early",
        "customer.subscription.created",
        "2026-01-01T00:00:10Z",
        Sub { status: "active", price: "price_basic", period: P1, cancel_at_period_end: false },
    );
    assert_eq!(deliver(&server, &created).1["status"], "ignored");
    assert_eq!(deliver(&server, &created).1["status"], "ignored", "still unlinked: the same record");
    assert_eq!(server.put("/v1/members/life", ADMIN_KEY, &json!({"stripe_customer_id": "cus_life"})).status(), 200);
    let (status, answer) = deliver(&server, &created);
    assert_eq!((status, answer["status"].as_str()), (200, Some("applied")), "{answer}");

    // A price no plan has: 422, so Stripe retries; after the catalog knows
    // it, the retry goes through.
    let upgrade = subscription_event(
        "evt_gold",
        "customer.subscription.updated",
        "2026-01-02T00:00:00Z",
        Sub { status: "active", price: "price_gold", period: P1, cancel_at_period_end: false },
    );
    let (status, problem) = deliver(&server, &upgrade);
    assert_eq!((status, problem["field"].as_str()), (422, Some("stripe_price_id")), "{problem}");
    assert_eq!(server.admin_post("/v1/plans", stripe_plan("gold", 5_000, 9_000, 0, "price_gold")).0, 201);
    let (status, answer) = deliver(&server, &upgrade);
    assert_eq!((status, answer["status"].as_str()), (200, Some("applied")), "{answer}");
    server.sync("life");
    assert_eq!(server.admin_get("/v1/members/life/subscription").1["plan_id"], "gold");

    // The member moves to another Stripe customer: the old one links to nothing.
    let moved = json!({"stripe_customer_id": "cus_elsewhere"});
    assert_eq!(server.put("/v1/members/life", ADMIN_KEY, &moved).status(), 200);
    let mut late = upgrade.clone();
    late["id"] = json!("evt_after_move");
    let (status, answer) = deliver(&server, &late);
    assert_eq!((status, answer["status"].as_str()), (200, Some("ignored")), "{answer}");
}

/// Events of a customer linked to no member are kept; once the customer is
/// linked, a replay for it applies them in Stripe's order, exactly once,
/// without Stripe sending them again.
#[test]
fn events_ignored_before_a_customer_is_linked_are_replayed_for_it_in_stripes_order() {
    let server = stripe_server(Some("2026-01-01T00:00:00Z"), &[]);
    assert_eq!(server.admin_post("/v1/plans", stripe_plan("basic", 1_000, 1_000, 500, "price_basic")).0, 201);
    let active = Sub { status: "active", price: "price_basic", period: P1, cancel_at_period_end: false };
    let created = subscription_event("evt_c1", "customer.subscription.created", "2026-01-01T00:00:10Z", active);
    let bill =
        Bill { invoice: "in_r1", reason: "subscription_create", price: "price_basic", amount: 1_000, period: P1 };
    let paid = invoice_event("evt_p1", "invoice.paid", "2026-01-01T00:00:20Z", bill);
    // Delivered out of order and twice, before the link: ignored, kept.
    let before = server.head_position();
    for event in [&paid, &created, &paid] {
        assert_eq!(deliver(&server, event).1["status"], "ignored");
    }
    let head = server.head_position();
    assert_eq!(head, before + 2, "one intake record per event");

    let replay = |query: &str| server.admin_post(&format!("/v1/admin/stripe/replay{query}"), json!({}));
    let (status, report) = replay("?customer=cus_life");
    assert_eq!((status, report["replayed"].as_u64(), report["ignored"].as_u64()), (200, Some(2), Some(2)), "{report}");
    assert_eq!(server.head_position(), head, "still unlinked: nothing new");

    assert_eq!(server.put("/v1/members/life", ADMIN_KEY, &json!({"stripe_customer_id": "cus_life"})).status(), 200);
    let (status, report) = replay("?customer=cus_life");
    assert_eq!((status, report["applied"].as_u64()), (200, Some(2)), "{report}");
    server.sync("life");
    let (_, subscription) = server.admin_get("/v1/members/life/subscription");
    assert_eq!((subscription["status"].as_str(), subscription["plan_id"].as_str()), (Some("active"), Some("basic")));
    let (_, balance) = server.admin_get("/v1/members/life/balance");
    assert_eq!(balance["available"], 1_000, "the paid invoice, applied after the subscription, allocated: {balance}");
    // In Stripe's order, not the order they arrived in.
    let applied: Vec<String> = server
        .events_of_type("StripeEventApplied")
        .iter()
        .map(|payload| payload["stripe_event_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(applied, ["evt_c1", "evt_p1"]);

    // Again: exactly once.
    let head = server.head_position();
    let (_, report) = replay("?customer=cus_life");
    assert_eq!(report["applied"], 2, "answered from their records: {report}");
    assert_eq!(server.head_position(), head, "a second replay writes nothing");
    let (status, problem) = replay("?customer=not%20an%20id");
    assert_eq!((status, problem["field"].as_str()), (422, Some("customer")), "{problem}");

    // The same through the CLI, which asks the running server.
    let cli = |args: &[&str], key: Option<&str>| {
        let mut command = std::process::Command::new(tally_binary());
        command.arg("--data-dir").arg(server.data_dir.path()).args(args).env_remove("TALLY_ADMIN_KEY");
        if let Some(key) = key {
            command.env("TALLY_ADMIN_KEY", key);
        }
        let output = command.output().expect("tally runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = cli(&["stripe", "replay", "--customer", "cus_life"], Some(ADMIN_KEY));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "replayed 2 events of cus_life: 2 applied, 0 ignored, 0 still unprocessed, 0 refused");
    assert_eq!(server.head_position(), head, "the CLI's replay wrote nothing either");
    let (code, _, stderr) = cli(&["stripe", "replay", "--customer", "cus_life"], None);
    assert_eq!(code, Some(1), "no key: {stderr}");
    assert!(stderr.contains("TALLY_ADMIN_KEY"), "{stderr}");
    let (code, _, stderr) = cli(&["stripe", "replay", "--customer", "bad id"], Some(ADMIN_KEY));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--customer"), "{stderr}");
}

#[test]
fn a_checkout_with_tally_metadata_buys_credits() {
    let server = life_server();
    let mut event: Value =
        serde_json::from_slice(&fixture_bytes("events/composed/checkout.session.completed.json")).unwrap();
    event["id"] = json!("evt_checkout");
    let session = &mut event["data"]["object"];
    session["customer"] = json!("cus_life");
    session["payment_status"] = json!("paid");
    session["status"] = json!("complete");
    session["amount_total"] = json!(4_900);
    session["currency"] = json!("usd");
    session["metadata"] = json!({"tally_purchase_credits": "5000"});
    let (status, answer) = deliver(&server, &event);
    assert_eq!((status, answer["status"].as_str()), (200, Some("applied")), "{answer}");
    let (_, balance) = server.admin_get(&format!("/v1/members/life/balance?min_position={}", answer["position"]));
    assert_eq!(balance["available"], 5_000);
    // Unpaid (Stripe's own fixture value): acknowledged, ignored.
    event["id"] = json!("evt_checkout_unpaid");
    event["data"]["object"]["payment_status"] = json!("unpaid");
    assert_eq!(deliver(&server, &event).1["status"], "ignored");
}

/// Fidelity: a subscription with several items follows the one priced by a
/// catalog plan (two such: kept for an operator, with the reason), and one
/// Stripe ended is canceled at Stripe's instant, not tally's clock.
#[test]
fn subscriptions_follow_the_catalog_item_and_end_when_stripe_says() {
    let server = life_server();
    let active = || Sub { status: "active", price: "price_basic", period: P1, cancel_at_period_end: false };
    let mut created = subscription_event("evt_c", "customer.subscription.created", P1.0, active());
    let items = created["data"]["object"]["items"]["data"].as_array_mut().unwrap();
    let mut addon = items[0].clone();
    addon["id"] = json!("si_addon");
    addon["price"]["id"] = json!("price_seats_addon");
    items.insert(0, addon);
    for _ in 0..3 {
        assert_eq!(deliver(&server, &created).1["status"], "applied");
    }
    server.sync("life");
    assert_eq!(server.admin_get("/v1/members/life/subscription").1["plan_id"], "basic");
    // Its first invoice bills the add-on first: the plan's line brings the credits.
    let bill =
        Bill { invoice: "in_addon", reason: "subscription_create", price: "price_basic", amount: 1_000, period: P1 };
    let mut paid = invoice_event("evt_i", "invoice.paid", P1.0, bill);
    let lines = paid["data"]["object"]["lines"]["data"].as_array_mut().unwrap();
    let mut addon_line = lines[0].clone();
    addon_line["id"] = json!("il_addon");
    addon_line["amount"] = json!(300);
    addon_line["pricing"]["price_details"]["price"] = json!("price_seats_addon");
    lines.insert(0, addon_line);
    paid["data"]["object"]["total"] = json!(1_300);
    let (status, answer) = deliver(&server, &paid);
    assert_eq!((status, answer["status"].as_str()), (200, Some("applied")), "{answer}");
    server.sync("life");
    assert_eq!(server.admin_get("/v1/members/life/balance").1["available"], 1_000, "the basic plan's credits");

    // A second catalog price on the same subscription: refused for good, kept with the reason.
    let mut both = subscription_event("evt_both", "customer.subscription.updated", "2026-01-02T00:00:00Z", active());
    let items = both["data"]["object"]["items"]["data"].as_array_mut().unwrap();
    let mut plus = items[0].clone();
    plus["id"] = json!("si_plus");
    plus["price"]["id"] = json!("price_plus");
    items.push(plus);
    let (status, answer) = deliver(&server, &both);
    assert_eq!((status, answer["status"].as_str()), (200, Some("unprocessed")), "{answer}");
    assert!(answer["reason"].as_str().unwrap().contains("several items"), "{answer}");

    // Asked to end at the period's end; then Stripe ends it on Jan 9 (say an
    // operator ended it early) and says so on Jan 9; tally's clock reads
    // Jan 20 when it arrives.
    let scheduled = subscription_event(
        "evt_s",
        "customer.subscription.updated",
        "2026-01-03T00:00:00Z",
        Sub { cancel_at_period_end: true, ..active() },
    );
    assert_eq!(deliver(&server, &scheduled).1["status"], "applied");
    set_clock(&server, "2026-01-20T00:00:00Z");
    let ended_at = "2026-01-09T12:00:00Z";
    let mut deleted = subscription_event(
        "evt_d",
        "customer.subscription.deleted",
        ended_at,
        Sub { status: "canceled", cancel_at_period_end: true, ..active() },
    );
    deleted["data"]["object"]["ended_at"] = json!(at(ended_at));
    deleted["data"]["object"]["canceled_at"] = json!(at("2026-01-05T00:00:00Z"));
    assert_eq!(deliver(&server, &deleted).1["status"], "applied");
    server.sync("life");
    let (_, subscription) = server.admin_get("/v1/members/life/subscription");
    assert_eq!(subscription["status"], "canceled", "{subscription}");
    assert_eq!(subscription["canceled_at"], ended_at, "Stripe's ended_at: {subscription}");
    // It ended before its period's end, so not "at period end as asked".
    assert_eq!(subscription["cancel_at_period_end"], false, "{subscription}");
    assert_eq!(subscription["cancel_at"], Value::Null, "{subscription}");
}

/// A failed payment of an invoice is its history, in whatever order it is
/// delivered beside the invoice's payment: the same invoice (paid, one
/// failure) and the same subscription status either way.
#[test]
fn a_failure_delivered_after_the_payment_is_history_and_the_books_do_not_depend_on_order() {
    let mut seen = Vec::new();
    for reversed in [false, true] {
        let server = life_server();
        let started = subscription_event(
            "evt_s",
            "customer.subscription.created",
            P1.0,
            Sub { status: "active", price: "price_basic", period: P1, cancel_at_period_end: false },
        );
        assert_eq!(deliver(&server, &started).1["status"], "applied");
        let bill = || Bill {
            invoice: "in_first",
            reason: "subscription_create",
            price: "price_basic",
            amount: 1_000,
            period: P1,
        };
        let failed = invoice_event("evt_failed", "invoice.payment_failed", "2026-01-01T00:00:00Z", bill());
        let paid = invoice_event("evt_paid", "invoice.paid", "2026-01-01T01:00:00Z", bill());
        let order = if reversed { vec![&paid, &failed] } else { vec![&failed, &paid] };
        for event in order {
            for _ in 0..3 {
                let (status, answer) = deliver(&server, event);
                assert_eq!((status, answer["status"].as_str()), (200, Some("applied")), "{answer}");
            }
        }
        let books = books(&server);
        let (_, invoices) = server.admin_get("/v1/members/life/invoices");
        let invoice = &invoices["invoices"][0];
        assert_eq!(invoice["status"], "paid", "reversed {reversed}: {invoice}");
        assert_eq!(invoice["payment_failures"], 1, "reversed {reversed}: {invoice}");
        assert!(invoice["last_payment_failure"].is_string(), "{invoice}");
        assert_eq!(books["subscription"][0], "active", "reversed {reversed}: {books}");
        seen.push((books, invoice["payment_failures"].clone()));
    }
    assert_eq!(seen[0], seen[1], "the same books in both orders");
}

/// Stripe invoices voided or marked uncollectible: mirrored onto tally's
/// record of them, three deliveries each, in either order, in the current
/// shape and a 2020-03-02 account's.
#[test]
fn voided_and_uncollectible_stripe_invoices_mirror_in_any_order_and_shape() {
    let bill = |invoice| Bill { invoice, reason: "manual", price: "price_basic", amount: 700, period: P1 };
    let current = |id: &str, event_type: &str, invoice: &'static str| {
        invoice_event(id, event_type, "2026-01-01T00:00:00Z", bill(invoice))
    };
    let old_shape = |id: &str, event_type: &str, invoice: &str| {
        let mut event: Value =
            serde_json::from_slice(&fixture_bytes("events/genuine/supabase-stripe-sync-engine/invoice_paid.json"))
                .unwrap();
        event["id"] = json!(id);
        event["type"] = json!(event_type);
        event["data"]["object"]["id"] = json!(invoice);
        event["data"]["object"]["customer"] = json!("cus_life");
        let object = &mut event["data"]["object"];
        object["billing_reason"] = json!("manual");
        object["status"] = json!("open");
        // A zero total is issued already paid: give it something to owe.
        for field in ["total", "subtotal", "amount_due", "amount_remaining"] {
            object[field] = json!(700);
        }
        object["amount_paid"] = json!(0);
        object["lines"]["data"][0]["amount"] = json!(700);
        event
    };
    let mut all_books = Vec::new();
    for shape in ["current", "2020-03-02"] {
        for reversed in [false, true] {
            let server = life_server();
            let make = |id: &str, event_type: &str, invoice: &'static str| match shape {
                "current" => current(id, event_type, invoice),
                _ => old_shape(id, event_type, invoice),
            };
            let events = vec![
                make("evt_v1", "invoice.finalized", "in_void"),
                make("evt_v2", "invoice.voided", "in_void"),
                make("evt_u1", "invoice.finalized", "in_bad"),
                make("evt_u2", "invoice.marked_uncollectible", "in_bad"),
            ];
            deliver_three_times_each(&server, events, reversed);
            let books = books(&server);
            let statuses: Vec<&Value> =
                books["invoices"].as_array().unwrap().iter().map(|invoice| &invoice[1]).collect();
            assert_eq!(statuses, [&json!("uncollectible"), &json!("void")], "{shape}, reversed {reversed}: {books}");
            all_books.push(json!({"shape": shape, "books": books["invoices"]}));
        }
    }
    // The same statuses in both orders of each shape (totals differ between shapes).
    assert_eq!(all_books[0], all_books[1]);
    assert_eq!(all_books[2], all_books[3]);
}

/// A checkout session of `life`'s customer buying 5,000 credits, in the
/// shape of `fixture` (the current API's, or a 2020-03-02 account's).
fn delayed_checkout(fixture: &str, event_id: &str, event_type: &str, session_id: &str, paid: bool) -> Value {
    let mut event: Value = serde_json::from_slice(&fixture_bytes(fixture)).unwrap();
    event["id"] = json!(event_id);
    event["type"] = json!(event_type);
    let session = &mut event["data"]["object"];
    session["id"] = json!(session_id);
    session["customer"] = json!("cus_life");
    session["payment_status"] = json!(if paid { "paid" } else { "unpaid" });
    session["status"] = json!("complete");
    session["amount_total"] = json!(4_900);
    session["currency"] = json!("usd");
    session["metadata"] = json!({"tally_purchase_credits": "5000"});
    event
}

#[test]
fn a_delayed_payment_grants_its_credits_once_when_it_succeeds_in_any_order_and_shape() {
    let shapes = [
        "events/composed/checkout.session.completed.json",
        "events/genuine/supabase-stripe-sync-engine/checkout_session_completed.json",
    ];
    let mut all_books = Vec::new();
    for fixture in shapes {
        for reversed in [false, true] {
            let server = life_server();
            let completed =
                delayed_checkout(fixture, "evt_completed", "checkout.session.completed", "cs_delayed", false);
            let succeeded = delayed_checkout(
                fixture,
                "evt_succeeded",
                "checkout.session.async_payment_succeeded",
                "cs_delayed",
                true,
            );
            let (status, pending) = deliver(&server, &completed);
            assert_eq!((status, pending["status"].as_str()), (200, Some("ignored")), "{fixture}: {pending}");
            server.sync("life");
            assert_eq!(server.admin_get("/v1/members/life/balance").1["available"], 0, "nothing before the payment");
            // And a paid `completed` for the same session (as if paid at once): never a second grant.
            let paid_at_once = delayed_checkout(fixture, "evt_paid", "checkout.session.completed", "cs_delayed", true);
            let order = if reversed {
                vec![paid_at_once, succeeded, completed]
            } else {
                vec![completed, succeeded, paid_at_once]
            };
            for event in &order {
                for _ in 0..3 {
                    let (status, answer) = deliver(&server, event);
                    assert_eq!(status, 200, "{fixture} {}: {answer}", event["id"]);
                }
            }
            let books = books(&server);
            assert_eq!(books["balance"]["available"], 5_000, "{fixture}, reversed {reversed}: {books}");
            all_books.push(books);

            // A failed delayed payment of another session: recorded once, nothing granted.
            let failed =
                delayed_checkout(fixture, "evt_failed", "checkout.session.async_payment_failed", "cs_failed", false);
            for _ in 0..3 {
                let (status, answer) = deliver(&server, &failed);
                assert_eq!((status, answer["status"].as_str()), (200, Some("applied")), "{fixture}: {answer}");
            }
            server.sync("life");
            assert_eq!(server.admin_get("/v1/members/life/balance").1["available"], 5_000);
            let failures = server.events_of_type("CheckoutPaymentFailed");
            assert_eq!(failures.len(), 1, "{fixture}: {failures:?}");
            assert_eq!(failures[0]["stripe_checkout_session_id"], "cs_failed");
            assert_eq!(failures[0]["credits"], 5_000);
        }
    }
    assert!(
        all_books.windows(2).all(|pair| pair[0] == pair[1]),
        "the same books in every order and shape: {all_books:?}"
    );
}

// ---------------------------------------------------------------------------
// Outbound
// ---------------------------------------------------------------------------

#[test]
fn a_stripe_billed_subscription_is_created_through_a_fake_stripe_and_errors_change_nothing() {
    let fake = FakeStripe::start();
    let server =
        stripe_server(None, &[("TALLY_STRIPE_SECRET_KEY", "sk_test_fake"), ("TALLY_STRIPE_API_BASE", &fake.base)]);
    assert_eq!(server.admin_post("/v1/plans", stripe_plan("basic", 1_000, 1_000, 0, "price_basic")).0, 201);
    assert_eq!(server.admin_post("/v1/plans", plan("local", 1_000, 1_000, 0, None)).0, 201);
    assert_eq!(server.put("/v1/members/m1", ADMIN_KEY, &json!({})).status(), 200);

    let body = json!({"plan_id": "basic", "billing": "stripe"});
    let response = server.post("/v1/members/m1/subscription", ADMIN_KEY, &body, Some("create-1"));
    let status = response.status().as_u16();
    let created: Value = response.json().unwrap();
    assert_eq!(status, 201, "{created}");
    let seen = fake.seen();
    assert_eq!(
        seen.iter().map(|request| request.path.as_str()).collect::<Vec<_>>(),
        ["/v1/customers", "/v1/subscriptions"]
    );
    assert_eq!(seen[0].field("metadata[tally_member_id]"), Some("m1"));
    assert_eq!(seen[1].field("customer"), Some("cus_fake_1"));
    assert_eq!(seen[1].field("items[0][price]"), Some("price_basic"));
    // Stripe idempotency keys derive from the request's (hashed with its scope).
    let keys: Vec<&str> = seen.iter().map(|request| request.idempotency_key.as_deref().unwrap()).collect();
    assert!(keys[0].starts_with("tally-customer-") && keys[1].starts_with("tally-subscription-"), "{keys:?}");
    server.sync("m1");
    let (_, subscription) = server.admin_get("/v1/members/m1/subscription");
    assert_eq!(
        (
            subscription["billing"].as_str(),
            subscription["stripe_subscription_id"].as_str(),
            subscription["stripe_customer_id"].as_str()
        ),
        (Some("stripe"), Some("sub_fake_1"), Some("cus_fake_1")),
        "{subscription}"
    );
    // The retried request is answered from the idempotency record.
    let replay = server.post("/v1/members/m1/subscription", ADMIN_KEY, &body, Some("create-1"));
    assert_eq!(replay.status().as_u16(), 201);
    assert_eq!(replay.headers().get("Idempotent-Replayed").map(|value| value.to_str().unwrap()), Some("true"));

    // Stripe declines: a clear 502 problem, and the ledger is unchanged.
    fake.fail_subscriptions(
        402,
        json!({"error": {"type": "card_error", "code": "card_declined", "message": "Your card was declined."}}),
    );
    assert_eq!(server.put("/v1/members/m2", ADMIN_KEY, &json!({})).status(), 200);
    let head = server.head_position();
    let response = server.post("/v1/members/m2/subscription", ADMIN_KEY, &body, Some("create-2"));
    assert_eq!(response.status().as_u16(), 502);
    let problem: Value = response.json().unwrap();
    assert_eq!(problem["code"], "payment_provider_error", "{problem}");
    assert_eq!(
        (problem["provider_code"].as_str(), problem["provider_status"].as_u64()),
        (Some("card_declined"), Some(402)),
        "{problem}"
    );
    assert!(problem["detail"].as_str().unwrap().contains("Your card was declined."), "{problem}");
    assert_eq!(server.head_position(), head, "nothing was written");

    // A plan without a Stripe price cannot be billed by Stripe.
    let (status, problem) =
        server.admin_post("/v1/members/m2/subscription", json!({"plan_id": "local", "billing": "stripe"}));
    assert_eq!((status, problem["field"].as_str()), (422, Some("plan_id")), "{problem}");
}

/// A Stripe-managed member's overage goes to Stripe as an invoice item when
/// tally's clock closes the period, once, even across a restart.
#[test]
fn overage_of_a_stripe_managed_member_is_sent_to_stripe_once() {
    let fake = FakeStripe::start();
    let env = [
        ("TALLY_STRIPE_WEBHOOK_SECRET", SECRET),
        ("TALLY_STRIPE_SECRET_KEY", "sk_test_fake"),
        ("TALLY_STRIPE_API_BASE", fake.base.as_str()),
    ];
    let clock = ["--test-clock", "--start", "2026-01-01T00:00:00Z"];
    let server = Server::start_with_env(TempDir::new().unwrap(), &clock, &env);
    let mut metered = stripe_plan("metered", 1_000, 1_000, 0, "price_metered");
    metered["overage"] = json!({"allowed": true, "limit_credits": 5_000, "unit_price": 2});
    assert_eq!(server.admin_post("/v1/plans", metered).0, 201);
    assert_eq!(server.put("/v1/members/life", ADMIN_KEY, &json!({"stripe_customer_id": "cus_life"})).status(), 200);
    let active = Sub { status: "active", price: "price_metered", period: P1, cancel_at_period_end: false };
    let bill =
        Bill { invoice: "in_m1", reason: "subscription_create", price: "price_metered", amount: 1_000, period: P1 };
    for event in [
        subscription_event("evt_m1", "customer.subscription.created", "2026-01-01T00:00:10Z", active),
        invoice_event("evt_m2", "invoice.paid", "2026-01-01T00:00:20Z", bill),
    ] {
        assert_eq!(deliver(&server, &event).1["status"], "applied");
    }
    let (status, used) =
        server.admin_post("/v1/members/life/usage", json!({"usage_id": "big", "metric": "calls", "credits": 1_300}));
    assert_eq!(status, 201, "{used}");
    assert_eq!(used["balance"]["debt"], 300);
    assert!(fake.seen().is_empty(), "nothing is sent before the period closes");

    set_clock(&server, "2026-02-01T00:00:00Z");
    let items = |fake: &FakeStripe| -> Vec<crate::fake_stripe::Seen> {
        fake.seen().into_iter().filter(|seen| seen.path == "/v1/invoiceitems").collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while items(&fake).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let sent = items(&fake);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        (sent[0].field("customer"), sent[0].field("amount"), sent[0].field("currency")),
        (Some("cus_life"), Some("600"), Some("usd"))
    );
    assert!(sent[0].field("description").unwrap().contains("300 credits"), "{sent:?}");
    assert!(sent[0].idempotency_key.as_deref().unwrap().starts_with("tally-"));

    // A priced purchase granted through tally: on Stripe's invoice too, not tally's.
    let body = json!({"source": "purchase", "amount": 500, "price": 990});
    let (status, granted) = server.admin_post("/v1/members/life/credits/grants", body);
    assert_eq!(status, 201, "{granted}");
    let types: Vec<&str> =
        granted["events"].as_array().unwrap().iter().map(|event| event["type"].as_str().unwrap()).collect();
    assert!(!types.contains(&"InvoiceIssued"), "{types:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while items(&fake).len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let sent = items(&fake);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!((sent[1].field("amount"), sent[1].field("description")), (Some("990"), Some("Purchase of 500 credits")));

    // A restart does not send it again.
    let data_dir = server.terminate();
    let server = Server::start_with_env(data_dir, &clock, &env);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(items(&fake).len(), 2);
    drop(server);
}

/// A genuine event the ledger could not take is kept verbatim; after the
/// cause is fixed an operator replays it.
#[test]
fn an_operator_replays_unprocessed_events_after_fixing_their_cause() {
    let server = stripe_server(Some("2026-01-01T00:00:00Z"), &[]);
    assert_eq!(server.admin_post("/v1/plans", stripe_plan("basic", 1_000, 1_000, 500, "price_basic")).0, 201);
    let euro = json!({"stripe_customer_id": "cus_life", "currency": "EUR"});
    assert_eq!(server.put("/v1/members/life", ADMIN_KEY, &euro).status(), 200);
    let created = subscription_event(
        "evt_eur",
        "customer.subscription.created",
        "2026-01-01T00:00:10Z",
        Sub { status: "active", price: "price_basic", period: P1, cancel_at_period_end: false },
    );
    let (status, answer) = deliver(&server, &created);
    assert_eq!((status, answer["status"].as_str()), (200, Some("unprocessed")), "{answer}");
    assert!(answer["reason"].as_str().unwrap().contains("currency"), "{answer}");

    let (status, report) = server.admin_post("/v1/admin/stripe/replay", json!({}));
    assert_eq!(
        (status, report["replayed"].as_u64(), report["still_unprocessed"].as_u64()),
        (200, Some(1), Some(1)),
        "{report}"
    );
    assert_eq!(server.put("/v1/members/life", ADMIN_KEY, &json!({"currency": "USD"})).status(), 200);
    let (_, report) = server.admin_post("/v1/admin/stripe/replay", json!({}));
    assert_eq!((report["replayed"].as_u64(), report["applied"].as_u64()), (Some(1), Some(1)), "{report}");
    let head = server.head_position();
    let (_, again) = server.admin_post("/v1/admin/stripe/replay", json!({}));
    assert_eq!(again["applied"].as_u64(), Some(1), "{again}");
    assert_eq!(server.head_position(), head, "a second replay is answered from the record");
    server.sync("life");
    let (_, subscription) = server.admin_get("/v1/members/life/subscription");
    assert_eq!((subscription["plan_id"].as_str(), subscription["billing"].as_str()), (Some("basic"), Some("stripe")));
    // Only the admin replays.
    let (_, issued) = server.admin_post("/v1/members/life/api-keys", json!({}));
    let member_key = issued["secret"].as_str().unwrap();
    assert_eq!(server.post("/v1/admin/stripe/replay", member_key, &json!({}), None).status(), 403);
}

// ---------------------------------------------------------------------------
// Refunds
// ---------------------------------------------------------------------------

/// `charge.refunded` of the purchase `pi_refund` in the current shape
/// (Stripe's own charge fixture) or the 2020-03-02 one (the charge names its
/// invoice and embeds its refunds).
fn charge_refunded(event_id: &str, amount_refunded: i64, old_shape: bool) -> Value {
    let mut event = composed("invoice.paid");
    event["id"] = json!(event_id);
    event["type"] = json!("charge.refunded");
    let mut charge: Value = serde_json::from_slice(&fixture_bytes("openapi-fixtures3/charge.json")).unwrap();
    charge["amount"] = json!(4_900);
    charge["amount_captured"] = json!(4_900);
    charge["amount_refunded"] = json!(amount_refunded);
    charge["refunded"] = json!(amount_refunded == 4_900);
    charge["currency"] = json!("usd");
    charge["customer"] = json!("cus_life");
    charge["payment_intent"] = json!("pi_refund");
    if old_shape {
        event["api_version"] = json!("2020-03-02");
        charge["invoice"] = Value::Null;
        charge["refunds"] = json!({"object": "list", "data": [], "has_more": false, "total_count": 0,
            "url": "/v1/charges/ch_1/refunds"});
    }
    event["data"] = json!({"object": charge});
    event
}

fn refund_created(event_id: &str, refund_id: &str, amount: i64) -> Value {
    let mut event = composed("invoice.paid");
    event["id"] = json!(event_id);
    event["type"] = json!("refund.created");
    event["data"] = json!({"object": {"id": refund_id, "object": "refund", "amount": amount, "currency": "usd",
        "charge": "ch_1", "customer": "cus_life", "payment_intent": "pi_refund", "status": "succeeded",
        "created": 1767225600, "metadata": {}}});
    event
}

/// The books' own identities (DESIGN.md §3), read from the balance.
fn assert_conservation(balance: &Value) {
    let n = |field: &str| balance[field].as_i64().unwrap_or_else(|| panic!("{field} in {balance}"));
    assert_eq!(
        n("granted") + n("debt_incurred"),
        n("used") + n("debited") + n("expired") + n("available") + n("held"),
        "conservation: {balance}"
    );
    assert_eq!(n("balance"), n("available") + n("held") - n("debt"), "{balance}");
    assert_eq!(n("debt"), n("debt_incurred") - n("debt_reduced") - n("debt_billed"), "{balance}");
}

/// A purchase of 5,000 credits for 49.00, half spent, refunded in three
/// steps (a partial refund by id, the charge at half, the charge in full):
/// the unspent half comes back out of the grant, the spent half becomes
/// debt or is written off as the operator says. Every event delivered three
/// times, in order or reversed, in both shapes: the same books.
#[test]
fn a_refund_of_a_half_spent_purchase_takes_credits_back_under_either_setting() {
    for (spent, debt) in [("debt", 2_500), ("write_off", 0)] {
        let mut all_books = Vec::new();
        for old_shape in [false, true] {
            for reversed in [false, true] {
                let server = stripe_server(Some("2026-01-01T00:00:00Z"), &[("TALLY_STRIPE_REFUND_SPENT", spent)]);
                let response = server.put("/v1/members/life", ADMIN_KEY, &json!({"stripe_customer_id": "cus_life"}));
                assert_eq!(response.status(), 200);
                let mut purchase = delayed_checkout(
                    "events/composed/checkout.session.completed.json",
                    "evt_buy",
                    "checkout.session.completed",
                    "cs_refund",
                    true,
                );
                purchase["data"]["object"]["payment_intent"] = json!("pi_refund");
                assert_eq!(deliver(&server, &purchase).1["status"], "applied");
                let (status, used) = server.admin_post(
                    "/v1/members/life/usage",
                    json!({"usage_id": "u1", "metric": "calls", "credits": 2_500}),
                );
                assert_eq!(status, 201, "{used}");
                let refunds = vec![
                    refund_created("evt_re1", "re_1", 1_000),
                    charge_refunded("evt_ch1", 2_450, old_shape),
                    charge_refunded("evt_ch2", 4_900, old_shape),
                ];
                deliver_three_times_each(&server, refunds, reversed);
                let books = books(&server);
                let balance = &books["balance"];
                assert_eq!(
                    (balance["available"].as_i64(), balance["debt"].as_i64(), balance["balance"].as_i64()),
                    (Some(0), Some(debt), Some(-debt)),
                    "{spent}, old shape {old_shape}, reversed {reversed}: {books}"
                );
                assert_conservation(balance);
                let (_, transactions) = server.admin_get("/v1/members/life/transactions?limit=100");
                let taken_back: i64 = transactions["transactions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|row| row["type"] == "stripe_refund")
                    .map(|row| row["credits"].as_i64().unwrap())
                    .sum();
                assert_eq!(taken_back, 5_000, "the whole purchase is taken back, once: {transactions}");
                // Refunded in three steps or in one: the rows differ, the books not.
                let mut books = books;
                books["balance"].as_object_mut().unwrap().remove("transactions");
                all_books.push(books);
            }
        }
        assert!(all_books.windows(2).all(|pair| pair[0] == pair[1]), "{spent}: {all_books:?}");
    }
}

/// A credit note refunding half of a paid subscription invoice: recorded on
/// tally's record of the invoice, credits untouched by default, the
/// allocation's refunded share taken back when the operator says so.
#[test]
fn an_invoice_refund_is_recorded_on_the_invoice_and_takes_credits_only_when_set() {
    for (setting, available) in [("false", 1_000), ("true", 500)] {
        let server =
            stripe_server(Some("2026-01-01T00:00:00Z"), &[("TALLY_STRIPE_REFUND_SUBSCRIPTION_CREDITS", setting)]);
        assert_eq!(server.admin_post("/v1/plans", stripe_plan("basic", 1_000, 1_000, 500, "price_basic")).0, 201);
        let response = server.put("/v1/members/life", ADMIN_KEY, &json!({"stripe_customer_id": "cus_life"}));
        assert_eq!(response.status(), 200);
        let events = [
            subscription_event(
                "evt_s1",
                "customer.subscription.created",
                "2026-01-01T00:00:00Z",
                Sub { status: "active", price: "price_basic", period: P1, cancel_at_period_end: false },
            ),
            invoice_event(
                "evt_i1",
                "invoice.paid",
                "2026-01-01T00:00:01Z",
                Bill {
                    invoice: "in_1",
                    reason: "subscription_create",
                    price: "price_basic",
                    amount: 1_000,
                    period: P1,
                },
            ),
        ];
        for event in &events {
            assert_eq!(deliver(&server, event).1["status"], "applied");
        }
        let mut note = composed("invoice.paid");
        note["id"] = json!("evt_cn1");
        note["type"] = json!("credit_note.created");
        note["data"] = json!({"object": {"id": "cn_1", "object": "credit_note", "amount": 500, "currency": "usd",
            "customer": "cus_life", "invoice": "in_1", "refunds": [{"refund": "re_9", "amount_refunded": 500}],
            "out_of_band_amount": null, "status": "issued", "type": "post_payment"}});
        for _ in 0..3 {
            let (status, answer) = deliver(&server, &note);
            assert_eq!((status, answer["status"].as_str()), (200, Some("applied")), "{answer}");
        }
        let books = books(&server);
        assert_eq!(books["balance"]["available"], available, "take back {setting}: {books}");
        assert_conservation(&books["balance"]);
        let (_, invoices) = server.admin_get("/v1/members/life/invoices");
        let invoice = &invoices["invoices"][0];
        assert_eq!(
            (invoice["stripe_invoice_id"].as_str(), invoice["refunded_amount"].as_i64()),
            (Some("in_1"), Some(500))
        );
    }
}

// ---------------------------------------------------------------------------
// Backfill
// ---------------------------------------------------------------------------

/// `tally stripe sync` against the fake Stripe: four customers in two pages
/// (after one rate-limited answer): one linked before, one naming its
/// member in metadata (linked by the sync), one naming no member that
/// exists and one naming none (both reported, with the email, not guessed).
/// Their live subscriptions, the paid current invoice and an open invoice
/// are applied as the webhooks would; a second run writes nothing.
#[test]
fn sync_backfills_an_existing_account_page_by_page_and_a_second_run_writes_nothing() {
    let fake = FakeStripe::start();
    let server = stripe_server(
        Some("2026-01-15T00:00:00Z"),
        &[("TALLY_STRIPE_SECRET_KEY", "sk_test_fake"), ("TALLY_STRIPE_API_BASE", &fake.base)],
    );
    assert_eq!(server.admin_post("/v1/plans", stripe_plan("basic", 1_000, 1_000, 500, "price_basic")).0, 201);
    assert_eq!(server.put("/v1/members/m_linked", ADMIN_KEY, &json!({"stripe_customer_id": "cus_a"})).status(), 200);
    assert_eq!(server.put("/v1/members/m_named", ADMIN_KEY, &json!({})).status(), 200);

    let customer = |id: &str, email: &str, member: Option<&str>| {
        let mut customer = crate::fake_stripe::fixture("customer");
        customer["id"] = json!(id);
        customer["email"] = json!(email);
        customer["metadata"] = member.map_or(json!({}), |member| json!({"tally_member_id": member}));
        customer
    };
    let subscription = |id: &str, customer: &str, latest_invoice: Value| {
        let active = Sub { status: "active", price: "price_basic", period: P1, cancel_at_period_end: false };
        let mut object =
            subscription_event("unused", "customer.subscription.created", P1.0, active)["data"]["object"].clone();
        object["id"] = json!(id);
        object["customer"] = json!(customer);
        object["metadata"] = json!({});
        object["latest_invoice"] = latest_invoice;
        object["items"]["data"][0]["subscription"] = json!(id);
        object
    };
    let invoice = |bill: Bill, event_type: &str, customer: &str, subscription: &str| {
        let mut object = invoice_event("unused", event_type, P1.0, bill)["data"]["object"].clone();
        object["customer"] = json!(customer);
        object["parent"]["subscription_details"]["subscription"] = json!(subscription);
        object["lines"]["data"][0]["parent"]["subscription_item_details"]["subscription"] = json!(subscription);
        object
    };
    let first =
        Bill { invoice: "in_a", reason: "subscription_create", price: "price_basic", amount: 1_000, period: P1 };
    let extra = Bill { invoice: "in_b2", reason: "manual", price: "price_basic", amount: 500, period: P1 };
    fake.set_account(crate::fake_stripe::Account {
        customers: vec![
            customer("cus_a", "a@example.com", None),
            customer("cus_b", "b@example.com", Some("m_named")),
            customer("cus_c", "c@example.com", Some("ghost")),
            customer("cus_d", "d@example.com", None),
        ],
        subscriptions: vec![subscription("sub_a", "cus_a", json!("in_a")), subscription("sub_b", "cus_b", Value::Null)],
        invoices: vec![
            invoice(first, "invoice.paid", "cus_a", "sub_a"),
            invoice(extra, "invoice.finalized", "cus_b", "sub_b"),
        ],
    });
    fake.rate_limit_next(1);

    let cli = |args: &[&str]| {
        let output = std::process::Command::new(tally_binary())
            .arg("--data-dir")
            .arg(server.data_dir.path())
            .args(["stripe", "sync"])
            .args(args)
            .env("TALLY_ADMIN_KEY", ADMIN_KEY)
            .output()
            .expect("tally runs");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(0), "{stderr}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let report: Value = serde_json::from_str(&cli(&["--page-size", "2", "--format", "json"])).unwrap();
    assert_eq!(
        (
            &report["applied"],
            &report["unmatched"],
            &report["unprocessed"],
            report["customers"].as_array().map(Vec::len)
        ),
        (&json!(4), &json!(2), &json!(0), Some(4)),
        "{report}"
    );
    let customers = report["customers"].as_array().unwrap();
    assert_eq!(customers[0]["matched_by"], "customer_id");
    assert_eq!((&customers[1]["matched_by"], &customers[1]["member_id"]), (&json!("metadata"), &json!("m_named")));
    assert_eq!(customers[2]["email"], "c@example.com");
    assert!(customers[2]["reasons"][0].as_str().unwrap().contains("ghost"), "{}", customers[2]);
    assert_eq!((&customers[3]["member_id"], &customers[3]["email"]), (&Value::Null, &json!("d@example.com")));
    let pages: Vec<String> =
        fake.seen().into_iter().map(|seen| seen.path).filter(|path| path.starts_with("/v1/customers?")).collect();
    assert_eq!(pages.len(), 3, "one rate-limited answer, then two pages: {pages:?}");
    assert!(pages[2].contains("starting_after=cus_b"), "{pages:?}");

    // The books, as the webhooks would have made them.
    server.sync("m_linked");
    let (_, balance) = server.admin_get("/v1/members/m_linked/balance");
    assert_eq!(balance["available"], 1_000, "the paid current period's credits: {balance}");
    let (_, subscription) = server.admin_get("/v1/members/m_linked/subscription");
    assert_eq!((&subscription["status"], &subscription["plan_id"]), (&json!("active"), &json!("basic")));
    server.sync("m_named");
    let (_, subscription) = server.admin_get("/v1/members/m_named/subscription");
    assert_eq!(subscription["stripe_subscription_id"], "sub_b", "{subscription}");
    let (_, invoices) = server.admin_get("/v1/members/m_named/invoices");
    let open: Vec<&Value> = invoices["invoices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|invoice| invoice["stripe_invoice_id"] == "in_b2")
        .collect();
    assert_eq!(open.len(), 1, "{invoices}");
    assert_eq!(open[0]["status"], "open");
    let (_, feed) = server.admin_get("/v1/events?after=0&limit=1000");
    let linked = feed["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|event| event["stream_id"] == "member-m_named" && event["payload"]["stripe_customer_id"] == "cus_b");
    assert!(linked, "the sync linked m_named to cus_b");

    // Again: nothing new is written; one customer, in the table form.
    let head = server.head_position();
    let again: Value = serde_json::from_str(&cli(&["--page-size", "2", "--format", "json"])).unwrap();
    assert_eq!(again["applied"], 4, "answered from their records: {again}");
    assert_eq!(server.head_position(), head, "a second sync writes nothing");
    let table = cli(&["--customer", "cus_d"]);
    assert!(table.contains("synced 1 customers") && table.contains("unmatched, email d@example.com"), "{table}");
}

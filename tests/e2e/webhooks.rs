//! Outbound webhook signatures (DESIGN.md §11) checked by an implementation
//! that is not tally's: the Standard Webhooks reference library for Python
//! (`standardwebhooks` from PyPI, pinned in tests/servers/requirements.txt
//! and installed by .ci/test-servers), as a receiver would run it.

use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};
use tally_notify::signature::{Secret, sign};

/// Runs the reference verifier on each case: `[{secret, id, timestamp,
/// signature, body}]` → one `true`/`false` a case.
fn reference_verdicts(cases: &Value) -> Vec<bool> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-venv/bin/python");
    let script = r#"
import json, sys
from standardwebhooks import Webhook
verdicts = []
for case in json.load(sys.stdin):
    headers = {"webhook-id": case["id"], "webhook-timestamp": str(case["timestamp"]),
               "webhook-signature": case["signature"]}
    try:
        Webhook(case["secret"]).verify(case["body"].encode(), headers)
        verdicts.append(True)
    except Exception:
        verdicts.append(False)
print(json.dumps(verdicts))
"#;
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{python} (bash .ci/test-servers installs it): {error}"));
    child.stdin.take().unwrap().write_all(cases.to_string().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "the reference verifier failed");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn signatures_verify_with_the_standard_webhooks_reference_library() {
    let (old, new) = (Secret::generate(), Secret::generate());
    let now = chrono::Utc::now().timestamp();
    let body = r#"{"type":"usage.recorded","id":"evt_1","created_at":"2026-12-06T06:00:00Z","data":{"credits":25}}"#;
    let alone = sign(&[&old], "msg_1", now, body.as_bytes());
    // A rotation: both secrets sign, and each alone verifies.
    let both = sign(&[&new, &old], "msg_2", now, body.as_bytes());
    let case = |secret: &Secret, id: &str, timestamp: i64, signature: &str, body: &str| {
        json!({"secret": secret.expose().as_str(), "id": id, "timestamp": timestamp, "signature": signature,
            "body": body})
    };
    let cases = json!([
        case(&old, "msg_1", now, &alone, body),
        case(&old, "msg_2", now, &both, body),
        case(&new, "msg_2", now, &both, body),
        // What the reference must refuse: another secret, a changed body,
        // id or timestamp.
        case(&new, "msg_1", now, &alone, body),
        case(&old, "msg_1", now, &alone, &body.replace("25", "26")),
        case(&old, "msg_9", now, &alone, body),
        case(&old, "msg_1", now + 1, &alone, body),
    ]);
    assert_eq!(reference_verdicts(&cases), [true, true, true, false, false, false, false]);
}

// ---------------------------------------------------------------------------
// Deliveries through the real binary, to a receiver on loopback
// ---------------------------------------------------------------------------

use crate::support::*;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VAULT_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

/// How the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Status(u16),
    /// Closes the connection without answering.
    Close,
    /// 302 to another path.
    Redirect,
}

#[derive(Clone, Debug)]
struct Received {
    id: String,
    timestamp: i64,
    signature: String,
    body: String,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// A webhook receiver on 127.0.0.1 that records every request whole.
struct Receiver {
    port: u16,
    answer: Arc<Mutex<Answer>>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let answer = Arc::new(Mutex::new(Answer::Status(200)));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (answering, recording) = (answer.clone(), received.clone());
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    continue;
                }
                let mut headers = std::collections::HashMap::new();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':') {
                        headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
                    }
                }
                let length: usize = headers.get("content-length").and_then(|value| value.parse().ok()).unwrap_or(0);
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                recording.lock().unwrap().push(Received {
                    id: headers.get("webhook-id").cloned().unwrap_or_default(),
                    timestamp: headers.get("webhook-timestamp").and_then(|value| value.parse().ok()).unwrap_or(0),
                    signature: headers.get("webhook-signature").cloned().unwrap_or_default(),
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                let reply = match *answering.lock().unwrap() {
                    Answer::Close => continue,
                    Answer::Redirect => {
                        "HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_owned()
                    }
                    Answer::Status(status) => format!(
                        "HTTP/1.1 {status} Whatever\r\nContent-Type: text/plain\r\nContent-Length: 8\r\nConnection: close\r\n\r\nreceived"
                    ),
                };
                let _ = stream.write_all(reply.as_bytes());
            }
        });
        Receiver { port, answer, received }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn answer(&self, answer: Answer) {
        *self.answer.lock().unwrap() = answer;
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `done` holds of what arrived, 20 s at most.
    fn until(&self, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let received = self.received();
            if done(&received) {
                return received;
            }
            assert!(Instant::now() < deadline, "the receiver never got there: {received:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn webhook_server(data_dir: tempfile::TempDir) -> Server {
    Server::start_with_env(
        data_dir,
        &["--test-clock", "--start", "2026-03-01T00:00:00Z", "--allow-private-targets", "127.0.0.1/32"],
        &[("TALLY_VAULT_KEY", VAULT_KEY), ("TALLY_OUTBOUND", "allow-list")],
    )
}

fn usage(server: &Server, id: &str) {
    let (status, body) =
        server.admin_post("/v1/members/acme/usage", json!({"usage_id": id, "metric": "api_calls", "credits": 1}));
    assert_eq!(status, 201, "{body}");
}

fn usage_ids(received: &[Received]) -> Vec<String> {
    received
        .iter()
        .map(Received::json)
        .filter(|body| body["type"] == "usage.recorded")
        .map(|body| body["data"]["usage_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The reference library's verdict on each delivery with `secret`.
fn verdicts(received: &[Received], secret: &str) -> Vec<bool> {
    let cases: Vec<Value> = received
        .iter()
        .map(|delivery| {
            json!({"secret": secret, "id": delivery.id, "timestamp": delivery.timestamp,
                "signature": delivery.signature, "body": delivery.body})
        })
        .collect();
    reference_verdicts(&Value::from(cases))
}

fn create_endpoint(server: &Server, url: &str, event_types: Value) -> Value {
    let response = server.post(
        "/v1/members/acme/webhook-endpoints",
        ADMIN_KEY,
        &json!({"url": url, "event_types": event_types}),
        None,
    );
    assert_eq!(response.status().as_u16(), 201);
    response.json().unwrap()
}

#[test]
fn deliveries_are_signed_in_order_and_verify_through_a_rotation() {
    let receiver = Receiver::start();
    let server = webhook_server(tempfile::TempDir::new().unwrap());
    server.admin_post("/v1/members/acme/credits/grants", json!({"source": "promotional", "amount": 1000}));

    // Refusals name their field and write nothing.
    let head = server.head_position();
    for (body, field) in [
        (json!({"url": "http://hooks.example.com/tally"}), "url"),
        // Loopback, but off the allow-list (127.0.0.1/32): refused, never reached.
        (json!({"url": "https://127.0.0.2/tally"}), "url"),
        (json!({"url": receiver.url(), "event_types": ["usage.recorded", "usage.deleted"]}), "event_types[1]"),
        (json!({"url": receiver.url(), "event_types": []}), "event_types"),
    ] {
        let response = server.post("/v1/members/acme/webhook-endpoints", ADMIN_KEY, &body, None);
        assert_eq!(response.status().as_u16(), 422, "{body}");
        let problem: Value = response.json().unwrap();
        assert_eq!(problem["field"], field, "{problem}");
    }
    assert_eq!(server.head_position(), head);

    let endpoint = create_endpoint(&server, &receiver.url(), json!(["usage.recorded"]));
    let endpoint_id = endpoint["endpoint_id"].as_str().unwrap().to_owned();
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{endpoint}");
    let (_, shown) = server.admin_get(&format!("/v1/members/acme/webhook-endpoints/{endpoint_id}"));
    assert!(shown.get("secret").is_none(), "the secret is shown once: {shown}");
    let (_, listed) = server.admin_get("/v1/members/acme/webhook-endpoints");
    assert!(!listed.to_string().contains(&secret));

    for index in 1..=5 {
        usage(&server, &format!("u{index}"));
    }
    let received = receiver.until(|received| received.len() >= 5);
    assert_eq!(usage_ids(&received), ["u1", "u2", "u3", "u4", "u5"], "the log's order");
    assert!(verdicts(&received, &secret).iter().all(|ok| *ok), "the reference verifies every delivery");
    let body = received[0].json();
    assert_eq!(body["id"].as_str(), Some(received[0].id.as_str()));
    assert_eq!(body["data"]["member_id"], "acme");
    assert!(body["created_at"].is_string());

    // A rotation: both secrets sign for 24 h.
    let rotated: Value = server
        .post(&format!("/v1/members/acme/webhook-endpoints/{endpoint_id}/rotate-secret"), ADMIN_KEY, &json!({}), None)
        .json()
        .unwrap();
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, secret);
    assert_eq!(rotated["previous_secret_expires_at"], "2026-03-02T00:00:00Z");
    usage(&server, "u6");
    let received = receiver.until(|received| received.len() >= 6);
    let last = &received[5..];
    assert_eq!(verdicts(last, &secret), [true], "the old secret still verifies");
    assert_eq!(verdicts(last, &new_secret), [true], "and the new one");
    assert_eq!(last[0].signature.split(' ').count(), 2);

    // The delivery log, and a test delivery.
    let (status, log) = server.admin_get(&format!("/v1/members/acme/webhook-endpoints/{endpoint_id}/deliveries"));
    assert_eq!(status, 200, "{log}");
    let deliveries = log["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 6);
    assert!(deliveries.iter().all(|delivery| delivery["state"] == "delivered"
        && delivery["attempt_log"][0]["status"] == 200
        && delivery["attempt_log"][0]["response"] == "received"));
    let test: Value = server
        .post(&format!("/v1/members/acme/webhook-endpoints/{endpoint_id}/test"), ADMIN_KEY, &json!({}), None)
        .json()
        .unwrap();
    let received = receiver.until(|received| received.len() >= 7);
    assert_eq!(received[6].id, test["delivery_id"].as_str().unwrap());
    assert_eq!(received[6].json()["type"], "webhook.test");
    assert_eq!(verdicts(&received[6..], &new_secret), [true]);
}

#[test]
fn failures_retry_on_schedule_redirects_are_not_followed_and_a_410_turns_the_endpoint_off() {
    let receiver = Receiver::start();
    let server = webhook_server(tempfile::TempDir::new().unwrap());
    server.admin_post("/v1/members/acme/credits/grants", json!({"source": "promotional", "amount": 1000}));
    let endpoint = create_endpoint(&server, &receiver.url(), json!(["usage.recorded"]));
    let endpoint_id = endpoint["endpoint_id"].as_str().unwrap().to_owned();
    let deliveries = |server: &Server| -> Vec<Value> {
        let (_, log) = server.admin_get(&format!("/v1/members/acme/webhook-endpoints/{endpoint_id}/deliveries"));
        log["deliveries"].as_array().unwrap().clone()
    };

    // 500: tried at once and again at once, then not before 5 s (± a tenth).
    receiver.answer(Answer::Status(500));
    usage(&server, "u1");
    receiver.until(|received| received.len() >= 2);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(receiver.received().len(), 2, "the clock stands still: no third attempt");
    let first = deliveries(&server);
    assert_eq!(first[0]["attempts"], 2);
    assert_eq!(first[0]["attempt_log"][1]["status"], 500);
    let next = chrono::DateTime::parse_from_rfc3339(first[0]["next_attempt_at"].as_str().unwrap()).unwrap();
    let start = chrono::DateTime::parse_from_rfc3339("2026-03-01T00:00:00Z").unwrap();
    let wait = (next - start).num_milliseconds();
    assert!((4_500..=5_500).contains(&wait), "the retry waits 5 s with jitter, not {wait} ms");
    // A later event waits behind it: order per endpoint is the log's.
    usage(&server, "u2");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(usage_ids(&receiver.received()), ["u1", "u1"]);

    // A redirect is a failure, not followed.
    receiver.answer(Answer::Redirect);
    server.admin_post("/v1/admin/clock", json!({"now": "2026-03-01T00:00:06Z"}));
    receiver.until(|received| received.len() >= 3);
    std::thread::sleep(Duration::from_millis(300));
    let log = deliveries(&server);
    let u1 = log.iter().find(|delivery| delivery["attempts"] == 3).expect("u1 tried a third time");
    assert_eq!(u1["attempt_log"][2]["status"], 302);
    assert_eq!(u1["attempt_log"][2]["error"], "redirects are not followed");
    assert_eq!(receiver.received().len(), 3, "nothing went to /elsewhere");

    // Healthy again at the next retry: u1, then u2, in order.
    receiver.answer(Answer::Status(200));
    server.admin_post("/v1/admin/clock", json!({"now": "2026-03-01T00:06:00Z"}));
    let received = receiver.until(|received| usage_ids(received).ends_with(&["u1".to_owned(), "u2".to_owned()]));
    assert_eq!(usage_ids(&received), ["u1", "u1", "u1", "u1", "u2"]);
    let ids: std::collections::BTreeSet<&str> =
        received.iter().filter(|delivery| delivery.json()["data"]["usage_id"] == "u1").map(|d| d.id.as_str()).collect();
    assert_eq!(ids.len(), 1, "every attempt of a delivery carries the same webhook-id");

    // Redeliver: the same id again.
    let u1_id = received[0].id.clone();
    let response = server.post(
        &format!("/v1/members/acme/webhook-endpoints/{endpoint_id}/deliveries/{u1_id}/redeliver"),
        ADMIN_KEY,
        &json!({}),
        None,
    );
    assert_eq!(response.status().as_u16(), 202);
    let received = receiver.until(|received| received.len() >= 6);
    assert_eq!(received[5].id, u1_id);
    let missing = server.post(
        &format!("/v1/members/acme/webhook-endpoints/{endpoint_id}/deliveries/msg_nope/redeliver"),
        ADMIN_KEY,
        &json!({}),
        None,
    );
    assert_eq!(missing.status().as_u16(), 404);

    // A connection closed without an answer is a failure too; a 410 turns
    // the endpoint off and raises the alert.
    receiver.answer(Answer::Close);
    usage(&server, "u3");
    receiver.until(|received| received.len() >= 8);
    receiver.answer(Answer::Status(410));
    server.admin_post("/v1/admin/clock", json!({"now": "2026-03-01T00:06:10Z"}));
    receiver.until(|received| received.len() >= 9);
    let deadline = Instant::now() + Duration::from_secs(15);
    let shown = loop {
        let (_, shown) = server.admin_get(&format!("/v1/members/acme/webhook-endpoints/{endpoint_id}"));
        if shown["enabled"] == false || Instant::now() > deadline {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(shown["enabled"], false, "{shown}");
    assert!(shown["disabled_reason"].as_str().unwrap().contains("410"), "{shown}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, alerts) = server.admin_get("/v1/members/acme/alerts?rule=webhook_endpoint_failing");
        if alerts["alerts"].as_array().is_some_and(|alerts| !alerts.is_empty()) {
            assert_eq!(alerts["alerts"][0]["subject"], endpoint_id.as_str());
            break;
        }
        assert!(Instant::now() < deadline, "no webhook_endpoint_failing alert: {alerts}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = deliveries(&server);
    let closed = log.iter().find(|delivery| delivery["attempt_log"][0]["status"].is_null()).expect("a closed attempt");
    assert!(closed["attempt_log"][0]["error"].as_str().unwrap().starts_with("could not deliver"), "{closed}");
    // Off: new events queue nothing for it to send.
    let before = receiver.received().len();
    usage(&server, "u4");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(receiver.received().len(), before);
}

/// A kill -9 while deliveries wait: after the restart every event arrives
/// at least once, first arrivals in the log's order, and a repeat carries
/// the same `webhook-id` and body.
#[test]
fn a_kill_loses_no_delivery_and_keeps_the_order() {
    let receiver = Receiver::start();
    let server = webhook_server(tempfile::TempDir::new().unwrap());
    server.admin_post("/v1/members/acme/credits/grants", json!({"source": "promotional", "amount": 1000}));
    create_endpoint(&server, &receiver.url(), json!(["usage.recorded"]));
    receiver.answer(Answer::Status(503));
    for index in 1..=12 {
        usage(&server, &format!("u{index}"));
    }
    receiver.until(|received| !received.is_empty());
    let data_dir = server.kill();
    receiver.answer(Answer::Status(200));
    let server = webhook_server(data_dir);
    for index in 13..=20 {
        usage(&server, &format!("u{index}"));
    }
    // Past the 5 s retry of the first delivery.
    server.admin_post("/v1/admin/clock", json!({"now": "2026-03-01T00:00:10Z"}));
    let received = receiver.until(|received| {
        let ids = usage_ids(received);
        (1..=20).all(|index| ids.contains(&format!("u{index}")))
    });
    let mut first_seen: Vec<String> = Vec::new();
    let mut by_id: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for delivery in &received {
        let usage_id = delivery.json()["data"]["usage_id"].as_str().unwrap().to_owned();
        if !first_seen.contains(&usage_id) {
            first_seen.push(usage_id.clone());
        }
        let body = by_id.entry(delivery.id.clone()).or_insert_with(|| delivery.body.clone());
        assert_eq!(body, &delivery.body, "a repeat of {} carries the same body", delivery.id);
    }
    let expected: Vec<String> = (1..=20).map(|index| format!("u{index}")).collect();
    assert_eq!(first_seen, expected);
    assert_eq!(by_id.len(), 20, "one webhook-id per event");
}

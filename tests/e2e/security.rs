//! Hostile input through the real binary: member-key isolation over every
//! member-scoped route of the OpenAPI document, secrets kept out of logs and
//! files, size limits, a slow client, and SQL-looking strings stored verbatim.

use crate::support::*;
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Every member-scoped route × method in the OpenAPI document, with a member
/// key of `alice` aimed at `bob` (who exists) and at `ghost` (who does not):
/// always 403 `forbidden`, the same answer either way, and nothing written.
#[test]
fn a_member_key_reaches_no_other_member_on_any_route() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    for member in ["alice", "bob"] {
        let (status, _) = server.admin_post(
            &format!("/v1/members/{member}/credits/grants"),
            json!({"source": "promotional", "amount": 50}),
        );
        assert_eq!(status, 201);
    }
    let (_, issued) = server.admin_post("/v1/members/alice/api-keys", json!({}));
    let alice_key = issued["secret"].as_str().unwrap().to_owned();
    server.sync("alice");
    let document: Value = server.client.get(server.url("/openapi.json")).send().unwrap().json().unwrap();
    let head = server.head_position();

    let mut checked = 0;
    for (template, operations) in document["paths"].as_object().unwrap() {
        if !template.contains("{member}") {
            continue;
        }
        for method in operations.as_object().unwrap().keys() {
            let mut answers = Vec::new();
            for target in ["bob", "ghost"] {
                let path = template
                    .replace("{member}", target)
                    .replace("{usage}", "u1")
                    .replace("{reservation}", "rsv_1")
                    .replace("{invoice}", &format!("inv_{target}_1"));
                let response = server
                    .client
                    .request(method.to_uppercase().parse().unwrap(), server.url(&path))
                    .bearer_auth(&alice_key)
                    .header("Idempotency-Key", uuid_like())
                    .header("Content-Type", "application/json")
                    .body(
                        r#"{"usage_id":"u9","metric":"m","credits":1,"amount":1,"plan_id":"p","source":"promotional"}"#,
                    )
                    .send()
                    .unwrap();
                let status = response.status().as_u16();
                let problem: Value = response.json().unwrap_or(Value::Null);
                assert_eq!((status, problem["code"].as_str()), (403, Some("forbidden")), "{method} {path}: {problem}");
                answers.push(problem["detail"].clone());
            }
            assert_eq!(answers[0], answers[1], "{method} {template}: the answer tells whether the member exists");
            checked += 1;
        }
    }
    assert!(checked >= 24, "only {checked} member-scoped operations in the document");
    assert_eq!(server.head_position(), head, "nothing was written");
}

/// A whole session at debug level (keys issued and used, a Stripe webhook
/// signed with the secret, refused credentials): no secret in the logs, and
/// none in any file of the data directory.
#[test]
fn secrets_never_reach_the_logs_or_the_data_files() {
    let logs = tempfile::TempDir::new().unwrap();
    let log = logs.path().join("stderr.log");
    let webhook_secret = "whsec_never_logged_7f3a9c";
    let server = Server::start_logged(
        &["--test-clock", "--start", "2026-01-01T00:00:00Z", "--allow-private-targets", "127.0.0.1/32"],
        &[
            ("TALLY_LOG", "debug"),
            ("TALLY_STRIPE_WEBHOOK_SECRET", webhook_secret),
            ("TALLY_VAULT_KEY", "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc="),
            ("TALLY_OUTBOUND", "allow-list"),
        ],
        &log,
    );
    server.admin_post("/v1/members/m1/credits/grants", json!({"source": "promotional", "amount": 50}));
    // An outbound endpoint's signing secret, then a rotation: shown once
    // each, and nowhere else. (Port 9 on loopback: nothing listens.)
    let (status, endpoint) =
        server.admin_post("/v1/members/m1/webhook-endpoints", json!({"url": "http://127.0.0.1:9/hook"}));
    assert_eq!(status, 201, "{endpoint}");
    let endpoint_id = endpoint["endpoint_id"].as_str().unwrap();
    let (_, rotated) =
        server.admin_post(&format!("/v1/members/m1/webhook-endpoints/{endpoint_id}/rotate-secret"), json!({}));
    let signing_secrets: Vec<String> = [&endpoint, &rotated]
        .iter()
        .map(|answer| answer["secret"].as_str().unwrap().trim_start_matches("whsec_").to_owned())
        .collect();
    let (_, issued) = server.admin_post("/v1/members/m1/api-keys", json!({}));
    let member_key = issued["secret"].as_str().unwrap().to_owned();
    server.sync("m1");
    assert_eq!(server.get("/v1/members/m1/balance", &member_key).status(), 200);
    let wrong = format!("{member_key}x");
    assert_eq!(server.get("/v1/members/m1/balance", &wrong).status(), 401);
    let body = br#"{"id":"evt_1","object":"event","type":"ping","created":1767225600,"data":{"object":{}}}"#;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let signature = tally_stripe::sign(body, webhook_secret, now);
    let response = server
        .client
        .post(server.url("/v1/webhooks/stripe"))
        .header("Stripe-Signature", &signature)
        .body(body.to_vec())
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let bad = server
        .client
        .post(server.url("/v1/webhooks/stripe"))
        .header("Stripe-Signature", "t=1,v1=00")
        .body(body.to_vec());
    assert_eq!(bad.send().unwrap().status(), 400);
    let data_dir = server.terminate();

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().count() > 5, "debug logging produced too little to be a test: {text}");
    let member_secret = member_key.rsplit('_').next().unwrap();
    let v1 = signature.split_once(",v1=").unwrap().1;
    let outbound = [signing_secrets[0].as_str(), signing_secrets[1].as_str()];
    for secret in
        [ADMIN_KEY, member_key.as_str(), member_secret, wrong.as_str(), webhook_secret, v1].iter().chain(&outbound)
    {
        assert!(!text.contains(secret), "a secret ({}…) is in the logs", &secret[..6]);
    }
    for entry in std::fs::read_dir(data_dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for secret in [member_secret, webhook_secret, ADMIN_KEY].iter().chain(&outbound) {
            let found = bytes.windows(secret.len()).any(|window| window == secret.as_bytes());
            assert!(!found, "{} holds a secret", path.display());
        }
    }
}

#[test]
fn oversized_bodies_and_headers_are_refused_and_the_server_goes_on() {
    let server = Server::start_with_env(
        tempfile::TempDir::new().unwrap(),
        &[],
        &[("TALLY_STRIPE_WEBHOOK_SECRET", "whsec_limits")],
    );
    let head = server.head_position();
    let big = format!(r#"{{"source":"promotional","amount":5,"reason":"{}"}}"#, "x".repeat(70 * 1024));
    let response = server
        .client
        .post(server.url("/v1/members/m1/credits/grants"))
        .bearer_auth(ADMIN_KEY)
        .header("Idempotency-Key", "big-1")
        .header("Content-Type", "application/json")
        .body(big)
        .send()
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.json::<Value>().unwrap()["code"], "payload_too_large");
    // A webhook may be larger (512 KiB) but not unbounded.
    let huge = vec![b'{'; 600 * 1024];
    let response =
        server.client.post(server.url("/v1/webhooks/stripe")).header("Stripe-Signature", "t=1,v1=00").body(huge).send();
    let status = response.map(|response| response.status().as_u16()).unwrap_or(413);
    assert_eq!(status, 413);
    // A header far beyond any real one.
    let response = server
        .client
        .get(server.url("/v1/members/m1/balance"))
        .bearer_auth(ADMIN_KEY)
        .header("X-Filler", "y".repeat(64 * 1024))
        .send();
    let status = response.map(|response| response.status().as_u16()).unwrap_or(431);
    assert!((400..500).contains(&status), "{status}");
    // An Idempotency-Key over its limit.
    let response = server.post(
        "/v1/members/m1/credits/grants",
        ADMIN_KEY,
        &json!({"source": "promotional", "amount": 5}),
        Some(&"k".repeat(300)),
    );
    assert_eq!(response.status(), 422);
    assert_eq!(server.head_position(), head, "nothing was written");
    assert_eq!(server.admin_get("/healthz").0, 200, "the server goes on");
}

/// A client that sends half a request and stalls is cut off by the request
/// timeout (10 s), while others are served meanwhile.
#[test]
fn a_slow_client_is_cut_off_and_does_not_block_others() {
    let server = Server::start(&[]);
    let address = server.base.trim_start_matches("http://").to_owned();
    let mut slow = TcpStream::connect(&address).unwrap();
    slow.write_all(b"POST /v1/members/m1/usage HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n").unwrap();
    let started = Instant::now();
    assert_eq!(server.admin_get("/healthz").0, 200, "served while a client stalls");
    slow.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(15), "the stalled connection was held {waited:?}");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
}

/// Strings that look like SQL are data: stored and read back verbatim, and
/// the log stays whole.
#[test]
fn sql_looking_strings_are_stored_verbatim_and_harmless() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    let hostile = [
        "'; DROP TABLE events; --",
        "Robert'); DELETE FROM idempotency WHERE ('1'='1",
        "\" OR 1=1 --",
        "x'||(SELECT hex(randomblob(8)))||'",
        "💥 \\u0000 <script>alert(1)</script>",
    ];
    let mut plan = plan("p1", 100, 100, 0, None);
    plan["name"] = json!(hostile[0]);
    assert_eq!(server.admin_post("/v1/plans", plan).0, 201);
    for (index, text) in hostile.iter().enumerate() {
        let body = json!({"source": "adjustment", "amount": 10, "reason": text, "category": "paid"});
        let (status, answer) = server.admin_post("/v1/members/m1/credits/grants", body);
        assert_eq!(status, 201, "{text}: {answer}");
        let body = json!({"amount": 1, "reason": text});
        assert_eq!(server.admin_post("/v1/members/m1/credits/debits", body).0, 201, "{text}");
        let usage = json!({"usage_id": format!("u{index}"), "metric": "m", "credits": 1});
        assert_eq!(server.admin_post("/v1/members/m1/usage", usage).0, 201);
        let reverse = json!({"reason": text});
        let (status, answer) = server.admin_post(&format!("/v1/members/m1/usage/u{index}/reverse"), reverse);
        assert_eq!(status, 200, "{text}: {answer}");
    }
    // Identifiers are refused outright, not stored.
    let (status, problem) =
        server.admin_post("/v1/members/m1/usage", json!({"usage_id": hostile[0], "metric": "m", "credits": 1}));
    assert_eq!((status, problem["field"].as_str()), (422, Some("usage_id")));

    let (_, events) = server.admin_get("/v1/events?limit=1000");
    let stored = events.to_string();
    for text in hostile {
        let encoded = serde_json::to_string(text).unwrap();
        let occurrences = stored.matches(encoded.trim_matches('"')).count();
        assert!(occurrences >= 3, "{text} is stored verbatim ({occurrences} times)");
    }
    let (_, plans) = server.admin_get("/v1/plans");
    assert_eq!(plans["plans"][0]["name"], hostile[0], "{plans}");
    server.sync("m1");
    let (status, balance) = server.admin_get("/v1/members/m1/balance");
    assert_eq!(status, 200);
    // 5 × (10 granted − 1 debited − 1 used + 1 refunded) = 45.
    assert_eq!(balance["available"], 45, "{balance}");
    let data_dir = server.terminate();
    let output = std::process::Command::new(tally_binary())
        .arg("--data-dir")
        .arg(data_dir.path())
        .args(["audit", "verify"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
}

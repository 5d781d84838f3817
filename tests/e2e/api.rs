//! The HTTP API through the real binary: a month of a member's life on the
//! test clock, the auth matrix, idempotency, bad input, rate limits, and
//! every route of the OpenAPI document.

use crate::support::*;
use serde_json::{Value, json};

fn sum_of_amounts(transactions: &Value) -> i64 {
    transactions["transactions"]
        .as_array()
        .expect("transactions")
        .iter()
        .map(|row| row["amount"].as_i64().unwrap())
        .sum()
}

#[test]
fn a_month_of_a_members_life_through_http() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    assert_eq!(server.admin_post("/v1/plans", plan("starter", 1_000, 1_000, 500, None)).0, 201);
    assert_eq!(server.admin_post("/v1/plans", plan("pro", 5_000, 10_000, 5_000, Some((2_000, 2)))).0, 201);
    let response = server.put("/v1/members/m1", ADMIN_KEY, &json!({"time_zone": "Europe/Paris"}));
    assert_eq!(response.status(), 200);

    let (status, started) = server.admin_post("/v1/members/m1/subscription", json!({"plan_id": "starter"}));
    assert_eq!(status, 201, "{started}");
    assert_eq!(started["balance"]["available"], 1_000);

    let (status, used) =
        server.admin_post("/v1/members/m1/usage", json!({"usage_id": "u1", "metric": "api_calls", "credits": 300}));
    assert_eq!(status, 201, "{used}");
    assert_eq!(used["balance"]["available"], 700);
    let position = used["position"].as_u64().unwrap();
    let (status, balance) = server.admin_get(&format!("/v1/members/m1/balance?min_position={position}"));
    assert_eq!(status, 200, "{balance}");
    assert_eq!((balance["available"].as_i64(), balance["balance"].as_i64()), (Some(700), Some(700)));

    let (status, _) =
        server.admin_post("/v1/members/m1/credits/grants", json!({"source": "purchase", "amount": 200, "price": 150}));
    assert_eq!(status, 201);

    // Halfway through January (16 of 31 days left): upgrade to pro.
    let (status, clock) = server.admin_post("/v1/admin/clock", json!({"now": "2026-01-16T00:00:00Z"}));
    assert_eq!(status, 200, "{clock}");
    let (status, upgraded) = server.admin_post("/v1/members/m1/subscription/change", json!({"plan_id": "pro"}));
    assert_eq!(status, 200, "{upgraded}");
    // 9,000 more credits × 16/31 = 4,645 (floored); 4,000¢ × 16/31 = 2,064¢.
    assert_eq!(upgraded["balance"]["available"], 900 + 4_645);

    // Overage: 5,545 available, 455 become debt at 2¢.
    let (status, overage) =
        server.admin_post("/v1/members/m1/usage", json!({"usage_id": "u2", "metric": "api_calls", "credits": 6_000}));
    assert_eq!(status, 201, "{overage}");
    assert_eq!(overage["balance"], json!({"balance": -455, "available": 0, "held": 0, "debt": 455}));

    // Renewal: nothing left to roll over; the invoice bills fee, purchase, proration and overage.
    let (status, renewed) = server.admin_post("/v1/admin/clock", json!({"now": "2026-02-01T00:00:00Z"}));
    assert_eq!(status, 200, "{renewed}");
    let position = renewed["position"].as_u64().unwrap();
    let (_, balance) = server.admin_get(&format!("/v1/members/m1/balance?min_position={position}"));
    assert_eq!((balance["available"].as_i64(), balance["debt"].as_i64()), (Some(10_000), Some(0)), "{balance}");

    let (status, invoices) = server.admin_get(&format!("/v1/members/m1/invoices?min_position={position}"));
    assert_eq!(status, 200, "{invoices}");
    let invoice = &invoices["invoices"][0];
    assert_eq!(invoice["invoice_id"], "inv_m1_1");
    assert_eq!(invoice["status"], "open");
    assert_eq!(invoice["total"], 1_000 + 150 + 2_064 + 910);
    let line_total: i64 =
        invoice["lines"].as_array().unwrap().iter().map(|line| line["amount"].as_i64().unwrap()).sum();
    assert_eq!(line_total, invoice["total"].as_i64().unwrap());

    let (status, paid) = server.admin_post("/v1/members/m1/invoices/inv_m1_1/pay", json!({}));
    assert_eq!(status, 200, "{paid}");
    let position = paid["position"].as_u64().unwrap();
    let (_, invoice) = server.admin_get(&format!("/v1/members/m1/invoices/inv_m1_1?min_position={position}"));
    assert_eq!(invoice["status"], "paid");

    let (_, subscription) = server.admin_get(&format!("/v1/members/m1/subscription?min_position={position}"));
    assert_eq!(subscription["plan_id"], "pro");
    assert_eq!(subscription["status"], "active");
    assert_eq!(subscription["period_start"], "2026-02-01T00:00:00Z");
    assert_eq!(subscription["period_end"], "2026-03-01T00:00:00Z");

    let (_, transactions) = server.admin_get(&format!("/v1/members/m1/transactions?limit=500&min_position={position}"));
    assert_eq!(sum_of_amounts(&transactions), 10_000, "{transactions}");

    let (_, daily) = server.admin_get("/v1/members/m1/usage/daily?from=2026-01-01&to=2026-01-31");
    let credits: i64 = daily["days"].as_array().unwrap().iter().map(|day| day["credits"].as_i64().unwrap()).sum();
    assert_eq!(credits, 6_300, "{daily}");

    // The audit replays the member's stream as of a moment.
    let (status, audit) = server.admin_get("/v1/members/m1/audit?as_of=2026-01-10T00:00:00Z");
    assert_eq!(status, 200, "{audit}");
    assert_eq!(audit["available"], 900);
}

#[test]
fn auth_matrix() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    server.admin_post("/v1/members/alice/credits/grants", json!({"source": "promotional", "amount": 50}));
    server.admin_post("/v1/members/bob/credits/grants", json!({"source": "promotional", "amount": 50}));
    let (status, issued) = server.admin_post("/v1/members/alice/api-keys", json!({}));
    assert_eq!(status, 201, "{issued}");
    let alice_key = issued["secret"].as_str().unwrap().to_owned();
    server.sync("alice");
    assert!(issued["masked"].as_str().unwrap().contains('…'));

    let cases: Vec<(&str, Option<&str>, u16)> = vec![
        ("/v1/members/alice/balance", None, 401),
        // Credentials are checked before anything else: no hint from validation.
        ("/v1/members/alice/transactions?limit=0", None, 401),
        ("/v1/members/alice/balance", Some("tk_nope_nope"), 401),
        ("/v1/members/alice/balance", Some(&alice_key), 200),
        ("/v1/members/bob/balance", Some(&alice_key), 403),
        // The same answer for a member that does not exist: nothing leaks.
        ("/v1/members/nobody/balance", Some(&alice_key), 403),
        ("/v1/members/bob/balance", Some(ADMIN_KEY), 200),
        ("/v1/events", Some(&alice_key), 403),
        ("/v1/members/alice/api-keys", Some(&alice_key), 403),
    ];
    for (path, key, expected) in cases {
        let mut request = server.client.get(server.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().unwrap();
        assert_eq!(response.status().as_u16(), expected, "GET {path} with {key:?}");
        if expected >= 400 {
            let problem: Value = response.json().unwrap();
            assert_eq!(problem["code"], if expected == 401 { "unauthorized" } else { "forbidden" });
        }
    }
    // A member key records its own usage but cannot grant itself credits or reverse usage.
    let usage = json!({"usage_id": "u1", "metric": "api_calls", "credits": 5});
    assert_eq!(server.post("/v1/members/alice/usage", &alice_key, &usage, Some("k1")).status(), 201);
    assert_eq!(server.post("/v1/members/bob/usage", &alice_key, &usage, Some("k2")).status(), 403);
    let grant = json!({"source": "promotional", "amount": 5});
    assert_eq!(server.post("/v1/members/alice/credits/grants", &alice_key, &grant, Some("k3")).status(), 403);
    assert_eq!(server.post("/v1/members/alice/usage/u1/reverse", &alice_key, &json!({}), Some("k4")).status(), 403);
    assert_eq!(server.post("/v1/members/alice/check", &alice_key, &json!({"credits": 5}), None).status(), 200);

    // Keys are stored hashed: the secret never appears in the data directory.
    for entry in std::fs::read_dir(server.data_dir.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let secret = alice_key.split('_').next_back().unwrap().as_bytes();
        assert!(!bytes.windows(secret.len()).any(|window| window == secret));
    }
}

#[test]
fn idempotent_retries_and_key_reuse() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    server.admin_post("/v1/members/m1/credits/grants", json!({"source": "promotional", "amount": 100}));
    let body = json!({"usage_id": "u1", "metric": "api_calls", "credits": 10});
    let first = server.post("/v1/members/m1/usage", ADMIN_KEY, &body, Some("retry-me"));
    assert_eq!(first.status(), 201);
    let first: Value = first.json().unwrap();
    let head = server.head_position();
    let again = server.post("/v1/members/m1/usage", ADMIN_KEY, &body, Some("retry-me"));
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers().get("Idempotent-Replayed").unwrap(), "true");
    let again: Value = again.json().unwrap();
    assert_eq!(again["position"], first["position"]);
    assert_eq!(again["balance"], first["balance"]);
    assert_eq!(server.head_position(), head);

    let other = json!({"usage_id": "u2", "metric": "api_calls", "credits": 10});
    let reused = server.post("/v1/members/m1/usage", ADMIN_KEY, &other, Some("retry-me"));
    assert_eq!(reused.status(), 422);
    assert_eq!(reused.json::<Value>().unwrap()["code"], "idempotency_key_reused");
    assert_eq!(server.head_position(), head);
}

#[test]
fn bad_input_gets_a_clear_4xx_and_writes_nothing() {
    let server = Server::start_with_clock("2026-01-10T00:00:00Z");
    server.admin_post("/v1/plans", plan("starter", 1_000, 1_000, 500, None));
    server.admin_post("/v1/members/m1/subscription", json!({"plan_id": "starter"}));
    server.admin_post("/v1/members/m1/usage", json!({"usage_id": "used", "metric": "api_calls", "credits": 1}));
    let (_, reserved) = server.admin_post("/v1/members/m1/reservations", json!({"amount": 5, "ttl_s": 60}));
    let reservation = reserved["reservation_id"].as_str().unwrap().to_owned();
    let head = server.head_position();
    let long = "x".repeat(129);
    let usage = "/v1/members/m1/usage";
    let grants = "/v1/members/m1/credits/grants";
    let settle_path = format!("/v1/members/m1/reservations/{reservation}/settle");
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (usage, "{not json".into(), 400, "malformed_request"),
        (usage, "[1,2]".into(), 400, "malformed_request"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":"ten"}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":-5}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":0}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":1000000001}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":1e40}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":99999999999999999999999}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":1,"colour":"red"}"#.into(), 422, "validation_failed"),
        (usage, r#"{"metric":"m","credits":1}"#.into(), 422, "validation_failed"),
        (usage, format!(r#"{{"usage_id":"{long}","metric":"m","credits":1}}"#), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u 1","metric":"m","credits":1}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":1,"quantity":0}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":1,"occurred_at":"yesterday"}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":1,"occurred_at":"2025-01-01T00:00:00Z"}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":1,"occurred_at":"2026-01-10T01:00:00Z"}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"used","metric":"m","credits":1}"#.into(), 422, "validation_failed"),
        (usage, r#"{"usage_id":"u","metric":"m","credits":5000}"#.into(), 402, "insufficient_credits"),
        ("/v1/members/ghost/usage", r#"{"usage_id":"u","metric":"m","credits":1}"#.into(), 404, "not_found"),
        ("/v1/members/bad%20id/usage", r#"{"usage_id":"u","metric":"m","credits":1}"#.into(), 422, "validation_failed"),
        (grants, r#"{"source":"monthly_allocation","amount":5}"#.into(), 422, "validation_failed"),
        (grants, r#"{"source":"promotional","amount":5,"priority":101}"#.into(), 422, "validation_failed"),
        (grants, r#"{"source":"adjustment","amount":5}"#.into(), 422, "validation_failed"),
        (grants, r#"{"source":"promotional","amount":5,"expires_at":"2026-01-01T00:00:00Z"}"#.into(), 422, "validation_failed"),
        (grants, format!(r#"{{"source":"adjustment","amount":5,"reason":"{}"}}"#, "r".repeat(501)), 422, "validation_failed"),
        (grants, r#"{"source":"purchase","amount":5,"price":-1}"#.into(), 422, "validation_failed"),
        (grants, r#"{"source":"promotional","amount":5,"expires_at":"+12000-01-01T00:00:00Z"}"#.into(), 422, "validation_failed"),
        (grants, r#"{"source":"promotional","amount":5,"effective_at":"3026-01-01T00:00:00Z"}"#.into(), 422, "validation_failed"),
        ("/v1/members/m1/credits/debits", r#"{"amount":5000,"reason":"x"}"#.into(), 402, "insufficient_credits"),
        ("/v1/members/m1/subscription", r#"{"plan_id":"starter"}"#.into(), 422, "validation_failed"),
        ("/v1/members/m1/subscription/change", r#"{"plan_id":"gold"}"#.into(), 404, "not_found"),
        ("/v1/members/m1/reservations", r#"{"amount":5,"ttl_s":0}"#.into(), 422, "validation_failed"),
        ("/v1/members/m1/reservations", r#"{"amount":5000}"#.into(), 402, "insufficient_credits"),
        ("/v1/members/m1/reservations/rsv_999/settle", r#"{"amount":1}"#.into(), 404, "not_found"),
        (settle_path.as_str(), r#"{"amount":6}"#.into(), 422, "validation_failed"),
        ("/v1/members/m1/usage/nope/reverse", "{}".into(), 404, "not_found"),
        ("/v1/members/m1/invoices/inv_m1_9/pay", "{}".into(), 404, "not_found"),
        ("/v1/plans", r#"{"plan_id":"p","name":"P","price":-1,"currency":"USD","monthly_credits":1,"rollover":{"enabled":false},"overage":{"allowed":false},"rate_limit_per_minute":1}"#.into(), 422, "validation_failed"),
        ("/v1/plans", r#"{"plan_id":"p","name":"P","price":1,"currency":"usd","monthly_credits":1,"rollover":{"enabled":false},"overage":{"allowed":false},"rate_limit_per_minute":1}"#.into(), 422, "validation_failed"),
        ("/v1/admin/clock", r#"{"now":"2025-01-01T00:00:00Z"}"#.into(), 422, "validation_failed"),
        (usage, format!(r#"{{"usage_id":"u","metric":"{}","credits":1}}"#, "m".repeat(70_000)), 413, "payload_too_large"),
    ];
    assert!(cases.len() >= 30);
    for (path, body, expected_status, expected_code) in cases {
        let response = server
            .client
            .post(server.url(path))
            .bearer_auth(ADMIN_KEY)
            .header("Idempotency-Key", uuid_like())
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers().get("content-type").map(|value| value.to_str().unwrap().to_owned());
        let problem: Value = response.json().unwrap_or(Value::Null);
        let shown: String = body.chars().take(120).collect();
        assert_eq!(
            (status, problem["code"].as_str()),
            (expected_status, Some(expected_code)),
            "POST {path} {shown}: {problem}"
        );
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    }
    // A missing Idempotency-Key on a route that moves credits.
    let response = server.post(usage, ADMIN_KEY, &json!({"usage_id": "u9", "metric": "m", "credits": 1}), None);
    assert_eq!(response.status(), 422);
    let problem = response.json::<Value>().unwrap();
    assert_eq!((problem["header"].as_str(), problem.get("field")), (Some("Idempotency-Key"), None), "{problem}");
    // Bad reads.
    for path in [
        "/v1/members/m1/balance?min_position=abc",
        "/v1/members/m1/balance?min_position=99999999",
        "/v1/members/m1/transactions?limit=0",
        "/v1/members/m1/transactions?limit=100000",
        "/v1/members/m1/transactions?cursor=9223372036854775808",
        "/v1/members/m1/invoices?cursor=abc",
        "/v1/members/m1/audit?min_position=99999999",
        "/v1/members/m1/usage/daily?from=2026-13-01&to=2026-01-02",
        "/v1/members/m1/usage/daily?from=2026-02-01&to=2026-01-01",
        "/v1/members/m1/audit?as_of=never",
        "/v1/events?limit=5000",
    ] {
        let (status, problem) = server.admin_get(path);
        assert_eq!((status, problem["code"].as_str()), (422, Some("validation_failed")), "GET {path}: {problem}");
        assert_ne!(problem["field"], "query", "GET {path} names its parameter: {problem}");
    }
    assert_eq!(server.head_position(), head, "no rejection wrote anything");
}

#[test]
fn member_keys_are_rate_limited_by_their_plan() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    let mut slow = plan("slow", 0, 100, 0, None);
    slow["rate_limit_per_minute"] = json!(5);
    server.admin_post("/v1/plans", slow);
    server.admin_post("/v1/members/m1/subscription", json!({"plan_id": "slow"}));
    let (_, issued) = server.admin_post("/v1/members/m1/api-keys", json!({}));
    let key = issued["secret"].as_str().unwrap().to_owned();
    server.sync("m1");
    let statuses: Vec<u16> = (0..8).map(|_| server.get("/v1/members/m1/balance", &key).status().as_u16()).collect();
    assert_eq!(&statuses[..5], &[200; 5], "{statuses:?}");
    let limited = server.get("/v1/members/m1/balance", &key);
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers().get("Retry-After").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after));
    assert_eq!(limited.json::<Value>().unwrap()["code"], "rate_limited");
    // The admin is not limited.
    assert_eq!(server.get("/v1/members/m1/balance", ADMIN_KEY).status(), 200);
}

#[test]
fn every_route_in_the_openapi_document_answers() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    let document: Value = server.client.get(server.url("/openapi.json")).send().unwrap().json().unwrap();
    let paths = document["paths"].as_object().expect("paths");
    assert!(paths.len() >= 25, "{}", paths.len());
    server.admin_post("/v1/plans", plan("starter", 1_000, 1_000, 500, None));
    let mut routes = 0;
    for (template, operations) in paths {
        for method in operations.as_object().unwrap().keys() {
            let path = template
                .replace("{member}", "m1")
                .replace("{usage}", "u1")
                .replace("{reservation}", "rsv_1")
                .replace("{invoice}", "inv_m1_1");
            let request = server.client.request(method.to_uppercase().parse().unwrap(), server.url(&path));
            let response = request
                .bearer_auth(ADMIN_KEY)
                .header("Idempotency-Key", uuid_like())
                .header("Content-Type", "application/json")
                .body("{}")
                .send()
                .unwrap();
            let status = response.status().as_u16();
            let body = response.text().unwrap();
            assert!(status < 500, "{method} {path}: {status} {body}");
            if status == 404 {
                let problem: Value = serde_json::from_str(&body).unwrap();
                assert!(!problem["detail"].as_str().unwrap().starts_with("no route"), "{method} {path} is not routed");
            }
            routes += 1;
        }
    }
    assert!(routes >= 30, "{routes}");
    // A known path with another method is 405 with Allow; an unknown path 404.
    let response = server.client.delete(server.url("/v1/members/m1/usage")).bearer_auth(ADMIN_KEY).send().unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers().get("Allow").unwrap(), "POST");
    let response = server.client.get(server.url("/v1/nothing/here")).send().unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(response.json::<Value>().unwrap()["code"], "not_found");
}

#[test]
fn sigterm_stops_the_server_gracefully_and_keeps_every_acknowledged_write() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    server.admin_post("/v1/members/m1/credits/grants", json!({"source": "promotional", "amount": 1_000}));
    for index in 0..20 {
        let (status, _) = server
            .admin_post("/v1/members/m1/usage", json!({"usage_id": format!("u{index}"), "metric": "m", "credits": 3}));
        assert_eq!(status, 201);
    }
    let head = server.head_position();
    let data_dir = server.terminate();
    let restarted = Server::start_in(data_dir, &["--test-clock", "--start", "2026-01-01T00:00:00Z"]);
    assert_eq!(restarted.head_position(), head);
    restarted.sync("m1");
    let (_, balance) = restarted.admin_get("/v1/members/m1/balance");
    assert_eq!(balance["available"], 1_000 - 60);
}

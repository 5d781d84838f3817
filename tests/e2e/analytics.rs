//! Analytics through the real binary: trends by day and week with the
//! previous period beside them, grouped by metric and integration; the
//! breakdown with the rest summed; query performance; the cost projection
//! on a month whose figures are worked out by hand; the operators'
//! overview; and every refusal naming its field.

use crate::support::*;
use serde_json::{Value, json};

fn usage(server: &Server, id: &str, metric: &str, credits: i64, integration: Option<&str>) -> u64 {
    let mut body = json!({"usage_id": id, "metric": metric, "credits": credits});
    if let Some(integration) = integration {
        body["integration_id"] = integration.into();
        body["query_id"] = "q1".into();
    }
    let (status, answer) = server.admin_post("/v1/members/acme/usage", body);
    assert_eq!(status, 201, "{answer}");
    answer["position"].as_u64().unwrap()
}

fn clock(server: &Server, now: &str) {
    let (status, body) = server.admin_post("/v1/admin/clock", json!({"now": now}));
    assert_eq!(status, 200, "{body}");
}

fn get(server: &Server, path: &str) -> Value {
    let (status, body) = server.admin_get(path);
    assert_eq!(status, 200, "{path}: {body}");
    body
}

#[test]
fn trends_breakdowns_and_query_performance_follow_the_members_days() {
    // Monday 2 March, 12:00 UTC: 07:00 in New York.
    let server = Server::start_with_clock("2026-03-02T12:00:00Z");
    let put = server.put("/v1/members/acme", ADMIN_KEY, &json!({"time_zone": "America/New_York"}));
    assert_eq!(put.status().as_u16(), 200);
    server.admin_post("/v1/members/acme/credits/grants", json!({"source": "promotional", "amount": 10_000}));
    usage(&server, "u1", "api_calls", 100, Some("crm"));
    clock(&server, "2026-03-03T12:00:00Z");
    usage(&server, "u2", "api_calls", 50, None);
    usage(&server, "u3", "exports", 30, None);
    // 03:00 UTC on the 9th is still the 8th in New York.
    clock(&server, "2026-03-09T03:00:00Z");
    usage(&server, "u4", "api_calls", 5, None);
    clock(&server, "2026-03-09T12:00:00Z");
    let position = usage(&server, "u5", "api_calls", 20, None);

    let week = get(
        &server,
        &format!("/v1/members/acme/analytics/usage?from=2026-03-02&to=2026-03-08&min_position={position}"),
    );
    let days = week["buckets"].as_array().unwrap();
    assert_eq!(days.len(), 7, "every day of the range, empty ones too");
    let credits: Vec<i64> = days.iter().map(|day| day["credits"].as_i64().unwrap()).collect();
    assert_eq!(credits, [100, 80, 0, 0, 0, 0, 5]);
    assert_eq!(
        days[1]["groups"],
        json!([{"key": "api_calls", "credits": 50, "quantity": 1, "records": 1},
        {"key": "exports", "credits": 30, "quantity": 1, "records": 1}])
    );
    assert_eq!(week["total"]["credits"], 185);
    assert_eq!(
        (week["previous"]["from"].as_str(), week["previous"]["to"].as_str()),
        (Some("2026-02-23"), Some("2026-03-01"))
    );
    assert_eq!(week["previous"]["total"]["credits"], 0);
    assert_eq!(week["change"]["credits"], 185);

    let weeks = get(&server, "/v1/members/acme/analytics/usage?from=2026-03-02&to=2026-03-15&granularity=week");
    let credits: Vec<(&str, i64)> = weeks["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|bucket| (bucket["start"].as_str().unwrap(), bucket["credits"].as_i64().unwrap()))
        .collect();
    assert_eq!(credits, [("2026-03-02", 185), ("2026-03-09", 20)]);
    let month = get(&server, "/v1/members/acme/analytics/usage?from=2026-03-02&to=2026-03-15&granularity=month");
    assert_eq!(month["buckets"].as_array().unwrap().len(), 1);
    let by_integration = get(
        &server,
        "/v1/members/acme/analytics/usage?from=2026-03-02&to=2026-03-15&granularity=month&group_by=integration",
    );
    assert_eq!(
        by_integration["buckets"][0]["groups"],
        json!([{"key": "-", "credits": 105, "quantity": 4, "records": 4},
        {"key": "crm", "credits": 100, "quantity": 1, "records": 1}])
    );

    let top = get(&server, "/v1/members/acme/analytics/resources?from=2026-03-01&to=2026-03-31&top=1");
    assert_eq!(top["top"][0]["key"], "api_calls");
    assert_eq!(top["top"][0]["credits"], 175);
    assert_eq!(top["rest"]["credits"], 30);
    assert_eq!(top["rest"]["keys"], 1);
    assert_eq!(top["total"]["credits"], 205);

    // A charged execution: reserve, then settle with the query's outcome.
    let (_, reserved) = server.admin_post("/v1/members/acme/reservations", json!({"amount": 10, "ttl_s": 60}));
    let reservation = reserved["reservation_id"].as_str().unwrap();
    let (status, settled) = server.admin_post(
        &format!("/v1/members/acme/reservations/{reservation}/settle"),
        json!({"amount": 8, "query": {"integration_id": "crm", "query_id": "q1", "status": "succeeded", "duration_ms": 40, "rows": 3}}),
    );
    assert_eq!(status, 200, "{settled}");
    let position = settled["position"].as_u64().unwrap();
    let queries = get(
        &server,
        &format!("/v1/members/acme/analytics/queries?from=2026-03-01&to=2026-03-31&min_position={position}"),
    );
    let query = &queries["queries"][0];
    assert_eq!((query["integration_id"].as_str(), query["query_id"].as_str()), (Some("crm"), Some("q1")));
    assert_eq!(
        (query["executions"].as_i64(), query["credits"].as_i64(), query["error_rate"].as_f64()),
        (Some(1), Some(8), Some(0.0))
    );
    let p50 = query["duration_ms_p50"].as_i64().unwrap();
    assert!(p50 >= 40 && query["duration_ms_p99"].as_i64().unwrap() >= p50, "{query}");
    assert_eq!(queries["integrations"][0]["executions"], 1);

    // Refusals name their field.
    server.admin_post("/v1/members/globex/credits/grants", json!({"source": "promotional", "amount": 10}));
    let (_, issued) = server.admin_post("/v1/members/globex/api-keys", json!({}));
    let globex = issued["secret"].as_str().unwrap();
    for (path, code, field) in [
        ("/v1/members/acme/analytics/usage?granularity=hour", "validation_failed", Some("granularity")),
        ("/v1/members/acme/analytics/usage?group_by=colour", "validation_failed", Some("group_by")),
        ("/v1/members/acme/analytics/usage?from=2026-03-09&to=2026-03-01", "validation_failed", Some("to")),
        ("/v1/members/acme/analytics/usage?from=2025-01-01&to=2026-03-01", "validation_failed", Some("to")),
        ("/v1/members/acme/analytics/usage?from=yesterday", "validation_failed", Some("from")),
        ("/v1/members/acme/analytics/resources?top=0", "validation_failed", Some("top")),
        ("/v1/members/acme/analytics/usage?colour=red", "validation_failed", None),
        ("/v1/members/ghost/analytics/cost", "not_found", None),
    ] {
        let problem: Value = server.get(path, ADMIN_KEY).json().unwrap();
        assert_eq!(problem["code"], code, "{path}: {problem}");
        if let Some(field) = field {
            assert_eq!(problem["field"], field, "{path}: {problem}");
        }
    }
    assert_eq!(server.get("/v1/members/acme/analytics/usage", globex).status().as_u16(), 403);
    assert_eq!(server.get("/v1/analytics/overview", globex).status().as_u16(), 403);
}

/// The month of DESIGN.md's example, worked out by hand: a $50 plan with
/// 1,000 credits and overage up to 2,000 at 2¢; 100 credits a day from
/// March 1. On the 11th: burn 100 a day, nothing left, 21 days to go.
#[test]
fn the_cost_projection_of_a_month_worked_out_by_hand() {
    let server = Server::start_with_clock("2026-03-01T00:00:00Z");
    assert_eq!(server.admin_post("/v1/plans", plan("pro", 5_000, 1_000, 0, Some((2_000, 2)))).0, 201);
    assert_eq!(server.admin_post("/v1/members/acme/subscription", json!({"plan_id": "pro"})).0, 201);
    for day in 1..=10 {
        clock(&server, &format!("2026-03-{day:02}T06:00:00Z"));
        usage(&server, &format!("u{day}"), "api_calls", 100, None);
    }
    clock(&server, "2026-03-11T00:00:00Z");
    let head = server.head_position();
    let cost = get(&server, &format!("/v1/members/acme/analytics/cost?min_position={head}"));
    assert_eq!(cost["burn_rate_per_day"], json!({"d7": 100, "d30": 33}), "{cost}");
    assert_eq!(cost["available"], 0);
    assert_eq!(cost["exhaustion_date"], "2026-03-11");
    assert_eq!(cost["period_use_so_far"], 1_000);
    assert_eq!(cost["projected_period_use"], 3_100);
    assert_eq!(cost["projected_overage"], 2_000, "capped at the plan's limit");
    assert_eq!(cost["projected_refused"], 100);
    let invoice = &cost["next_invoice_estimate"];
    assert_eq!(
        (invoice["fee"].as_i64(), invoice["overage_amount"].as_i64(), invoice["total"].as_i64()),
        (Some(5_000), Some(4_000), Some(9_000))
    );
    assert_eq!(invoice["issued_at"], "2026-04-01T00:00:00Z");
    assert_eq!(cost["last_30_days"], json!({"credits_used": 1_000, "value": 2_000, "basis": "overage_unit_price"}));
    assert_eq!(cost["currency"], "USD");
    assert!(cost["method"].as_str().unwrap().starts_with("Burn rate"));

    // A member with nothing: no rate, no projection.
    server.admin_post("/v1/members/quiet/credits/grants", json!({"source": "promotional", "amount": 10}));
    let quiet = get(&server, "/v1/members/quiet/analytics/cost");
    assert_eq!(quiet["burn_rate_per_day"], json!({"d7": 0, "d30": 0}));
    assert!(quiet["exhaustion_date"].is_null() && quiet["next_invoice_estimate"].is_null());

    let overview = get(&server, &format!("/v1/analytics/overview?min_position={head}"));
    assert_eq!(overview["members"], 2, "{overview}");
    assert_eq!(overview["subscriptions"]["active"], 1);
    assert_eq!(overview["subscriptions"]["by_plan"][0]["plan_id"], "pro");
    assert_eq!(overview["mrr"], json!([{"currency": "USD", "amount": 5_000}]));
    assert_eq!(overview["credits"]["used"], 1_000);
    assert_eq!(overview["credits"]["granted"], 1_010);
    assert!(overview["projection_lag"]["events"].is_u64());
    assert!(overview["open_alerts"]["count"].as_u64().unwrap() >= 1, "acme is low on credits: {overview}");
}

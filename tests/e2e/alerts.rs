//! Alerts through the real binary: the rules a member sets (checked, and
//! nothing written on a refusal), episodes that fire once and re-arm, the
//! reads for members and operators, the Prometheus counters, time alone
//! bringing a grant's expiry into view, and a kill -9 that neither loses
//! nor repeats an episode.

use crate::support::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Polls a member's alerts until `done` holds (the reactor works in the
/// background), or fails after 15 s with what it saw.
fn alerts_until(server: &Server, member: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    rule_alerts_until(server, member, None, done)
}

/// [`alerts_until`] for one rule's alerts.
fn rule_alerts_until(server: &Server, member: &str, rule: Option<&str>, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let filter = rule.map(|rule| format!("&rule={rule}")).unwrap_or_default();
    loop {
        let (status, body) = server.admin_get(&format!("/v1/members/{member}/alerts?order=oldest_first{filter}"));
        assert_eq!(status, 200, "{body}");
        let alerts = body["alerts"].as_array().cloned().unwrap_or_default();
        if done(&alerts) {
            return alerts;
        }
        assert!(Instant::now() < deadline, "the alerts never got there: {alerts:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn summary(alerts: &[Value]) -> Vec<(String, String)> {
    alerts
        .iter()
        .map(|alert| (alert["alert_id"].as_str().unwrap().to_owned(), alert["state"].as_str().unwrap().to_owned()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(id, state)| (id.to_string(), state.to_string())).collect()
}

#[test]
fn a_low_balance_fires_once_per_episode_and_rearms() {
    let server = Server::start_with_clock("2026-03-01T00:00:00Z");
    let grant = |amount: i64| {
        let (status, body) =
            server.admin_post("/v1/members/acme/credits/grants", json!({"source": "promotional", "amount": amount}));
        assert_eq!(status, 201, "{body}");
    };
    let usage = |id: &str, credits: i64| {
        let (status, body) = server
            .admin_post("/v1/members/acme/usage", json!({"usage_id": id, "metric": "api_calls", "credits": credits}));
        assert_eq!(status, 201, "{body}");
    };
    grant(150);
    usage("u1", 60);
    let alerts = alerts_until(&server, "acme", |alerts| !alerts.is_empty());
    assert_eq!(summary(&alerts), pairs(&[("low_balance:1", "open")]));
    assert_eq!(alerts[0]["figures"]["available"], 90);
    assert_eq!(alerts[0]["figures"]["below_credits"], 100);
    // Still low: nothing new.
    usage("u2", 10);
    grant(500);
    let alerts = alerts_until(&server, "acme", |alerts| alerts.iter().all(|alert| alert["state"] == "resolved"));
    assert_eq!(summary(&alerts), pairs(&[("low_balance:1", "resolved")]));
    assert_eq!(alerts[0]["resolved_figures"]["available"], 580);
    // 570 credits today against no history: a spike as well.
    usage("u3", 500);
    let alerts = rule_alerts_until(&server, "acme", Some("low_balance"), |alerts| alerts.len() == 2);
    assert_eq!(summary(&alerts), pairs(&[("low_balance:1", "resolved"), ("low_balance:2", "open")]));
    let spikes = rule_alerts_until(&server, "acme", Some("usage_spike"), |alerts| !alerts.is_empty());
    assert_eq!(spikes[0]["figures"]["today_credits"], 570);
    assert_eq!(server.events_of_type("AlertTriggered").len(), 3, "one event per episode");

    // Operators see every member's; a member key sees only its own.
    let (status, open) = server.admin_get("/v1/alerts?state=open&rule=low_balance");
    assert_eq!(status, 200, "{open}");
    assert_eq!(open["alerts"].as_array().unwrap().len(), 1);
    assert_eq!(open["alerts"][0]["member_id"], "acme");
    let (_, issued) = server.admin_post("/v1/members/acme/api-keys", json!({}));
    let key = issued["secret"].as_str().unwrap();
    assert_eq!(server.get("/v1/alerts", key).status().as_u16(), 403);
    let own: Value = server.get("/v1/members/acme/alerts?state=resolved", key).json().unwrap();
    assert_eq!(summary(own["alerts"].as_array().unwrap()), pairs(&[("low_balance:1", "resolved")]));
    for (query, field) in [("state=closed", "state"), ("rule=nonsense", "rule"), ("order=sideways", "order")] {
        let problem: Value = server.get(&format!("/v1/members/acme/alerts?{query}"), key).json().unwrap();
        assert_eq!((problem["code"].as_str(), problem["field"].as_str()), (Some("validation_failed"), Some(field)));
    }

    let metrics = server.client.get(server.url("/metrics")).send().unwrap().text().unwrap();
    assert!(metrics.contains("tally_alerts_triggered_total{rule=\"low_balance\"} 2"), "{metrics}");
    assert!(metrics.contains("tally_alerts_open{rule=\"low_balance\"} 1"), "{metrics}");
}

#[test]
fn alert_rules_are_checked_and_a_change_is_evaluated_at_once() {
    let server = Server::start_with_clock("2026-03-01T00:00:00Z");
    server.admin_post("/v1/members/acme/credits/grants", json!({"source": "promotional", "amount": 300}));
    let (status, rules) = server.admin_get("/v1/members/acme/alert-rules");
    assert_eq!(status, 200, "{rules}");
    assert_eq!(rules["overrides"], json!({}));
    assert_eq!(rules["rules"]["low_balance"]["below_credits"], 100);
    assert_eq!(rules["defaults"], rules["rules"]);
    assert_eq!(server.admin_get("/v1/members/ghost/alert-rules").0, 404);

    let head = server.head_position();
    for (body, field) in [
        (json!({"low_balance": {"below_credits": 0}}), "low_balance.below_credits"),
        (json!({"usage_spike": {"factor": 1000}}), "usage_spike.factor"),
        (json!({"loud_noises": {"enabled": true}}), "loud_noises"),
        (json!({"payment_failed": {"enabled": "sometimes"}}), "payment_failed.enabled"),
    ] {
        let response = server.put("/v1/members/acme/alert-rules", ADMIN_KEY, &body);
        assert_eq!(response.status().as_u16(), 422, "{body}");
        let problem: Value = response.json().unwrap();
        assert_eq!((problem["code"].as_str(), problem["field"].as_str()), (Some("validation_failed"), Some(field)));
    }
    let not_an_object = server.put("/v1/members/acme/alert-rules", ADMIN_KEY, &json!([1, 2]));
    assert_eq!(not_an_object.status().as_u16(), 400);
    assert_eq!(server.head_position(), head, "a refusal writes nothing");

    // 300 credits are below a 500-credit floor: the change alone fires it.
    let body = json!({"low_balance": {"enabled": true, "below_credits": 500},
        "usage_spike": {"enabled": true, "factor": 3, "floor_credits": 100}});
    let response = server.put("/v1/members/acme/alert-rules", ADMIN_KEY, &body);
    assert_eq!(response.status().as_u16(), 200);
    let changed: Value = response.json().unwrap();
    assert_eq!(changed["overrides"], body);
    assert_eq!(changed["rules"]["low_balance"]["below_credits"], 500);
    assert_eq!(changed["rules"]["low_balance"]["below_days"], 3, "what the override leaves out stays default");
    let alerts = alerts_until(&server, "acme", |alerts| !alerts.is_empty());
    assert_eq!(alerts[0]["alert_id"], "low_balance:1");
    assert_eq!(alerts[0]["figures"]["below_credits"], 500);
    // The same overrides again write nothing; `{}` goes back to the defaults.
    let head = server.head_position();
    assert_eq!(server.put("/v1/members/acme/alert-rules", ADMIN_KEY, &body).status().as_u16(), 200);
    assert_eq!(server.head_position(), head);
    let reset: Value = server.put("/v1/members/acme/alert-rules", ADMIN_KEY, &json!({})).json().unwrap();
    assert_eq!(reset["rules"], reset["defaults"]);
    let alerts = alerts_until(&server, "acme", |alerts| alerts[0]["state"] == "resolved");
    assert_eq!(alerts.len(), 1);
}

#[test]
fn time_alone_brings_an_expiring_grant_into_view_and_its_expiry_clears_it() {
    let server = Server::start_with_clock("2026-03-01T00:00:00Z");
    let (status, body) = server.admin_post(
        "/v1/members/acme/credits/grants",
        json!({"source": "promotional", "amount": 1000, "expires_at": "2026-03-20T00:00:00Z"}),
    );
    assert_eq!(status, 201, "{body}");
    server.sync("acme");
    // 19 days ahead: outside the 7-day window, nothing.
    std::thread::sleep(Duration::from_millis(1_200));
    let (_, quiet) = server.admin_get("/v1/members/acme/alerts");
    assert_eq!(quiet["alerts"], json!([]));
    server.admin_post("/v1/admin/clock", json!({"now": "2026-03-14T00:00:00Z"}));
    let alerts = alerts_until(&server, "acme", |alerts| !alerts.is_empty());
    assert_eq!(alerts[0]["rule"], "credits_expiring");
    assert_eq!(alerts[0]["subject"], alerts[0]["figures"]["grant_id"]);
    assert_eq!(alerts[0]["figures"]["credits"], 1000);
    // The grant lapses: the episode closes, and the member is now low.
    server.admin_post("/v1/admin/clock", json!({"now": "2026-03-21T00:00:00Z"}));
    let alerts = alerts_until(&server, "acme", |alerts| alerts.len() == 2 && alerts[0]["state"] == "resolved");
    assert_eq!(alerts[1]["rule"], "low_balance");
}

/// Members spend concurrently while the server is killed (SIGKILL) at a
/// moment the reactor is busy; after a restart every episode the log's
/// history calls for is there exactly once, the same as in a run that was
/// never killed.
#[test]
fn a_kill_loses_no_alert_and_repeats_none() {
    fn history(server: &Server, members: &[String], from: usize, to: usize) {
        for round in from..to {
            for member in members {
                let (status, body) = server.admin_post(
                    &format!("/v1/members/{member}/usage"),
                    json!({"usage_id": format!("u{round}"), "metric": "calls", "credits": 30}),
                );
                assert_eq!(status, 201, "{body}");
                if round % 4 == 3 {
                    server.admin_post(
                        &format!("/v1/members/{member}/credits/grants"),
                        json!({"source": "promotional", "amount": 120}),
                    );
                }
            }
        }
    }
    let members: Vec<String> = (0..6).map(|index| format!("m{index}")).collect();
    let start = |server: &Server| {
        for member in &members {
            server.admin_post(
                &format!("/v1/members/{member}/credits/grants"),
                json!({"source": "promotional", "amount": 200}),
            );
        }
    };
    let episodes = |server: &Server| -> Vec<(String, String, String)> {
        let mut seen: Vec<(String, String, String)> = Vec::new();
        for (event_type, kind) in [("AlertTriggered", "raised"), ("AlertResolved", "resolved")] {
            let (_, feed) = server.admin_get("/v1/events?after=0&limit=1000");
            for event in feed["events"].as_array().unwrap().iter().filter(|event| event["event_type"] == event_type) {
                let member = event["stream_id"].as_str().unwrap().trim_start_matches("member-").to_owned();
                seen.push((member, event["payload"]["alert_id"].as_str().unwrap().to_owned(), kind.to_owned()));
            }
        }
        seen.sort();
        seen
    };
    let settle = |server: &Server| {
        // The reactor has caught up when the log stops growing.
        let mut head = server.head_position();
        loop {
            std::thread::sleep(Duration::from_millis(1_500));
            let now = server.head_position();
            if now == head {
                return;
            }
            head = now;
        }
    };

    let calm = Server::start_with_clock("2026-03-01T00:00:00Z");
    start(&calm);
    history(&calm, &members, 0, 24);
    settle(&calm);
    let expected = episodes(&calm);
    assert!(expected.len() >= 12, "the history makes episodes: {expected:?}");

    let killed = Server::start_with_clock("2026-03-01T00:00:00Z");
    start(&killed);
    history(&killed, &members, 0, 12);
    let data_dir = killed.kill();
    let restarted = Server::start_in(data_dir, &["--test-clock", "--start", "2026-03-01T00:00:00Z"]);
    history(&restarted, &members, 12, 24);
    settle(&restarted);
    let seen = episodes(&restarted);
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "an episode was written twice: {seen:?}");
    assert_eq!(seen, expected);
}

/// `serve --demo` shows alerts at once: acme's spike today and its failing
/// integration, globex's failed payment, initech low on its free credits;
/// and the analytics have a month to show.
#[test]
fn the_demo_has_alerts_and_analytics_to_show() {
    let server = Server::start(&["--demo"]);
    let head = server.head_position();
    let (status, open) = server.admin_get(&format!("/v1/alerts?state=open&limit=1000&min_position={head}"));
    assert_eq!(status, 200, "{open}");
    let open: Vec<(String, String)> = open["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|alert| (alert["member_id"].as_str().unwrap().to_owned(), alert["rule"].as_str().unwrap().to_owned()))
        .collect();
    for (member, rule) in [
        ("acme", "usage_spike"),
        ("acme", "integration_failing"),
        ("globex", "payment_failed"),
        ("initech", "low_balance"),
    ] {
        assert!(open.contains(&(member.to_owned(), rule.to_owned())), "{member} {rule} in {open:?}");
    }
    let (_, usage) = server.admin_get("/v1/members/acme/analytics/usage");
    assert!(usage["total"]["credits"].as_i64().unwrap() > 2_500, "{usage}");
    let (_, cost) = server.admin_get("/v1/members/acme/analytics/cost");
    assert!(cost["burn_rate_per_day"]["d7"].as_i64().unwrap() > 0, "{cost}");
    let (_, overview) = server.admin_get("/v1/analytics/overview");
    assert_eq!(overview["members"], 3, "{overview}");
    assert_eq!(overview["failing_integrations"]["count"], 1);
}

//! Answers a client can act on, through the real binary: what `check` says
//! and why, the ids every write answer carries, problem documents people
//! can read, harmless retries that answer success, plain logs when nobody
//! watches a terminal, the limits the OpenAPI document states, and batch
//! usage.

use crate::support::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;

fn post_raw(server: &Server, path: &str, key: &str, body: &Value) -> (u16, Value) {
    let response = server.post(path, key, body, Some(&uuid_like()));
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

#[test]
fn check_says_why_and_how_much() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    server.admin_post("/v1/plans", plan("starter", 1_000, 1_000, 0, None));
    server.admin_post("/v1/plans", plan("pro", 5_000, 10_000, 0, Some((2_000, 2))));
    server.admin_post("/v1/members/small/subscription", json!({"plan_id": "starter"}));
    server.admin_post("/v1/members/big/subscription", json!({"plan_id": "pro"}));

    let (status, allowed) = server.admin_post("/v1/members/big/check", json!({"credits": 10_500}));
    assert_eq!(status, 200, "{allowed}");
    assert_eq!(
        allowed,
        json!({"allowed": true, "requested": 10_500, "available": 10_000, "overage_room": 2_000,
               "would_incur_debt": 500, "debt": 500})
    );
    let (_, beyond) = server.admin_post("/v1/members/big/check", json!({"credits": 12_001}));
    assert_eq!(
        beyond,
        json!({"allowed": false, "requested": 12_001, "available": 10_000, "overage_room": 2_000,
               "would_incur_debt": 0, "reason": "overage_limit_reached", "debt": 0})
    );
    let (_, short) = server.admin_post("/v1/members/small/check", json!({"credits": 1_001}));
    assert_eq!((short["allowed"].as_bool(), short["reason"].as_str()), (Some(false), Some("insufficient_credits")));
    assert_eq!(short["overage_room"], 0);

    // The document marks the old name deprecated.
    let document: Value = server.client.get(server.url("/openapi.json")).send().unwrap().json().unwrap();
    let check = &document["components"]["schemas"]["CheckView"]["properties"];
    assert_eq!(check["debt"]["deprecated"], true, "{check}");
    assert!(check["would_incur_debt"].get("deprecated").is_none());
}

#[test]
fn write_answers_name_their_objects() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    let response = server.post("/v1/plans", ADMIN_KEY, &plan("starter", 1_000, 1_000, 0, None), None);
    assert_eq!(response.status(), 201);
    let published: Value = response.json().unwrap();
    assert!(published.get("member_id").is_none(), "no member_id on a catalog answer: {published}");
    assert_eq!((published["object"].as_str(), published["plan_id"].as_str()), (Some("plan"), Some("starter")));

    let (status, started) = server.admin_post("/v1/members/m1/subscription", json!({"plan_id": "starter"}));
    assert_eq!(status, 201, "{started}");
    assert_eq!(started["object"], "subscription");
    assert_eq!(started["subscription_status"], "active");
    assert_eq!(started["period_end"], "2026-02-01T00:00:00Z");
    let allocation = started["grant_ids"][0].as_str().expect("the allocation's grant id").to_owned();

    let (status, granted) =
        server.admin_post("/v1/members/m1/credits/grants", json!({"source": "purchase", "amount": 200, "price": 99}));
    assert_eq!(status, 201, "{granted}");
    assert_eq!(granted["object"], "grant");
    let purchase = granted["grant_id"].as_str().expect("grant_id at top level").to_owned();
    assert_eq!(granted["grant_ids"], json!([purchase.clone()]));
    let in_events: Vec<&str> =
        granted["events"].as_array().unwrap().iter().filter_map(|e| e["grant_id"].as_str()).collect();
    assert_eq!(in_events, vec![purchase.as_str()], "the same id as in the events");
    assert_eq!(granted["balance"]["available"], 1_200);

    // The allocation (priority 20) burns before the purchase (50).
    let (status, used) =
        server.admin_post("/v1/members/m1/usage", json!({"usage_id": "u1", "metric": "api_calls", "credits": 1_100}));
    assert_eq!(status, 201, "{used}");
    assert_eq!((used["object"].as_str(), used["usage_id"].as_str()), (Some("usage"), Some("u1")));
    assert_eq!(
        used["burned"],
        json!([{"grant_id": allocation, "amount": 1_000}, {"grant_id": purchase, "amount": 100}])
    );
    assert_eq!(used["debt_incurred"], 0);
    assert_eq!(used["balance"]["available"], 100);

    let (status, reserved) = server.admin_post("/v1/members/m1/reservations", json!({"amount": 40, "ttl_s": 60}));
    assert_eq!(status, 201, "{reserved}");
    assert_eq!(reserved["object"], "reservation");
    assert!(reserved["reservation_id"].as_str().unwrap().starts_with("rsv_"));
    assert_eq!(reserved["deadline"], "2026-01-01T00:01:00Z");
    assert_eq!(reserved["held"], 40);
    assert_eq!(reserved["holds"], json!([{"grant_id": purchase, "amount": 40}]));
    assert_eq!(reserved["balance"]["held"], 40);

    // Every write answer has the same envelope.
    for answer in [&published, &started, &granted, &used, &reserved] {
        for field in ["object", "position", "events", "replayed", "already"] {
            assert!(answer.get(field).is_some(), "{field} missing from {answer}");
        }
    }
}

#[test]
fn problems_read_as_sentences_and_name_the_thing_not_found() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    server.admin_post("/v1/plans", plan("starter", 1_000, 1_000, 0, None));
    let (_, refused) = server.admin_post("/v1/members/m1/subscription", json!({"plan_id": "nope"}));
    assert_eq!(refused["code"], "not_found", "{refused}");
    assert!(refused["detail"].as_str().unwrap().starts_with("plan `nope` not found"), "{refused}");

    // A member that does not exist is named the same way on every route.
    let ghost = "member `ghost` not found";
    let mut answers = vec![
        server.admin_get("/v1/members/ghost/balance"),
        server.admin_get("/v1/members/ghost/transactions"),
        server.admin_get("/v1/members/ghost/subscription"),
        server.admin_post("/v1/members/ghost/usage", json!({"usage_id": "u1", "metric": "m", "credits": 1})),
        server.admin_post("/v1/members/ghost/check", json!({"credits": 1})),
        server.admin_post("/v1/members/ghost/reservations", json!({"amount": 1})),
        server.admin_post("/v1/members/ghost/api-keys", json!({})),
    ];
    answers.push(server.admin_post("/v1/members/ghost/credits/debits", json!({"amount": 1, "reason": "r"})));
    for (status, problem) in answers {
        assert_eq!((status, problem["code"].as_str()), (404, Some("not_found")), "{problem}");
        assert!(problem["detail"].as_str().unwrap().starts_with(ghost), "{problem}");
        assert_eq!(problem["title"], "Nothing found with this id", "{problem}");
    }

    // Titles are sentences per code, not HTTP reason phrases; details say what to do.
    server.admin_post("/v1/members/m1/subscription", json!({"plan_id": "starter"}));
    let (status, short) =
        server.admin_post("/v1/members/m1/usage", json!({"usage_id": "u1", "metric": "m", "credits": 5_000}));
    assert_eq!(status, 402);
    assert_eq!(short["title"], "Not enough credits");
    assert!(short["detail"].as_str().unwrap().contains("grant or purchase credits"), "{short}");
    assert_eq!((short["requested"].as_i64(), short["available"].as_i64()), (Some(5_000), Some(1_000)));
    let (_, invalid) =
        server.admin_post("/v1/members/m1/usage", json!({"usage_id": "u1", "metric": "m", "credits": 0}));
    assert_eq!(
        (invalid["field"].as_str(), invalid["title"].as_str()),
        (Some("credits"), Some("A field of the request is not valid"))
    );
    let unauthorized: Value = server.get("/v1/members/m1/balance", "tk_wrong_key").json().unwrap();
    assert_eq!(unauthorized["title"], "Missing or unknown API key");

    // A missing Idempotency-Key names the header, not a body field.
    let response =
        server.post("/v1/members/m1/usage", ADMIN_KEY, &json!({"usage_id": "u2", "metric": "m", "credits": 1}), None);
    assert_eq!(response.status(), 422);
    let problem: Value = response.json().unwrap();
    assert_eq!(problem["header"], "Idempotency-Key", "{problem}");
    assert!(problem.get("field").is_none(), "{problem}");
}

#[test]
fn harmless_retries_answer_success_and_write_nothing() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    server.admin_post("/v1/plans", plan("starter", 1_000, 1_000, 0, None));
    server.admin_post("/v1/members/m1/subscription", json!({"plan_id": "starter"}));

    let (status, first) = server.admin_post("/v1/members/m1/subscription/cancel", json!({"at_period_end": true}));
    assert_eq!(status, 200, "{first}");
    assert_eq!((first["already"].as_bool(), first["cancel_at"].as_str()), (Some(false), Some("2026-02-01T00:00:00Z")));
    let head = server.head_position();
    // Another key: not an idempotent replay, the same intent.
    let (status, second) = server.admin_post("/v1/members/m1/subscription/cancel", json!({"at_period_end": true}));
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["already"], true, "{second}");
    assert_eq!(second["replayed"], false);
    assert_eq!(second["cancel_at"], "2026-02-01T00:00:00Z");
    assert_eq!(second["subscription_status"], "active");
    assert_eq!(second["events"], json!([]));
    assert_eq!(server.head_position(), head, "the second cancel wrote nothing");
    // At the period's end it ends, and its record says it ended as asked.
    let (_, ended) = server.admin_post("/v1/admin/clock", json!({"now": "2026-02-01T00:00:00Z"}));
    let (_, subscription) =
        server.admin_get(&format!("/v1/members/m1/subscription?min_position={}", ended["position"]));
    assert_eq!(subscription["status"], "canceled", "{subscription}");
    assert_eq!(
        (subscription["cancel_at_period_end"].as_bool(), subscription["cancel_at"].as_str()),
        (Some(true), Some("2026-02-01T00:00:00Z"))
    );
    server.admin_post("/v1/members/m1/credits/grants", json!({"source": "promotional", "amount": 100}));

    let (_, reserved) = server.admin_post("/v1/members/m1/reservations", json!({"amount": 10}));
    let reservation = reserved["reservation_id"].as_str().unwrap().to_owned();
    let release = format!("/v1/members/m1/reservations/{reservation}/release");
    let (status, released) = server.admin_post(&release, json!({}));
    assert_eq!((status, released["released"].as_i64(), released["already"].as_bool()), (200, Some(10), Some(false)));
    let head = server.head_position();
    let (status, again) = server.admin_post(&release, json!({}));
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        (again["already"].as_bool(), again["reservation_id"].as_str()),
        (Some(true), Some(reservation.as_str()))
    );
    assert_eq!(again["balance"]["held"], 0);
    assert_eq!(server.head_position(), head, "the second release wrote nothing");

    // Settling what was released stays a refusal that says which came first.
    let (status, late) =
        server.admin_post(&format!("/v1/members/m1/reservations/{reservation}/settle"), json!({"amount": 5}));
    assert_eq!((status, late["code"].as_str()), (422, Some("validation_failed")), "{late}");
    assert!(late["detail"].as_str().unwrap().contains("was released before this settle"), "{late}");
    // And the reverse.
    let (_, reserved) = server.admin_post("/v1/members/m1/reservations", json!({"amount": 10}));
    let settled = reserved["reservation_id"].as_str().unwrap().to_owned();
    let (status, _) = server.admin_post(&format!("/v1/members/m1/reservations/{settled}/settle"), json!({"amount": 4}));
    assert_eq!(status, 200);
    let (status, late) = server.admin_post(&format!("/v1/members/m1/reservations/{settled}/release"), json!({}));
    assert_eq!(status, 422, "{late}");
    assert!(late["detail"].as_str().unwrap().contains("was settled for 4 credits before this release"), "{late}");
}

#[test]
fn logs_written_to_a_file_carry_no_colour_codes() {
    let logs = tempfile::TempDir::new().unwrap();
    for (format, extra) in [("text", vec![]), ("json", vec!["--log-format", "json"])] {
        let log = logs.path().join(format!("{format}.log"));
        let mut arguments = vec!["--test-clock", "--start", "2026-01-01T00:00:00Z"];
        arguments.extend(extra.iter().copied());
        let server = Server::start_logged(&arguments, &[("TALLY_LOG", "info")], &log);
        server.admin_post("/v1/members/m1/credits/grants", json!({"source": "promotional", "amount": 5}));
        server.admin_get("/v1/members/nobody/balance");
        drop(server);
        let written = std::fs::read(&log).unwrap();
        assert!(written.len() > 100, "{format}: the server logged at info: {}", String::from_utf8_lossy(&written));
        assert!(
            !written.contains(&0x1b),
            "{format}: an escape code in a log file: {}",
            String::from_utf8_lossy(&written)
        );
        if format == "json" {
            let first = String::from_utf8_lossy(&written).lines().next().unwrap().to_owned();
            assert!(serde_json::from_str::<Value>(&first).is_ok(), "json logs stay JSON: {first}");
        }
    }
}

/// Every bound the document states for a request field is the one the
/// server enforces: the bound passes validation, one past it is refused
/// naming the field. And every route the document says needs an
/// `Idempotency-Key` refuses a request without one.
#[test]
fn the_openapi_document_states_the_limits_the_server_enforces() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    server.admin_post("/v1/members/m1/credits/grants", json!({"source": "promotional", "amount": 10}));
    let document: Value = server.client.get(server.url("/openapi.json")).send().unwrap().json().unwrap();
    let schemas = &document["components"]["schemas"];
    let usage = &schemas["UsageBody"]["properties"];
    assert_eq!(
        (usage["credits"]["minimum"].as_i64(), usage["credits"]["maximum"].as_i64()),
        (Some(1), Some(1_000_000_000))
    );
    assert_eq!(usage["usage_id"]["maxLength"], 128);
    assert_eq!(schemas["GrantBody"]["properties"]["source"]["enum"], json!(["purchase", "promotional", "adjustment"]));
    assert!(
        schemas["MemberBody"]["properties"]["time_zone"]["enum"].as_array().unwrap().contains(&json!("Europe/Paris"))
    );
    assert_eq!(schemas["UsageBatchBody"]["properties"]["records"]["maxItems"], 1_000);
    // Query parameters are stated as such, with their bounds.
    let parameters = document["paths"]["/v1/members/{member}/transactions"]["get"]["parameters"].as_array().unwrap();
    let limit = parameters.iter().find(|parameter| parameter["name"] == "limit").unwrap();
    assert_eq!((limit["in"].as_str(), limit["schema"]["maximum"].as_i64()), (Some("query"), Some(1_000)), "{limit}");
    let (status, problem) = server.admin_get("/v1/members/m1/transactions?limit=1001");
    assert_eq!((status, problem["field"].as_str()), (422, Some("limit")), "{problem}");

    // (route, body builder, field): the document's bound, then one past it.
    type Body = Box<dyn Fn(i64) -> Value>;
    let bounded: Vec<(&str, &str, &str, Body)> = vec![
        ("/v1/members/m1/check", "CheckBody", "credits", Box::new(|n| json!({"credits": n}))),
        (
            "/v1/members/m1/usage",
            "UsageBody",
            "quantity",
            Box::new(|n| json!({"usage_id": format!("q{n}"), "metric": "m", "credits": 1, "quantity": n})),
        ),
        ("/v1/members/m1/reservations", "ReserveBody", "ttl_s", Box::new(|n| json!({"amount": 1, "ttl_s": n}))),
        (
            "/v1/members/m1/credits/grants",
            "GrantBody",
            "priority",
            Box::new(|n| json!({"source": "promotional", "amount": 1, "priority": n})),
        ),
    ];
    for (path, schema, field, body) in bounded {
        let property = &schemas[schema]["properties"][field];
        let (minimum, maximum) = (property["minimum"].as_i64().unwrap(), property["maximum"].as_i64().unwrap());
        for inside in [minimum, maximum] {
            let (status, answer) = post_raw(&server, path, ADMIN_KEY, &body(inside));
            assert!(status < 300, "{path} {field}={inside} is inside the document's bounds: {answer}");
        }
        for outside in [minimum - 1, maximum + 1] {
            let (status, problem) = post_raw(&server, path, ADMIN_KEY, &body(outside));
            assert_eq!((status, problem["field"].as_str()), (422, Some(field)), "{path} {field}={outside}: {problem}");
        }
    }
    // Cursors: the documented pattern fits the cursors the server hands out.
    let (_, page) = server.admin_get("/v1/members/m1/transactions?limit=1");
    let cursor = page["next_cursor"].as_str().expect("a next page").to_owned();
    let transactions = document["paths"]["/v1/members/{member}/transactions"]["get"]["parameters"].as_array().unwrap();
    let documented = transactions.iter().find(|parameter| parameter["name"] == "cursor").unwrap();
    assert_eq!(documented["schema"]["pattern"], "^[1-9][0-9]{0,18}$");
    assert!(
        cursor.len() <= 19 && !cursor.starts_with('0') && cursor.bytes().all(|byte| byte.is_ascii_digit()),
        "{cursor}"
    );
    let daily = document["paths"]["/v1/members/{member}/usage/daily"]["get"]["parameters"].as_array().unwrap();
    let daily_cursor = daily.iter().find(|parameter| parameter["name"] == "cursor").unwrap();
    assert!(daily_cursor["schema"].get("pattern").is_none(), "daily cursors are a day and a metric: {daily_cursor}");

    let pattern = usage["metric"]["pattern"].as_str().unwrap();
    assert_eq!(pattern, "^[A-Za-z0-9_.:-]{1,128}$");
    let (status, problem) =
        post_raw(&server, "/v1/members/m1/usage", ADMIN_KEY, &json!({"usage_id": "x", "metric": "a b", "credits": 1}));
    assert_eq!((status, problem["field"].as_str()), (422, Some("metric")), "{problem}");

    let mut required = BTreeSet::new();
    for (template, item) in document["paths"].as_object().unwrap() {
        let Some(post) = item.get("post") else { continue };
        let parameters = post["parameters"].as_array().cloned().unwrap_or_default();
        let header =
            parameters.iter().find(|parameter| parameter["name"] == "Idempotency-Key" && parameter["in"] == "header");
        if header.is_some_and(|header| header["required"] == true) {
            required.insert(template.clone());
        }
    }
    // The thirteen member writes, and the two query executions.
    assert_eq!(required.len(), 15, "{required:?}");
    // The other POSTs take a request without the header (whatever else they say of it).
    for (template, item) in document["paths"].as_object().unwrap() {
        if item.get("post").is_none() || required.contains(template) || template.contains("webhooks") {
            continue;
        }
        let path = template.replace("{member}", "m1");
        let problem: Value = server.post(&path, ADMIN_KEY, &json!({}), None).json().unwrap_or(Value::Null);
        assert!(problem.get("header").is_none(), "POST {path} needs no key: {problem}");
    }
    for template in required {
        let path = template
            .replace("{member}", "m1")
            .replace("{usage}", "u1")
            .replace("{reservation}", "rsv_1")
            .replace("{invoice}", "inv_m1_1")
            .replace("{integration}", "i1")
            .replace("{query}", "q1");
        let response = server.post(&path, ADMIN_KEY, &json!({}), None);
        let status = response.status().as_u16();
        let problem: Value = response.json().unwrap();
        assert_eq!((status, problem["header"].as_str()), (422, Some("Idempotency-Key")), "POST {path}: {problem}");
    }
}

fn usage_record(usage_id: &str, credits: i64) -> Value {
    json!({"usage_id": usage_id, "metric": "api_calls", "credits": credits})
}

#[test]
fn batch_usage_decides_each_record_on_its_own_and_answers_a_retry_the_same() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    server.admin_post("/v1/members/m1/credits/grants", json!({"source": "promotional", "amount": 100}));
    let (_, issued) = server.admin_post("/v1/members/m1/api-keys", json!({}));
    let member_key = issued["secret"].as_str().unwrap().to_owned();
    let head = server.written();

    let records = json!({"records": [
        usage_record("b1", 30),
        usage_record("b2", 500),                       // more than is left: refused alone
        {"usage_id": "b3", "metric": "api_calls"},     // no credits: refused alone
        usage_record("b4", 60),
        usage_record("b1", 30),                        // the same record twice in one batch
        {"usage_id": "b5", "metric": "api_calls", "credits": 1, "colour": "red"},
    ]});
    let response = server.post("/v1/members/m1/usage/batch", &member_key, &records, None);
    assert_eq!(response.status(), 200);
    let first: Value = response.json().unwrap();
    let results = first["results"].as_array().unwrap();
    let outcomes: Vec<(u64, bool, u64, Option<&str>)> = results
        .iter()
        .map(|result| {
            (
                result["index"].as_u64().unwrap(),
                result["accepted"].as_bool().unwrap(),
                result["status"].as_u64().unwrap(),
                result["problem"]["code"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![
            (0, true, 201, None),
            (1, false, 402, Some("insufficient_credits")),
            (2, false, 422, Some("validation_failed")),
            (3, true, 201, None),
            (4, true, 201, None),
            (5, false, 422, Some("validation_failed")),
        ],
        "{first}"
    );
    assert_eq!((first["accepted"].as_u64(), first["refused"].as_u64()), (Some(3), Some(3)));
    assert_eq!(results[2]["problem"]["field"], "credits");
    assert_eq!(results[5]["problem"]["field"], "colour");
    assert_eq!(results[0]["position"], results[4]["position"], "a duplicate in the batch is the first record");
    assert_eq!((results[0]["replayed"].as_bool(), results[4]["replayed"].as_bool()), (Some(false), Some(true)));
    assert_eq!(results[3]["balance"]["available"], 10);
    assert!(results[0]["burned"][0]["grant_id"].is_string());
    // Exactly the two distinct accepted records were written (usage + deduction each).
    assert_eq!(server.written(), head + 4);

    // The retried batch answers the same and writes nothing.
    let retried: Value = server.post("/v1/members/m1/usage/batch", &member_key, &records, None).json().unwrap();
    assert_eq!(server.written(), head + 4);
    for (before, after) in results.iter().zip(retried["results"].as_array().unwrap()) {
        for field in ["index", "usage_id", "accepted", "status", "position", "burned"] {
            assert_eq!(before[field], after[field], "{field}: {before} then {after}");
        }
        assert_eq!(after["replayed"].as_bool(), Some(after["accepted"] == true), "{after}");
    }
    // The same usage id with another body is refused, naming the reuse.
    let changed = json!({"records": [usage_record("b1", 31)]});
    let answer: Value = server.post("/v1/members/m1/usage/batch", &member_key, &changed, None).json().unwrap();
    assert_eq!(answer["results"][0]["problem"]["code"], "idempotency_key_reused", "{answer}");

    let position = first["position"].as_u64().unwrap();
    let (_, balance) = server.admin_get(&format!("/v1/members/m1/balance?min_position={position}"));
    assert_eq!(balance["available"], 10, "{balance}");

    // Limits and keys.
    let too_many: Vec<Value> = (0..1_001).map(|index| usage_record(&format!("x{index}"), 1)).collect();
    let (status, problem) = post_raw(&server, "/v1/members/m1/usage/batch", ADMIN_KEY, &json!({"records": too_many}));
    assert_eq!((status, problem["field"].as_str()), (422, Some("records")), "{problem}");
    let (status, problem) = post_raw(&server, "/v1/members/m1/usage/batch", ADMIN_KEY, &json!({"records": []}));
    assert_eq!((status, problem["field"].as_str()), (422, Some("records")), "{problem}");
    let (status, _) =
        post_raw(&server, "/v1/members/other/usage/batch", &member_key, &json!({"records": [usage_record("o", 1)]}));
    assert_eq!(status, 403);
    let (status, _) = post_raw(&server, "/v1/usage/batch", &member_key, &json!({"records": []}));
    assert_eq!(status, 403);
    let (status, problem) = post_raw(&server, "/v1/members/m1/usage/batch", ADMIN_KEY, &json!({"records": [7]}));
    assert_eq!((status, problem["results"][0]["problem"]["field"].as_str()), (200, Some("record")), "{problem}");
    // Bodies: a batch may be larger than a single request (1 MiB, not 64 KiB), and no larger.
    let long_id = |index: usize| format!("{index}-{}", "x".repeat(100));
    let large: Vec<Value> = (0..1_000).map(|index| usage_record(&long_id(index), 1_000_000)).collect();
    let (status, answer) = post_raw(&server, "/v1/members/m1/usage/batch", ADMIN_KEY, &json!({"records": large}));
    assert_eq!((status, answer["refused"].as_u64()), (200, Some(1_000)), "short of credits, but read: {answer}");
    let huge: Vec<Value> = (0..1_000).map(|index| usage_record(&format!("{index}-{}", "x".repeat(1_100)), 1)).collect();
    let (status, problem) = post_raw(&server, "/v1/members/m1/usage/batch", ADMIN_KEY, &json!({"records": huge}));
    assert_eq!((status, problem["code"].as_str()), (413, Some("payload_too_large")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("1048576"), "{problem}");
    assert_eq!(server.written(), head + 4, "refused batches wrote nothing");
}

#[test]
fn the_admin_batch_spans_members() {
    let server = Server::start_with_clock("2026-01-01T00:00:00Z");
    server.admin_post("/v1/members/a/credits/grants", json!({"source": "promotional", "amount": 50}));
    server.admin_post("/v1/members/b/credits/grants", json!({"source": "promotional", "amount": 50}));
    let mut records: Vec<Value> = (0..400)
        .map(|index| {
            let mut record = usage_record(&format!("r{index}"), 1);
            record["member_id"] = json!(if index % 2 == 0 { "a" } else { "b" });
            record
        })
        .collect();
    records.push(json!({"member_id": "ghost", "usage_id": "g1", "metric": "m", "credits": 1}));
    records.push(json!({"member_id": "bad id", "usage_id": "g2", "metric": "m", "credits": 1}));
    records.push(json!({"usage_id": "g3", "metric": "m", "credits": 1}));
    let (status, answer) = post_raw(&server, "/v1/usage/batch", ADMIN_KEY, &json!({"records": records}));
    assert_eq!(status, 200, "{answer}");
    // 50 credits each: the first 50 records of each member pass, the rest are short.
    assert_eq!((answer["accepted"].as_u64(), answer["refused"].as_u64()), (Some(100), Some(303)));
    let results = answer["results"].as_array().unwrap();
    let codes: Vec<Option<&str>> = results[400..].iter().map(|result| result["problem"]["code"].as_str()).collect();
    assert_eq!(codes, vec![Some("not_found"), Some("validation_failed"), Some("validation_failed")]);
    assert_eq!(results[401]["problem"]["field"], "member_id");
    assert_eq!(results[402]["problem"]["field"], "member_id");
    assert!(results[400]["problem"]["detail"].as_str().unwrap().starts_with("member `ghost` not found"));
    let position = answer["position"].as_u64().unwrap();
    for member in ["a", "b"] {
        let (_, balance) = server.admin_get(&format!("/v1/members/{member}/balance?min_position={position}"));
        assert_eq!(balance["available"], 0, "{member}: {balance}");
    }
}

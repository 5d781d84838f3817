//! Integrations through the real server: connect a source, change it,
//! rotate its credential, save queries, remove it; bad input refused with
//! its field and nothing written; another member's key refused; and the
//! secret never in an answer, the event feed or any file of the data
//! directory.

use crate::support::*;
use serde_json::{Value, json};
use tempfile::TempDir;

/// 32 bytes of 7, in base64: a test key.
const VAULT_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
const TOKEN: &str = "tok_live_7f3a9c2e51d04b8a";
const OTHER_TOKEN: &str = "tok_live_b2d94e7a10c35f66";

fn server() -> Server {
    Server::start_with_env(
        TempDir::new().unwrap(),
        &["--allow-private-targets", "127.0.0.1/32"],
        &[("TALLY_VAULT_KEY", VAULT_KEY)],
    )
}

/// A server that reaches 127.0.0.1 only, and looks up no name.
fn local_server() -> Server {
    Server::start_with_env(
        TempDir::new().unwrap(),
        &["--allow-private-targets", "127.0.0.1/32"],
        &[("TALLY_VAULT_KEY", VAULT_KEY), ("TALLY_OUTBOUND", "allow-list")],
    )
}

fn weather(token: &str) -> Value {
    json!({"provider": "rest", "name": "Weather",
        "config": {"base_url": "https://api.example.com", "auth": {"type": "bearer"}},
        "credential": {"token": token}})
}

fn call(server: &Server, method: &str, path: &str, key: &str, body: Option<&Value>) -> (u16, Value) {
    let mut request = server.client.request(method.parse().unwrap(), server.url(path)).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().expect("request");
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    assert!(!text.contains(TOKEN) && !text.contains(OTHER_TOKEN), "a secret in an answer: {text}");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn an_integration_is_connected_changed_rotated_given_queries_and_removed() {
    let server = server();
    assert_eq!(server.put("/v1/members/acme", ADMIN_KEY, &json!({})).status(), 200);
    let path = "/v1/members/acme/integrations/weather";
    let (status, created) = call(&server, "PUT", path, ADMIN_KEY, Some(&weather(TOKEN)));
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        (&created["object"], &created["status"], &created["provider"]),
        (&json!("integration"), &json!("untested"), &json!("rest"))
    );
    assert_eq!((&created["credential"]["version"], &created["credential"]["hint"]), (&json!(1), &json!("…4b8a")));
    // Sent again: nothing changes. A new token: version 2.
    let (status, same) = call(&server, "PUT", path, ADMIN_KEY, Some(&weather(TOKEN)));
    assert_eq!((status, &same["credential"]["version"]), (200, &json!(1)), "{same}");
    let (_, rotated) = call(
        &server,
        "POST",
        &format!("{path}/credential"),
        ADMIN_KEY,
        Some(&json!({"credential": {"token": OTHER_TOKEN}})),
    );
    assert_eq!(rotated["credential"]["version"], 2, "{rotated}");
    assert_ne!(rotated["credential"]["fingerprint"], created["credential"]["fingerprint"]);
    // A config change without the credential keeps it.
    let mut renamed = weather(OTHER_TOKEN);
    renamed["name"] = json!("Weather (EU)");
    renamed.as_object_mut().unwrap().remove("credential");
    let (status, changed) = call(&server, "PUT", path, ADMIN_KEY, Some(&renamed));
    assert_eq!(
        (status, &changed["name"], &changed["credential"]["version"]),
        (200, &json!("Weather (EU)"), &json!(2)),
        "{changed}"
    );

    let query = json!({"kind": "request", "request": {"method": "GET", "path": "/forecast/{{city}}"},
        "params": {"city": {"type": "string"}}, "rows_pointer": "/items", "cache_ttl_s": 60,
        "credits_base": 5, "credits_per_1k_rows": 1, "max_rows": 1000});
    let (status, saved) = call(&server, "PUT", &format!("{path}/queries/forecast"), ADMIN_KEY, Some(&query));
    assert_eq!((status, &saved["query_id"]), (200, &json!("forecast")), "{saved}");
    let (_, listed) = call(&server, "GET", &format!("{path}/queries"), ADMIN_KEY, None);
    assert_eq!(listed["queries"][0]["query"]["credits_base"], 5);
    let (_, one) = call(&server, "GET", path, ADMIN_KEY, None);
    assert_eq!(one["queries"], json!(["forecast"]));
    let (_, all) = call(&server, "GET", "/v1/members/acme/integrations", ADMIN_KEY, None);
    assert_eq!(all["integrations"].as_array().map(Vec::len), Some(1), "{all}");
    assert_eq!(call(&server, "DELETE", &format!("{path}/queries/forecast"), ADMIN_KEY, None).0, 200);
    assert_eq!(call(&server, "GET", &format!("{path}/queries/forecast"), ADMIN_KEY, None).0, 404);

    let (status, removed) = call(&server, "DELETE", path, ADMIN_KEY, None);
    assert_eq!((status, &removed["status"]), (200, &json!("removed")));
    assert_eq!(call(&server, "GET", path, ADMIN_KEY, None).0, 404);
    let (_, all) = call(&server, "GET", "/v1/members/acme/integrations", ADMIN_KEY, None);
    assert_eq!(all["integrations"], json!([]));

    // No secret in the event feed or in any file of the data directory.
    let (_, feed) = call(&server, "GET", "/v1/events?after=0&limit=1000", ADMIN_KEY, None);
    assert!(
        feed["events"].as_array().unwrap().iter().any(|event| event["event_type"] == "IntegrationCredentialRotated")
    );
    let dir = server.data_dir.path().to_owned();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            for secret in [TOKEN, OTHER_TOKEN] {
                assert!(
                    !bytes.windows(secret.len()).any(|window| window == secret.as_bytes()),
                    "{secret} in {}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn bad_integrations_and_queries_are_refused_with_their_field_and_other_members_get_nothing() {
    let server = server();
    for member in ["acme", "globex"] {
        assert_eq!(server.put(&format!("/v1/members/{member}"), ADMIN_KEY, &json!({})).status(), 200);
    }
    let path = "/v1/members/acme/integrations/weather";
    let head = server.head_position();
    for (body, field, code) in [
        (json!({"provider": "ftp", "name": "x", "config": {}}), "provider", "validation_failed"),
        (
            json!({"provider": "rest", "name": "x", "config": {"base_url": "https://u:p@api.example.com"}}),
            "config.base_url",
            "validation_failed",
        ),
        (
            json!({"provider": "rest", "name": "x", "config": {"base_url": "ftp://api.example.com"}}),
            "config.base_url",
            "validation_failed",
        ),
        (
            json!({"provider": "rest", "name": "x", "config": {"base_url": "https://api.example.com", "surprise": 1}}),
            "config.surprise",
            "validation_failed",
        ),
        (
            json!({"provider": "rest", "name": "x", "config": {"base_url": "https://api.example.com", "auth": {"type": "bearer"}}}),
            "credential",
            "validation_failed",
        ),
        (
            json!({"provider": "rest", "name": "x", "config": {"base_url": "https://api.example.com"}, "credential": {"token": "t"}}),
            "credential",
            "validation_failed",
        ),
        (
            json!({"provider": "rest", "name": "x", "config": {"base_url": "https://api.example.com", "auth": {"type": "bearer"}}, "credential": {"token": 7}}),
            "credential.token",
            "validation_failed",
        ),
    ] {
        let (status, problem) = call(&server, "PUT", path, ADMIN_KEY, Some(&body));
        assert_eq!(
            (status, problem["code"].as_str(), problem["field"].as_str()),
            (422, Some(code), Some(field)),
            "{body}: {problem}"
        );
    }
    let (status, problem) = call(
        &server,
        "PUT",
        path,
        ADMIN_KEY,
        Some(&json!({"provider": "rest", "name": "x", "config": {"base_url": "https://10.0.0.7/"}})),
    );
    assert_eq!((status, problem["code"].as_str()), (422, Some("target_forbidden")), "{problem}");
    let (status, _) = call(&server, "PUT", "/v1/members/nobody/integrations/weather", ADMIN_KEY, Some(&weather(TOKEN)));
    assert_eq!(status, 404, "no such member");
    assert_eq!(server.head_position(), head, "refusals write nothing");

    assert_eq!(call(&server, "PUT", path, ADMIN_KEY, Some(&weather(TOKEN))).0, 201);
    let bad_query =
        json!({"kind": "request", "request": {"path": "/forecast/{{city}}"}, "params": {"town": {"type": "string"}}});
    let (status, problem) = call(&server, "PUT", &format!("{path}/queries/forecast"), ADMIN_KEY, Some(&bad_query));
    assert_eq!((status, problem["field"].as_str()), (422, Some("request.path")), "{problem}");
    let wrong_kind = json!({"kind": "graphql", "graphql": {"query": "{ a }"}, "credits_base": 1});
    assert_eq!(
        call(&server, "PUT", &format!("{path}/queries/forecast"), ADMIN_KEY, Some(&wrong_kind)).1["field"],
        "kind"
    );

    // Another member's key: forbidden on every route, and nothing learned.
    let (_, key) = server.admin_post("/v1/members/globex/api-keys", json!({}));
    let globex = key["secret"].as_str().unwrap().to_owned();
    for (method, route) in [
        ("GET", path.to_owned()),
        ("PUT", path.to_owned()),
        ("DELETE", path.to_owned()),
        ("GET", "/v1/members/acme/integrations".to_owned()),
        ("POST", format!("{path}/credential")),
        ("POST", format!("{path}/test")),
        ("POST", format!("{path}/disable")),
        ("POST", format!("{path}/enable")),
        ("GET", format!("{path}/queries")),
        ("PUT", format!("{path}/queries/forecast")),
    ] {
        let (status, problem) = call(&server, method, &route, &globex, Some(&weather(OTHER_TOKEN)));
        assert_eq!((status, problem["code"].as_str()), (403, Some("forbidden")), "{method} {route}");
    }
}

#[test]
fn without_a_vault_key_a_credential_is_refused_with_how_to_set_one() {
    let server = Server::start(&[]);
    assert_eq!(server.put("/v1/members/acme", ADMIN_KEY, &json!({})).status(), 200);
    let (status, problem) =
        call(&server, "PUT", "/v1/members/acme/integrations/weather", ADMIN_KEY, Some(&weather(TOKEN)));
    assert_eq!((status, problem["field"].as_str()), (422, Some("credential")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("TALLY_VAULT_KEY"), "{problem}");
    // Without a credential, an integration needs no vault.
    let open = json!({"provider": "rest", "name": "Open data", "config": {"base_url": "https://api.example.com"}});
    assert_eq!(call(&server, "PUT", "/v1/members/acme/integrations/open", ADMIN_KEY, Some(&open)).0, 201);
}

/// `POST …/test` probes the source: healthy on a 200, the credential's
/// refusal named on a 401, `failing` after three failures in a row, and a
/// name that resolves to a loopback address off the allow-list refused
/// before any connection (the upstream counts none).
#[test]
fn a_test_probes_the_source_and_three_failures_make_it_failing() {
    let upstream = crate::upstream::Upstream::start(TOKEN);
    let server = local_server();
    assert_eq!(server.put("/v1/members/acme", ADMIN_KEY, &json!({})).status(), 200);
    let path = "/v1/members/acme/integrations/local";
    let body = |token: &str| {
        json!({"provider": "rest", "name": "Local",
            "config": {"base_url": format!("http://127.0.0.1:{}", upstream.port), "auth": {"type": "bearer"}, "health_path": "/health"},
            "credential": {"token": token}})
    };
    assert_eq!(call(&server, "PUT", path, ADMIN_KEY, Some(&body(TOKEN))).0, 201);
    let (status, tested) = call(&server, "POST", &format!("{path}/test"), ADMIN_KEY, None);
    assert_eq!((status, &tested["ok"], &tested["status"]), (200, &json!(true), &json!("healthy")), "{tested}");
    assert_eq!(call(&server, "GET", path, ADMIN_KEY, None).1["last_test"]["ok"], true);

    // A wrong token: the source's refusal, by its code.
    call(
        &server,
        "POST",
        &format!("{path}/credential"),
        ADMIN_KEY,
        Some(&json!({"credential": {"token": OTHER_TOKEN}})),
    );
    let (_, refused) = call(&server, "POST", &format!("{path}/test"), ADMIN_KEY, None);
    assert_eq!(
        (&refused["ok"], &refused["error_code"]),
        (&json!(false), &json!("integration_auth_failed")),
        "{refused}"
    );

    // Down: three failures in a row make it failing; one success heals it.
    call(&server, "POST", &format!("{path}/credential"), ADMIN_KEY, Some(&json!({"credential": {"token": TOKEN}})));
    upstream.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let statuses: Vec<Value> =
        (0..3).map(|_| call(&server, "POST", &format!("{path}/test"), ADMIN_KEY, None).1["status"].clone()).collect();
    assert_eq!(statuses, [json!("untested"), json!("untested"), json!("failing")]);
    upstream.down.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(call(&server, "POST", &format!("{path}/test"), ADMIN_KEY, None).1["status"], "healthy");

    // A name is never looked up on an allow-list-only server.
    let seen = upstream.requests.load(std::sync::atomic::Ordering::SeqCst);
    let named = json!({"provider": "rest", "name": "Named",
        "config": {"base_url": format!("https://localhost:{}", upstream.port), "health_path": "/health"}});
    assert_eq!(call(&server, "PUT", "/v1/members/acme/integrations/named", ADMIN_KEY, Some(&named)).0, 201);
    let (_, refused) = call(&server, "POST", "/v1/members/acme/integrations/named/test", ADMIN_KEY, None);
    assert_eq!(refused["error_code"], "target_forbidden", "{refused}");
    assert_eq!(upstream.requests.load(std::sync::atomic::Ordering::SeqCst), seen, "nothing reached the upstream");
}

/// On a server that reaches public addresses, a name that resolves to a
/// loopback address the allow-list leaves out is refused after the lookup
/// (from /etc/hosts) and before any connection.
#[test]
fn a_name_resolving_to_a_forbidden_address_is_refused_before_connecting() {
    let upstream = crate::upstream::Upstream::start(TOKEN);
    let server = Server::start_with_env(TempDir::new().unwrap(), &[], &[("TALLY_VAULT_KEY", VAULT_KEY)]);
    assert_eq!(server.put("/v1/members/acme", ADMIN_KEY, &json!({})).status(), 200);
    let named = json!({"provider": "rest", "name": "Named",
        "config": {"base_url": format!("https://localhost:{}", upstream.port), "health_path": "/health"}});
    assert_eq!(call(&server, "PUT", "/v1/members/acme/integrations/named", ADMIN_KEY, Some(&named)).0, 201);
    let (_, refused) = call(&server, "POST", "/v1/members/acme/integrations/named/test", ADMIN_KEY, None);
    assert_eq!((&refused["ok"], &refused["error_code"]), (&json!(false), &json!("target_forbidden")), "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("loopback"), "{refused}");
    assert_eq!(upstream.requests.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing reached the upstream");
}

/// A saved query runs against the loopback upstream, charged through a
/// reservation; a retry with the same key answers from its record and never
/// runs again; a second key is a cache hit at `credits_base`; failures of
/// the source (down, too slow) charge nothing and leave no hold; too few
/// credits refuse before anything runs.
#[test]
fn a_saved_query_runs_charged_and_a_retry_never_runs_twice() {
    let upstream = crate::upstream::Upstream::start(TOKEN);
    let server = local_server();
    assert_eq!(server.put("/v1/members/acme", ADMIN_KEY, &json!({})).status(), 200);
    let (status, _) =
        server.admin_post("/v1/members/acme/credits/grants", json!({"source": "promotional", "amount": 100}));
    assert_eq!(status, 201);
    let path = "/v1/members/acme/integrations/weather";
    let integration = json!({"provider": "rest", "name": "Weather",
        "config": {"base_url": format!("http://127.0.0.1:{}", upstream.port), "auth": {"type": "bearer"}},
        "credential": {"token": TOKEN}});
    assert_eq!(call(&server, "PUT", path, ADMIN_KEY, Some(&integration)).0, 201);
    let query = json!({"kind": "request", "request": {"method": "GET", "path": "/forecast/{{city}}"},
        "params": {"city": {"type": "string"}}, "rows_pointer": "/items", "cache_ttl_s": 60,
        "credits_base": 5, "credits_per_1k_rows": 1, "max_rows": 1000});
    assert_eq!(call(&server, "PUT", &format!("{path}/queries/forecast"), ADMIN_KEY, Some(&query)).0, 200);
    let execute = |key: Option<&str>, query_id: &str, body: Value| {
        let mut request = server
            .client
            .post(server.url(&format!("{path}/queries/{query_id}/execute")))
            .bearer_auth(ADMIN_KEY)
            .json(&body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().unwrap();
        let status = response.status().as_u16();
        let text = response.text().unwrap();
        assert!(!text.contains(TOKEN), "{text}");
        (status, serde_json::from_str::<Value>(&text).unwrap())
    };
    let runs = || upstream.requests.load(std::sync::atomic::Ordering::SeqCst);

    let (status, first) = execute(Some("k1"), "forecast", json!({"params": {"city": "paris"}}));
    assert_eq!(status, 200, "{first}");
    let record = &first["execution"];
    assert_eq!(
        (&record["status"], &record["rows"], &record["credits"], &record["cache_hit"]),
        (&json!("ok"), &json!(7), &json!(6), &json!(false))
    );
    assert_eq!(first["rows"].as_array().map(Vec::len), Some(7));
    assert_eq!(first["rows"][0], json!({"day": 1, "city": "paris"}));
    assert_eq!((&first["balance"]["available"], &first["balance"]["held"]), (&json!(94), &json!(0)));
    let after_first = runs();

    let (status, again) = execute(Some("k1"), "forecast", json!({"params": {"city": "paris"}}));
    assert_eq!(
        (status, &again["replayed"], &again["execution"]["execution_id"]),
        (200, &json!(true), &record["execution_id"])
    );
    assert_eq!(runs(), after_first, "a retry never runs again");
    let (_, hit) = execute(Some("k2"), "forecast", json!({"params": {"city": "paris"}}));
    assert_eq!(
        (&hit["execution"]["cache_hit"], &hit["execution"]["credits"], &hit["balance"]["available"]),
        (&json!(true), &json!(5), &json!(89))
    );
    assert_eq!(runs(), after_first, "a cache hit runs nothing");

    // Refused before anything: no key, a parameter of the wrong type.
    let (status, problem) = execute(None, "forecast", json!({"params": {"city": "paris"}}));
    assert_eq!((status, problem["header"].as_str()), (422, Some("Idempotency-Key")), "{problem}");
    let (status, problem) = execute(Some("k3"), "forecast", json!({"params": {"city": 7}}));
    assert_eq!((status, problem["field"].as_str()), (422, Some("params.city")), "{problem}");
    assert_eq!(execute(Some("k4"), "nope", json!({})).0, 404);

    // The source down, then too slow: nothing charged, no hold left.
    upstream.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let (status, problem) = execute(Some("k5"), "forecast", json!({"params": {"city": "oslo"}}));
    assert_eq!((status, problem["code"].as_str()), (502, Some("integration_unreachable")), "{problem}");
    upstream.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let slow =
        json!({"kind": "request", "request": {"path": "/slow"}, "credits_base": 3, "max_rows": 10, "timeout_ms": 500});
    assert_eq!(call(&server, "PUT", &format!("{path}/queries/slow"), ADMIN_KEY, Some(&slow)).0, 200);
    let (status, problem) = execute(Some("k6"), "slow", json!({}));
    assert_eq!((status, problem["code"].as_str()), (504, Some("integration_timeout")), "{problem}");
    server.sync("acme");
    let (_, balance) = server.admin_get("/v1/members/acme/balance");
    assert_eq!((&balance["available"], &balance["held"]), (&json!(89), &json!(0)), "{balance}");

    // Too few credits: refused before the source is called.
    let dear = json!({"kind": "request", "request": {"path": "/forecast/x"}, "credits_base": 500, "max_rows": 10});
    assert_eq!(call(&server, "PUT", &format!("{path}/queries/dear"), ADMIN_KEY, Some(&dear)).0, 200);
    let before = runs();
    let (status, problem) = execute(Some("k7"), "dear", json!({}));
    assert_eq!((status, problem["code"].as_str()), (402, Some("insufficient_credits")), "{problem}");
    assert_eq!(runs(), before);

    // The query editor's run: an unsaved query, charged the same way.
    let adhoc = server
        .client
        .post(server.url(&format!("{path}/execute")))
        .bearer_auth(ADMIN_KEY)
        .header("Idempotency-Key", "k8")
        .json(&json!({"query": query, "params": {"city": "rome"}}))
        .send()
        .unwrap();
    assert_eq!(adhoc.status().as_u16(), 200);
    let adhoc: Value = adhoc.json().unwrap();
    assert_eq!((&adhoc["execution"]["rows"], &adhoc["execution"]["credits"]), (&json!(7), &json!(6)));

    // Disabled, it runs nothing and charges nothing; enabled, it runs again.
    let (status, disabled) =
        call(&server, "POST", &format!("{path}/disable"), ADMIN_KEY, Some(&json!({"reason": "paused"})));
    assert_eq!((status, &disabled["status"]), (200, &json!("disabled")), "{disabled}");
    let before = runs();
    let (status, problem) = execute(Some("k9"), "forecast", json!({"params": {"city": "kyiv"}}));
    assert_eq!((status, problem["code"].as_str()), (409, Some("integration_disabled")), "{problem}");
    assert_eq!(runs(), before);
    let (_, enabled) = call(&server, "POST", &format!("{path}/enable"), ADMIN_KEY, None);
    assert_eq!(enabled["status"], "untested");
    assert_eq!(execute(Some("k10"), "forecast", json!({"params": {"city": "kyiv"}})).0, 200);

    // Every execution is recorded, failures included, in the member's log.
    let (_, feed) = call(&server, "GET", "/v1/events?after=0&limit=1000", ADMIN_KEY, None);
    let executed: Vec<&Value> =
        feed["events"].as_array().unwrap().iter().filter(|event| event["event_type"] == "QueryExecuted").collect();
    assert_eq!(executed.len(), 6, "paris, the hit, oslo down, slow, rome, kyiv: {executed:?}");
    assert!(executed.iter().any(|event| event["payload"]["error_code"] == "integration_timeout"));
}

/// A PUT retried with its Idempotency-Key after the credential was rotated
/// answers from its record and leaves no unnamed secret behind: the next
/// rotation still works.
#[test]
fn a_retried_put_after_a_rotation_leaves_the_next_rotation_working() {
    let server = server();
    assert_eq!(server.put("/v1/members/acme", ADMIN_KEY, &json!({})).status(), 200);
    let path = "/v1/members/acme/integrations/weather";
    let put = || {
        let response = server
            .client
            .put(server.url(path))
            .bearer_auth(ADMIN_KEY)
            .header("Idempotency-Key", "put-1")
            .json(&weather(TOKEN))
            .send()
            .unwrap();
        (response.status().as_u16(), response.json::<Value>().unwrap())
    };
    assert_eq!(put().0, 201);
    let rotate = |token: &str| {
        call(&server, "POST", &format!("{path}/credential"), ADMIN_KEY, Some(&json!({"credential": {"token": token}})))
    };
    assert_eq!(rotate(OTHER_TOKEN).1["credential"]["version"], 2);
    let (status, replayed) = put();
    assert_eq!((status, &replayed["replayed"]), (201, &json!(true)), "{replayed}");
    let (status, rotated) = rotate("tok_live_third_secret_0001");
    assert_eq!((status, &rotated["credential"]["version"]), (200, &json!(3)), "{rotated}");
}

/// `tally vault rotate-kek` on a stopped server's directory: afterwards the
/// new key opens the vault (the same secret is recognised, no new version),
/// and the old one no longer does.
#[test]
fn the_vault_key_is_rotated_offline_and_the_old_key_opens_nothing_after() {
    use std::os::unix::fs::PermissionsExt;
    const NEW_KEY: &str = "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=";
    const THIRD_KEY: &str = "CwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCwsLCws=";
    let server = server();
    assert_eq!(server.put("/v1/members/acme", ADMIN_KEY, &json!({})).status(), 200);
    let path = "/v1/members/acme/integrations/weather";
    let (_, created) = call(&server, "PUT", path, ADMIN_KEY, Some(&weather(TOKEN)));
    let data_dir = server.terminate();

    let keys = TempDir::new().unwrap();
    let key_file = |name: &str, key: &str| {
        let file = keys.path().join(name);
        std::fs::write(&file, key).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        file
    };
    let rotate = |current: &str, new_file: &std::path::Path| {
        std::process::Command::new(tally_binary())
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["vault", "rotate-kek", "--new-key-file"])
            .arg(new_file)
            .env("TALLY_VAULT_KEY", current)
            .output()
            .expect("tally runs")
    };
    let output = rotate(VAULT_KEY, &key_file("new.key", NEW_KEY));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("re-sealed 1 credentials"), "{stdout}");
    // The old key no longer opens the vault.
    let output = rotate(VAULT_KEY, &key_file("third.key", THIRD_KEY));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("another key"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let server =
        Server::start_with_env(data_dir, &["--allow-private-targets", "127.0.0.1/32"], &[("TALLY_VAULT_KEY", NEW_KEY)]);
    let (status, same) = call(&server, "PUT", path, ADMIN_KEY, Some(&weather(TOKEN)));
    assert_eq!((status, &same["credential"]["version"]), (200, &json!(1)), "{same}");
    assert_eq!(same["credential"]["fingerprint"], created["credential"]["fingerprint"], "fingerprints survive");
}

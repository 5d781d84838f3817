//! The SaaS sources through the real server, against fakes of Airtable,
//! Google Sheets and Salesforce on loopback (tests/e2e/saas_fakes.rs): per
//! provider, connect, test, save, execute charged (`QueryExecuted`,
//! history), a cache hit, `max_rows` across three pages or more, the rate
//! limit honoured, expired tokens refreshed, the service's refusals named,
//! hostile parameters bound as literals, and no secret anywhere: data
//! files, the server's log, `/metrics`, the event feed, the answers.

use crate::saas_fakes::*;
use crate::support::*;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tempfile::TempDir;

/// 32 bytes of 7, in base64: a test key.
const VAULT_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

/// A server that reaches 127.0.0.1 only, logging at debug into a file.
fn logged_server() -> (Server, TempDir, PathBuf) {
    server_with(&[("TALLY_OUTBOUND", "allow-list")])
}

/// A server with 127.0.0.1 allow-listed and `env`, logging at debug.
fn server_with(env: &[(&str, &str)]) -> (Server, TempDir, PathBuf) {
    let log = TempDir::new().unwrap();
    let log_path = log.path().join("server.log");
    let mut env = env.to_vec();
    env.extend([("TALLY_VAULT_KEY", VAULT_KEY), ("TALLY_LOG", "debug")]);
    let server = Server::start_logged(&["--allow-private-targets", "127.0.0.1/32"], &env, &log_path);
    assert_eq!(server.put("/v1/members/acme", ADMIN_KEY, &json!({})).status(), 200);
    let grant = json!({"source": "promotional", "amount": 10_000});
    assert_eq!(server.admin_post("/v1/members/acme/credits/grants", grant).0, 201);
    (server, log, log_path)
}

/// Everything the server answered, kept for the secrets check.
#[derive(Default)]
struct Answers(Vec<String>);

impl Answers {
    fn put(&mut self, server: &Server, path: &str, body: &Value) -> (u16, Value) {
        let response = server.put(path, ADMIN_KEY, body);
        let status = response.status().as_u16();
        let text = response.text().unwrap_or_default();
        self.0.push(text.clone());
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn post(&mut self, server: &Server, path: &str, key: &str, body: &Value) -> (u16, Value, Option<String>) {
        let response = server.post(path, ADMIN_KEY, body, Some(key));
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").map(|value| value.to_str().unwrap().to_owned());
        let text = response.text().unwrap_or_default();
        self.0.push(text.clone());
        (status, serde_json::from_str(&text).unwrap_or(Value::Null), retry_after)
    }

    fn get(&mut self, server: &Server, path: &str) -> Value {
        let (status, body) = server.admin_get(path);
        assert_eq!(status, 200, "{path}: {body}");
        self.0.push(body.to_string());
        body
    }

    /// Registers `integration` for acme; its answer.
    fn integrate(&mut self, server: &Server, integration: &str, provider: &str, config: Value, credential: Value) {
        let body = json!({"provider": provider, "name": integration, "config": config, "credential": credential});
        let (status, answer) = self.put(server, &format!("/v1/members/acme/integrations/{integration}"), &body);
        assert_eq!(status, 201, "{answer}");
    }

    fn save(&mut self, server: &Server, integration: &str, query_id: &str, query: Value) {
        let path = format!("/v1/members/acme/integrations/{integration}/queries/{query_id}");
        let (status, answer) = self.put(server, &path, &query);
        assert_eq!(status, 200, "{answer}");
    }

    fn run(
        &mut self,
        server: &Server,
        integration: &str,
        query_id: &str,
        params: Value,
    ) -> (u16, Value, Option<String>) {
        let path = format!("/v1/members/acme/integrations/{integration}/queries/{query_id}/execute");
        self.post(server, &path, &format!("run-{}", uuid_like()), &json!({"params": params}))
    }

    fn test(&mut self, server: &Server, integration: &str) -> Value {
        let path = format!("/v1/members/acme/integrations/{integration}/test");
        let (status, answer, _) = self.post(server, &path, &uuid_like(), &json!({}));
        assert_eq!(status, 200, "{answer}");
        answer
    }

    /// No secret in any answer, `/metrics`, the event feed, the log or any
    /// file of the data directory (after the server stopped).
    fn assert_no_secret(mut self, server: Server, log_path: &std::path::Path, secrets: &[&str]) {
        let metrics = server.get("/metrics", ADMIN_KEY).text().unwrap();
        self.0.push(metrics);
        self.0.push(server.admin_get("/v1/events?after=0&limit=1000").1.to_string());
        let data_dir = server.terminate();
        self.0.push(std::fs::read_to_string(log_path).unwrap());
        for secret in secrets {
            for text in &self.0 {
                assert!(!text.contains(secret), "a secret ({}…) is in an answer or the log", &secret[..8]);
            }
        }
        let mut stack = vec![data_dir.path().to_path_buf()];
        while let Some(path) = stack.pop() {
            if path.is_dir() {
                stack.extend(std::fs::read_dir(&path).unwrap().map(|entry| entry.unwrap().path()));
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for secret in secrets {
                let found = bytes.windows(secret.len()).any(|window| window == secret.as_bytes());
                assert!(!found, "{} holds a secret ({}…)", path.display(), &secret[..8]);
            }
        }
    }
}

fn rows(answer: &Value) -> &Vec<Value> {
    answer["rows"].as_array().unwrap_or_else(|| panic!("rows in {answer}"))
}

fn available(server: &Server) -> i64 {
    server.sync("acme");
    server.admin_get("/v1/members/acme/balance").1["available"].as_i64().unwrap()
}

#[test]
fn airtable_lists_records_paced_charged_and_bound() {
    let airtable = FakeAirtable::start(250);
    let (server, _log, log_path) = logged_server();
    let mut answers = Answers::default();
    let config = json!({"base_url": airtable.fake.url("/v0"), "base_id": AIRTABLE_BASE});
    answers.integrate(&server, "crm", "airtable", config.clone(), json!({"token": AIRTABLE_TOKEN}));
    let tested = answers.test(&server, "crm");
    assert_eq!((&tested["ok"], &tested["status"]), (&json!(true), &json!("healthy")), "{tested}");

    // max_rows across pages: 230 of 252 records, 100 a page, three pages.
    answers.save(
        &server,
        "crm",
        "all",
        json!({"kind": "records", "table": "Customers", "view": "Grid view",
        "max_rows": 230, "credits_base": 3, "credits_per_1k_rows": 1, "cache_ttl_s": 300}),
    );
    let before = available(&server);
    let listed = airtable.fake.count("/v0/appTEST");
    let (status, answer, _) = answers.run(&server, "crm", "all", json!({}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!((rows(&answer).len(), &answer["truncated"]), (230, &json!(true)));
    assert_eq!(airtable.fake.count("/v0/appTEST") - listed, 3, "three pages, no more");
    let first = &rows(&answer)[0];
    assert_eq!(first["id"], "rec00000000000000");
    assert_eq!((&first["Name"], &first["Visited"]), (&json!("Customer 001"), &json!(true)), "{first}");
    assert!(first["createdTime"].is_string() && first["Members"].is_array(), "{first}");
    let pages: Vec<Request> = airtable.fake.requests().into_iter().filter(|r| r.path.ends_with("/Customers")).collect();
    assert_eq!(pages[0].param("view"), Some("Grid view"));
    assert_eq!(pages[1].param("offset"), Some("itr100"));
    assert_eq!(pages[2].param("pageSize"), Some("31"), "the last page asks only for what is missing");
    assert_eq!(answer["execution"]["credits"], 4);
    assert_eq!(available(&server), before - 4);
    let executed = server.events_of_type("QueryExecuted");
    assert_eq!((&executed[0]["query_id"], &executed[0]["rows"]), (&json!("all"), &json!(230)), "{}", executed[0]);
    let history = answers.get(&server, "/v1/members/acme/executions?integration=crm");
    assert_eq!(history["executions"][0]["credits"], 4, "{history}");

    // The documentation's own answer reads as the documentation says.
    let (status, documented, _) = answers.post(
        &server,
        "/v1/members/acme/integrations/crm/execute",
        "doc-1",
        &json!({"kind": "records",
            "table": "Restaurants"}),
    );
    assert_eq!(status, 200, "{documented}");
    let page: Value = serde_json::from_str(&fixture("airtable/list_records.json")).unwrap();
    assert_eq!(rows(&documented).len(), 6, "two pages of the documented three records");
    let record = &page["records"][0];
    let mut expected = json!({"id": record["id"], "createdTime": record["createdTime"]});
    expected.as_object_mut().unwrap().extend(record["fields"].as_object().unwrap().clone());
    assert_eq!(rows(&documented)[0], expected);

    // The same run again is a cache hit: credits_base, nothing sent.
    let sent = airtable.fake.requests().len();
    let (_, again, _) = answers.run(&server, "crm", "all", json!({}));
    assert_eq!((&again["execution"]["cache_hit"], &again["execution"]["credits"]), (&json!(true), &json!(3)));
    assert_eq!(airtable.fake.requests().len(), sent);

    // Hostile values are one string literal each: they match themselves.
    answers.save(
        &server,
        "crm",
        "by-name",
        json!({"kind": "records", "table": "Customers",
        "filter_by_formula": "{Name} = {{name}}", "fields": ["Name"], "params": {"name": {"type": "string"}},
        "credits_base": 1, "cache_ttl_s": 0}),
    );
    for name in airtable_names(250).iter().skip(248) {
        let (status, answer, _) = answers.run(&server, "crm", "by-name", json!({"name": name}));
        assert_eq!(status, 200, "{answer}");
        assert_eq!(rows(&answer).len(), 1, "{name}: {answer}");
        assert_eq!(rows(&answer)[0]["Name"], json!(name));
        assert!(rows(&answer)[0].get("Seats").is_none(), "only the fields asked for");
    }
    let (_, none, _) = answers.run(&server, "crm", "by-name", json!({"name": "\" & TRUE() & \""}));
    assert_eq!(rows(&none).len(), 0, "{none}");
    let quoted = json!({"kind": "records", "table": "Customers", "filter_by_formula": "{Name} = \"{{name}}\"",
        "params": {"name": {"type": "string"}}, "credits_base": 1});
    let (status, refused) = answers.put(&server, "/v1/members/acme/integrations/crm/queries/quoted", &quoted);
    assert_eq!((status, &refused["field"]), (422, &json!("filter_by_formula")), "{refused}");

    // Eight runs in a row stay under 5 requests a second.
    for n in 0..8 {
        let (status, answer, _) = answers.run(&server, "crm", "by-name", json!({"name": format!("Customer {n:03}")}));
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(airtable.over_rate.load(Ordering::SeqCst), 0, "more than 5 requests a second reached Airtable");

    // Airtable's refusals, named; none charged.
    let before = available(&server);
    answers.save(
        &server,
        "crm",
        "bad-formula",
        json!({"kind": "records", "table": "Customers",
        "filter_by_formula": "BAD(", "credits_base": 1}),
    );
    let (status, failed, _) = answers.run(&server, "crm", "bad-formula", json!({}));
    assert_eq!((status, &failed["code"]), (422, &json!("integration_query_failed")), "{failed}");
    assert!(failed["detail"].as_str().unwrap().contains("INVALID_FILTER_BY_FORMULA"), "{failed}");
    answers.save(&server, "crm", "no-table", json!({"kind": "records", "table": "Nope", "credits_base": 1}));
    let (status, missing, _) = answers.run(&server, "crm", "no-table", json!({}));
    assert_eq!((status, &missing["code"]), (422, &json!("integration_query_failed")), "{missing}");
    answers.save(
        &server,
        "crm",
        "forbidden",
        json!({"kind": "records", "base_id": AIRTABLE_FORBIDDEN_BASE,
        "table": "Customers", "credits_base": 1}),
    );
    let (status, forbidden, _) = answers.run(&server, "crm", "forbidden", json!({}));
    assert_eq!((status, &forbidden["code"]), (502, &json!("integration_auth_failed")), "{forbidden}");
    airtable.fake.delay_ms.store(1_500, Ordering::SeqCst);
    answers.save(
        &server,
        "crm",
        "slow",
        json!({"kind": "records", "table": "Customers", "timeout_ms": 1_000,
        "credits_base": 1, "cache_ttl_s": 0}),
    );
    let (status, slow, _) = answers.run(&server, "crm", "slow", json!({}));
    assert_eq!((status, &slow["code"]), (504, &json!("integration_timeout")), "{slow}");
    airtable.fake.delay_ms.store(0, Ordering::SeqCst);
    answers.integrate(&server, "wrong", "airtable", config, json!({"token": "patWRONGtoken0000000000"}));
    let (_, refused, _) = answers.post(&server, "/v1/members/acme/integrations/wrong/test", "t-w", &json!({}));
    assert_eq!((&refused["ok"], &refused["error_code"]), (&json!(false), &json!("integration_auth_failed")));
    assert_eq!(available(&server), before, "failures are free");

    // A success makes it healthy again after those failures.
    let (status, answer, _) = answers.run(&server, "crm", "by-name", json!({"name": "Customer 050"}));
    assert_eq!(status, 200, "{answer}");
    let before = available(&server);

    // A 429: the base is held back 30 s; a run that cannot wait that long
    // fails at once, and the next one sends nothing.
    std::thread::sleep(Duration::from_secs(1));
    airtable.rate_limits.store(1, Ordering::SeqCst);
    let (status, limited, retry_after) = answers.run(&server, "crm", "by-name", json!({"name": "Customer 100"}));
    assert_eq!((status, &limited["code"]), (503, &json!("integration_rate_limited")), "{limited}");
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((25..=30).contains(&retry_after), "{retry_after}");
    let sent = airtable.fake.requests().len();
    let (status, held, _) = answers.run(&server, "crm", "by-name", json!({"name": "Customer 101"}));
    assert_eq!((status, &held["code"]), (503, &json!("integration_rate_limited")), "{held}");
    assert_eq!(airtable.fake.requests().len(), sent, "nothing was sent to a base that asked to wait");
    assert_eq!(available(&server), before, "rate limits are free");
    let (_, integration) = server.admin_get("/v1/members/acme/integrations/crm");
    assert_eq!(integration["status"], "healthy", "a rate limit is not a failure of the source: {integration}");

    // Every request to the base was paced: 210 ms apart, never closer.
    let times: Vec<std::time::Instant> = airtable
        .fake
        .requests()
        .iter()
        .filter(|request| request.path.starts_with(&format!("/v0/{AIRTABLE_BASE}/")))
        .map(|request| request.at)
        .collect();
    assert!(times.len() > 20, "{} requests", times.len());
    for pair in times.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(gap >= Duration::from_millis(190), "two requests to one base {gap:?} apart");
    }

    answers.assert_no_secret(server, &log_path, &[AIRTABLE_TOKEN]);
}

#[test]
fn google_sheets_signs_in_as_a_service_account_and_reads_ranges() {
    let account = ServiceAccount::generate();
    let sheets = FakeSheets::start(account.public_key_der.clone(), 3_600);
    let key_file = account.key_file(&sheets.fake.url("/token"));
    let (server, _log, log_path) = logged_server();
    let mut answers = Answers::default();
    let config = json!({"api_base_url": sheets.fake.url(""), "spreadsheet_id": SHEETS_SPREADSHEET});
    answers.integrate(&server, "sites", "google_sheets", config.clone(), json!({"service_account_json": key_file}));
    let tested = answers.test(&server, "sites");
    assert_eq!(tested["ok"], true, "{tested}; refused: {:?}", sheets.refused.lock().unwrap());

    answers.save(
        &server,
        "sites",
        "table",
        json!({"kind": "range", "range": "Sheet1!A1:D", "header_row": true,
        "value_render_option": "UNFORMATTED_VALUE", "max_rows": 100, "credits_base": 2, "cache_ttl_s": 300}),
    );
    let before = available(&server);
    let (status, answer, _) = answers.run(&server, "sites", "table", json!({}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(rows(&answer).len(), 12);
    assert_eq!(rows(&answer)[0], json!({"Name": "Site 1", "Seats": 1, "Opened": "2024-01-05", "Name_2": "x"}));
    assert_eq!(rows(&answer)[4], json!({"Name": "Site 5", "Seats": 5, "Opened": null, "Name_2": null}));
    let read = sheets.fake.requests().into_iter().rfind(|r| r.path.contains("/values/")).unwrap();
    assert_eq!(read.path, format!("/v4/spreadsheets/{SHEETS_SPREADSHEET}/values/Sheet1!A1:D"));
    assert_eq!(read.param("valueRenderOption"), Some("UNFORMATTED_VALUE"));
    assert_eq!(available(&server), before - 2);
    let (_, cached, _) = answers.run(&server, "sites", "table", json!({}));
    assert_eq!(cached["execution"]["cache_hit"], true);

    // The documentation's ValueRange, with its header row.
    let (status, documented, _) = answers.post(
        &server,
        "/v1/members/acme/integrations/sites/execute",
        "doc-1",
        &json!({"kind": "range", "range": "Doc!A1:D5", "header_row": true}),
    );
    assert_eq!(status, 200, "{documented}");
    assert_eq!(rows(&documented).len(), 4);
    assert_eq!(
        rows(&documented)[0],
        json!({"Item": "Wheel", "Cost": "$20.50", "Stocked": "4", "Ship Date": "3/1/2016"})
    );

    // Without a header row, arrays; max_rows cuts.
    answers.save(
        &server,
        "sites",
        "raw",
        json!({"kind": "range", "range": "Sheet1!{{cells}}", "max_rows": 3,
        "params": {"cells": {"type": "string"}}, "credits_base": 1, "cache_ttl_s": 0}),
    );
    let (status, raw, _) = answers.run(&server, "sites", "raw", json!({"cells": "A1:D"}));
    assert_eq!(status, 200, "{raw}");
    assert_eq!((rows(&raw).len(), &raw["truncated"]), (3, &json!(true)));
    assert_eq!(rows(&raw)[0], json!(["Name", "Seats", "Opened", "Name"]));

    // One token for all of that; a revoked one is fetched again once.
    assert_eq!(sheets.issued.load(Ordering::SeqCst), 1, "the access token is kept");
    sheets.expire_tokens.store(true, Ordering::SeqCst);
    let (status, fresh, _) = answers.run(&server, "sites", "raw", json!({"cells": "A1:B"}));
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(sheets.issued.load(Ordering::SeqCst), 2);
    assert!(sheets.refused.lock().unwrap().is_empty(), "{:?}", sheets.refused.lock().unwrap());

    // Google's refusals, named.
    answers.save(&server, "sites", "other-tab", json!({"kind": "range", "range": "Summary!A1:B", "credits_base": 1}));
    let (status, refused, _) = answers.run(&server, "sites", "other-tab", json!({}));
    assert_eq!((status, &refused["code"]), (422, &json!("integration_query_failed")), "{refused}");
    assert!(refused["detail"].as_str().unwrap().contains("Unable to parse range"), "{refused}");
    answers.save(
        &server,
        "sites",
        "private",
        json!({"kind": "range", "spreadsheet_id": "1PRIVATEsheet",
        "range": "Sheet1!A1:B", "credits_base": 1}),
    );
    let (status, private, _) = answers.run(&server, "sites", "private", json!({}));
    assert_eq!((status, &private["code"]), (502, &json!("integration_auth_failed")), "{private}");

    // A 429 asking for a second: the run waits it out within its timeout,
    // and answers.
    sheets.retry_after_s.store(1, Ordering::SeqCst);
    sheets.rate_limits.store(1, Ordering::SeqCst);
    let started = std::time::Instant::now();
    let (status, waited, _) = answers.run(&server, "sites", "raw", json!({"cells": "A1:A"}));
    assert_eq!(status, 200, "{waited}");
    assert!(started.elapsed() >= Duration::from_secs(1), "the pause was kept: {:?}", started.elapsed());
    let reads = sheets.fake.requests().into_iter().filter(|request| request.path.ends_with("Sheet1!A1:A")).count();
    assert_eq!(reads, 2, "refused once, then read");

    // A 429 asking for more than the run has: the integration is held back
    // for Google's Retry-After; the next run sends nothing.
    sheets.retry_after_s.store(42, Ordering::SeqCst);
    sheets.rate_limits.store(1, Ordering::SeqCst);
    let (status, limited, retry_after) = answers.run(&server, "sites", "raw", json!({"cells": "A1:C"}));
    assert_eq!(
        (status, &limited["code"], retry_after.as_deref()),
        (503, &json!("integration_rate_limited"), Some("42"))
    );
    let sent = sheets.fake.requests().len();
    let (status, held, _) = answers.run(&server, "sites", "raw", json!({"cells": "A2:C"}));
    assert_eq!((status, &held["code"]), (503, &json!("integration_rate_limited")), "{held}");
    assert_eq!(sheets.fake.requests().len(), sent, "nothing was sent while Google asked for a pause");

    // A key whose signature Google cannot verify is refused at the token.
    let stranger = ServiceAccount::generate().key_file(&sheets.fake.url("/token"));
    answers.integrate(&server, "stranger", "google_sheets", config.clone(), json!({"service_account_json": stranger}));
    let (_, refused, _) = answers.post(&server, "/v1/members/acme/integrations/stranger/test", "t-s", &json!({}));
    assert_eq!((&refused["ok"], &refused["error_code"]), (&json!(false), &json!("integration_auth_failed")));
    assert_eq!(sheets.refused.lock().unwrap().len(), 1);

    // An API key, for public sheets.
    answers.integrate(&server, "public", "google_sheets", config, json!({"api_key": SHEETS_API_KEY}));
    answers.save(
        &server,
        "public",
        "table",
        json!({"kind": "range", "range": "Sheet1!A1:B", "header_row": true,
        "credits_base": 1}),
    );
    let (status, public, _) = answers.run(&server, "public", "table", json!({}));
    assert_eq!((status, rows(&public).len()), (200, 12), "{public}");

    let mut secrets: Vec<String> =
        vec![account.private_key_pem.lines().nth(3).unwrap().to_owned(), SHEETS_API_KEY.into()];
    secrets.extend((1..=sheets.issued.load(Ordering::SeqCst)).map(|n| format!("ya29.test-access-{n}")));
    // The signed assertions too: each was a credential for an hour.
    let assertions =
        sheets.fake.requests().iter().filter_map(|request| request.form_field("assertion")).collect::<Vec<_>>();
    assert!(!assertions.is_empty());
    secrets.extend(assertions);
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    answers.assert_no_secret(server, &log_path, &secrets);
}

#[test]
fn salesforce_follows_batches_refreshes_tokens_and_reports_usage() {
    let salesforce = FakeSalesforce::start(350, 100);
    let (server, _log, log_path) = logged_server();
    let mut answers = Answers::default();
    let config = json!({"login_url": salesforce.fake.url(""), "api_version": SF_VERSION, "flow": "client_credentials"});
    let credential = json!({"client_id": SF_CLIENT_ID, "client_secret": SF_CLIENT_SECRET});
    answers.integrate(&server, "crm", "salesforce", config.clone(), credential);
    let tested = answers.test(&server, "crm");
    assert_eq!(tested["ok"], true, "{tested}");
    assert_eq!(tested["api_usage"]["limit"], 15_000, "{tested}");

    answers.save(
        &server,
        "crm",
        "accounts",
        json!({"kind": "soql", "soql": "SELECT Id, Name FROM Account",
        "max_rows": 320, "credits_base": 5, "cache_ttl_s": 300}),
    );
    let before = available(&server);
    let (status, answer, _) = answers.run(&server, "crm", "accounts", json!({}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!((rows(&answer).len(), &answer["truncated"]), (320, &json!(true)));
    assert_eq!(rows(&answer)[0], json!({"Id": "001D00000000000000", "Name": "Account 0001"}), "attributes dropped");
    assert_eq!(salesforce.fake.count("/services/data/v66.0/query"), 4, "four batches of 100");
    assert_eq!(available(&server), before - 5);
    let (_, cached, _) = answers.run(&server, "crm", "accounts", json!({}));
    assert_eq!(cached["execution"]["cache_hit"], true);
    server.sync("acme");
    let integration = answers.get(&server, "/v1/members/acme/integrations/crm");
    let used = u64::from(salesforce.api_used.load(Ordering::SeqCst));
    assert_eq!(integration["api_usage"]["used"], used, "the last answer's count: {integration}");
    assert_eq!(integration["api_usage"]["limit"], 15_000, "{integration}");
    let executed = server.events_of_type("QueryExecuted");
    assert_eq!(executed[0]["api_usage"]["limit"], 15_000, "{}", executed[0]);

    // Tokens that die after two requests: refreshed once per death, and
    // every run still answers.
    salesforce.token_uses.store(2, Ordering::SeqCst);
    salesforce.expire_tokens.store(true, Ordering::SeqCst);
    answers.save(
        &server,
        "crm",
        "one",
        json!({"kind": "soql", "soql": "SELECT Id, Name FROM Account WHERE Name = {{name}}",
        "keep_attributes": true, "params": {"name": {"type": "string"}}, "credits_base": 1, "cache_ttl_s": 0}),
    );
    let issued = salesforce.tokens_issued.load(Ordering::SeqCst);
    for name in salesforce_names(350).iter().rev().take(4) {
        let (status, answer, _) = answers.run(&server, "crm", "one", json!({"name": name}));
        assert_eq!(status, 200, "{answer}");
        assert_eq!(rows(&answer).len(), 1, "{name}: {answer}");
        assert_eq!(rows(&answer)[0]["Name"], json!(name));
        assert_eq!(rows(&answer)[0]["attributes"]["type"], "Account");
    }
    assert!(salesforce.tokens_issued.load(Ordering::SeqCst) > issued, "expired tokens were refreshed");
    let (_, nobody, _) = answers.run(&server, "crm", "one", json!({"name": "x' OR Name != 'y"}));
    assert_eq!(rows(&nobody).len(), 0, "{nobody}");

    // Salesforce's refusals, named; none charged.
    let before = available(&server);
    for (soql, code) in [
        ("SELECT Id, Name FROM Account WHERE", "MALFORMED_QUERY"),
        ("SELECT Id, Name, Foo__c FROM Account", "INVALID_FIELD"),
    ] {
        let (status, failed, _) = answers.post(
            &server,
            "/v1/members/acme/integrations/crm/execute",
            &uuid_like(),
            &json!({"query": {"kind": "soql", "soql": soql}}),
        );
        assert_eq!((status, &failed["code"]), (422, &json!("integration_query_failed")), "{failed}");
        assert!(failed["detail"].as_str().unwrap().contains(code), "{failed}");
    }
    salesforce.over_limit.store(true, Ordering::SeqCst);
    let (status, limited, retry_after) = answers.run(&server, "crm", "one", json!({"name": "Account 0001"}));
    assert_eq!((status, &limited["code"]), (503, &json!("integration_rate_limited")), "{limited}");
    assert!(retry_after.is_some());
    let executed = server.events_of_type("QueryExecuted");
    let failed = executed.last().unwrap();
    assert_eq!(failed["error_code"], "integration_rate_limited", "{failed}");
    assert!(failed["api_usage"]["used"].is_u64(), "a failure's answer reported the usage too: {failed}");
    // Held back: a test sends nothing, records nothing, and the
    // integration stays healthy.
    let sent = salesforce.fake.requests().len();
    let probed = answers.test(&server, "crm");
    assert_eq!((&probed["error_code"], &probed["position"]), (&json!("integration_rate_limited"), &Value::Null));
    assert_eq!(salesforce.fake.requests().len(), sent, "nothing is sent to an org that is over its limit");
    assert_eq!(answers.get(&server, "/v1/members/acme/integrations/crm")["status"], "healthy");
    salesforce.over_limit.store(false, Ordering::SeqCst);
    assert_eq!(available(&server), before);

    // The documentation's two pages, at the version they show.
    let documented_version = json!({"login_url": salesforce.fake.url(""), "api_version": "67.0"});
    answers.integrate(
        &server,
        "v67",
        "salesforce",
        documented_version,
        json!({"client_id": SF_CLIENT_ID,
        "client_secret": SF_CLIENT_SECRET}),
    );
    let (status, documented, _) = answers.post(
        &server,
        "/v1/members/acme/integrations/v67/execute",
        "doc-1",
        &json!({"kind": "soql", "soql": "SELECT Id, Name FROM Account"}),
    );
    assert_eq!(status, 200, "{documented}");
    let names: Vec<&Value> = rows(&documented).iter().map(|row| &row["Name"]).collect();
    assert_eq!(names, [&json!("Test 1"), &json!("Test 2"), &json!("O'Brien & Sons")]);

    // The refresh-token flow; a wrong secret is refused at the token.
    let refresh = json!({"login_url": salesforce.fake.url(""), "api_version": SF_VERSION, "flow": "refresh_token"});
    answers.integrate(
        &server,
        "refresh",
        "salesforce",
        refresh,
        json!({"client_id": SF_CLIENT_ID,
        "refresh_token": SF_REFRESH_TOKEN}),
    );
    assert_eq!(answers.test(&server, "refresh")["ok"], true);
    answers.integrate(
        &server,
        "wrong",
        "salesforce",
        config,
        json!({"client_id": SF_CLIENT_ID,
        "client_secret": "not-the-secret-0000"}),
    );
    let wrong = answers.test(&server, "wrong");
    assert_eq!(wrong["error_code"], "integration_auth_failed", "{wrong}");

    let mut secrets: Vec<String> = vec![SF_CLIENT_ID.into(), SF_CLIENT_SECRET.into(), SF_REFRESH_TOKEN.into()];
    secrets.extend((1..=salesforce.tokens_issued.load(Ordering::SeqCst)).map(|n| format!("00DTEST!session.{n}")));
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    answers.assert_no_secret(server, &log_path, &secrets);
}

/// A token server that names an instance the guard does not allow (a
/// loopback address off the allow-list) gets nothing sent there.
#[test]
fn a_salesforce_instance_url_is_checked_by_the_target_guard() {
    let salesforce = FakeSalesforce::start(10, 100);
    *salesforce.instance_url.lock().unwrap() = format!("http://127.0.0.2:{}", salesforce.fake.port);
    // The guard's own rule, not an allow-list-only server: 127.0.0.2 is
    // loopback, and only 127.0.0.1 is opened. Every address here is a
    // literal: nothing is looked up.
    let (server, _log, _log_path) = server_with(&[]);
    let mut answers = Answers::default();
    let config = json!({"login_url": salesforce.fake.url(""), "api_version": SF_VERSION});
    answers.integrate(
        &server,
        "crm",
        "salesforce",
        config,
        json!({"client_id": SF_CLIENT_ID,
        "client_secret": SF_CLIENT_SECRET}),
    );
    let tested = answers.test(&server, "crm");
    assert_eq!(tested["error_code"], "target_forbidden", "{tested}");
    let (status, refused, _) = answers.post(
        &server,
        "/v1/members/acme/integrations/crm/execute",
        "x-1",
        &json!({"query": {"kind": "soql", "soql": "SELECT Id, Name FROM Account"}}),
    );
    assert_eq!((status, &refused["code"]), (422, &json!("target_forbidden")), "{refused}");
    let requests = salesforce.fake.requests();
    assert!(!requests.is_empty());
    assert!(
        requests.iter().all(|request| request.method == "POST" && request.path == "/services/oauth2/token"),
        "only tokens were asked for"
    );
}

#[test]
fn providers_describe_their_forms_and_configs_are_checked_by_them() {
    let (server, _log, _log_path) = logged_server();
    let response = reqwest::blocking::get(server.url("/v1/providers")).unwrap();
    assert_eq!(response.status(), 200, "public: no key needed");
    let listed: Value = response.json().unwrap();
    let names: Vec<&str> =
        listed["providers"].as_array().unwrap().iter().map(|p| p["provider"].as_str().unwrap()).collect();
    assert_eq!(names, ["rest", "graphql", "postgres", "mysql", "mongodb", "airtable", "google_sheets", "salesforce"]);
    let (_, salesforce) = server.admin_get("/v1/providers/salesforce");
    assert_eq!(salesforce["kinds"], json!(["soql"]));
    let flow = salesforce["config"].as_array().unwrap().iter().find(|field| field["name"] == "flow").unwrap();
    assert_eq!(flow["options"], json!(["client_credentials", "refresh_token"]));
    let refresh = &salesforce["credentials"][1];
    assert_eq!(refresh["when"], json!({"field": "flow", "equals": "refresh_token"}));
    assert!(refresh["fields"].as_array().unwrap().iter().all(|field| field["secret"] == true), "{refresh}");
    let (status, _) = server.admin_get("/v1/providers/oracle");
    assert_eq!(status, 404);

    // What the form says is what the check does.
    let mut answers = Answers::default();
    for (body, field) in [
        (json!({"provider": "airtable", "config": {}, "credential": {"token": "pat"}}), "config.base_id"),
        (
            json!({"provider": "airtable", "config": {"base_id": "appX", "colour": 1}, "credential": {"token": "p"}}),
            "config.colour",
        ),
        (json!({"provider": "airtable", "config": {"base_id": "appX"}}), "credential"),
        (
            json!({"provider": "salesforce", "config": {"flow": "refresh_token"},
            "credential": {"client_id": "c", "client_secret": "s"}}),
            "credential.refresh_token",
        ),
        (
            json!({"provider": "salesforce", "config": {"api_version": "v66"},
            "credential": {"client_id": "c", "client_secret": "s"}}),
            "config.api_version",
        ),
        (
            json!({"provider": "google_sheets", "config": {},
            "credential": {"service_account_json": "{\"private_key\": \"leak-me-not\""}}),
            "credential.service_account_json",
        ),
        (
            json!({"provider": "google_sheets", "config": {},
            "credential": {"service_account_json": "{\"type\": \"service_account\", \"client_email\": \"a@b\", \"private_key\": \"leak-me-not\"}"}}),
            "credential.service_account_json",
        ),
    ] {
        let mut body = body;
        body["name"] = json!("x");
        let (status, refused) = answers.put(&server, "/v1/members/acme/integrations/x", &body);
        assert_eq!((status, &refused["field"]), (422, &json!(field)), "{body}: {refused}");
        assert!(!refused.to_string().contains("leak-me-not"), "{refused}");
    }
    let (_, integrations) = server.admin_get("/v1/members/acme/integrations");
    assert_eq!(integrations["integrations"], json!([]), "refusals change nothing");
}

//! The REST and GraphQL providers against a real upstream on loopback (an
//! actix-web server in this process, on 127.0.0.1): JSON, auth, OAuth2
//! tokens, slow, failing, huge, non-JSON and redirecting endpoints. The
//! guard's allow-list opens 127.0.0.1 only; the forbidden redirect points
//! at 127.0.0.2, loopback too, which the guard refuses before connecting.

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use secrecy::SecretString;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tally_integrations::guard::Guard;
use tally_integrations::http::GuardedHttp;
use tally_integrations::query::QuerySpec;
use tally_integrations::{Call, Limits, ProviderError, provider};

const TOKEN: &str = "tok_test_abcdefghijklmnop";

#[derive(Default)]
struct Counters {
    tokens_issued: AtomicU32,
    /// Answer the next protected call 401 (an expired token).
    expire_next: AtomicU32,
}

fn authorized(request: &HttpRequest, token: &str) -> bool {
    request.headers().get("authorization").and_then(|value| value.to_str().ok()) == Some(&format!("Bearer {token}"))
}

async fn forecast(request: HttpRequest, city: web::Path<String>) -> HttpResponse {
    if !authorized(&request, TOKEN) {
        return HttpResponse::Unauthorized().json(json!({"error": "bad token"}));
    }
    let items: Vec<Value> = (1..=7).map(|day| json!({"day": day, "city": city.as_str()})).collect();
    HttpResponse::Ok().json(json!({"items": items, "query": request.query_string()}))
}

async fn huge() -> HttpResponse {
    // 50 MiB, streamed without a length: the cap must count as it reads.
    let chunk = web::Bytes::from(vec![b' '; 64 * 1024]);
    let stream = futures_util::stream::iter((0..800).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    HttpResponse::Ok().content_type("application/json").streaming(stream)
}

async fn token(counters: web::Data<Counters>) -> HttpResponse {
    let issued = counters.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
    HttpResponse::Ok().json(json!({"access_token": format!("at_{issued}"), "token_type": "bearer", "expires_in": 3600}))
}

async fn protected(request: HttpRequest, counters: web::Data<Counters>) -> HttpResponse {
    let latest = counters.tokens_issued.load(Ordering::SeqCst);
    if counters.expire_next.swap(0, Ordering::SeqCst) == 1 || !authorized(&request, &format!("at_{latest}")) {
        return HttpResponse::Unauthorized().finish();
    }
    HttpResponse::Ok().json(json!([{"ok": true, "token": latest}]))
}

async fn graphql(body: web::Json<Value>) -> HttpResponse {
    let query = body["query"].as_str().unwrap_or_default();
    if query.contains("__typename") {
        return HttpResponse::Ok().json(json!({"data": {"__typename": "Query"}}));
    }
    if query.contains("broken") {
        return HttpResponse::Ok().json(json!({"data": null, "errors": [{"message": "Cannot query field broken"}]}));
    }
    let city = body["variables"]["city"].as_str().unwrap_or("nowhere");
    let items: Vec<Value> = (1..=3).map(|day| json!({"day": day, "city": city})).collect();
    HttpResponse::Ok().json(json!({"data": {"forecast": {"items": items}}}))
}

/// Starts the upstream on 127.0.0.1 and returns its port.
fn upstream() -> (u16, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let data = web::Data::from(counters.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            HttpServer::new(move || {
                App::new()
                    .app_data(data.clone())
                    .route("/forecast/{city}", web::get().to(forecast))
                    .route(
                        "/slow",
                        web::get().to(|| async {
                            actix_web::rt::time::sleep(Duration::from_secs(5)).await;
                            HttpResponse::Ok().json(json!([]))
                        }),
                    )
                    .route("/fail", web::get().to(|| async { HttpResponse::ServiceUnavailable().body("down") }))
                    .route("/huge", web::get().to(huge))
                    .route("/text", web::get().to(|| async { HttpResponse::Ok().body("hello, not json") }))
                    .route(
                        "/missing",
                        web::get().to(|| async { HttpResponse::NotFound().body(format!("no such thing, {TOKEN}")) }),
                    )
                    .route(
                        "/hop",
                        web::get().to(move |request: HttpRequest| async move {
                            let port = request.app_config().local_addr().port();
                            HttpResponse::Found()
                                .insert_header(("location", format!("http://127.0.0.1:{port}/forecast/hopped")))
                                .finish()
                        }),
                    )
                    .route(
                        "/escape",
                        web::get().to(move |request: HttpRequest| async move {
                            let port = request.app_config().local_addr().port();
                            HttpResponse::Found()
                                .insert_header(("location", format!("http://127.0.0.2:{port}/forecast/x")))
                                .finish()
                        }),
                    )
                    .route("/oauth/token", web::post().to(token))
                    .route("/api/protected", web::get().to(protected))
                    .route("/graphql", web::post().to(graphql))
            })
            .workers(1)
            .listen(listener)
            .unwrap()
            .run()
            .await
            .unwrap();
        });
    });
    (port, counters)
}

fn http() -> GuardedHttp {
    GuardedHttp::new(Guard::new(Guard::parse_allow_list("127.0.0.1/32").unwrap()))
}

fn query(value: Value) -> QuerySpec {
    serde_json::from_value(value).unwrap()
}

fn params(value: Value) -> Map<String, Value> {
    value.as_object().unwrap().clone()
}

struct Setup {
    config: Value,
    credential: Option<SecretString>,
    limits: Limits,
    http: GuardedHttp,
}

impl Setup {
    fn call(&self) -> Call<'_> {
        Call {
            config: &self.config,
            credential: self.credential.as_ref(),
            credential_key: "acme/weather/1".into(),
            limits: self.limits,
            http: &self.http,
        }
    }

    async fn run(&self, name: &str, spec: &QuerySpec, given: Value) -> Result<tally_integrations::Rows, ProviderError> {
        let provider = provider(name).unwrap();
        provider.validate_query(&self.config, spec)?;
        let bound = spec.bind(&params(given))?;
        provider.run(&self.call(), spec, &bound).await
    }
}

fn rest(port: u16, credential: Option<Value>) -> Setup {
    Setup {
        config: json!({"base_url": format!("http://127.0.0.1:{port}"), "auth": {"type": "bearer"}}),
        credential: credential.map(|value| SecretString::from(value.to_string())),
        limits: Limits { timeout: Duration::from_millis(800), max_rows: 1_000, max_bytes: 1024 * 1024 },
        http: http(),
    }
}

fn forecast_query(path: &str) -> QuerySpec {
    query(json!({"kind": "request", "request": {"method": "GET", "path": path, "query": {"units": "{{units}}"}},
        "params": {"city": {"type": "string"}, "units": {"type": "string", "default": "metric"}},
        "rows_pointer": "/items", "max_rows": 1000}))
}

#[actix_web::test]
async fn a_rest_query_binds_its_parameters_and_reads_rows_at_the_pointer() {
    let (port, _) = upstream();
    let setup = rest(port, Some(json!({"token": TOKEN})));
    let rows = setup.run("rest", &forecast_query("/forecast/{{city}}"), json!({"city": "paris"})).await.unwrap();
    assert_eq!(rows.rows.len(), 7);
    assert_eq!(rows.values()[0], json!({"day": 1, "city": "paris"}));
    assert!(!rows.truncated && rows.bytes > 0);
    // A value with a slash stays one path segment.
    let rows = setup.run("rest", &forecast_query("/forecast/{{city}}"), json!({"city": "a/b c"})).await.unwrap();
    assert_eq!(rows.values()[0]["city"], "a/b c");
    // max_rows cuts and says so.
    let mut limited = setup.limits;
    limited.max_rows = 3;
    let setup_cut = Setup { limits: limited, ..rest(port, Some(json!({"token": TOKEN}))) };
    let rows = setup_cut.run("rest", &forecast_query("/forecast/{{city}}"), json!({"city": "oslo"})).await.unwrap();
    assert_eq!((rows.rows.len(), rows.truncated), (3, true));
    // A redirect to the same allowed host is followed.
    let rows = setup.run("rest", &forecast_query("/hop"), json!({"city": "x"})).await.unwrap();
    assert_eq!(rows.values()[0]["city"], "hopped");
    provider("rest").unwrap().probe(&setup.call()).await.unwrap();
}

#[actix_web::test]
async fn every_upstream_fault_is_its_own_clear_error() {
    let (port, _) = upstream();
    let setup = rest(port, Some(json!({"token": TOKEN})));
    let plain = |path: &str| query(json!({"kind": "request", "request": {"path": path}}));
    let code = |result: Result<tally_integrations::Rows, ProviderError>| result.unwrap_err().code();
    assert_eq!(code(setup.run("rest", &plain("/slow"), json!({})).await), "integration_timeout");
    assert_eq!(code(setup.run("rest", &plain("/fail"), json!({})).await), "integration_unreachable");
    assert_eq!(code(setup.run("rest", &plain("/huge"), json!({})).await), "integration_response_too_large");
    assert_eq!(code(setup.run("rest", &plain("/text"), json!({})).await), "integration_query_failed");
    let wrong = rest(port, Some(json!({"token": "tok_wrong_000000000000"})));
    assert_eq!(code(wrong.run("rest", &plain("/forecast/x"), json!({})).await), "integration_auth_failed");
    // The upstream's words come back, without the credential in them.
    let error = setup.run("rest", &plain("/missing"), json!({})).await.unwrap_err();
    assert_eq!(error.code(), "integration_query_failed");
    assert!(error.to_string().contains("no such thing") && !error.to_string().contains(TOKEN), "{error}");
    let error = setup.run("rest", &plain("/padded"), json!({})).await.unwrap_err();
    assert!(!error.to_string().contains("tok_test"), "no part of a secret across the cut: {error}");
    // A redirect to a loopback address off the allow-list: refused before connecting.
    let error = setup.run("rest", &plain("/escape"), json!({})).await.unwrap_err();
    assert_eq!(error.code(), "target_forbidden", "{error}");
    // The same host, off the allow-list altogether.
    let closed = Setup { http: GuardedHttp::new(Guard::default()), ..rest(port, Some(json!({"token": TOKEN}))) };
    let error = closed.run("rest", &plain("/forecast/x"), json!({})).await.unwrap_err();
    assert_eq!(error.code(), "target_forbidden", "loopback off the allow-list, refused before connecting: {error}");
}

#[actix_web::test]
async fn configs_and_credentials_are_checked_before_anything_is_sent() {
    let guard = Guard::new(Guard::parse_allow_list("127.0.0.1/32").unwrap());
    let rest = provider("rest").unwrap();
    let check = |config: Value, credential: Option<Value>| {
        let credential = credential.map(|value| value.as_object().unwrap().clone());
        rest.validate_config(&config, credential.as_ref(), &guard).map_err(|error| (error.code(), error.to_string()))
    };
    assert!(
        check(json!({"base_url": "https://api.example.com", "auth": {"type": "bearer"}}), Some(json!({"token": "t"})))
            .is_ok()
    );
    for (config, credential, wanted) in [
        (json!({"base_url": "https://u:p@api.example.com"}), None, "credentials"),
        (json!({"base_url": "ftp://api.example.com"}), None, "scheme"),
        (json!({"base_url": "https://api.example.com", "extra": 1}), None, "unknown field"),
        (json!({"base_url": "https://api.example.com", "auth": {"type": "bearer"}}), None, "needs token"),
        (
            json!({"base_url": "https://api.example.com", "auth": {"type": "basic"}}),
            Some(json!({"username": "u"})),
            "password",
        ),
        (json!({"base_url": "https://api.example.com", "auth": {"type": "magic"}}), None, "unknown variant"),
        (
            json!({"base_url": "https://api.example.com", "auth": {"type": "api_key"}}),
            Some(json!({"key": "k"})),
            "one `header`",
        ),
    ] {
        let (code, message) = check(config.clone(), credential).unwrap_err();
        assert_eq!(code, "validation_failed", "{config}");
        assert!(message.contains(wanted), "{config}: {message}");
    }
    let (code, _) = check(json!({"base_url": "https://10.1.2.3/"}), None).unwrap_err();
    assert_eq!(code, "target_forbidden");
}

#[actix_web::test]
async fn oauth2_tokens_are_cached_and_fetched_again_once_on_401() {
    let (port, counters) = upstream();
    let setup = Setup {
        config: json!({"base_url": format!("http://127.0.0.1:{port}"),
            "auth": {"type": "oauth2_client_credentials", "token_url": format!("http://127.0.0.1:{port}/oauth/token")}}),
        credential: Some(SecretString::from(
            json!({"client_id": "id", "client_secret": "secret-value-1234"}).to_string(),
        )),
        ..rest(port, None)
    };
    let spec = query(json!({"kind": "request", "request": {"path": "/api/protected"}}));
    for _ in 0..3 {
        assert_eq!(setup.run("rest", &spec, json!({})).await.unwrap().values()[0]["token"], 1);
    }
    assert_eq!(counters.tokens_issued.load(Ordering::SeqCst), 1, "one token for three calls");
    counters.expire_next.store(1, Ordering::SeqCst);
    assert_eq!(setup.run("rest", &spec, json!({})).await.unwrap().values()[0]["token"], 2, "refreshed once on 401");
    assert_eq!(counters.tokens_issued.load(Ordering::SeqCst), 2);
}

#[actix_web::test]
async fn graphql_passes_parameters_as_variables_and_refuses_errors_and_mutations() {
    let (port, _) = upstream();
    let setup = Setup { config: json!({"endpoint": format!("http://127.0.0.1:{port}/graphql")}), ..rest(port, None) };
    let forecast = query(json!({"kind": "graphql",
        "graphql": {"query": "query($city: String!) { forecast(city: $city) { items { day city } } }"},
        "params": {"city": {"type": "string"}}, "rows_pointer": "/forecast/items"}));
    let rows = setup.run("graphql", &forecast, json!({"city": "lyon"})).await.unwrap();
    assert_eq!(
        rows.values(),
        vec![json!({"day": 1, "city": "lyon"}), json!({"day": 2, "city": "lyon"}), json!({"day": 3, "city": "lyon"})]
    );
    let broken = query(json!({"kind": "graphql", "graphql": {"query": "{ broken }"}}));
    let error = setup.run("graphql", &broken, json!({})).await.unwrap_err();
    assert_eq!(error.code(), "integration_query_failed");
    assert!(error.to_string().contains("Cannot query field broken"), "{error}");
    let mutation = query(json!({"kind": "graphql", "graphql": {"query": "mutation { drop }"}}));
    assert_eq!(setup.run("graphql", &mutation, json!({})).await.unwrap_err().code(), "validation_failed");
    provider("graphql").unwrap().probe(&setup.call()).await.unwrap();
}

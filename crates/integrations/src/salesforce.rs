//! The `salesforce` provider: SOQL over the Salesforce REST API. Config
//! `{"login_url", "api_version", "flow"}`; the credential follows the
//! OAuth 2.0 flow: `client_credentials` takes `{"client_id",
//! "client_secret"}` (a connected app with the client-credentials flow
//! enabled and a run-as user; the login URL is then the org's My Domain),
//! `refresh_token` takes `{"client_id", "refresh_token"}` and, for a
//! confidential app, `"client_secret"`.
//!
//! The token answer's `instance_url` is where queries go: it is checked
//! by the target guard like any address a member gives, before anything
//! is sent to it, so a token server cannot point tally at an internal
//! address. Tokens are kept until Salesforce answers 401
//! `INVALID_SESSION_ID`, then fetched again once and the request retried.
//!
//! A query of kind `soql` runs `/services/data/vNN.N/query?q=…` and
//! follows `nextRecordsUrl` (a path under the instance, never another
//! host) until `done` or `max_rows`; each record's `attributes` is dropped
//! unless `keep_attributes`. `Sforce-Limit-Info` (the org's API calls of
//! the last 24 hours against its allowance) is read from every answer and
//! recorded with the execution.

use crate::form::{CredentialForm, Field, Form, Kind, When, field};
use crate::http::Answer;
use crate::provider::{ApiUsage, BoxFuture, Call, Provider, ProviderError, Rows, config_as};
use crate::query::QuerySpec;
use crate::saas::{Language, Pacer, Token, Tokens, api_usage, left};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const LOGIN_URL_DEFAULT: &str = "https://login.salesforce.com";
/// Spring '26; an integration may name another.
pub const API_VERSION_DEFAULT: &str = "66.0";
/// Salesforce's tokens carry no lifetime: one is kept at most this long,
/// and fetched again sooner when refused.
const TOKEN_KEPT: Duration = Duration::from_secs(3_600);
/// Records a batch (Salesforce's `batchSize`: 200 to 2,000).
const BATCH_MIN: usize = 200;
const BATCH_MAX: usize = 2_000;
/// What REQUEST_LIMIT_EXCEEDED waits: the allowance is counted over a
/// rolling 24 hours, so this is only when to look again.
const REQUEST_LIMIT_WAIT_S: u64 = 300;
const SOQL_BYTES_MAX: usize = 100_000;

const CONFIG: &[Field] = &[
    field(
        "login_url",
        Kind::Url,
        "where tokens are fetched: https://login.salesforce.com, \
        https://test.salesforce.com for a sandbox, or the org's My Domain (needed by client_credentials)",
    )
    .default("\"https://login.salesforce.com\""),
    field("api_version", Kind::String, "the REST API version, `NN.N`").default("\"66.0\"").max_length(8),
    field("flow", Kind::Enum, "the OAuth 2.0 flow of the connected app")
        .options(&["client_credentials", "refresh_token"])
        .default("\"client_credentials\""),
];

const CLIENT_ID: Field = field("client_id", Kind::String, "the connected app's consumer key").required().secret();

pub const FORM: Form = Form {
    provider: "salesforce",
    title: "Salesforce",
    help: "SOQL queries through a connected app (OAuth 2.0 client credentials or a refresh token)",
    kinds: &["soql"],
    config: CONFIG,
    credentials: &[
        CredentialForm {
            name: "client_credentials",
            when: Some(When { field: "flow", equals: "client_credentials", absent: "client_credentials" }),
            fields: &[
                CLIENT_ID,
                field("client_secret", Kind::String, "the connected app's consumer secret").required().secret(),
            ],
        },
        CredentialForm {
            name: "refresh_token",
            when: Some(When { field: "flow", equals: "refresh_token", absent: "client_credentials" }),
            fields: &[
                CLIENT_ID,
                field("client_secret", Kind::String, "the consumer secret, for a confidential app").secret(),
                field("refresh_token", Kind::String, "a refresh token the app was granted (scopes api, refresh_token)")
                    .required()
                    .secret()
                    .max_length(4_096),
            ],
        },
    ],
    credential_optional: false,
};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "login_url_default")]
    login_url: String,
    #[serde(default = "api_version_default")]
    api_version: String,
    #[serde(default)]
    flow: Flow,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Flow {
    #[default]
    ClientCredentials,
    RefreshToken,
}

fn login_url_default() -> String {
    LOGIN_URL_DEFAULT.to_owned()
}

fn api_version_default() -> String {
    API_VERSION_DEFAULT.to_owned()
}

/// `NN.N`.
fn is_version(text: &str) -> bool {
    text.split_once('.').is_some_and(|(major, minor)| {
        (1..=3).contains(&major.len())
            && minor.len() == 1
            && major.chars().chain(minor.chars()).all(|c| c.is_ascii_digit())
    })
}

/// The error of a Salesforce answer: `[{"message", "errorCode"}]`.
fn error_of(answer: &Answer) -> (String, String) {
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    let first = body.get(0).unwrap_or(&body);
    let code = first["errorCode"].as_str().unwrap_or_default().to_owned();
    (code, first["message"].as_str().unwrap_or_default().to_owned())
}

pub struct SalesforceProvider {
    tokens: Tokens,
    /// Holds an integration back after REQUEST_LIMIT_EXCEEDED.
    pacer: Pacer,
    /// Each integration's last `Sforce-Limit-Info`, from any answer.
    usage: Mutex<HashMap<String, ApiUsage>>,
}

impl Default for SalesforceProvider {
    fn default() -> SalesforceProvider {
        SalesforceProvider { tokens: Tokens::default(), pacer: Pacer::new(Duration::ZERO), usage: Mutex::default() }
    }
}

impl SalesforceProvider {
    /// A token and the instance it is for: the kept one, or a new one
    /// from the login URL (its `instance_url` checked by the guard).
    async fn token(&self, call: &Call<'_>, config: &Config, deadline: Instant) -> Result<Token, ProviderError> {
        self.tokens.get_or_fetch(&call.credential_key, fetch_token(call, config, deadline)).await
    }

    /// A GET of `path` on the instance; a 401 `INVALID_SESSION_ID` drops
    /// the token, fetches a new one and tries once more; a
    /// `REQUEST_LIMIT_EXCEEDED` holds the integration back for
    /// [`REQUEST_LIMIT_WAIT_S`] (nothing more is sent before).
    async fn get(
        &self,
        call: &Call<'_>,
        path: &str,
        query: &[(&str, &str)],
        headers: &[(&str, String)],
        deadline: Instant,
        max_bytes: u64,
    ) -> Result<Answer, ProviderError> {
        let config = config_as::<Config>(call.config)?;
        let key = call.integration_key().to_owned();
        let mut refreshed = false;
        loop {
            self.pacer.wait(&key, deadline, call.limits.timeout).await?;
            let token = self.token(call, &config, deadline).await?;
            let instance = token.instance_url.as_deref().unwrap_or_default();
            let bearer = crate::saas::bearer(token.access_token.expose_secret())?;
            let mut request = call
                .http
                .client()
                .get(format!("{instance}{path}"))
                .query(query)
                .header(reqwest::header::AUTHORIZATION, bearer)
                .header(reqwest::header::ACCEPT, "application/json");
            for (name, value) in headers {
                request = request.header(*name, value.as_str());
            }
            let answer = call.http.send(request, left(deadline, call.limits.timeout)?, max_bytes).await?;
            if let Some(usage) = api_usage(&answer.headers) {
                self.usage.lock().expect("the usage lock is never poisoned").insert(key.clone(), usage);
            }
            if answer.status == 401 && !refreshed {
                self.tokens.forget(&call.credential_key).await;
                refreshed = true;
                continue;
            }
            if answer.status == 403 && error_of(&answer).0 == "REQUEST_LIMIT_EXCEEDED" {
                self.pacer.block(&key, Duration::from_secs(REQUEST_LIMIT_WAIT_S));
                continue;
            }
            return Ok(answer);
        }
    }
}

/// A new token from the login URL, for the config's flow; its
/// `instance_url` is checked by the guard before it is kept.
async fn fetch_token(call: &Call<'_>, config: &Config, deadline: Instant) -> Result<Token, ProviderError> {
    let fields = crate::rest::credential_fields(call)?;
    let text = |name: &str| fields.get(name).and_then(Value::as_str).unwrap_or_default();
    let mut form = vec![("client_id", text("client_id"))];
    match config.flow {
        Flow::ClientCredentials => {
            form.push(("grant_type", "client_credentials"));
            form.push(("client_secret", text("client_secret")));
        }
        Flow::RefreshToken => {
            form.push(("grant_type", "refresh_token"));
            form.push(("refresh_token", text("refresh_token")));
            if !text("client_secret").is_empty() {
                form.push(("client_secret", text("client_secret")));
            }
        }
    }
    let url = format!("{}/services/oauth2/token", config.login_url.trim_end_matches('/'));
    let request = call.http.client().post(&url).header(reqwest::header::ACCEPT, "application/json").form(&form);
    let (body, access_token) = crate::saas::token_answer(call, request, deadline).await?;
    let Some(instance_url) = body["instance_url"].as_str().filter(|url| !url.is_empty()) else {
        return Err(ProviderError::AuthFailed("the token answer has no instance_url".into()));
    };
    // The instance is the token server's word: the guard decides.
    call.http.guard().check_url(instance_url).map_err(ProviderError::from)?;
    let token = Token {
        access_token: Arc::new(access_token),
        instance_url: Some(instance_url.trim_end_matches('/').to_owned()),
        lifetime: TOKEN_KEPT,
    };
    Ok(token)
}

/// Salesforce's answer as JSON, or its error in tally's terms.
fn check(answer: &Answer, call: &Call<'_>) -> Result<Value, ProviderError> {
    if let Some(json) = crate::saas::json_of(answer, "Salesforce") {
        return json;
    }
    let (code, message) = error_of(answer);
    let said = crate::saas::said(&format!("Salesforce answered {} {code}: {message}", answer.status), call);
    Err(match (answer.status, code.as_str()) {
        (_, "REQUEST_LIMIT_EXCEEDED") => {
            ProviderError::RateLimited { retry_after_s: REQUEST_LIMIT_WAIT_S, message: said }
        }
        (401 | 403, _) => ProviderError::AuthFailed(said),
        (500..=599, _) => ProviderError::Unreachable(format!("Salesforce answered {}", answer.status)),
        // MALFORMED_QUERY, INVALID_FIELD, INVALID_TYPE, …: the query's to fix.
        _ => ProviderError::QueryFailed(said),
    })
}

impl Provider for SalesforceProvider {
    fn form(&self) -> &'static Form {
        &FORM
    }

    fn forget(&self, integration_key: &str) {
        self.tokens.forget_integration(integration_key);
        self.usage.lock().expect("the usage lock is never poisoned").remove(integration_key);
    }

    fn last_usage(&self, integration_key: &str) -> Option<ApiUsage> {
        self.usage.lock().expect("the usage lock is never poisoned").get(integration_key).copied()
    }

    fn validate_config(
        &self,
        config: &Value,
        _credential: Option<&Map<String, Value>>,
        guard: &crate::guard::Guard,
    ) -> Result<(), ProviderError> {
        let parsed = config_as::<Config>(config)?;
        guard.check_url(&parsed.login_url).map_err(|error| crate::rest::url_refusal("config.login_url", error))?;
        if !is_version(&parsed.api_version) {
            return Err(ProviderError::invalid("config.api_version", "a version `NN.N`, such as 66.0"));
        }
        Ok(())
    }

    fn validate_query(&self, _config: &Value, query: &QuerySpec) -> Result<(), ProviderError> {
        if query.kind != "soql" {
            return Err(ProviderError::invalid("kind", "a salesforce integration runs queries of kind `soql`"));
        }
        query.only_fields(&["soql", "keep_attributes"])?;
        let soql = query.soql.as_deref().unwrap_or_default();
        if soql.trim().is_empty() || soql.len() > SOQL_BYTES_MAX {
            return Err(ProviderError::invalid(
                "soql",
                format!("a SOQL query is required, at most {SOQL_BYTES_MAX} bytes"),
            ));
        }
        let first = soql.split_whitespace().next().unwrap_or_default();
        if !first.eq_ignore_ascii_case("SELECT") {
            return Err(ProviderError::invalid("soql", "a SOQL query starts with SELECT"));
        }
        crate::saas::check_language(Language::Soql, "soql", Some(soql))
    }

    fn probe<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Option<ApiUsage>, ProviderError>> {
        Box::pin(async move {
            let config = config_as::<Config>(call.config)?;
            let deadline = Instant::now() + call.limits.timeout;
            let answer = self.get(call, "/services/data/", &[], &[], deadline, 256 * 1024).await?;
            let body = check(&answer, call)?;
            let offered = body.as_array().into_iter().flatten().any(|version| version["version"] == config.api_version);
            if !offered {
                return Err(ProviderError::QueryFailed(format!(
                    "the instance does not offer API version {}",
                    config.api_version
                )));
            }
            Ok(api_usage(&answer.headers))
        })
    }

    fn run<'a>(
        &'a self,
        call: &'a Call<'a>,
        query: &'a QuerySpec,
        params: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Rows, ProviderError>> {
        Box::pin(async move {
            let config = config_as::<Config>(call.config)?;
            let deadline = Instant::now() + call.limits.timeout;
            let soql = Language::Soql.render(query.soql.as_deref().unwrap_or_default(), params);
            let max_rows = call.limits.max_rows;
            let batch = (max_rows + 1).clamp(BATCH_MIN, BATCH_MAX);
            let options = [("Sforce-Query-Options", format!("batchSize={batch}"))];
            let keep_attributes = query.keep_attributes.unwrap_or(false);
            let data = format!("/services/data/v{}/", config.api_version);
            let mut rows = Rows::default();
            let mut next: Option<String> = None;
            let mut seen = std::collections::HashSet::new();
            loop {
                let budget = call.limits.max_bytes.saturating_sub(rows.bytes);
                let answer = match &next {
                    None => {
                        let path = format!("{data}query");
                        self.get(call, &path, &[("q", &soql)], &options, deadline, budget).await?
                    }
                    Some(path) => self.get(call, path, &[], &options, deadline, budget).await?,
                };
                let mut body = check(&answer, call)?;
                let records = body.get_mut("records").and_then(Value::as_array_mut).map(std::mem::take);
                let empty = records.as_ref().is_none_or(Vec::is_empty);
                for mut record in records.into_iter().flatten() {
                    if rows.rows.len() == max_rows {
                        rows.truncated = true;
                        break;
                    }
                    if !keep_attributes && let Some(fields) = record.as_object_mut() {
                        fields.remove("attributes");
                    }
                    rows.push(&record, call.limits.max_bytes)?;
                }
                let done = body["done"].as_bool().unwrap_or(true);
                if rows.truncated || done {
                    break;
                }
                if empty {
                    return Err(ProviderError::QueryFailed("Salesforce gave an empty batch that is not done".into()));
                }
                // The next batch is a path under the instance, never a host.
                match body["nextRecordsUrl"].as_str() {
                    Some(path)
                        if path.starts_with(&data)
                            && !path.contains("..")
                            && !path.contains("//")
                            && seen.insert(path.to_owned()) =>
                    {
                        next = Some(path.to_owned());
                    }
                    _ => {
                        return Err(ProviderError::QueryFailed(
                            "Salesforce's answer is not done but gives no new nextRecordsUrl under the API".into(),
                        ));
                    }
                }
            }
            Ok(rows)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions_and_queries_are_checked_when_saved() {
        assert!(is_version("66.0") && is_version("9.0"));
        assert!(!is_version("66") && !is_version("v66.0") && !is_version("66.0.1"));
        let provider = SalesforceProvider::default();
        for (soql, field) in
            [("DELETE FROM Account", "soql"), ("SELECT Id FROM Account WHERE Name = '{{name}}'", "soql")]
        {
            let query: QuerySpec =
                serde_json::from_value(json!({"kind": "soql", "soql": soql, "params": {"name": {"type": "string"}}}))
                    .unwrap();
            match provider.validate_query(&json!({}), &query) {
                Err(ProviderError::Invalid { field: refused, .. }) => assert_eq!(refused, field),
                other => panic!("{soql}: {other:?}"),
            }
        }
    }
}

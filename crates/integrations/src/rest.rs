//! The `rest` provider: any JSON API over HTTP(S). Config:
//! `{"base_url", "auth": {"type": …}, "headers": {…}, "health_path"}`; a
//! saved query of kind `request` names a method, a path template, query
//! parameters, headers and a JSON body, all with `{{name}}` placeholders.
//!
//! Auth kinds and the credential each needs:
//! - `none`: no credential;
//! - `bearer`: `{"token"}` as `Authorization: Bearer`;
//! - `basic`: `{"username", "password"}`;
//! - `api_key`: `{"key"}` in the header named by `header` or the query
//!   parameter named by `query`;
//! - `oauth2_client_credentials`: `{"client_id", "client_secret"}`; the
//!   token is fetched from `token_url` (through the guard), cached until it
//!   expires, and fetched again once when the API answers 401.

use crate::http::Answer;
use crate::provider::{ApiUsage, BoxFuture, Call, Limits, Provider, ProviderError, Rows, scrub};
use crate::query::{QuerySpec, render, render_json, render_path};
use moka::future::Cache;
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// Config headers, query headers and query-string pairs, each.
pub const HEADERS_MAX: usize = 50;
/// An upstream's error text kept in a problem, at most.
pub const UPSTREAM_MESSAGE_MAX: usize = 300;
use crate::form::{CredentialForm, Field, Form, Kind, When, field as form_field};

const AUTH_HELP: &str = "how tally signs in: {\"type\": \"none\"} (the default), {\"type\": \"bearer\"}, \
    {\"type\": \"basic\"}, {\"type\": \"api_key\", \"header\": name} or {\"type\": \"api_key\", \"query\": name}, \
    {\"type\": \"oauth2_client_credentials\", \"token_url\": url, \"scope\": text}";

/// The credential shapes of the HTTP providers, one per `auth.type`.
pub const HTTP_CREDENTIALS: &[CredentialForm] = &[
    CredentialForm {
        name: "bearer",
        when: Some(When { field: "auth.type", equals: "bearer", absent: "none" }),
        fields: &[form_field("token", Kind::String, "sent as `Authorization: Bearer …`")
            .required()
            .secret()
            .max_length(8_192)],
    },
    CredentialForm {
        name: "basic",
        when: Some(When { field: "auth.type", equals: "basic", absent: "none" }),
        fields: &[
            form_field("username", Kind::String, "the user name").required().secret(),
            form_field("password", Kind::String, "the password").required().secret(),
        ],
    },
    CredentialForm {
        name: "api_key",
        when: Some(When { field: "auth.type", equals: "api_key", absent: "none" }),
        fields: &[form_field("key", Kind::String, "sent in the header or query parameter the config names")
            .required()
            .secret()
            .max_length(8_192)],
    },
    CredentialForm {
        name: "oauth2_client_credentials",
        when: Some(When { field: "auth.type", equals: "oauth2_client_credentials", absent: "none" }),
        fields: &[
            form_field("client_id", Kind::String, "the OAuth 2.0 client id").required().secret(),
            form_field("client_secret", Kind::String, "the OAuth 2.0 client secret").required().secret(),
        ],
    },
];

const REST_CONFIG: &[Field] = &[
    form_field("base_url", Kind::Url, "the API's base URL; https unless the operator allow-lists the address")
        .required(),
    form_field("auth", Kind::Object, AUTH_HELP),
    form_field("headers", Kind::Object, "headers sent with every request (not Host or Authorization), at most 50"),
    form_field("health_path", Kind::String, "a path to GET for the health check; a HEAD of base_url without it"),
];

pub const REST_FORM: Form = Form {
    provider: "rest",
    title: "REST API",
    help: "any JSON API over HTTP(S)",
    kinds: &["request"],
    config: REST_CONFIG,
    credentials: HTTP_CREDENTIALS,
    credential_optional: false,
};

const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];
/// A token is refreshed this long before the expiry its issuer gave.
const TOKEN_MARGIN: Duration = Duration::from_secs(30);
const TOKEN_LIFETIME_MAX: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `base_url` for REST, `endpoint` for GraphQL: one name per provider.
    #[serde(alias = "endpoint")]
    pub base_url: String,
    #[serde(default)]
    pub auth: Auth,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub health_path: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Auth {
    #[default]
    None,
    Bearer,
    Basic,
    ApiKey {
        #[serde(default)]
        header: Option<String>,
        #[serde(default)]
        query: Option<String>,
    },
    Oauth2ClientCredentials {
        token_url: String,
        #[serde(default)]
        scope: Option<String>,
    },
}

impl Auth {
    /// The credential fields this kind needs.
    pub fn credential_fields(&self) -> &'static [&'static str] {
        match self {
            Auth::None => &[],
            Auth::Bearer => &["token"],
            Auth::Basic => &["username", "password"],
            Auth::ApiKey { .. } => &["key"],
            Auth::Oauth2ClientCredentials { .. } => &["client_id", "client_secret"],
        }
    }
}

/// Parses and checks an HTTP provider's config and the credential's shape.
pub fn parse_config(
    config: &Value,
    credential: Option<&Map<String, Value>>,
    guard: &crate::guard::Guard,
) -> Result<HttpConfig, ProviderError> {
    let parsed: HttpConfig =
        serde_json::from_value(config.clone()).map_err(|error| ProviderError::invalid("config", error.to_string()))?;
    guard.check_url(&parsed.base_url).map_err(|error| url_refusal("config.base_url", error))?;
    if parsed.headers.len() > HEADERS_MAX {
        return Err(ProviderError::invalid("config.headers", format!("at most {HEADERS_MAX} headers")));
    }
    for (name, value) in &parsed.headers {
        check_header(&format!("config.headers.{name}"), name, value)?;
    }
    match &parsed.auth {
        Auth::ApiKey { header, query } => match (header, query) {
            (Some(name), None) => check_header("config.auth.header", name, "x")?,
            (None, Some(name)) if !name.is_empty() && name.len() <= 64 => {}
            _ => return Err(ProviderError::invalid("config.auth", "an api_key goes in one `header` or one `query`")),
        },
        Auth::Oauth2ClientCredentials { token_url, .. } => {
            guard.check_url(token_url).map_err(|error| url_refusal("config.auth.token_url", error))?;
        }
        _ => {}
    }
    let wanted = parsed.auth.credential_fields();
    match (credential, wanted.is_empty()) {
        (None, true) => {}
        (Some(_), true) => return Err(ProviderError::invalid("credential", "auth `none` takes no credential")),
        (None, false) => {
            return Err(ProviderError::invalid("credential", format!("this auth needs {}", wanted.join(", "))));
        }
        (Some(fields), false) => {
            for name in fields.keys() {
                if !wanted.contains(&name.as_str()) {
                    return Err(ProviderError::invalid(format!("credential.{name}"), "is not a field of this auth"));
                }
            }
            for name in wanted {
                if fields.get(*name).and_then(Value::as_str).is_none_or(str::is_empty) {
                    return Err(ProviderError::invalid(
                        format!("credential.{name}"),
                        "is required, a non-empty string",
                    ));
                }
            }
        }
    }
    Ok(parsed)
}

/// A forbidden address is `target_forbidden`; a bad URL is invalid.
pub fn url_refusal(field: &str, error: crate::guard::GuardError) -> ProviderError {
    match error {
        forbidden @ crate::guard::GuardError::Forbidden { .. } => ProviderError::TargetForbidden(forbidden),
        other => ProviderError::invalid(field, other.to_string()),
    }
}

fn check_header(field: &str, name: &str, value: &str) -> Result<(), ProviderError> {
    let valid_name = reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok();
    let valid_value = reqwest::header::HeaderValue::from_str(value).is_ok();
    if !valid_name || !valid_value {
        return Err(ProviderError::invalid(field, "not a valid HTTP header"));
    }
    if name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case("authorization") {
        return Err(ProviderError::invalid(field, "Host and Authorization are tally's to set"));
    }
    Ok(())
}

/// The credential's fields, from the vault's JSON.
pub fn credential_fields(call: &Call<'_>) -> Result<Map<String, Value>, ProviderError> {
    match call.credential {
        None => Ok(Map::new()),
        Some(secret) => match serde_json::from_str::<Value>(secret.expose_secret()) {
            Ok(Value::Object(fields)) => Ok(fields),
            _ => Err(ProviderError::AuthFailed("the stored credential is not a JSON object".into())),
        },
    }
}

fn field<'a>(fields: &'a Map<String, Value>, name: &str) -> &'a str {
    fields.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// Shared by the HTTP providers: auth applied to a request, OAuth2 tokens
/// cached per credential version.
pub struct HttpAuth {
    tokens: Cache<String, (String, Duration)>,
}

impl Default for HttpAuth {
    fn default() -> HttpAuth {
        struct TokenExpiry;
        impl moka::Expiry<String, (String, Duration)> for TokenExpiry {
            fn expire_after_create(
                &self,
                _: &String,
                value: &(String, Duration),
                _: std::time::Instant,
            ) -> Option<Duration> {
                Some(value.1)
            }
        }
        HttpAuth { tokens: Cache::builder().max_capacity(10_000).expire_after(TokenExpiry).build() }
    }
}

impl HttpAuth {
    pub async fn apply(
        &self,
        call: &Call<'_>,
        config: &HttpConfig,
        mut request: reqwest::RequestBuilder,
        fresh_token: bool,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let fields = credential_fields(call)?;
        request = match &config.auth {
            Auth::None => request,
            Auth::Bearer => request
                .header(reqwest::header::AUTHORIZATION, sensitive(&format!("Bearer {}", field(&fields, "token")))?),
            Auth::Basic => request.basic_auth(field(&fields, "username"), Some(field(&fields, "password"))),
            Auth::ApiKey { header: Some(name), .. } => request.header(name.as_str(), sensitive(field(&fields, "key"))?),
            Auth::ApiKey { query: Some(name), .. } => request.query(&[(name.as_str(), field(&fields, "key"))]),
            Auth::ApiKey { .. } => request,
            Auth::Oauth2ClientCredentials { token_url, scope } => {
                if fresh_token {
                    self.tokens.invalidate(&call.credential_key).await;
                }
                let token = match self.tokens.get(&call.credential_key).await {
                    Some((token, _)) => token,
                    None => {
                        let (token, lifetime) = fetch_token(call, &fields, token_url, scope.as_deref()).await?;
                        self.tokens.insert(call.credential_key.clone(), (token.clone(), lifetime)).await;
                        token
                    }
                };
                request.header(reqwest::header::AUTHORIZATION, sensitive(&format!("Bearer {token}"))?)
            }
        };
        Ok(request)
    }

    /// Sends a request built by `build`, refreshing an OAuth2 token once
    /// when the answer is 401.
    pub async fn send(
        &self,
        call: &Call<'_>,
        config: &HttpConfig,
        limits: Limits,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Answer, ProviderError> {
        let request = self.apply(call, config, build(), false).await?;
        let answer = call.http.send(request, limits.timeout, limits.max_bytes).await?;
        if answer.status == 401 && matches!(config.auth, Auth::Oauth2ClientCredentials { .. }) {
            let request = self.apply(call, config, build(), true).await?;
            return call.http.send(request, limits.timeout, limits.max_bytes).await;
        }
        Ok(answer)
    }
}

/// An auth header value, marked sensitive (never printed by reqwest/hyper).
fn sensitive(value: &str) -> Result<reqwest::header::HeaderValue, ProviderError> {
    let mut value = reqwest::header::HeaderValue::from_str(value)
        .map_err(|_| ProviderError::AuthFailed("the credential cannot go in an HTTP header".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

async fn fetch_token(
    call: &Call<'_>,
    fields: &Map<String, Value>,
    token_url: &str,
    scope: Option<&str>,
) -> Result<(String, Duration), ProviderError> {
    let mut form = vec![("grant_type", "client_credentials")];
    if let Some(scope) = scope {
        form.push(("scope", scope));
    }
    let request = call
        .http
        .client()
        .post(token_url)
        .basic_auth(field(fields, "client_id"), Some(field(fields, "client_secret")))
        .form(&form);
    let answer = call.http.send(request, call.limits.timeout, 64 * 1024).await?;
    if !(200..300).contains(&answer.status) {
        return Err(ProviderError::AuthFailed(format!("the token endpoint answered {}", answer.status)));
    }
    let body: Value = serde_json::from_slice(&answer.body)
        .map_err(|_| ProviderError::AuthFailed("the token endpoint's answer is not JSON".into()))?;
    let token = body["access_token"]
        .as_str()
        .filter(|token| !token.is_empty())
        .ok_or_else(|| ProviderError::AuthFailed("the token endpoint gave no access_token".into()))?;
    let lifetime = Duration::from_secs(body["expires_in"].as_u64().unwrap_or(3600))
        .min(TOKEN_LIFETIME_MAX)
        .saturating_sub(TOKEN_MARGIN);
    Ok((token.to_owned(), lifetime))
}

/// An HTTP answer as rows: 401/403 refuse the credential, 5xx is the
/// source failing, another non-2xx refuses the query (with the source's
/// words, scrubbed), a 2xx must be JSON.
pub fn answer_json(answer: &Answer, call: &Call<'_>) -> Result<Value, ProviderError> {
    // Scrubbed whole, then cut: a secret across the cut is never half shown.
    let text = || {
        let text = scrub(&String::from_utf8_lossy(&answer.body), call.credential);
        text.chars().take(UPSTREAM_MESSAGE_MAX).collect::<String>()
    };
    match answer.status {
        200..=299 => serde_json::from_slice(&answer.body)
            .map_err(|error| ProviderError::QueryFailed(format!("the answer is not JSON: {error}"))),
        401 | 403 => Err(ProviderError::AuthFailed(format!("the source answered {}", answer.status))),
        500..=599 => Err(ProviderError::Unreachable(format!("the source answered {}", answer.status))),
        status => Err(ProviderError::QueryFailed(format!("the source answered {status}: {}", text()))),
    }
}

/// The rows a JSON pointer finds in an answer, cut at `max_rows`.
pub fn rows_at(answer: &Value, pointer: Option<&str>, bytes: u64, max_rows: usize) -> Result<Rows, ProviderError> {
    let found = match pointer {
        None | Some("") => answer,
        Some(pointer) => answer.pointer(pointer).ok_or_else(|| {
            ProviderError::QueryFailed(format!("rows_pointer `{pointer}` finds nothing in the answer"))
        })?,
    };
    let items = match found {
        Value::Array(items) => items.as_slice(),
        Value::Null => &[],
        other => std::slice::from_ref(other),
    };
    let truncated = items.len() > max_rows;
    let rows = items.iter().take(max_rows).map(crate::provider::row).collect();
    Ok(Rows { rows, bytes, truncated })
}

#[derive(Default)]
pub struct RestProvider {
    auth: HttpAuth,
}

impl Provider for RestProvider {
    fn form(&self) -> &'static Form {
        &REST_FORM
    }

    fn validate_config(
        &self,
        config: &Value,
        credential: Option<&Map<String, Value>>,
        guard: &crate::guard::Guard,
    ) -> Result<(), ProviderError> {
        parse_config(config, credential, guard).map(drop)
    }

    fn validate_query(&self, _config: &Value, query: &QuerySpec) -> Result<(), ProviderError> {
        if query.kind != "request" {
            return Err(ProviderError::invalid("kind", "a rest integration runs queries of kind `request`"));
        }
        let Some(request) = &query.request else {
            return Err(ProviderError::invalid("request", "is required for kind `request`"));
        };
        if query.graphql.is_some() {
            return Err(ProviderError::invalid("graphql", "is not for kind `request`"));
        }
        if !METHODS.contains(&request.method.as_str()) {
            return Err(ProviderError::invalid("request.method", format!("must be one of {}", METHODS.join(", "))));
        }
        if !request.path.starts_with('/') {
            return Err(ProviderError::invalid("request.path", "must start with /"));
        }
        if request.headers.len() > HEADERS_MAX || request.query.len() > HEADERS_MAX {
            return Err(ProviderError::invalid(
                "request",
                format!("at most {HEADERS_MAX} headers and query parameters"),
            ));
        }
        for (name, value) in &request.headers {
            check_header(&format!("request.headers.{name}"), name, &render(value, &Map::new(), str::to_owned))?;
        }
        Ok(())
    }

    fn probe<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Option<ApiUsage>, ProviderError>> {
        Box::pin(async move {
            let config = config_unchecked(call.config)?;
            let base = config.base_url.trim_end_matches('/').to_owned();
            let (method, url) = match &config.health_path {
                Some(path) => (reqwest::Method::GET, format!("{base}{path}")),
                None => (reqwest::Method::HEAD, base),
            };
            let answer =
                self.auth.send(call, &config, call.limits, || call.http.client().request(method.clone(), &url)).await?;
            match answer.status {
                401 | 403 => Err(ProviderError::AuthFailed(format!("the source answered {}", answer.status))),
                500..=599 => Err(ProviderError::Unreachable(format!("the source answered {}", answer.status))),
                _ => Ok(None),
            }
        })
    }

    fn run<'a>(
        &'a self,
        call: &'a Call<'a>,
        query: &'a QuerySpec,
        params: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Rows, ProviderError>> {
        Box::pin(async move {
            let config = config_unchecked(call.config)?;
            let request = query.request.as_ref().ok_or_else(|| ProviderError::invalid("request", "is required"))?;
            let method = reqwest::Method::from_bytes(request.method.as_bytes())
                .map_err(|_| ProviderError::invalid("request.method", "not an HTTP method"))?;
            let url = format!("{}{}", config.base_url.trim_end_matches('/'), render_path(&request.path, params)?);
            let pairs: Vec<(String, String)> =
                request.query.iter().map(|(key, value)| (key.clone(), render(value, params, str::to_owned))).collect();
            let body = request.body.as_ref().map(|body| render_json(body, params));
            let build = || {
                let mut builder = call.http.client().request(method.clone(), &url).query(&pairs);
                for (name, value) in config.headers.iter().chain(&request.headers) {
                    builder = builder.header(name.as_str(), render(value, params, str::to_owned));
                }
                if let Some(body) = &body {
                    builder = builder.json(body);
                }
                builder.header(reqwest::header::ACCEPT, "application/json")
            };
            let answer = self.auth.send(call, &config, call.limits, build).await?;
            let json = answer_json(&answer, call)?;
            rows_at(&json, query.rows_pointer.as_deref(), answer.body.len() as u64, call.limits.max_rows)
        })
    }
}

/// A config already validated when it was saved.
pub fn config_unchecked(config: &Value) -> Result<HttpConfig, ProviderError> {
    crate::provider::config_as(config)
}

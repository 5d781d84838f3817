//! The `google_sheets` provider: the Google Sheets API v4, read-only.
//! Config `{"api_base_url", "token_uri", "spreadsheet_id"}`; credential
//! `{"service_account_json"}` (a service-account key file, the sheet
//! shared with its `client_email`) or `{"api_key"}` (public sheets only).
//!
//! With a service account, tally signs an RS256 JWT (iss = the account's
//! email, scope `spreadsheets.readonly`, aud = the token URI, one hour),
//! exchanges it at the token URI (grant
//! `urn:ietf:params:oauth:grant-type:jwt-bearer`) and keeps the access
//! token, never the key, until a minute before it expires. The private
//! key is read from the unsealed credential for the signing only.
//!
//! A query of kind `range` reads `spreadsheets.values.get` of an A1 range
//! (`valueRenderOption`, `dateTimeRenderOption`): with `header_row`, the
//! first row names the columns and each further row is an object (an
//! empty name is `column_N`, a repeated one gets `_2`, `_3`, …; a short
//! row's missing cells are null); otherwise each row is an array.

use crate::form::{CredentialForm, Field, Form, Kind, field};
use crate::http::Answer;
use crate::provider::{ApiUsage, BoxFuture, Call, Provider, ProviderError, Rows, config_as};
use crate::query::QuerySpec;
use crate::saas::{Pacer, Token, Tokens, left, lifetime, retry_after};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

pub const API_BASE_URL_DEFAULT: &str = "https://sheets.googleapis.com";
pub const TOKEN_URI_DEFAULT: &str = "https://oauth2.googleapis.com/token";
pub const SCOPE: &str = "https://www.googleapis.com/auth/spreadsheets.readonly";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// An assertion's lifetime (Google's maximum).
pub const ASSERTION_LIFETIME_S: i64 = 3_600;
/// What a 429 without Retry-After waits: Google's quotas are per minute.
const RATE_LIMIT_WAIT_S: u64 = 60;
const RENDER_OPTIONS: &[&str] = &["FORMATTED_VALUE", "UNFORMATTED_VALUE", "FORMULA"];
const DATE_OPTIONS: &[&str] = &["SERIAL_NUMBER", "FORMATTED_STRING"];

const CONFIG: &[Field] = &[
    field("api_base_url", Kind::Url, "the Sheets API; change it only to reach a test double")
        .default("\"https://sheets.googleapis.com\""),
    field(
        "token_uri",
        Kind::Url,
        "where the service account's assertion is exchanged; the key file's token_uri \
        (Google's) when absent",
    ),
    field(
        "spreadsheet_id",
        Kind::String,
        "the spreadsheet queries read unless they name another, and the health \
        check reads the title of",
    )
    .max_length(128),
];

pub const FORM: Form = Form {
    provider: "google_sheets",
    title: "Google Sheets",
    help: "ranges of a spreadsheet, read with a service account the sheet is shared with, or an API key for public \
        sheets",
    kinds: &["range"],
    config: CONFIG,
    credentials: &[
        CredentialForm {
            name: "service_account",
            when: None,
            fields: &[field(
                "service_account_json",
                Kind::Json,
                "the JSON key file of a service account (IAM → Service accounts → Keys); share the sheet with its \
                 client_email as a viewer",
            )
            .required()
            .secret()],
        },
        CredentialForm {
            name: "api_key",
            when: None,
            fields: &[field("api_key", Kind::String, "an API key restricted to the Sheets API (public sheets only)")
                .required()
                .secret()
                .max_length(256)],
        },
    ],
    credential_optional: false,
};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "api_base_url_default")]
    api_base_url: String,
    #[serde(default)]
    token_uri: Option<String>,
    #[serde(default)]
    spreadsheet_id: Option<String>,
}

fn api_base_url_default() -> String {
    API_BASE_URL_DEFAULT.to_owned()
}

/// The fields of a service-account key file tally reads.
#[derive(Deserialize)]
struct ServiceAccount {
    #[serde(rename = "type")]
    kind: String,
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

impl Drop for ServiceAccount {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.private_key);
    }
}

impl ServiceAccount {
    /// The key file, read; its refusals never quote it.
    fn read(text: &str) -> Result<ServiceAccount, ProviderError> {
        let refuse = |message: &str| ProviderError::invalid("credential.service_account_json", message.to_owned());
        let account: ServiceAccount = serde_json::from_str(text)
            .map_err(|_| refuse("a service-account key file has type, client_email and private_key"))?;
        if account.kind != "service_account" {
            return Err(refuse("the key file's type is not `service_account`"));
        }
        if !account.client_email.contains('@') {
            return Err(refuse("the key file's client_email is not an email address"));
        }
        jsonwebtoken::EncodingKey::from_rsa_pem(account.private_key.as_bytes())
            .map_err(|_| refuse("the key file's private_key is not an RSA private key in PEM"))?;
        Ok(account)
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
}

/// The signed assertion of a service account for `token_uri`.
fn assertion(account: &ServiceAccount, token_uri: &str, now: i64) -> Result<String, ProviderError> {
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(account.private_key.as_bytes())
        .map_err(|_| ProviderError::AuthFailed("the service account's private key does not parse".into()))?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = account.private_key_id.clone();
    let claims =
        Claims { iss: &account.client_email, scope: SCOPE, aud: token_uri, iat: now, exp: now + ASSERTION_LIFETIME_S };
    jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|_| ProviderError::AuthFailed("the assertion could not be signed".into()))
}

/// How a call signs in: the kind is read without copying the key file,
/// which is read (and zeroed after) only to sign an assertion.
enum Credential {
    ServiceAccount,
    ApiKey(SecretString),
}

#[derive(Deserialize)]
struct Shape {
    #[serde(default)]
    service_account_json: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    api_key: Option<String>,
}

/// The key file's text, zeroed when dropped.
#[derive(Deserialize)]
struct KeyFile {
    service_account_json: String,
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.service_account_json);
    }
}

fn credential_of(call: &Call<'_>) -> Result<Credential, ProviderError> {
    let stored = || ProviderError::AuthFailed("the stored credential has no key".into());
    let secret = call.credential.ok_or_else(stored)?;
    let shape: Shape = serde_json::from_str(secret.expose_secret()).map_err(|_| stored())?;
    match (shape.service_account_json, shape.api_key) {
        (Some(_), _) => Ok(Credential::ServiceAccount),
        (None, Some(key)) => Ok(Credential::ApiKey(SecretString::from(key))),
        (None, None) => Err(stored()),
    }
}

pub struct SheetsProvider {
    tokens: Tokens,
    /// Holds an integration back after Google's 429, for its Retry-After.
    pacer: Pacer,
}

impl Default for SheetsProvider {
    fn default() -> SheetsProvider {
        SheetsProvider { tokens: Tokens::default(), pacer: Pacer::new(Duration::ZERO) }
    }
}

impl SheetsProvider {
    /// An access token of the service account: the cached one, or one
    /// from the token URI.
    async fn token(
        &self,
        call: &Call<'_>,
        config: &Config,
        deadline: Instant,
    ) -> Result<Arc<SecretString>, ProviderError> {
        let token = self.tokens.get_or_fetch(&call.credential_key, mint(call, config, deadline)).await?;
        Ok(token.access_token)
    }

    /// A GET of the API, signed in: a 401 with a kept token fetches a new
    /// one once; a 429 holds the integration back for its Retry-After,
    /// waited out when the run has time, else refused.
    async fn get(
        &self,
        call: &Call<'_>,
        config: &Config,
        url: &str,
        query: &[(&str, &str)],
        deadline: Instant,
    ) -> Result<Answer, ProviderError> {
        let credential = credential_of(call)?;
        let key = call.integration_key().to_owned();
        let mut refreshed = false;
        loop {
            self.pacer.wait(&key, deadline, call.limits.timeout).await?;
            let mut request =
                call.http.client().get(url).query(query).header(reqwest::header::ACCEPT, "application/json");
            request = match &credential {
                Credential::ApiKey(api_key) => request.query(&[("key", api_key.expose_secret())]),
                Credential::ServiceAccount => {
                    let token = self.token(call, config, deadline).await?;
                    request.header(reqwest::header::AUTHORIZATION, crate::saas::bearer(token.expose_secret())?)
                }
            };
            let answer = call.http.send(request, left(deadline, call.limits.timeout)?, call.limits.max_bytes).await?;
            match answer.status {
                401 if !refreshed && matches!(credential, Credential::ServiceAccount) => {
                    self.tokens.forget(&call.credential_key).await;
                    refreshed = true;
                }
                429 => {
                    let wait = retry_after(&answer.headers).unwrap_or(RATE_LIMIT_WAIT_S);
                    self.pacer.block(&key, Duration::from_secs(wait));
                }
                _ => return Ok(answer),
            }
        }
    }
}

/// A new access token of the service account: an assertion signed with
/// its key (unsealed for the signing only, and zeroed after), exchanged at
/// the token URI.
async fn mint(call: &Call<'_>, config: &Config, deadline: Instant) -> Result<Token, ProviderError> {
    let (token_uri, assertion) = {
        // The key is unsealed for the signing only, and zeroed after.
        let unreadable = || ProviderError::AuthFailed("the stored key file does not parse".into());
        let secret = call.credential.ok_or_else(unreadable)?;
        let key_file: KeyFile = serde_json::from_str(secret.expose_secret()).map_err(|_| unreadable())?;
        let account = ServiceAccount::read(&key_file.service_account_json).map_err(|_| unreadable())?;
        let token_uri = config
            .token_uri
            .clone()
            .or_else(|| account.token_uri.clone())
            .unwrap_or_else(|| TOKEN_URI_DEFAULT.to_owned());
        let assertion = Zeroizing::new(assertion(&account, &token_uri, chrono::Utc::now().timestamp())?);
        (token_uri, assertion)
    };
    let request =
        call.http.client().post(&token_uri).form(&[("grant_type", JWT_BEARER), ("assertion", assertion.as_str())]);
    let (body, access_token) = crate::saas::token_answer(call, request, deadline).await?;
    let token = Token {
        access_token: Arc::new(access_token),
        instance_url: None,
        lifetime: lifetime(body["expires_in"].as_u64(), Duration::from_secs(3_600)),
    };
    Ok(token)
}

/// Google's answer as JSON, or its error (`{"error": {"code", "message",
/// "status"}}`) in tally's terms.
fn check(answer: &Answer, call: &Call<'_>) -> Result<Value, ProviderError> {
    if let Some(json) = crate::saas::json_of(answer, "Google Sheets") {
        return json;
    }
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    let status = body["error"]["status"].as_str().unwrap_or_default();
    let message = crate::saas::said(body["error"]["message"].as_str().unwrap_or_default(), call);
    let said = format!("Google answered {} {status}: {message}", answer.status);
    Err(match answer.status {
        401 | 403 => ProviderError::AuthFailed(said),
        429 => ProviderError::RateLimited {
            retry_after_s: retry_after(&answer.headers).unwrap_or(RATE_LIMIT_WAIT_S),
            message: said,
        },
        500..=599 => ProviderError::Unreachable(format!("Google answered {}", answer.status)),
        _ => ProviderError::QueryFailed(said),
    })
}

impl Provider for SheetsProvider {
    fn form(&self) -> &'static Form {
        &FORM
    }

    fn forget(&self, integration_key: &str) {
        self.tokens.forget_integration(integration_key);
    }

    fn validate_config(
        &self,
        config: &Value,
        credential: Option<&Map<String, Value>>,
        guard: &crate::guard::Guard,
    ) -> Result<(), ProviderError> {
        let parsed = config_as::<Config>(config)?;
        let refusal = crate::rest::url_refusal;
        guard.check_url(&parsed.api_base_url).map_err(|error| refusal("config.api_base_url", error))?;
        if let Some(token_uri) = &parsed.token_uri {
            guard.check_url(token_uri).map_err(|error| refusal("config.token_uri", error))?;
        }
        if let Some(key_file) = credential.and_then(|fields| fields.get("service_account_json")).and_then(Value::as_str)
        {
            let account = ServiceAccount::read(key_file)?;
            if parsed.token_uri.is_none() {
                let token_uri = account.token_uri.as_deref().unwrap_or(TOKEN_URI_DEFAULT);
                guard.check_url(token_uri).map_err(|error| refusal("credential.service_account_json", error))?;
            }
        }
        Ok(())
    }

    fn validate_query(&self, config: &Value, query: &QuerySpec) -> Result<(), ProviderError> {
        if query.kind != "range" {
            return Err(ProviderError::invalid("kind", "a google_sheets integration runs queries of kind `range`"));
        }
        query.only_fields(&[
            "spreadsheet_id",
            "range",
            "value_render_option",
            "date_time_render_option",
            "header_row",
        ])?;
        if query.spreadsheet_id.is_none() && config.get("spreadsheet_id").is_none() {
            return Err(ProviderError::invalid("spreadsheet_id", "is required (the config names none)"));
        }
        if query.range.as_deref().is_none_or(|range| range.is_empty() || range.len() > 512) {
            return Err(ProviderError::invalid("range", "an A1 range is required (`Sheet1!A1:F`)"));
        }
        for (field, value, options) in [
            ("value_render_option", &query.value_render_option, RENDER_OPTIONS),
            ("date_time_render_option", &query.date_time_render_option, DATE_OPTIONS),
        ] {
            if let Some(value) = value
                && !options.contains(&value.as_str())
            {
                return Err(ProviderError::invalid(field, format!("must be one of {}", options.join(", "))));
            }
        }
        Ok(())
    }

    fn probe<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Option<ApiUsage>, ProviderError>> {
        Box::pin(async move {
            let config = config_as::<Config>(call.config)?;
            let deadline = Instant::now() + call.limits.timeout;
            let Some(spreadsheet) = &config.spreadsheet_id else {
                return match credential_of(call)? {
                    Credential::ServiceAccount => self.token(call, &config, deadline).await.map(|_| None),
                    Credential::ApiKey(_) => Err(ProviderError::invalid(
                        "config.spreadsheet_id",
                        "an API key can only be tested on a spreadsheet: name one in the config",
                    )),
                };
            };
            let base = config.api_base_url.trim_end_matches('/');
            let url = format!("{base}/v4/spreadsheets/{}", crate::saas::segment("config.spreadsheet_id", spreadsheet)?);
            let answer = self.get(call, &config, &url, &[("fields", "properties.title")], deadline).await?;
            let body = check(&answer, call)?;
            match body.pointer("/properties/title") {
                Some(Value::String(_)) => Ok(None),
                _ => Err(ProviderError::QueryFailed("the spreadsheet's metadata has no title".into())),
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
            let config = config_as::<Config>(call.config)?;
            let deadline = Instant::now() + call.limits.timeout;
            // Each rendered whole, then encoded as one path segment: a
            // sheet name may hold `/`, `?` or `#`.
            let plain = |text: &str| crate::query::render(text, params, str::to_owned);
            let spreadsheet = match &query.spreadsheet_id {
                Some(template) => plain(template),
                None => config.spreadsheet_id.clone().unwrap_or_default(),
            };
            let spreadsheet = crate::saas::segment("spreadsheet_id", &spreadsheet)?;
            let range = crate::saas::segment("range", &plain(query.range.as_deref().unwrap_or_default()))?;
            let base = config.api_base_url.trim_end_matches('/');
            let url = format!("{base}/v4/spreadsheets/{spreadsheet}/values/{range}");
            let mut pairs = vec![("majorDimension", "ROWS")];
            if let Some(option) = &query.value_render_option {
                pairs.push(("valueRenderOption", option));
            }
            if let Some(option) = &query.date_time_render_option {
                pairs.push(("dateTimeRenderOption", option));
            }
            let answer = self.get(call, &config, &url, &pairs, deadline).await?;
            let body = check(&answer, call)?;
            let values = body["values"].as_array().map(Vec::as_slice).unwrap_or_default();
            rows_of(values, query.header_row.unwrap_or(false), call.limits.max_rows, call.limits.max_bytes, &answer)
        })
    }
}

/// The column names of a header row: an empty one is `column_N`, a
/// repeated one gets `_2`, `_3`, ….
fn column_names(header: &[Value], width: usize) -> Vec<String> {
    let mut names: Vec<String> = Vec::with_capacity(width);
    let mut taken: std::collections::HashSet<String> = std::collections::HashSet::with_capacity(width);
    // The next suffix to try per name: a thousand `x` columns cost a
    // thousand lookups, not a million.
    let mut suffixes: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for index in 0..width {
        let given = header.get(index).map(|cell| match cell {
            Value::String(text) => text.trim().to_owned(),
            Value::Null => String::new(),
            other => other.to_string(),
        });
        let base = given.filter(|name| !name.is_empty()).unwrap_or_else(|| format!("column_{}", index + 1));
        let mut name = base.clone();
        let mut n = suffixes.get(&base).copied().unwrap_or(2);
        while taken.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        suffixes.insert(base, n);
        taken.insert(name.clone());
        names.push(name);
    }
    names
}

fn rows_of(
    values: &[Value],
    header_row: bool,
    max_rows: usize,
    max_bytes: u64,
    answer: &Answer,
) -> Result<Rows, ProviderError> {
    let mut rows = Rows { bytes: 0, ..Rows::default() };
    let (header, data) = match (header_row, values.split_first()) {
        (true, Some((header, data))) => (header.as_array().map(Vec::as_slice), data),
        _ => (None, values),
    };
    let width = data.iter().filter_map(Value::as_array).map(Vec::len).max().unwrap_or(0);
    let names = header.map(|header| column_names(header, width.max(header.len())));
    for row in data {
        if rows.rows.len() == max_rows {
            rows.truncated = true;
            break;
        }
        let cells = row.as_array().map(Vec::as_slice).unwrap_or_default();
        match &names {
            Some(names) => {
                let columns: Vec<(&String, Value)> = names
                    .iter()
                    .enumerate()
                    .map(|(index, name)| (name, cells.get(index).cloned().unwrap_or(Value::Null)))
                    .collect();
                rows.push_columns(&columns, max_bytes)?;
            }
            None => rows.push(row, max_bytes)?,
        }
    }
    rows.bytes = rows.bytes.max(answer.body.len() as u64);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_header_row_names_the_columns_and_short_rows_are_filled() {
        let values = json!([["Name", "", "Name"], ["Ada", 1], ["Bo", 2, "x", "extra"]]);
        let answer = Answer { status: 200, headers: Default::default(), body: Vec::new() };
        let rows = rows_of(values.as_array().unwrap(), true, 10, 1 << 20, &answer).unwrap();
        assert_eq!(
            rows.values(),
            [
                json!({"Name": "Ada", "column_2": 1, "Name_2": null, "column_4": null}),
                json!({"Name": "Bo", "column_2": 2, "Name_2": "x", "column_4": "extra"}),
            ]
        );
        let arrays = rows_of(values.as_array().unwrap(), false, 2, 1 << 20, &answer).unwrap();
        assert_eq!(arrays.values(), [json!(["Name", "", "Name"]), json!(["Ada", 1])]);
        assert!(arrays.truncated);
    }
}

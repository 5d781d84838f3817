//! The provider trait: what every data source does (DESIGN.md §9). The SQL,
//! MongoDB and SaaS providers of later issues implement the same trait.
//!
//! A provider is stateless about members: everything it needs for a call
//! comes in a [`Call`] (the integration's config, its credential, the
//! limits, the guarded HTTP client), so one instance serves everyone.

use crate::guard::GuardError;
use crate::query::{QueryError, QuerySpec};
use secrecy::SecretString;
use serde_json::{Map, Value};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// Execution limits, named and documented (DESIGN.md §9, "Limits").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub timeout: Duration,
    pub max_rows: usize,
    /// Bytes of the upstream's answer, counted after decompression.
    pub max_bytes: u64,
}

pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
pub const TIMEOUT_MAX: Duration = Duration::from_secs(60);
pub const MAX_ROWS_DEFAULT: usize = 1_000;
pub const MAX_ROWS_MAX: usize = 100_000;
pub const RESPONSE_BYTES_DEFAULT: u64 = 8 * 1024 * 1024;
/// How long a connection may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Redirects followed, each re-checked by the guard.
pub const REDIRECTS_MAX: usize = 3;

impl Default for Limits {
    fn default() -> Limits {
        Limits { timeout: TIMEOUT_DEFAULT, max_rows: MAX_ROWS_DEFAULT, max_bytes: RESPONSE_BYTES_DEFAULT }
    }
}

/// One row, as its JSON text: a parsed `Value` takes ten times or more
/// the memory of its text, and a row is only ever passed on, not read.
pub type Row = Box<serde_json::value::RawValue>;

/// A row's JSON text.
pub fn row(value: &Value) -> Row {
    serde_json::value::to_raw_value(value).expect("a JSON value serialises")
}

/// Rows as JSON objects, and what was cut.
#[derive(Clone, Debug, Default)]
pub struct Rows {
    pub rows: Vec<Row>,
    /// Bytes of the upstream's answer.
    pub bytes: u64,
    /// More rows came than `max_rows`: the rest was dropped.
    pub truncated: bool,
}

/// A source's count of API calls against its limit (Salesforce's daily
/// allowance), as the source reported it on its last answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiUsage {
    pub used: u64,
    pub limit: u64,
}

/// Why a provider call failed, each with its stable problem code. Messages
/// never carry a credential: upstream text is scrubbed of the call's
/// secrets before it gets here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{0}")]
    TargetForbidden(GuardError),
    #[error("the source cannot be reached: {0}")]
    Unreachable(String),
    #[error("the source did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the source refused the credential: {0}")]
    AuthFailed(String),
    #[error("the source refused the query: {0}")]
    QueryFailed(String),
    #[error("the source's answer is larger than {0} bytes")]
    TooLarge(u64),
    /// The source's rate limit: nothing more is sent to it before
    /// `retry_after_s` (no hammering).
    #[error("the source's rate limit is reached: {message}")]
    RateLimited { retry_after_s: u64, message: String },
}

impl Rows {
    /// Appends a row, counting its JSON bytes: past `max_bytes`, the
    /// answer is too large.
    pub fn push(&mut self, value: &Value, max_bytes: u64) -> Result<(), ProviderError> {
        let row = row(value);
        self.bytes += row.get().len() as u64;
        if self.bytes > max_bytes {
            return Err(ProviderError::TooLarge(max_bytes));
        }
        self.rows.push(row);
        Ok(())
    }

    /// Appends a row of named columns, as an object in column order (a
    /// `Value` object would sort them); a name twice is refused.
    pub fn push_columns<S: AsRef<str>>(&mut self, columns: &[(S, Value)], max_bytes: u64) -> Result<(), ProviderError> {
        let mut text = String::from("{");
        // Wide rows (a spreadsheet's) look names up in a set, not a scan.
        let mut seen = (columns.len() > 16).then(|| std::collections::HashSet::with_capacity(columns.len()));
        for (index, (name, value)) in columns.iter().enumerate() {
            let name = name.as_ref();
            let twice = match &mut seen {
                Some(seen) => !seen.insert(name),
                None => columns[..index].iter().any(|(earlier, _)| earlier.as_ref() == name),
            };
            if twice {
                return Err(ProviderError::QueryFailed(format!(
                    "the column name `{name}` appears twice: give each column its own name (AS …)"
                )));
            }
            if index > 0 {
                text.push(',');
            }
            text.push_str(&serde_json::to_string(name).expect("a string serialises"));
            text.push(':');
            text.push_str(&serde_json::to_string(value).expect("a JSON value serialises"));
        }
        text.push('}');
        self.bytes += text.len() as u64;
        if self.bytes > max_bytes {
            return Err(ProviderError::TooLarge(max_bytes));
        }
        self.rows.push(serde_json::value::RawValue::from_string(text).expect("an object was written"));
        Ok(())
    }

    /// The rows parsed again (for tests and tools; the execution path
    /// passes them on as text).
    pub fn values(&self) -> Vec<Value> {
        self.rows.iter().map(|row| serde_json::from_str(row.get()).expect("a row is JSON")).collect()
    }
}

impl ProviderError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ProviderError {
        ProviderError::Invalid { field: field.into(), message: message.into() }
    }

    /// The problem code (DESIGN.md §9, "Error codes").
    pub fn code(&self) -> &'static str {
        match self {
            ProviderError::Invalid { .. } => "validation_failed",
            ProviderError::TargetForbidden(_) => "target_forbidden",
            ProviderError::Unreachable(_) => "integration_unreachable",
            ProviderError::Timeout(_) => "integration_timeout",
            ProviderError::AuthFailed(_) => "integration_auth_failed",
            ProviderError::QueryFailed(_) => "integration_query_failed",
            ProviderError::TooLarge(_) => "integration_response_too_large",
            ProviderError::RateLimited { .. } => "integration_rate_limited",
        }
    }

    /// Failures of the upstream (charged nothing), as opposed to refusals
    /// of the request itself.
    pub fn is_upstream(&self) -> bool {
        !matches!(self, ProviderError::Invalid { .. } | ProviderError::TargetForbidden(_))
    }
}

impl From<GuardError> for ProviderError {
    fn from(error: GuardError) -> ProviderError {
        if error.is_forbidden() {
            ProviderError::TargetForbidden(error)
        } else {
            ProviderError::Unreachable(error.to_string())
        }
    }
}

impl From<QueryError> for ProviderError {
    fn from(error: QueryError) -> ProviderError {
        ProviderError::Invalid { field: error.field, message: error.message }
    }
}

/// Everything one call needs.
pub struct Call<'a> {
    /// The integration's non-secret config, validated when saved.
    pub config: &'a Value,
    /// The credential's JSON object, from the vault; `None` for `auth: none`.
    pub credential: Option<&'a SecretString>,
    /// Identifies the credential version, for token caches.
    pub credential_key: String,
    pub limits: Limits,
    pub http: &'a crate::http::GuardedHttp,
}

impl Call<'_> {
    /// `member/integration`: what a provider keys its connection pools by.
    pub fn integration_key(&self) -> &str {
        self.credential_key.rsplit_once('/').map_or(self.credential_key.as_str(), |(key, _version)| key)
    }
}

/// An integration's config as its provider reads it (checked when saved).
pub fn config_as<T: serde::de::DeserializeOwned>(config: &Value) -> Result<T, ProviderError> {
    serde_json::from_value(config.clone()).map_err(|error| ProviderError::invalid("config", error.to_string()))
}

/// `work` within `timeout`: past it, [`ProviderError::Timeout`].
pub async fn within<T>(
    timeout: Duration,
    work: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    tokio::time::timeout(timeout, work).await.unwrap_or(Err(ProviderError::Timeout(timeout)))
}

/// A timeout the source reported (its own statement limit) named with the
/// call's timeout.
pub fn with_timeout(error: ProviderError, timeout: Duration) -> ProviderError {
    match error {
        ProviderError::Timeout(_) => ProviderError::Timeout(timeout),
        other => other,
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub trait Provider: Send + Sync {
    /// Its name, query kinds, config and credential fields, as
    /// `GET /v1/providers` shows them and [`crate::validate_config`] checks
    /// them first.
    fn form(&self) -> &'static crate::form::Form;

    /// `rest`, `graphql`, …: its form's.
    fn name(&self) -> &'static str {
        self.form().provider
    }

    /// The query kinds this provider runs (`request`, `graphql`, …): its
    /// form's.
    fn kinds(&self) -> &'static [&'static str] {
        self.form().kinds
    }

    /// Checks a config (no extra fields, URLs the guard accepts) and the
    /// credential's shape for it; nothing is contacted.
    fn validate_config(
        &self,
        config: &Value,
        credential: Option<&Map<String, Value>>,
        guard: &crate::guard::Guard,
    ) -> Result<(), ProviderError>;

    /// Checks a saved query against the config (its kind, its template).
    fn validate_query(&self, config: &Value, query: &QuerySpec) -> Result<(), ProviderError>;

    /// The cheapest call that proves the source answers with this
    /// credential, and the source's count of API calls if it gives one.
    fn probe<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Option<ApiUsage>, ProviderError>>;

    /// Closes what the provider keeps open for an integration (its
    /// connection pool), when it is changed, disabled or removed.
    fn forget(&self, _integration_key: &str) {}

    /// The source's count of API calls against its allowance, as its last
    /// answer to this integration (`member/integration`) gave it, success
    /// or failure (Salesforce's `Sforce-Limit-Info`).
    fn last_usage(&self, _integration_key: &str) -> Option<ApiUsage> {
        None
    }

    /// Runs a query with bound parameters, within the call's limits.
    fn run<'a>(
        &'a self,
        call: &'a Call<'a>,
        query: &'a QuerySpec,
        params: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Rows, ProviderError>>;
}

/// Replaces every secret value of the credential in `text` (an upstream's
/// error message, say) before it goes anywhere.
pub fn scrub(text: &str, credential: Option<&SecretString>) -> String {
    use secrecy::ExposeSecret;
    let mut text = text.to_owned();
    let Some(credential) = credential else { return text };
    let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(credential.expose_secret()) else { return text };
    for value in fields.values() {
        if let Some(secret) = value.as_str().filter(|secret| secret.len() >= 4) {
            text = text.replace(secret, "[redacted]");
        }
    }
    text
}

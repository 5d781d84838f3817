//! The `airtable` provider: Airtable's Web API with a personal access
//! token. Config `{"base_url", "base_id", "probe_table"}`, credential
//! `{"token"}`; a query of kind `records` lists a table's records
//! (`table`, `view`, `filter_by_formula`, `fields`, `sort`), 100 a page,
//! following `offset` until the table ends or `max_rows` is passed.
//!
//! A record is a row: `id`, `createdTime`, then its fields by name (a
//! field named `id` or `createdTime` is `fields.id`, `fields.createdTime`).
//! Airtable allows 5 requests a second per base and answers 429 beyond,
//! asking for 30 s: requests to a base are paced 210 ms apart, and after
//! a 429 nothing is sent to that base for 30 s; a run that cannot wait
//! that long within its timeout fails with `integration_rate_limited`.

use crate::form::{CredentialForm, Field, Form, Kind, field};
use crate::http::Answer;
use crate::provider::{ApiUsage, BoxFuture, Call, Provider, ProviderError, Rows, config_as};
use crate::query::QuerySpec;
use crate::saas::{Language, Pacer, left, retry_after};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

pub const BASE_URL_DEFAULT: &str = "https://api.airtable.com/v0";
/// Records a page, at most (Airtable's own maximum).
pub const PAGE_SIZE_MAX: usize = 100;
/// Requests to one base are at least this far apart: Airtable allows 5
/// a second, and this keeps under it whatever the clocks' jitter.
pub const REQUEST_INTERVAL: Duration = Duration::from_millis(210);
/// What Airtable asks after a 429.
pub const RATE_LIMIT_WAIT: Duration = Duration::from_secs(30);
const FIELDS_MAX: usize = 100;
const SORTS_MAX: usize = 10;

const CONFIG: &[Field] = &[
    field("base_url", Kind::Url, "Airtable's API; change it only to reach a test double")
        .default("\"https://api.airtable.com/v0\""),
    field("base_id", Kind::String, "the base, `app…` (in the base's URL or its API page)").required().max_length(64),
    field(
        "probe_table",
        Kind::String,
        "a table the health check reads one record of; without it, the check \
        asks Airtable who the token belongs to",
    )
    .max_length(256),
];

pub const FORM: Form = Form {
    provider: "airtable",
    title: "Airtable",
    help: "records of an Airtable base, read with a personal access token (scope data.records:read, access to the base)",
    kinds: &["records"],
    config: CONFIG,
    credentials: &[CredentialForm {
        name: "token",
        when: None,
        fields: &[field("token", Kind::String, "a personal access token, `pat…`").required().secret().max_length(512)],
    }],
    credential_optional: false,
};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "base_url_default")]
    base_url: String,
    base_id: String,
    #[serde(default)]
    probe_table: Option<String>,
}

fn base_url_default() -> String {
    BASE_URL_DEFAULT.to_owned()
}

fn is_id(text: &str) -> bool {
    !text.is_empty() && text.len() <= 64 && text.chars().all(|c| c.is_ascii_alphanumeric())
}

pub struct AirtableProvider {
    pacer: Pacer,
}

impl Default for AirtableProvider {
    fn default() -> AirtableProvider {
        AirtableProvider { pacer: Pacer::new(REQUEST_INTERVAL) }
    }
}

/// `{"error": {"type", "message"}}` or `{"error": "NOT_FOUND"}`.
fn error_of(answer: &Answer) -> (String, String) {
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    let error = &body["error"];
    let kind = error["type"].as_str().or(error.as_str()).unwrap_or_default().to_owned();
    (kind, error["message"].as_str().unwrap_or_default().to_owned())
}

impl AirtableProvider {
    /// One GET, paced per base; a 429 holds the base back and is waited
    /// out when the run has time, else refused.
    async fn get(
        &self,
        call: &Call<'_>,
        base_key: &str,
        url: &str,
        query: &[(String, String)],
        deadline: Instant,
        max_bytes: u64,
    ) -> Result<Answer, ProviderError> {
        let fields = crate::rest::credential_fields(call)?;
        let header = crate::saas::bearer(fields.get("token").and_then(Value::as_str).unwrap_or_default())?;
        loop {
            self.pacer.wait(base_key, deadline, call.limits.timeout).await?;
            let request = call
                .http
                .client()
                .get(url)
                .query(query)
                .header(reqwest::header::AUTHORIZATION, header.clone())
                .header(reqwest::header::ACCEPT, "application/json");
            let answer = call.http.send(request, left(deadline, call.limits.timeout)?, max_bytes).await?;
            if answer.status != 429 {
                return Ok(answer);
            }
            // retry_after is capped: the sum cannot overflow.
            let wait = retry_after(&answer.headers).map_or(RATE_LIMIT_WAIT, Duration::from_secs).max(RATE_LIMIT_WAIT);
            self.pacer.block(base_key, wait);
            tracing::info!(base = base_key, wait_s = wait.as_secs(), "airtable answered 429: the base is held back");
        }
    }

    /// Airtable's answer as JSON, or its error in tally's terms.
    fn check(answer: &Answer, call: &Call<'_>) -> Result<Value, ProviderError> {
        if let Some(json) = crate::saas::json_of(answer, "Airtable") {
            return json;
        }
        let (kind, message) = error_of(answer);
        let said = crate::saas::said(&format!("Airtable answered {} {kind}: {message}", answer.status), call);
        Err(match answer.status {
            401 | 403 => ProviderError::AuthFailed(said),
            500..=599 => ProviderError::Unreachable(format!("Airtable answered {}", answer.status)),
            // 404 (no such base or table), 422 (INVALID_FILTER_BY_FORMULA,
            // UNKNOWN_FIELD_NAME, …): the query's to fix.
            _ => ProviderError::QueryFailed(said),
        })
    }
}

impl Provider for AirtableProvider {
    fn form(&self) -> &'static Form {
        &FORM
    }

    fn validate_config(
        &self,
        config: &Value,
        _credential: Option<&Map<String, Value>>,
        guard: &crate::guard::Guard,
    ) -> Result<(), ProviderError> {
        let parsed = config_as::<Config>(config)?;
        guard.check_url(&parsed.base_url).map_err(|error| crate::rest::url_refusal("config.base_url", error))?;
        if !is_id(&parsed.base_id) || !parsed.base_id.starts_with("app") {
            return Err(ProviderError::invalid("config.base_id", "an Airtable base id, `app` and letters or digits"));
        }
        Ok(())
    }

    fn validate_query(&self, _config: &Value, query: &QuerySpec) -> Result<(), ProviderError> {
        if query.kind != "records" {
            return Err(ProviderError::invalid("kind", "an airtable integration runs queries of kind `records`"));
        }
        query.only_fields(&["base_id", "table", "view", "filter_by_formula", "fields", "sort"])?;
        match query.table.as_deref() {
            Some(table) if !table.is_empty() && table.len() <= 256 => {}
            _ => return Err(ProviderError::invalid("table", "the table's id or name is required (at most 256 bytes)")),
        }
        crate::saas::check_language(Language::Formula, "filter_by_formula", query.filter_by_formula.as_deref())?;
        if let Some(fields) = &query.fields
            && (fields.len() > FIELDS_MAX || fields.iter().any(|name| name.is_empty() || name.len() > 256))
        {
            return Err(ProviderError::invalid("fields", format!("at most {FIELDS_MAX} field names")));
        }
        if let Some(sort) = &query.sort {
            let valid = sort.as_array().is_some_and(|sorts| {
                sorts.len() <= SORTS_MAX
                    && sorts.iter().all(|sort| {
                        sort.as_object().is_some_and(|sort| {
                            sort.get("field").and_then(Value::as_str).is_some_and(|name| !name.is_empty())
                                && sort.keys().all(|key| key == "field" || key == "direction")
                                && sort.get("direction").is_none_or(|direction| {
                                    direction.as_str().is_some_and(|direction| ["asc", "desc"].contains(&direction))
                                })
                        })
                    })
            });
            if sort.to_string().contains("{{") {
                return Err(ProviderError::invalid("sort", "takes no {{parameters}}: name the fields"));
            }
            if !valid {
                return Err(ProviderError::invalid(
                    "sort",
                    format!("a list of at most {SORTS_MAX} {{\"field\", \"direction\": \"asc\"|\"desc\"}}"),
                ));
            }
        }
        Ok(())
    }

    fn probe<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Option<ApiUsage>, ProviderError>> {
        Box::pin(async move {
            let config = config_as::<Config>(call.config)?;
            let deadline = Instant::now() + call.limits.timeout;
            let base = config.base_url.trim_end_matches('/');
            let base_key = format!("{base}/{}", config.base_id);
            let (url, query) = match &config.probe_table {
                Some(table) => (
                    format!("{base}/{}/{}", config.base_id, crate::saas::segment("config.probe_table", table)?),
                    vec![("pageSize".to_owned(), "1".to_owned()), ("maxRecords".to_owned(), "1".to_owned())],
                ),
                None => (format!("{base}/meta/whoami"), Vec::new()),
            };
            let answer = self.get(call, &base_key, &url, &query, deadline, 64 * 1024).await?;
            Self::check(&answer, call).map(|_| None)
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
            let plain = |text: &str| crate::query::render(text, params, str::to_owned);
            let base_id = query.base_id.as_deref().map_or_else(|| config.base_id.clone(), plain);
            if !is_id(&base_id) {
                return Err(ProviderError::invalid("base_id", "an Airtable base id"));
            }
            let table = plain(query.table.as_deref().unwrap_or_default());
            let base = config.base_url.trim_end_matches('/');
            let base_key = format!("{base}/{base_id}");
            let url = format!("{base}/{base_id}/{}", crate::saas::segment("table", &table)?);
            let max_rows = call.limits.max_rows;
            // One more than max_rows tells whether there were more.
            let wanted = max_rows + 1;
            let mut pairs = vec![("maxRecords".to_owned(), wanted.to_string())];
            if let Some(view) = &query.view {
                pairs.push(("view".to_owned(), plain(view)));
            }
            if let Some(formula) = &query.filter_by_formula {
                pairs.push(("filterByFormula".to_owned(), Language::Formula.render(formula, params)));
            }
            for name in query.fields.iter().flatten() {
                pairs.push(("fields[]".to_owned(), name.clone()));
            }
            for (index, sort) in query.sort.as_ref().and_then(Value::as_array).into_iter().flatten().enumerate() {
                pairs.push((format!("sort[{index}][field]"), sort["field"].as_str().unwrap_or_default().to_owned()));
                if let Some(direction) = sort["direction"].as_str() {
                    pairs.push((format!("sort[{index}][direction]"), direction.to_owned()));
                }
            }
            let mut rows = Rows::default();
            let mut offset: Option<String> = None;
            let mut offsets = std::collections::HashSet::new();
            loop {
                let mut page = pairs.clone();
                page.push(("pageSize".to_owned(), (wanted - rows.rows.len()).min(PAGE_SIZE_MAX).to_string()));
                if let Some(offset) = &offset {
                    page.push(("offset".to_owned(), offset.clone()));
                }
                let budget = call.limits.max_bytes.saturating_sub(rows.bytes);
                let answer = self.get(call, &base_key, &url, &page, deadline, budget).await?;
                let body = Self::check(&answer, call)?;
                let records = body["records"].as_array().map(Vec::as_slice).unwrap_or_default();
                for record in records {
                    if rows.rows.len() == max_rows {
                        rows.truncated = true;
                        break;
                    }
                    rows.push_columns(&columns_of(record), call.limits.max_bytes)?;
                }
                offset = body["offset"].as_str().map(str::to_owned);
                let Some(next) = &offset else { break };
                if rows.truncated {
                    break;
                }
                // Every page moves on: never the same offset twice, never an
                // empty page with more to come.
                if records.is_empty() || !offsets.insert(next.clone()) {
                    return Err(ProviderError::QueryFailed(
                        "Airtable's pages do not move on (an empty page, or an offset given twice)".into(),
                    ));
                }
            }
            Ok(rows)
        })
    }
}

/// A record's columns: `id`, `createdTime`, then its fields.
fn columns_of(record: &Value) -> Vec<(String, Value)> {
    let mut columns =
        vec![("id".to_owned(), record["id"].clone()), ("createdTime".to_owned(), record["createdTime"].clone())];
    for (name, value) in record["fields"].as_object().into_iter().flatten() {
        let name = if name == "id" || name == "createdTime" { format!("fields.{name}") } else { name.clone() };
        columns.push((name, value.clone()));
    }
    columns
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_record_is_flattened_into_a_row() {
        let record = json!({"id": "rec1", "createdTime": "2024-01-01T00:00:00.000Z",
            "fields": {"Name": "Ada", "id": 7, "Tags": ["a"]}});
        let columns = columns_of(&record);
        let names: Vec<&str> = columns.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["id", "createdTime", "Name", "Tags", "fields.id"]);
    }

    #[test]
    fn a_formula_template_binds_literals_only() {
        let provider = AirtableProvider::default();
        let query: QuerySpec = serde_json::from_value(json!({"kind": "records", "table": "People",
            "filter_by_formula": "{Name} = '{{name}}'", "params": {"name": {"type": "string"}}}))
        .unwrap();
        let refused = provider.validate_query(&json!({}), &query).unwrap_err();
        assert_eq!(refused.code(), "validation_failed");
    }
}

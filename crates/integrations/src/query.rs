//! Saved queries: their shape, their parameters and the `{{name}}`
//! templates that use them (DESIGN.md §9, "Saved queries"). Parameters are
//! always bound, never spliced: a REST path segment gets the value
//! percent-encoded, a query string or header value gets it as text, a JSON
//! body value gets it typed, and GraphQL gets it as a variable.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

pub const CACHE_TTL_MAX_S: u64 = 86_400;
pub const CACHE_TTL_DEFAULT_S: u64 = 60;
pub const CREDITS_MAX: i64 = 1_000_000;
pub const PARAMS_MAX: usize = 50;
pub const PARAM_NAME_MAX: usize = 64;
pub const PARAM_TEXT_MAX: usize = 4_096;
pub const TEMPLATE_BYTES_MAX: usize = 64 * 1024;

/// A saved query (or an ad-hoc one) as the API takes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuerySpec {
    /// `request` (REST) or `graphql`; later providers add theirs.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// For `request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RestRequest>,
    /// For `graphql`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphql: Option<GraphqlRequest>,
    /// For `sql` (PostgreSQL, MySQL/MariaDB): one statement; `{{name}}`
    /// becomes a bind parameter (`$n`, `?`), never text in the statement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    /// For `find` and `aggregate` (MongoDB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    /// For `find`: the filter, projection and sort, in Extended JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projection: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort: Option<Value>,
    /// For `find`: at most this many documents (and never more than
    /// `max_rows`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// For `aggregate`: the stages, in Extended JSON; no `$out` or `$merge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Vec<Value>>,
    /// For `records` (Airtable): the base, when not the integration's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_id: Option<String>,
    /// For `records`: the table, by id or name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// For `records`: a view of the table (its filter and order apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<String>,
    /// For `records`: an Airtable formula; `{{name}}` becomes an escaped
    /// string or number literal, never formula text.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "filterByFormula")]
    pub filter_by_formula: Option<String>,
    /// For `records`: only these fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
    /// For `range` (Google Sheets): the spreadsheet, when not the
    /// integration's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spreadsheet_id: Option<String>,
    /// For `range`: an A1 range (`Sheet1!A1:F`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<String>,
    /// For `range`: `FORMATTED_VALUE` (the default), `UNFORMATTED_VALUE`
    /// or `FORMULA`.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "valueRenderOption")]
    pub value_render_option: Option<String>,
    /// For `range`: `SERIAL_NUMBER` (the default) or `FORMATTED_STRING`.
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "dateTimeRenderOption")]
    pub date_time_render_option: Option<String>,
    /// For `range`: the first row names the columns (rows are objects);
    /// otherwise rows are arrays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_row: Option<bool>,
    /// For `soql` (Salesforce): one SOQL query; `{{name}}` becomes an
    /// escaped literal, never query text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soql: Option<String>,
    /// For `soql`: keep each record's `attributes` (type and URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_attributes: Option<bool>,
    #[serde(default)]
    pub params: BTreeMap<String, ParamSpec>,
    /// A JSON pointer (RFC 6901) to the array of rows in the answer; the
    /// whole answer when absent (an array is its rows, anything else is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_pointer: Option<String>,
    #[serde(default = "cache_ttl_default")]
    pub cache_ttl_s: u64,
    #[serde(default)]
    pub credits_base: i64,
    #[serde(default)]
    pub credits_per_1k_rows: i64,
    /// What a cache hit costs; `credits_base` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_hit_credits: Option<i64>,
    #[serde(default = "max_rows_default")]
    pub max_rows: u64,
    /// Within the server's maximum; the server's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

fn cache_ttl_default() -> u64 {
    CACHE_TTL_DEFAULT_S
}

fn max_rows_default() -> u64 {
    crate::provider::MAX_ROWS_DEFAULT as u64
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestRequest {
    /// `GET` unless the saved query says otherwise.
    #[serde(default = "get")]
    pub method: String,
    /// Appended to the integration's `base_url`; `{{name}}` segments are
    /// percent-encoded.
    pub path: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

fn get() -> String {
    "GET".to_owned()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphqlRequest {
    /// The document; its variables are the query's parameters.
    pub query: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_name: Option<String>,
    /// A saved query may be a mutation only when it says so.
    #[serde(default)]
    pub allow_mutation: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    String,
    Integer,
    Number,
    Boolean,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    #[serde(rename = "type")]
    pub param_type: ParamType,
    /// Makes the parameter optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<Value>,
}

/// A refusal of a query or of its parameters: `validation_failed` on `field`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryError {
    pub field: String,
    pub message: String,
}

fn refuse(field: impl Into<String>, message: impl Into<String>) -> QueryError {
    QueryError { field: field.into(), message: message.into() }
}

/// The parameter names a template uses, in order; refuses an unclosed or
/// malformed placeholder.
pub fn placeholders(template: &str) -> Result<Vec<&str>, String> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| "a `{{` is not closed by `}}`".to_owned())?;
        let name = after[..end].trim();
        if !is_param_name(name) {
            return Err(format!("`{{{{{name}}}}}` is not a parameter name (letters, digits and _)"));
        }
        names.push(name);
        rest = &after[end + 2..];
    }
    Ok(names)
}

fn is_param_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= PARAM_NAME_MAX
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

impl QuerySpec {
    /// Every template string of the query, with the field it is in.
    fn templates(&self) -> Vec<(String, &str)> {
        let mut templates = Vec::new();
        if let Some(request) = &self.request {
            templates.push(("request.path".to_owned(), request.path.as_str()));
            for (key, value) in &request.query {
                templates.push((format!("request.query.{key}"), value.as_str()));
            }
            for (key, value) in &request.headers {
                templates.push((format!("request.headers.{key}"), value.as_str()));
            }
            if let Some(body) = &request.body {
                collect_strings(body, "request.body", &mut templates);
            }
        }
        for (field, text) in [
            ("sql", &self.sql),
            ("soql", &self.soql),
            ("filter_by_formula", &self.filter_by_formula),
            ("base_id", &self.base_id),
            ("table", &self.table),
            ("view", &self.view),
            ("spreadsheet_id", &self.spreadsheet_id),
            ("range", &self.range),
        ] {
            if let Some(text) = text {
                templates.push((field.to_owned(), text.as_str()));
            }
        }
        for (field, document) in [("filter", &self.filter), ("projection", &self.projection), ("sort", &self.sort)] {
            if let Some(document) = document {
                collect_strings(document, field, &mut templates);
            }
        }
        for (index, stage) in self.pipeline.iter().flatten().enumerate() {
            collect_strings(stage, &format!("pipeline.{index}"), &mut templates);
        }
        templates
    }

    /// Refuses the fields of other kinds: a query names only what its
    /// kind reads.
    pub fn only_fields(&self, kind_fields: &[&str]) -> Result<(), QueryError> {
        let present = [
            ("request", self.request.is_some()),
            ("graphql", self.graphql.is_some()),
            ("sql", self.sql.is_some()),
            ("collection", self.collection.is_some()),
            ("filter", self.filter.is_some()),
            ("projection", self.projection.is_some()),
            ("sort", self.sort.is_some()),
            ("limit", self.limit.is_some()),
            ("pipeline", self.pipeline.is_some()),
            ("rows_pointer", self.rows_pointer.is_some()),
            ("base_id", self.base_id.is_some()),
            ("table", self.table.is_some()),
            ("view", self.view.is_some()),
            ("filter_by_formula", self.filter_by_formula.is_some()),
            ("fields", self.fields.is_some()),
            ("spreadsheet_id", self.spreadsheet_id.is_some()),
            ("range", self.range.is_some()),
            ("value_render_option", self.value_render_option.is_some()),
            ("date_time_render_option", self.date_time_render_option.is_some()),
            ("header_row", self.header_row.is_some()),
            ("soql", self.soql.is_some()),
            ("keep_attributes", self.keep_attributes.is_some()),
        ];
        match present.iter().find(|(field, present)| *present && !kind_fields.contains(field)) {
            Some((field, _)) => Err(refuse(*field, format!("is not a field of kind `{}`", self.kind))),
            None => Ok(()),
        }
    }

    /// Checks what needs no provider: limits, parameter declarations, and
    /// that every template names only declared parameters.
    pub fn validate(&self, max_rows_max: u64, timeout_max_ms: u64) -> Result<(), QueryError> {
        if self.cache_ttl_s > CACHE_TTL_MAX_S {
            return Err(refuse("cache_ttl_s", format!("must be 0 to {CACHE_TTL_MAX_S}")));
        }
        for (field, value) in [
            ("credits_base", self.credits_base),
            ("credits_per_1k_rows", self.credits_per_1k_rows),
            ("cache_hit_credits", self.cache_hit_credits.unwrap_or(0)),
        ] {
            if !(0..=CREDITS_MAX).contains(&value) {
                return Err(refuse(field, format!("must be 0 to {CREDITS_MAX}")));
            }
        }
        if !(1..=max_rows_max).contains(&self.max_rows) {
            return Err(refuse("max_rows", format!("must be 1 to {max_rows_max}")));
        }
        if let Some(timeout) = self.timeout_ms
            && !(1..=timeout_max_ms).contains(&timeout)
        {
            return Err(refuse("timeout_ms", format!("must be 1 to {timeout_max_ms}")));
        }
        if let Some(pointer) = &self.rows_pointer
            && !(pointer.is_empty() || pointer.starts_with('/'))
        {
            return Err(refuse("rows_pointer", "must be a JSON pointer: empty, or starting with /"));
        }
        if self.params.len() > PARAMS_MAX {
            return Err(refuse("params", format!("at most {PARAMS_MAX} parameters")));
        }
        for (name, spec) in &self.params {
            if !is_param_name(name) {
                return Err(refuse(format!("params.{name}"), "a parameter name is letters, digits and _"));
            }
            if let Some(default) = &spec.default {
                check_type(name, spec.param_type, default)?;
            }
        }
        let mut bytes = 0;
        for (field, template) in self.templates() {
            bytes += template.len();
            for name in placeholders(template).map_err(|message| refuse(field.clone(), message))? {
                if !self.params.contains_key(name) {
                    return Err(refuse(field, format!("the template names the undeclared parameter `{name}`")));
                }
            }
        }
        if let Some(graphql) = &self.graphql {
            bytes += graphql.query.len();
        }
        if bytes > TEMPLATE_BYTES_MAX {
            return Err(refuse("request", format!("templates are larger than {TEMPLATE_BYTES_MAX} bytes")));
        }
        // What an execution reserves: at least one credit, at most the limit.
        let bound = i128::from(self.credits_base)
            + i128::from(self.credits_per_1k_rows) * i128::from(self.max_rows.div_ceil(1000));
        if bound < 1 {
            return Err(refuse(
                "credits_base",
                "a query costs at least one credit: set credits_base or credits_per_1k_rows",
            ));
        }
        if bound > i128::from(CREDITS_MAX) {
            return Err(refuse("credits_per_1k_rows", format!("an execution may cost at most {CREDITS_MAX} credits")));
        }
        Ok(())
    }

    /// The parameters of one run: each given one of its declared type,
    /// defaults filled in, none missing, none undeclared.
    pub fn bind(&self, given: &Map<String, Value>) -> Result<Map<String, Value>, QueryError> {
        if let Some(unknown) = given.keys().find(|name| !self.params.contains_key(*name)) {
            return Err(refuse(format!("params.{unknown}"), "is not a parameter of this query"));
        }
        let mut bound = Map::new();
        for (name, spec) in &self.params {
            let value = match (given.get(name), &spec.default) {
                (Some(value), _) => value.clone(),
                (None, Some(default)) => default.clone(),
                (None, None) => return Err(refuse(format!("params.{name}"), "is required")),
            };
            check_type(name, spec.param_type, &value)?;
            bound.insert(name.clone(), value);
        }
        Ok(bound)
    }
}

fn collect_strings<'a>(value: &'a Value, field: &str, out: &mut Vec<(String, &'a str)>) {
    match value {
        Value::String(text) => out.push((field.to_owned(), text)),
        Value::Array(items) => items.iter().for_each(|item| collect_strings(item, field, out)),
        Value::Object(fields) => {
            fields.iter().for_each(|(key, item)| collect_strings(item, &format!("{field}.{key}"), out))
        }
        _ => {}
    }
}

fn check_type(name: &str, param_type: ParamType, value: &Value) -> Result<(), QueryError> {
    let ok = match param_type {
        ParamType::String => value.as_str().is_some_and(|text| text.chars().count() <= PARAM_TEXT_MAX),
        ParamType::Integer => value.is_i64() || value.is_u64(),
        ParamType::Number => value.is_number(),
        ParamType::Boolean => value.is_boolean(),
    };
    if ok {
        Ok(())
    } else {
        let wanted = match param_type {
            ParamType::String => format!("a string of at most {PARAM_TEXT_MAX} characters"),
            ParamType::Integer => "an integer".to_owned(),
            ParamType::Number => "a number".to_owned(),
            ParamType::Boolean => "true or false".to_owned(),
        };
        Err(refuse(format!("params.{name}"), format!("must be {wanted}")))
    }
}

/// The text of a bound value inside a string.
fn text_of(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Substitutes placeholders in a text; `encode` is applied to each value.
pub fn render(template: &str, params: &Map<String, Value>, encode: impl Fn(&str) -> String) -> String {
    render_with(template, |name| encode(&params.get(name).map(text_of).unwrap_or_default()))
}

/// Replaces each placeholder by what `replace` makes of its name.
pub fn render_with(template: &str, mut replace: impl FnMut(&str) -> String) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push_str(&replace(after[..end].trim()));
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// A URL path with each placeholder's value percent-encoded as one
/// segment; a value of `.` or `..` (which a URL reads as a step up, even
/// encoded) is refused.
pub fn render_path(template: &str, params: &Map<String, Value>) -> Result<String, QueryError> {
    for name in placeholders(template).unwrap_or_default() {
        if let Some(value) = params.get(name).map(text_of)
            && (value == "." || value == "..")
        {
            return Err(refuse(format!("params.{name}"), "`.` and `..` cannot be a path segment"));
        }
    }
    Ok(render(template, params, segment))
}

/// A text as one URL path segment, percent-encoded.
pub fn segment(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>().replace('+', "%20")
}

/// A JSON body: a string that is exactly one placeholder takes the value
/// with its type; other strings get the values as text.
pub fn render_json(template: &Value, params: &Map<String, Value>) -> Value {
    match template {
        Value::String(text) => {
            let trimmed = text.trim();
            if let Some(name) = trimmed.strip_prefix("{{").and_then(|rest| rest.strip_suffix("}}"))
                && !name.contains("{{")
                && let Some(value) = params.get(name.trim())
            {
                return value.clone();
            }
            Value::String(render(text, params, str::to_owned))
        }
        Value::Array(items) => Value::Array(items.iter().map(|item| render_json(item, params)).collect()),
        Value::Object(fields) => {
            Value::Object(fields.iter().map(|(key, item)| (key.clone(), render_json(item, params))).collect())
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: Value) -> QuerySpec {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn a_template_naming_an_undeclared_parameter_is_refused_when_saved() {
        let query = spec(json!({"kind": "request", "request": {"path": "/forecast/{{city}}"},
            "params": {"town": {"type": "string"}}}));
        let error = query.validate(100_000, 60_000).unwrap_err();
        assert_eq!(error.field, "request.path");
        assert!(error.message.contains("`city`"), "{}", error.message);
        let broken = spec(json!({"kind": "request", "request": {"path": "/x/{{city"}}));
        assert!(broken.validate(100_000, 60_000).unwrap_err().message.contains("not closed"));
        let hidden = spec(json!({"kind": "request", "request": {"path": "/x", "body": {"a": ["{{secret}}"]}}}));
        assert_eq!(hidden.validate(100_000, 60_000).unwrap_err().field, "request.body.a");
    }

    #[test]
    fn limits_are_checked_with_the_field_named() {
        for (field, value) in [
            ("cache_ttl_s", json!(86_401)),
            ("credits_base", json!(-1)),
            ("max_rows", json!(0)),
            ("max_rows", json!(100_001)),
            ("timeout_ms", json!(60_001)),
        ] {
            let mut body = json!({"kind": "request", "request": {"path": "/"}});
            body[field] = value;
            assert_eq!(spec(body).validate(100_000, 60_000).unwrap_err().field, field);
        }
        let free = spec(json!({"kind": "request", "request": {"path": "/"}}));
        assert_eq!(free.validate(100_000, 60_000).unwrap_err().field, "credits_base", "a query costs something");
        let dear = spec(
            json!({"kind": "request", "request": {"path": "/"}, "credits_per_1k_rows": 1_000_000, "max_rows": 2_000}),
        );
        assert_eq!(dear.validate(100_000, 60_000).unwrap_err().field, "credits_per_1k_rows");
        let extra = serde_json::from_value::<QuerySpec>(json!({"kind": "request", "surprise": 1}));
        assert!(extra.is_err(), "unknown fields are refused");
    }

    #[test]
    fn parameters_are_typed_required_unless_defaulted_and_never_undeclared() {
        let query = spec(json!({"kind": "request", "request": {"path": "/{{city}}"}, "params": {
            "city": {"type": "string"}, "days": {"type": "integer", "default": 3}, "metric": {"type": "boolean", "default": true}}}));
        let bound = query.bind(json!({"city": "paris"}).as_object().unwrap()).unwrap();
        assert_eq!(Value::Object(bound), json!({"city": "paris", "days": 3, "metric": true}));
        for (given, field) in [
            (json!({}), "params.city"),
            (json!({"city": 7}), "params.city"),
            (json!({"city": "x", "days": 1.5}), "params.days"),
            (json!({"city": "x", "other": 1}), "params.other"),
        ] {
            assert_eq!(query.bind(given.as_object().unwrap()).unwrap_err().field, field, "{given}");
        }
    }

    #[test]
    fn values_are_bound_not_spliced() {
        let params = json!({"city": "../admin?x=1 2", "n": 5}).as_object().unwrap().clone();
        assert_eq!(render_path("/forecast/{{city}}/days", &params).unwrap(), "/forecast/..%2Fadmin%3Fx%3D1%202/days");
        let up = json!({"city": ".."}).as_object().unwrap().clone();
        assert_eq!(render_path("/forecast/{{city}}", &up).unwrap_err().field, "params.city");
        assert_eq!(
            render_json(&json!({"where": {"city": "{{city}}", "n": "{{ n }}", "label": "n={{n}}"}}), &params),
            json!({"where": {"city": "../admin?x=1 2", "n": 5, "label": "n=5"}})
        );
    }
}

//! The `graphql` provider: config `{"endpoint", "auth", "headers"}` (auth
//! as for REST); a saved query of kind `graphql` is a document whose
//! variables are the query's parameters, POSTed as
//! `{query, variables, operationName}`. Mutations run only from a saved
//! query marked `allow_mutation`; subscriptions never. An answer with
//! `errors` is refused, even with partial `data`: a half answer is not
//! charged as a whole one. `rows_pointer` points into `data`.

use crate::form::{Field, Form, Kind, field};
use crate::provider::{ApiUsage, BoxFuture, Call, Provider, ProviderError, Rows, scrub};
use crate::query::QuerySpec;
use crate::rest::{HTTP_CREDENTIALS, HttpAuth, answer_json, config_unchecked, parse_config, rows_at};

const CONFIG: &[Field] = &[
    field("endpoint", Kind::Url, "the GraphQL endpoint; https unless the operator allow-lists the address").required(),
    field("auth", Kind::Object, "how tally signs in, as for the rest provider"),
    field("headers", Kind::Object, "headers sent with every request (not Host or Authorization), at most 50"),
];

pub const FORM: Form = Form {
    provider: "graphql",
    title: "GraphQL API",
    help: "a GraphQL endpoint; parameters go as variables",
    kinds: &["graphql"],
    config: CONFIG,
    credentials: HTTP_CREDENTIALS,
    credential_optional: false,
};
use serde_json::{Map, Value, json};

#[derive(Default)]
pub struct GraphqlProvider {
    auth: HttpAuth,
}

/// The operation types a GraphQL document defines, read lexically:
/// comments and strings skipped, keywords taken only where a definition
/// starts (outside any selection set). A document is `query` when it
/// begins with `{`.
pub fn operation_types(document: &str) -> Vec<String> {
    let mut types = Vec::new();
    let mut depth = 0usize;
    let mut at_definition = true;
    let mut chars = document.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        match c {
            '#' => while chars.next_if(|(_, c)| *c != '\n').is_some() {},
            '"' => {
                let block = document[at..].starts_with("\"\"\"");
                if block {
                    chars.next();
                    chars.next();
                    let rest = &document[at + 3..];
                    let end = rest.find("\"\"\"").map_or(document.len(), |end| at + 3 + end + 3);
                    while chars.next_if(|(index, _)| *index < end).is_some() {}
                } else {
                    while let Some((_, c)) = chars.next() {
                        match c {
                            '\\' => {
                                chars.next();
                            }
                            '"' | '\n' => break,
                            _ => {}
                        }
                    }
                }
            }
            '{' => {
                if depth == 0 && at_definition {
                    types.push("query".to_owned());
                }
                depth += 1;
                at_definition = false;
            }
            '}' => {
                depth = depth.saturating_sub(1);
                at_definition = depth == 0;
            }
            c if depth == 0 && at_definition && (c.is_ascii_alphabetic() || c == '_') => {
                let mut word = String::from(c);
                while let Some((_, c)) = chars.next_if(|(_, c)| c.is_ascii_alphanumeric() || *c == '_') {
                    word.push(c);
                }
                types.push(word);
                at_definition = false;
            }
            _ => {}
        }
    }
    types
}

impl Provider for GraphqlProvider {
    fn form(&self) -> &'static Form {
        &FORM
    }

    fn validate_config(
        &self,
        config: &Value,
        credential: Option<&Map<String, Value>>,
        guard: &crate::guard::Guard,
    ) -> Result<(), ProviderError> {
        if config.get("base_url").is_some() {
            return Err(ProviderError::invalid("config.base_url", "a graphql integration names its `endpoint`"));
        }
        parse_config(config, credential, guard).map(drop)
    }

    fn validate_query(&self, _config: &Value, query: &QuerySpec) -> Result<(), ProviderError> {
        if query.kind != "graphql" {
            return Err(ProviderError::invalid("kind", "a graphql integration runs queries of kind `graphql`"));
        }
        if query.request.is_some() {
            return Err(ProviderError::invalid("request", "is not for kind `graphql`"));
        }
        let Some(graphql) = &query.graphql else {
            return Err(ProviderError::invalid("graphql", "is required for kind `graphql`"));
        };
        let types = operation_types(&graphql.query);
        if types.is_empty() {
            return Err(ProviderError::invalid("graphql.query", "defines no operation"));
        }
        for operation in &types {
            match operation.as_str() {
                "query" | "fragment" => {}
                "mutation" if graphql.allow_mutation => {}
                "mutation" => {
                    return Err(ProviderError::invalid(
                        "graphql.query",
                        "a mutation runs only from a saved query with allow_mutation: true",
                    ));
                }
                other => {
                    return Err(ProviderError::invalid("graphql.query", format!("`{other}` operations are not run")));
                }
            }
        }
        Ok(())
    }

    fn probe<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Option<ApiUsage>, ProviderError>> {
        Box::pin(async move {
            let config = config_unchecked(call.config)?;
            let body = json!({"query": "{ __typename }"});
            let answer = self
                .auth
                .send(call, &config, call.limits, || call.http.client().post(&config.base_url).json(&body))
                .await?;
            let json = answer_json(&answer, call)?;
            match json.pointer("/data/__typename") {
                Some(Value::String(_)) => Ok(None),
                _ => Err(ProviderError::QueryFailed("the endpoint does not answer GraphQL".into())),
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
            let graphql = query.graphql.as_ref().ok_or_else(|| ProviderError::invalid("graphql", "is required"))?;
            let mut body = json!({"query": graphql.query, "variables": params});
            if let Some(name) = &graphql.operation_name {
                body["operationName"] = json!(name);
            }
            let answer = self
                .auth
                .send(call, &config, call.limits, || {
                    let mut builder = call.http.client().post(&config.base_url).json(&body);
                    for (name, value) in &config.headers {
                        builder = builder.header(name.as_str(), value.as_str());
                    }
                    builder
                })
                .await?;
            let json = answer_json(&answer, call)?;
            if let Some(errors) = json.get("errors").and_then(Value::as_array).filter(|errors| !errors.is_empty()) {
                let messages: Vec<&str> = errors.iter().filter_map(|error| error["message"].as_str()).take(3).collect();
                let message = scrub(&messages.join("; "), call.credential);
                return Err(ProviderError::QueryFailed(message.chars().take(300).collect()));
            }
            let data = json.get("data").cloned().unwrap_or(Value::Null);
            rows_at(&data, query.rows_pointer.as_deref(), answer.body.len() as u64, call.limits.max_rows)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_are_read_past_comments_strings_and_selections() {
        assert_eq!(operation_types("{ forecast { temp } }"), ["query"]);
        assert_eq!(operation_types("query Q($c: String!) { forecast(city: $c) { temp } }"), ["query"]);
        assert_eq!(operation_types("# mutation\nquery { a(text: \"mutation {\") }"), ["query"]);
        assert_eq!(operation_types("query { a }\nmutation M { b }"), ["query", "mutation"]);
        assert_eq!(operation_types("\"\"\"doc { mutation\"\"\" subscription S { c }"), ["subscription"]);
        assert_eq!(operation_types("fragment F on T { x } query { ...F }"), ["fragment", "query"]);
    }
}

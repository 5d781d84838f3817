//! What the SaaS presets share: parameters bound as escaped literals of
//! their query languages (SOQL, Airtable formulas), a pacer that keeps a
//! source's request rate and honours its "wait" answers, access tokens
//! cached per credential version, and the time left of a run.

use crate::provider::{ApiUsage, ProviderError};
use crate::query::{QueryError, render_with};
use moka::future::Cache;
use secrecy::SecretString;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A query language's literals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    /// Salesforce SOQL: strings in single quotes, backslash escapes.
    Soql,
    /// Airtable formulas: strings in double quotes, backslash escapes.
    Formula,
}

impl Language {
    fn name(self) -> &'static str {
        match self {
            Language::Soql => "SOQL",
            Language::Formula => "formula",
        }
    }

    /// A bound value as a literal of the language: a string quoted and
    /// escaped, a number as digits (never an exponent), a boolean as the
    /// language writes it.
    pub fn literal(self, value: &Value) -> String {
        match value {
            Value::String(text) => {
                let mut out = String::with_capacity(text.len() + 2);
                let quote = match self {
                    Language::Soql => '\'',
                    Language::Formula => '"',
                };
                out.push(quote);
                for c in text.chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '\'' => out.push_str("\\'"),
                        '"' => out.push_str("\\\""),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        '\t' => out.push_str("\\t"),
                        '\u{8}' if self == Language::Soql => out.push_str("\\b"),
                        '\u{c}' if self == Language::Soql => out.push_str("\\f"),
                        // Other control characters have no escape in either
                        // language: a space keeps the literal whole.
                        c if c.is_control() => out.push(' '),
                        c => out.push(c),
                    }
                }
                out.push(quote);
                out
            }
            Value::Number(number) => match (number.as_i64(), number.as_u64(), number.as_f64()) {
                (Some(integer), _, _) => integer.to_string(),
                (_, Some(integer), _) => integer.to_string(),
                // Rust prints an f64 without an exponent.
                (_, _, Some(float)) => float.to_string(),
                _ => "0".to_owned(),
            },
            Value::Bool(true) => match self {
                Language::Soql => "TRUE".to_owned(),
                Language::Formula => "TRUE()".to_owned(),
            },
            Value::Bool(false) => match self {
                Language::Soql => "FALSE".to_owned(),
                Language::Formula => "FALSE()".to_owned(),
            },
            _ => "NULL".to_owned(),
        }
    }

    /// The template with each placeholder replaced by its value's literal.
    pub fn render(self, template: &str, params: &Map<String, Value>) -> String {
        render_with(template, |name| self.literal(params.get(name).unwrap_or(&Value::Null)))
    }

    /// Refuses a placeholder written inside a string literal of the
    /// template (`'{{name}}'`): the value becomes a whole literal of its
    /// own, so it is written bare (`Name = {{name}}`).
    pub fn check_template(self, field: &str, template: &str) -> Result<(), QueryError> {
        let mut quote: Option<char> = None;
        let mut chars = template.char_indices().peekable();
        while let Some((index, c)) = chars.next() {
            match quote {
                Some(open) => match c {
                    '\\' => {
                        chars.next();
                    }
                    c if c == open => quote = None,
                    '{' if template[index..].starts_with("{{") => {
                        return Err(QueryError {
                            field: field.to_owned(),
                            message: format!(
                                "a {{{{parameter}}}} inside a quoted {} string: write it bare, it becomes a quoted, \
                                 escaped literal",
                                self.name()
                            ),
                        });
                    }
                    _ => {}
                },
                None => {
                    let opens = match self {
                        Language::Soql => c == '\'',
                        Language::Formula => c == '"' || c == '\'',
                    };
                    if opens {
                        quote = Some(c);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Keeps each key's requests at least `interval` apart, and holds them
/// all back while a source has asked to wait (a 429). A request whose
/// turn comes after its run's deadline is refused at once with
/// `integration_rate_limited` instead of being sent late.
pub struct Pacer {
    interval: Duration,
    slots: Mutex<HashMap<String, Slot>>,
}

#[derive(Clone, Copy)]
struct Slot {
    next: Instant,
    blocked_until: Option<Instant>,
}

/// Keys kept before old ones are swept.
const PACER_KEYS_MAX: usize = 10_000;

impl Pacer {
    pub fn new(interval: Duration) -> Pacer {
        Pacer { interval, slots: Mutex::new(HashMap::new()) }
    }

    /// When `key` may send next, taking that turn; or the refusal, when
    /// the turn is past `deadline`.
    fn take(&self, key: &str, deadline: Instant) -> Result<Instant, ProviderError> {
        let now = Instant::now();
        let mut slots = self.slots.lock().expect("the pacer's lock is never poisoned");
        if slots.len() >= PACER_KEYS_MAX {
            slots.retain(|_, slot| slot.next > now || slot.blocked_until.is_some_and(|until| until > now));
        }
        let slot = slots.entry(key.to_owned()).or_insert(Slot { next: now, blocked_until: None });
        let turn = slot.next.max(now).max(slot.blocked_until.unwrap_or(now));
        if turn > deadline {
            let wait = turn.saturating_duration_since(now);
            return Err(ProviderError::RateLimited {
                retry_after_s: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                message: match slot.blocked_until {
                    Some(until) if until > now => "the source asked tally to wait before the next request".into(),
                    _ => "the source's request rate is used up for now".into(),
                },
            });
        }
        slot.next = turn + self.interval;
        Ok(turn)
    }

    /// Waits for `key`'s turn within `deadline`.
    pub async fn wait(&self, key: &str, deadline: Instant) -> Result<(), ProviderError> {
        let turn = self.take(key, deadline)?;
        tokio::time::sleep_until(turn.into()).await;
        Ok(())
    }

    /// Holds `key` back for `wait` (the source answered 429).
    pub fn block(&self, key: &str, wait: Duration) {
        let until = Instant::now() + wait;
        let mut slots = self.slots.lock().expect("the pacer's lock is never poisoned");
        let slot = slots.entry(key.to_owned()).or_insert(Slot { next: until, blocked_until: None });
        slot.blocked_until = Some(slot.blocked_until.map_or(until, |earlier| earlier.max(until)));
    }
}

/// An access token from a token endpoint, and where to use it.
#[derive(Clone)]
pub struct Token {
    pub access_token: Arc<SecretString>,
    /// Salesforce's `instance_url`, already checked by the guard.
    pub instance_url: Option<String>,
    pub lifetime: Duration,
}

/// Tokens are fetched again this long before the expiry their issuer gave.
pub const TOKEN_MARGIN: Duration = Duration::from_secs(60);
pub const TOKEN_LIFETIME_MAX: Duration = Duration::from_secs(24 * 3600);

/// Access tokens by credential version (`member/integration/version`): a
/// rotation starts afresh, and no two members ever share one.
pub struct Tokens {
    cache: Cache<String, Token>,
}

impl Default for Tokens {
    fn default() -> Tokens {
        struct Lifetime;
        impl moka::Expiry<String, Token> for Lifetime {
            fn expire_after_create(&self, _: &String, token: &Token, _: Instant) -> Option<Duration> {
                Some(token.lifetime)
            }
        }
        Tokens { cache: Cache::builder().max_capacity(10_000).expire_after(Lifetime).build() }
    }
}

impl Tokens {
    pub async fn get(&self, key: &str) -> Option<Token> {
        self.cache.get(key).await
    }

    pub async fn put(&self, key: &str, token: Token) {
        self.cache.insert(key.to_owned(), token).await;
    }

    pub async fn forget(&self, key: &str) {
        self.cache.invalidate(key).await;
    }

    /// Forgets every token of an integration (`member/integration`).
    pub fn forget_integration(&self, integration_key: &str) {
        let prefix = format!("{integration_key}/");
        let _ = self.cache.invalidate_entries_if(move |key, _| key.starts_with(&prefix));
    }
}

/// A token's lifetime from an `expires_in`, less the margin, within bounds.
pub fn lifetime(expires_in: Option<u64>, default: Duration) -> Duration {
    expires_in.map_or(default, Duration::from_secs).min(TOKEN_LIFETIME_MAX).saturating_sub(TOKEN_MARGIN)
}

/// The time left before `deadline`, or the run's timeout when it passed.
pub fn left(deadline: Instant, timeout: Duration) -> Result<Duration, ProviderError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() { Err(ProviderError::Timeout(timeout)) } else { Ok(left) }
}

/// A `Retry-After` header in seconds, when given as seconds.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()
}

/// Salesforce's `Sforce-Limit-Info: api-usage=25/15000`.
pub fn api_usage(headers: &reqwest::header::HeaderMap) -> Option<ApiUsage> {
    let info = headers.get("sforce-limit-info")?.to_str().ok()?;
    let usage = info.split(',').find_map(|part| part.trim().strip_prefix("api-usage="))?;
    let (used, limit) = usage.split_once('/')?;
    Some(ApiUsage { used: used.trim().parse().ok()?, limit: limit.trim().parse().ok()? })
}

/// A service's text (an error message) fit to pass on: the call's secrets
/// scrubbed, then cut.
pub fn said(text: &str, call: &crate::provider::Call<'_>) -> String {
    crate::provider::scrub(text, call.credential).chars().take(crate::rest::UPSTREAM_MESSAGE_MAX).collect()
}

/// A 2xx answer's JSON; `None` for another status, whose error the
/// service's own `check` reads.
pub fn json_of(answer: &crate::http::Answer, service: &str) -> Option<Result<Value, ProviderError>> {
    (200..300).contains(&answer.status).then(|| {
        serde_json::from_slice(&answer.body)
            .map_err(|error| ProviderError::QueryFailed(format!("{service}'s answer is not JSON: {error}")))
    })
}

/// A token endpoint's answer (OAuth 2.0, RFC 6749 §5): its JSON with a
/// non-empty `access_token`, or its refusal (`error`,
/// `error_description`) as `integration_auth_failed`.
pub async fn token_answer(
    call: &crate::provider::Call<'_>,
    request: reqwest::RequestBuilder,
    deadline: Instant,
) -> Result<(Value, SecretString), ProviderError> {
    let answer = call.http.send(request, left(deadline, call.limits.timeout)?, 64 * 1024).await?;
    let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    if answer.status >= 500 {
        return Err(ProviderError::Unreachable(format!("the token endpoint answered {}", answer.status)));
    }
    if !(200..300).contains(&answer.status) {
        let error = body["error"].as_str().unwrap_or("an error");
        let description = said(body["error_description"].as_str().unwrap_or_default(), call);
        return Err(ProviderError::AuthFailed(format!(
            "the token endpoint answered {} {error}: {description}",
            answer.status
        )));
    }
    match body["access_token"].as_str().filter(|token| !token.is_empty()) {
        Some(token) => {
            let token = SecretString::from(token.to_owned());
            Ok((body, token))
        }
        None => Err(ProviderError::AuthFailed("the token endpoint gave no access_token".into())),
    }
}

/// `Authorization: Bearer …`, marked sensitive (never printed by reqwest
/// or hyper).
pub fn bearer(token: &str) -> Result<reqwest::header::HeaderValue, ProviderError> {
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ProviderError::AuthFailed("the token cannot go in an HTTP header".into()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Checks a template of a query language: its placeholders bare, never
/// inside one of its string literals.
pub fn check_language(language: Language, field: &str, template: Option<&str>) -> Result<(), ProviderError> {
    if let Some(template) = template {
        language.check_template(field, template)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hostile_strings_become_one_literal() {
        let hostile = "x' OR Name != 'y\\' OR Id != null -- \"\n\t%_";
        assert_eq!(
            Language::Soql.literal(&json!(hostile)),
            "'x\\' OR Name != \\'y\\\\\\' OR Id != null -- \\\"\\n\\t%_'"
        );
        assert_eq!(
            Language::Formula.literal(&json!("\") , TRUE()) & (\"")),
            "\"\\\") , TRUE()) & (\\\"\"",
            "a quote cannot close the formula's string"
        );
        // Read back with the language's own rule, the literal is the value.
        for language in [Language::Soql, Language::Formula] {
            let literal = language.literal(&json!(hostile));
            let inner = &literal[1..literal.len() - 1];
            let mut unescaped = String::new();
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => unescaped.push(match chars.next().unwrap() {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    }),
                    '\'' | '"' => panic!("{language:?}: an unescaped quote in {literal}"),
                    c => unescaped.push(c),
                }
            }
            assert_eq!(unescaped, hostile, "{language:?}");
        }
    }

    #[test]
    fn numbers_and_booleans_are_literals_too() {
        assert_eq!(Language::Soql.literal(&json!(42)), "42");
        assert_eq!(Language::Soql.literal(&json!(1e21)), "1000000000000000000000");
        assert_eq!(Language::Soql.literal(&json!(-0.5)), "-0.5");
        assert_eq!(Language::Soql.literal(&json!(true)), "TRUE");
        assert_eq!(Language::Formula.literal(&json!(false)), "FALSE()");
        let params = json!({"name": "O'Brien", "n": 3}).as_object().unwrap().clone();
        assert_eq!(
            Language::Soql.render("SELECT Id FROM Account WHERE Name = {{name}} LIMIT {{ n }}", &params),
            "SELECT Id FROM Account WHERE Name = 'O\\'Brien' LIMIT 3"
        );
    }

    #[test]
    fn a_placeholder_inside_quotes_is_refused() {
        assert!(Language::Soql.check_template("soql", "SELECT Id FROM A WHERE Name = '{{name}}'").is_err());
        assert!(Language::Soql.check_template("soql", "WHERE Name LIKE 'a\\'{{x}}%'").is_err());
        assert!(Language::Soql.check_template("soql", "WHERE Name = {{name}} AND T = 'it''s'").is_ok());
        assert!(Language::Formula.check_template("f", "{Name} = '{{name}}'").is_err());
        assert!(Language::Formula.check_template("f", "FIND(\"{{x}}\", {Name})").is_err());
        assert!(Language::Formula.check_template("f", "AND({Name} = {{name}}, {Tag} = \"vip\")").is_ok());
    }

    #[tokio::test]
    async fn the_pacer_spaces_requests_and_refuses_past_the_deadline() {
        let pacer = Pacer::new(Duration::from_millis(50));
        let deadline = Instant::now() + Duration::from_secs(5);
        let started = Instant::now();
        for _ in 0..4 {
            pacer.wait("base", deadline).await.unwrap();
        }
        assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
        pacer.block("base", Duration::from_secs(30));
        match pacer.wait("base", Instant::now() + Duration::from_secs(1)).await {
            Err(ProviderError::RateLimited { retry_after_s, .. }) => assert!((29..=30).contains(&retry_after_s)),
            other => panic!("{other:?}"),
        }
        assert!(pacer.wait("other", Instant::now() + Duration::from_secs(1)).await.is_ok(), "keys are apart");
    }

    #[test]
    fn salesforce_usage_is_read_from_its_header() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("Sforce-Limit-Info", "api-usage=25/15000".parse().unwrap());
        assert_eq!(api_usage(&headers), Some(ApiUsage { used: 25, limit: 15_000 }));
        headers.insert("Sforce-Limit-Info", "per-app-api-usage=1/2(appName=x), api-usage=7/100".parse().unwrap());
        assert_eq!(api_usage(&headers), Some(ApiUsage { used: 7, limit: 100 }));
    }
}

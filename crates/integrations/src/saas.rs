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
    /// template (`'{{name}}'`), or, in a formula, inside a field reference
    /// (`{ {{name}} }`, where no escape exists): the value becomes a whole
    /// literal of its own, so it is written bare (`Name = {{name}}`).
    pub fn check_template(self, field: &str, template: &str) -> Result<(), QueryError> {
        let refuse = |inside: &str| QueryError {
            field: field.to_owned(),
            message: format!(
                "a {{{{parameter}}}} inside {inside} of the {}: write it bare, it becomes a quoted, escaped literal",
                self.name()
            ),
        };
        let mut quote: Option<char> = None;
        let mut field_reference = false;
        let mut escaped = false;
        let mut index = 0;
        while index < template.len() {
            let rest = &template[index..];
            // A placeholder is looked for before anything else, even right
            // after a backslash.
            if rest.starts_with("{{") {
                if quote.is_some() {
                    return Err(refuse("a quoted string"));
                }
                if field_reference {
                    return Err(refuse("a field reference {…}"));
                }
                let end = rest.find("}}").map_or(template.len(), |end| index + end + 2);
                index = end;
                continue;
            }
            let c = rest.chars().next().expect("not at the end");
            index += c.len_utf8();
            if escaped {
                escaped = false;
                continue;
            }
            match (quote, c) {
                (Some(_), '\\') => escaped = true,
                (Some(open), c) if c == open => quote = None,
                (Some(_), _) => {}
                (None, '\'') => quote = Some('\''),
                (None, '"') if self == Language::Formula => quote = Some('"'),
                (None, '{') if self == Language::Formula => field_reference = true,
                (None, '}') if self == Language::Formula => field_reference = false,
                (None, _) => {}
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
    /// the turn is past `deadline`: `integration_rate_limited` while the
    /// source asked for a pause, `integration_timeout` when the pace alone
    /// leaves no time.
    fn take(&self, key: &str, deadline: Instant, timeout: Duration) -> Result<Instant, ProviderError> {
        let now = Instant::now();
        let mut slots = self.slots.lock().expect("the pacer's lock is never poisoned");
        if slots.len() >= PACER_KEYS_MAX {
            slots.retain(|_, slot| slot.next > now || slot.blocked_until.is_some_and(|until| until > now));
        }
        let slot = slots.entry(key.to_owned()).or_insert(Slot { next: now, blocked_until: None });
        let blocked = slot.blocked_until.filter(|until| *until > now);
        let turn = slot.next.max(now).max(blocked.unwrap_or(now));
        if turn > deadline {
            return Err(match blocked {
                Some(until) => {
                    let wait = until.saturating_duration_since(now);
                    ProviderError::RateLimited {
                        retry_after_s: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                        message: "it asked for a pause, and nothing is sent to it before the pause ends".into(),
                    }
                }
                None => ProviderError::Timeout(timeout),
            });
        }
        slot.next = turn + self.interval;
        Ok(turn)
    }

    /// Waits for `key`'s turn within `deadline` (`timeout` names it); a
    /// pause asked for while it waited is honoured too.
    pub async fn wait(&self, key: &str, deadline: Instant, timeout: Duration) -> Result<(), ProviderError> {
        loop {
            let turn = self.take(key, deadline, timeout)?;
            if turn <= Instant::now() {
                // The timer wheel ticks by the millisecond: a turn that is
                // already here must not wait for its next tick.
                return Ok(());
            }
            tokio::time::sleep_until(turn.into()).await;
            let blocked = {
                let slots = self.slots.lock().expect("the pacer's lock is never poisoned");
                slots.get(key).and_then(|slot| slot.blocked_until).is_some_and(|until| until > Instant::now())
            };
            if !blocked {
                return Ok(());
            }
        }
    }

    /// Holds `key` back for `wait` (the source answered 429), at most
    /// [`PAUSE_MAX`].
    pub fn block(&self, key: &str, wait: Duration) {
        let until = Instant::now() + wait.min(PAUSE_MAX);
        let mut slots = self.slots.lock().expect("the pacer's lock is never poisoned");
        let slot = slots.entry(key.to_owned()).or_insert(Slot { next: until, blocked_until: None });
        slot.blocked_until = Some(slot.blocked_until.map_or(until, |earlier| earlier.max(until)));
    }
}

/// The longest pause a source's answer can impose (a larger Retry-After is
/// read as this).
pub const PAUSE_MAX: Duration = Duration::from_secs(3_600);

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
        let cache =
            Cache::builder().max_capacity(10_000).expire_after(Lifetime).support_invalidation_closures().build();
        Tokens { cache }
    }
}

impl Tokens {
    /// The kept token of `key`, or the one `fetch` gets: runs that miss at
    /// once wait for one fetch (a single flight), and a failure is kept by
    /// none of them.
    pub async fn get_or_fetch(
        &self,
        key: &str,
        fetch: impl std::future::Future<Output = Result<Token, ProviderError>>,
    ) -> Result<Token, ProviderError> {
        self.cache.try_get_with(key.to_owned(), fetch).await.map_err(|error| (*error).clone())
    }

    pub async fn forget(&self, key: &str) {
        self.cache.invalidate(key).await;
    }

    /// Forgets every token of an integration (`member/integration`).
    pub fn forget_integration(&self, integration_key: &str) {
        let prefix = format!("{integration_key}/");
        self.cache
            .invalidate_entries_if(move |key, _| key.starts_with(&prefix))
            .expect("the token cache is built with support_invalidation_closures");
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

/// A name (a spreadsheet, a range, a table) as one URL path segment; an
/// empty one, `.` or `..` (a step up, even encoded) is refused.
pub fn segment(field: &str, text: &str) -> Result<String, ProviderError> {
    if text.is_empty() || text == "." || text == ".." {
        return Err(ProviderError::invalid(field, format!("`{text}` is not a name")));
    }
    Ok(crate::query::segment(text))
}

/// A `Retry-After` header in seconds, when given as seconds, at most
/// [`PAUSE_MAX`].
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    let seconds: u64 = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(seconds.min(PAUSE_MAX.as_secs()))
}

/// Counts a source may report: larger ones are not believed.
pub const API_USAGE_MAX: u64 = 1_000_000_000_000;

/// Salesforce's `Sforce-Limit-Info: api-usage=25/15000`.
pub fn api_usage(headers: &reqwest::header::HeaderMap) -> Option<ApiUsage> {
    let info = headers.get("sforce-limit-info")?.to_str().ok()?;
    let usage = info.split(',').find_map(|part| part.trim().strip_prefix("api-usage="))?;
    let (used, limit) = usage.split_once('/')?;
    let (used, limit): (u64, u64) = (used.trim().parse().ok()?, limit.trim().parse().ok()?);
    (used <= API_USAGE_MAX && limit <= API_USAGE_MAX).then_some(ApiUsage { used, limit })
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
        assert!(Language::Formula.check_template("f", "{ {{f}} } = 1").is_err(), "no escape exists in {{…}}");
        assert!(Language::Formula.check_template("f", "'a\\{{x}}'").is_err(), "not hidden by a backslash");
        assert!(Language::Soql.check_template("soql", "WHERE Name = {{a}} AND Id = {{b}}").is_ok());
    }

    #[tokio::test]
    async fn the_pacer_spaces_requests_and_refuses_past_the_deadline() {
        let pacer = Pacer::new(Duration::from_millis(50));
        let deadline = Instant::now() + Duration::from_secs(5);
        let timeout = Duration::from_secs(5);
        let started = Instant::now();
        for _ in 0..4 {
            pacer.wait("base", deadline, timeout).await.unwrap();
        }
        assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
        pacer.block("base", Duration::from_secs(30));
        match pacer.wait("base", Instant::now() + Duration::from_secs(1), timeout).await {
            Err(ProviderError::RateLimited { retry_after_s, .. }) => assert!((29..=30).contains(&retry_after_s)),
            other => panic!("{other:?}"),
        }
        assert!(pacer.wait("other", Instant::now() + Duration::from_secs(1), timeout).await.is_ok(), "keys are apart");
        // The pace alone past the deadline is a timeout, not a pause.
        let slow = Pacer::new(Duration::from_secs(10));
        slow.wait("k", Instant::now() + Duration::from_secs(1), timeout).await.unwrap();
        let late = slow.wait("k", Instant::now() + Duration::from_secs(1), timeout).await;
        assert_eq!(late, Err(ProviderError::Timeout(timeout)));
        // An absurd pause is capped, never an overflow.
        slow.block("huge", Duration::MAX);
        assert!(slow.wait("huge", Instant::now(), timeout).await.is_err());
    }

    #[tokio::test]
    async fn a_pause_asked_for_while_waiting_is_honoured() {
        let pacer = Arc::new(Pacer::new(Duration::from_millis(100)));
        let deadline = Instant::now() + Duration::from_secs(5);
        let timeout = Duration::from_secs(5);
        pacer.wait("base", deadline, timeout).await.unwrap();
        let waiting = tokio::spawn({
            let pacer = pacer.clone();
            async move { pacer.wait("base", Instant::now() + Duration::from_millis(500), timeout).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        pacer.block("base", Duration::from_secs(30));
        assert!(matches!(waiting.await.unwrap(), Err(ProviderError::RateLimited { .. })));
    }

    #[tokio::test]
    async fn runs_that_miss_a_token_at_once_fetch_it_once() {
        let tokens = Tokens::default();
        let fetches = std::sync::atomic::AtomicUsize::new(0);
        let fetch = || async {
            fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(Token {
                access_token: Arc::new(SecretString::from("t".to_owned())),
                instance_url: None,
                lifetime: Duration::from_secs(60),
            })
        };
        let (a, b) = tokio::join!(tokens.get_or_fetch("m/i/1", fetch()), tokens.get_or_fetch("m/i/1", fetch()));
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
        tokens.forget_integration("m/i");
        let failed = tokens.get_or_fetch("m/i/1", async { Err(ProviderError::AuthFailed("no".into())) }).await;
        assert!(failed.is_err(), "forgotten, fetched again, and the failure is not kept");
        assert!(tokens.get_or_fetch("m/i/1", fetch()).await.is_ok());
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn salesforce_usage_is_read_from_its_header() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("Sforce-Limit-Info", "api-usage=25/15000".parse().unwrap());
        assert_eq!(api_usage(&headers), Some(ApiUsage { used: 25, limit: 15_000 }));
        headers.insert("Sforce-Limit-Info", "per-app-api-usage=1/2(appName=x), api-usage=7/100".parse().unwrap());
        assert_eq!(api_usage(&headers), Some(ApiUsage { used: 7, limit: 100 }));
        headers.insert("Sforce-Limit-Info", "api-usage=18446744073709551615/15000".parse().unwrap());
        assert_eq!(api_usage(&headers), None, "an absurd count is not believed");
    }
}

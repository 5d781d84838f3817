//! What the database providers share (`postgres`, `mysql`, `mongodb`):
//! their config, the credential (a password), `{{name}}` turned into bind
//! parameters, the pool of connections each integration keeps, and the
//! upstream's error text made safe to show.
//!
//! Config: `{"host", "port", "database", "user", "sslmode", "ca_cert"}`;
//! `sslmode` is `verify-full` unless said otherwise: `require` encrypts
//! without checking the certificate, and `disable` is accepted only for an
//! address the operator's allow-list opens (like plain `http`). The
//! credential is `{"password"}`, or none for a server that asks for none.

use crate::guard::{Guard, GuardError};
use crate::provider::{Call, ProviderError};
use crate::query::QuerySpec;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Connections one integration keeps open, at most.
/// (Above the executions one member may run at once, by default, and a
/// health probe beside them.)
pub const POOL_SIZE_MAX: usize = 8;
/// An idle connection (and an unused pool) is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A statement, at most.
pub const SQL_BYTES_MAX: usize = 64 * 1024;
/// A given CA certificate (PEM), at most.
pub const CA_CERT_BYTES_MAX: usize = 64 * 1024;
const NAME_MAX: usize = 128;

/// The config fields of the SQL providers; `port`'s default differs.
pub const fn sql_config(default_port: &'static str) -> [crate::form::Field; 6] {
    use crate::form::{Kind, field};
    [
        field("host", Kind::String, "the server's name or address; the guard checks it").required().max_length(253),
        field("port", Kind::Integer, "the server's port").range(1, 65_535).default(default_port),
        field("database", Kind::String, "the database to read").required().max_length(NAME_MAX),
        field("user", Kind::String, "the user tally signs in as: give it read access only")
            .required()
            .max_length(NAME_MAX),
        field(
            "sslmode",
            Kind::Enum,
            "TLS: verify-full checks the certificate and name; require encrypts only; \
            disable only for allow-listed addresses",
        )
        .options(&["verify-full", "require", "disable"])
        .default("\"verify-full\""),
        field("ca_cert", Kind::Pem, "PEM certificates to trust instead of the system's roots (verify-full only)"),
    ]
}

/// The credential of a database: a password, or none.
pub const PASSWORD: &[crate::form::CredentialForm] = &[crate::form::CredentialForm {
    name: "password",
    when: None,
    fields: &[crate::form::field("password", crate::form::Kind::String, "the user's password").required().secret()],
}];

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum SslMode {
    #[serde(rename = "disable")]
    Disable,
    #[serde(rename = "require")]
    Require,
    #[default]
    #[serde(rename = "verify-full")]
    VerifyFull,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlConfig {
    pub host: String,
    #[serde(default)]
    pub port: Option<u16>,
    pub database: String,
    pub user: String,
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM certificates to trust instead of the system's roots
    /// (`verify-full` only).
    #[serde(default)]
    pub ca_cert: Option<String>,
}

impl SqlConfig {
    /// Parses and checks a config, the guard included (no lookup), and the
    /// credential's shape.
    pub fn parse(
        config: &Value,
        credential: Option<&Map<String, Value>>,
        guard: &Guard,
    ) -> Result<SqlConfig, ProviderError> {
        let parsed: SqlConfig = serde_json::from_value(config.clone())
            .map_err(|error| ProviderError::invalid("config", error.to_string()))?;
        guard.check_host(&parsed.host, parsed.sslmode != SslMode::Disable).map_err(host_refusal)?;
        for (field, value) in [("config.database", &parsed.database), ("config.user", &parsed.user)] {
            if value.is_empty() || value.len() > NAME_MAX || value.contains('\0') {
                return Err(ProviderError::invalid(field, format!("1 to {NAME_MAX} characters")));
            }
        }
        if parsed.port == Some(0) {
            return Err(ProviderError::invalid("config.port", "1 to 65535"));
        }
        if let Some(ca) = &parsed.ca_cert {
            if parsed.sslmode != SslMode::VerifyFull {
                return Err(ProviderError::invalid("config.ca_cert", "is used by sslmode `verify-full` only"));
            }
            if ca.len() > CA_CERT_BYTES_MAX || !ca.contains("-----BEGIN CERTIFICATE-----") {
                return Err(ProviderError::invalid("config.ca_cert", "PEM certificates, at most 64 KiB"));
            }
            crate::tls::roots_of(ca)?;
        }
        password_shape(credential)?;
        Ok(parsed)
    }
}

/// A refusal of the guard at save time: a forbidden address is
/// `target_forbidden`, a malformed host invalid.
pub fn host_refusal(error: GuardError) -> ProviderError {
    match error {
        GuardError::InvalidUrl(message) => ProviderError::invalid("config.host", message),
        other => ProviderError::TargetForbidden(other),
    }
}

/// The credential of a database: `{"password"}`, or none at all.
pub fn password_shape(credential: Option<&Map<String, Value>>) -> Result<(), ProviderError> {
    let Some(fields) = credential else { return Ok(()) };
    if let Some(name) = fields.keys().find(|name| *name != "password") {
        return Err(ProviderError::invalid(format!("credential.{name}"), "the credential is {\"password\"}"));
    }
    if fields.get("password").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err(ProviderError::invalid("credential.password", "is required, a non-empty string"));
    }
    Ok(())
}

/// The password of a call's credential, if it has one.
pub fn password(call: &Call<'_>) -> Result<Option<SecretString>, ProviderError> {
    let fields = crate::rest::credential_fields(call)?;
    Ok(fields.get("password").and_then(Value::as_str).map(|password| SecretString::from(password.to_owned())))
}

/// Checks a query of kind `sql`: one statement text, within bounds.
pub fn validate_sql_query(query: &QuerySpec) -> Result<(), ProviderError> {
    if query.kind != "sql" {
        return Err(ProviderError::invalid("kind", "a database integration runs queries of kind `sql`"));
    }
    query.only_fields(&["sql"])?;
    let Some(sql) = &query.sql else {
        return Err(ProviderError::invalid("sql", "is required for kind `sql`"));
    };
    if sql.trim().is_empty() || sql.len() > SQL_BYTES_MAX {
        return Err(ProviderError::invalid("sql", format!("one statement of 1 to {SQL_BYTES_MAX} bytes")));
    }
    if sql.contains('\0') {
        return Err(ProviderError::invalid("sql", "contains a NUL character"));
    }
    Ok(())
}

/// The statement's first word, past blanks and comments (`-- …`, `# …`,
/// `/* … */`).
pub fn first_keyword(sql: &str) -> &str {
    let mut rest = sql;
    loop {
        let trimmed = rest.trim_start();
        if let Some(comment) = trimmed.strip_prefix("--").or_else(|| trimmed.strip_prefix('#')) {
            rest = comment.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(comment) = trimmed.strip_prefix("/*") {
            rest = comment.split_once("*/").map_or("", |(_, after)| after);
        } else {
            let end = trimmed.find(|c: char| !c.is_ascii_alphanumeric() && c != '_').unwrap_or(trimmed.len());
            return &trimmed[..end];
        }
    }
}

/// How a driver writes bind parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placeholders {
    /// PostgreSQL: `$1`, `$2`, …; a name used twice is one parameter.
    Numbered,
    /// MySQL: `?` each time; a name used twice is bound twice.
    Question,
}

/// The statement with each `{{name}}` replaced by the driver's bind
/// parameter, and the parameter names in the order they bind.
pub fn bind_placeholders(sql: &str, style: Placeholders) -> (String, Vec<String>) {
    let mut names: Vec<String> = Vec::new();
    let out = crate::query::render_with(sql, |name| match style {
        Placeholders::Numbered => {
            let index = match names.iter().position(|known| known == name) {
                Some(index) => index,
                None => {
                    names.push(name.to_owned());
                    names.len() - 1
                }
            };
            format!("${}", index + 1)
        }
        Placeholders::Question => {
            names.push(name.to_owned());
            "?".to_owned()
        }
    });
    (out, names)
}

/// The value bound to each name, in order; a name the query did not
/// declare cannot get here (templates are checked when saved).
pub fn values_in_order<'a>(names: &[String], params: &'a Map<String, Value>) -> Vec<&'a Value> {
    static NULL: Value = Value::Null;
    names.iter().map(|name| params.get(name).unwrap_or(&NULL)).collect()
}

/// The upstream's message, without the call's secrets, bounded.
pub fn upstream_message(text: &str, password: Option<&SecretString>) -> String {
    let mut text = text.to_owned();
    if let Some(password) = password.map(|secret| secret.expose_secret()).filter(|secret| secret.len() >= 4) {
        text = text.replace(password, "[redacted]");
    }
    if text.len() > crate::rest::UPSTREAM_MESSAGE_MAX {
        let mut end = crate::rest::UPSTREAM_MESSAGE_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// What a connection must not outlive: the statement's own limit inside
/// the server, set a little under the call's so that the server's
/// cancellation (not ours) ends a slow statement.
pub fn statement_budget(timeout: Duration) -> Duration {
    let margin = (timeout / 4).min(Duration::from_millis(250));
    timeout.saturating_sub(margin).max(Duration::from_millis(1))
}

/// A fingerprint of what a pool was built from: a change of config or of
/// credential version builds a new pool.
pub fn fingerprint(call: &Call<'_>) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    call.config.to_string().hash(&mut hasher);
    call.credential_key.hash(&mut hasher);
    hasher.finish()
}

/// The checked address a connection goes to: the host resolved through
/// the guard (a literal address checked as it is).
pub async fn checked_addresses(guard: &Guard, host: &str, port: u16) -> Result<Vec<IpAddr>, ProviderError> {
    let addresses = guard.resolve_host(host, port).await?;
    Ok(addresses.into_iter().map(|address| address.ip()).collect())
}

struct Entry<P> {
    fingerprint: u64,
    pool: P,
    used: Instant,
}

/// One pool per integration, built on first use and dropped (its
/// connections closed) when the integration changes, is forgotten, or has
/// not been used for [`IDLE_TIMEOUT`] (looked for once a minute).
pub struct Pools<P> {
    state: Mutex<PoolsState<P>>,
}

struct PoolsState<P> {
    entries: HashMap<String, Entry<P>>,
    /// When unused pools were last looked for: at most once a minute, not
    /// on every execution.
    swept: Instant,
}

/// How often unused pools are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

impl<P> Default for Pools<P> {
    fn default() -> Pools<P> {
        Pools { state: Mutex::new(PoolsState { entries: HashMap::new(), swept: Instant::now() }) }
    }
}

impl<P: Clone> Pools<P> {
    /// The pool of `call`'s integration, built by `build` when there is
    /// none for its current config and credential.
    pub async fn get<F, Fut>(&self, call: &Call<'_>, build: F) -> Result<P, ProviderError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<P, ProviderError>>,
    {
        let key = call.integration_key();
        let fingerprint = fingerprint(call);
        // Pools dropped here close their connections after the lock is let go.
        let mut unused: Vec<P> = Vec::new();
        {
            let mut state = self.state.lock().expect("the pools' lock is never poisoned");
            let now = Instant::now();
            if now.duration_since(state.swept) >= SWEEP_EVERY {
                state.swept = now;
                unused.extend(
                    state
                        .entries
                        .extract_if(|_, entry| now.duration_since(entry.used) > IDLE_TIMEOUT)
                        .map(|(_, entry)| entry.pool),
                );
            }
            if let Some(entry) = state.entries.get_mut(key)
                && entry.fingerprint == fingerprint
            {
                entry.used = now;
                return Ok(entry.pool.clone());
            }
        }
        drop(unused);
        let pool = build().await?;
        let replaced = {
            let mut state = self.state.lock().expect("the pools' lock is never poisoned");
            state.entries.insert(key.to_owned(), Entry { fingerprint, pool: pool.clone(), used: Instant::now() })
        };
        drop(replaced);
        Ok(pool)
    }

    /// Drops the pool of an integration: its idle connections close now,
    /// those in use when their run ends.
    pub fn forget(&self, integration_key: &str) {
        let removed = self.state.lock().expect("the pools' lock is never poisoned").entries.remove(integration_key);
        drop(removed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn placeholders_become_bind_parameters_numbered_or_positional() {
        let sql = "select * from t where a = {{a}} and b = {{ b }} or a = {{a}}";
        assert_eq!(
            bind_placeholders(sql, Placeholders::Numbered),
            ("select * from t where a = $1 and b = $2 or a = $1".to_owned(), vec!["a".to_owned(), "b".to_owned()])
        );
        let (text, names) = bind_placeholders(sql, Placeholders::Question);
        assert_eq!(text, "select * from t where a = ? and b = ? or a = ?");
        assert_eq!(names, ["a", "b", "a"]);
        let params = json!({"a": "'; DROP TABLE t; --", "b": 2}).as_object().unwrap().clone();
        assert_eq!(
            values_in_order(&names, &params),
            [&json!("'; DROP TABLE t; --"), &json!(2), &json!("'; DROP TABLE t; --")]
        );
    }

    #[test]
    fn a_config_is_checked_before_anything_is_contacted() {
        let loopback = Guard::allow_list_only(vec!["127.0.0.1/32".parse().unwrap()]);
        let open = Guard::new(vec![]);
        let config = |extra: Value| {
            let mut base = json!({"host": "127.0.0.1", "port": 5432, "database": "shop", "user": "reader"});
            base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            base
        };
        assert!(SqlConfig::parse(&config(json!({"sslmode": "disable"})), None, &loopback).is_ok());
        let parsed = SqlConfig::parse(&config(json!({})), None, &loopback).unwrap();
        assert_eq!(parsed.sslmode, SslMode::VerifyFull, "verify-full unless said otherwise");
        for (extra, code) in [
            (json!({"host": "10.0.0.5"}), "target_forbidden"),
            (json!({"host": "169.254.169.254"}), "target_forbidden"),
            (json!({"host": "db.example.com", "sslmode": "disable"}), "target_forbidden"),
            (json!({"sslmode": "prefer"}), "validation_failed"),
            (json!({"database": ""}), "validation_failed"),
            (json!({"surprise": 1}), "validation_failed"),
            (json!({"host": "a/b"}), "validation_failed"),
            (json!({"sslmode": "require", "ca_cert": "-----BEGIN CERTIFICATE-----"}), "validation_failed"),
        ] {
            let guard = if extra.get("host").is_some() { &open } else { &loopback };
            let error = SqlConfig::parse(&config(extra.clone()), None, guard).unwrap_err();
            assert_eq!(error.code(), code, "{extra}: {error}");
        }
        assert!(SqlConfig::parse(&config(json!({"host": "db.example.com"})), None, &open).is_ok());
        let other = json!({"password": "x", "token": "y"});
        assert_eq!(password_shape(other.as_object()).unwrap_err().code(), "validation_failed");
    }

    #[test]
    fn the_first_keyword_is_found_past_comments() {
        assert_eq!(first_keyword("  select 1"), "select");
        assert_eq!(first_keyword("/* x */ -- y\n # z\n CALL p()"), "CALL");
        assert_eq!(first_keyword("/* unclosed"), "");
    }

    #[test]
    fn the_servers_own_limit_ends_a_statement_before_ours() {
        assert_eq!(statement_budget(Duration::from_secs(10)), Duration::from_millis(9_750));
        assert_eq!(statement_budget(Duration::from_millis(400)), Duration::from_millis(300));
        assert!(statement_budget(Duration::from_millis(1)) >= Duration::from_millis(1));
    }

    #[test]
    fn messages_lose_the_password_and_stay_short() {
        let secret = SecretString::from("hunter2-password".to_owned());
        let message = upstream_message(&format!("auth failed for hunter2-password {}", "x".repeat(500)), Some(&secret));
        assert!(!message.contains("hunter2"));
        assert!(message.len() <= crate::rest::UPSTREAM_MESSAGE_MAX + 3);
    }
}

//! The `postgres` provider (DESIGN.md §9): tokio-postgres with a small
//! deadpool pool per integration, TLS through rustls.
//!
//! A run is always: `BEGIN READ ONLY`, `SET LOCAL statement_timeout` (a
//! little under the call's timeout, so the server cancels the statement
//! itself) and `SET LOCAL idle_in_transaction_session_timeout`, the
//! statement prepared (the extended protocol: one statement, so no `;
//! COMMIT; DELETE …` can leave the transaction), bound, and read through a
//! portal in batches, so `max_rows` stops the reading rather than
//! buffering the rest; then `ROLLBACK`. Should our own deadline pass first,
//! the statement is cancelled on the server and the connection dropped.
//!
//! Types, as JSON (the mapping README.md documents):
//! `bool` → boolean; `int2/int4/int8/oid` → integer; `float4/float8` →
//! number (`"NaN"`, `"Infinity"`, `"-Infinity"` as strings); `numeric` →
//! string (exact); `text/varchar/char/name/citext` and enums → string;
//! `timestamptz` → RFC 3339 in UTC (`…Z`); `timestamp` → RFC 3339, read as
//! UTC; `date` → `YYYY-MM-DD`; `time` → `HH:MM:SS[.ffffff]`; `json/jsonb`
//! → JSON; `uuid` → string; `bytea` → base64; one-dimensional arrays of
//! these → arrays; NULL → null. Any other type is refused by name, with
//! the cast to write (`x::text`).
//!
//! Parameters take the type PostgreSQL infers for them: text, integers,
//! floats, booleans, uuid, dates, timestamps and json are bound; for
//! anything else the refusal says which cast to write (`{{x}}::text`).

use crate::provider::{ApiUsage, BoxFuture, CONNECT_TIMEOUT, Call, Provider, ProviderError, Rows};
use crate::query::QuerySpec;
use crate::sql::{POOL_SIZE_MAX, Placeholders, Pools, SqlConfig, SslMode};
use base64::Engine as _;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Number, Value};
use std::time::{Duration, Instant};
use tokio_postgres::types::{FromSql, Kind, ToSql, Type};
use tokio_postgres::{Row, error::SqlState};

const DEFAULT_PORT: u16 = 5432;
/// Rows read from the portal at a time.
const BATCH_ROWS: usize = 500;

const CONFIG: [crate::form::Field; 6] = crate::sql::sql_config("5432");

pub const FORM: crate::form::Form = crate::form::Form {
    provider: "postgres",
    title: "PostgreSQL",
    help: "read-only SQL against PostgreSQL",
    kinds: &["sql"],
    config: &CONFIG,
    credentials: crate::sql::PASSWORD,
    credential_optional: true,
};

#[derive(Default)]
pub struct PostgresProvider {
    pools: Pools<(Pool, tokio_postgres_rustls::MakeRustlsConnect)>,
}

impl Provider for PostgresProvider {
    fn form(&self) -> &'static crate::form::Form {
        &FORM
    }

    fn validate_config(
        &self,
        config: &Value,
        credential: Option<&Map<String, Value>>,
        guard: &crate::guard::Guard,
    ) -> Result<(), ProviderError> {
        SqlConfig::parse(config, credential, guard).map(|_| ())
    }

    fn validate_query(&self, _config: &Value, query: &QuerySpec) -> Result<(), ProviderError> {
        crate::sql::validate_sql_query(query)
    }

    fn probe<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Option<ApiUsage>, ProviderError>> {
        Box::pin(async move {
            let password = crate::sql::password(call)?;
            let work = async {
                let (pool, _) = self.pool(call, password.as_ref()).await?;
                let client = pool.get().await.map_err(|error| pool_error(error, password.as_ref()))?;
                client.simple_query("SELECT 1").await.map_err(|error| query_error(&error, password.as_ref()))?;
                Ok(())
            };
            crate::provider::within(call.limits.timeout, work)
                .await
                .map(|()| None)
                .map_err(|error| crate::provider::with_timeout(error, call.limits.timeout))
        })
    }

    fn forget(&self, integration_key: &str) {
        self.pools.forget(integration_key);
    }

    fn run<'a>(
        &'a self,
        call: &'a Call<'a>,
        query: &'a QuerySpec,
        params: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Rows, ProviderError>> {
        Box::pin(async move {
            let started = Instant::now();
            let password = crate::sql::password(call)?;
            let (pool, tls) = self.pool(call, password.as_ref()).await?;
            let remaining = call.limits.timeout.saturating_sub(started.elapsed());
            let mut client = match tokio::time::timeout(remaining, pool.get()).await {
                Ok(client) => client.map_err(|error| pool_error(error, password.as_ref()))?,
                Err(_) => return Err(ProviderError::Timeout(call.limits.timeout)),
            };
            let cancel = client.cancel_token();
            let remaining = call.limits.timeout.saturating_sub(started.elapsed());
            let budget = crate::sql::statement_budget(remaining);
            let work = read(&mut client, call, query, params, budget, password.as_ref());
            match tokio::time::timeout(remaining, work).await {
                Ok(result) => result.map_err(|error| crate::provider::with_timeout(error, call.limits.timeout)),
                Err(_) => {
                    // Our deadline first (a hung network, say): the server
                    // is told to stop, and the connection is not reused.
                    tokio::spawn(async move {
                        let _ = cancel.cancel_query(tls).await;
                    });
                    drop(deadpool_postgres::Object::take(client));
                    Err(ProviderError::Timeout(call.limits.timeout))
                }
            }
        })
    }
}

impl PostgresProvider {
    async fn pool(
        &self,
        call: &Call<'_>,
        password: Option<&SecretString>,
    ) -> Result<(Pool, tokio_postgres_rustls::MakeRustlsConnect), ProviderError> {
        let (pool, tls) = self
            .pools
            .get(call, || async {
                let config = SqlConfig::parse(call.config, None, call.http.guard())?;
                let port = config.port.unwrap_or(DEFAULT_PORT);
                let addresses = crate::sql::checked_addresses(call.http.guard(), &config.host, port).await?;
                let mut pg = tokio_postgres::Config::new();
                // The host names the server for TLS; the connection goes to
                // the address the guard checked, with no second lookup.
                pg.host(config.host.trim_start_matches('[').trim_end_matches(']'))
                    .hostaddr(addresses[0])
                    .port(port)
                    .dbname(&config.database)
                    .user(&config.user)
                    .application_name("tally")
                    .connect_timeout(CONNECT_TIMEOUT)
                    .ssl_mode(match config.sslmode {
                        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                        _ => tokio_postgres::config::SslMode::Require,
                    });
                if let Some(password) = password {
                    pg.password(password.expose_secret());
                }
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(crate::tls::client_config(
                    config.sslmode,
                    config.ca_cert.as_deref(),
                )?);
                // Clean: what a run left in the session (advisory locks,
                // settings, temporary tables) goes before the next.
                let manager =
                    Manager::from_config(pg, tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Clean });
                let pool = Pool::builder(manager)
                    .max_size(POOL_SIZE_MAX)
                    .runtime(deadpool_postgres::Runtime::Tokio1)
                    .create_timeout(Some(CONNECT_TIMEOUT))
                    .build()
                    .map_err(|error| ProviderError::Unreachable(error.to_string()))?;
                Ok((pool, tls))
            })
            .await?;
        // Connections unused for the idle timeout are closed.
        pool.retain(|_, metrics| metrics.last_used() < crate::sql::IDLE_TIMEOUT);
        Ok((pool, tls))
    }
}

/// The transaction, the statement and the portal, read in batches.
async fn read(
    client: &mut deadpool_postgres::Object,
    call: &Call<'_>,
    query: &QuerySpec,
    params: &Map<String, Value>,
    budget: Duration,
    password: Option<&SecretString>,
) -> Result<Rows, ProviderError> {
    let failed = |error: tokio_postgres::Error| query_error(&error, password);
    let sql = query.sql.as_deref().unwrap_or_default();
    let (statement_text, names) = crate::sql::bind_placeholders(sql, Placeholders::Numbered);
    let transaction = client.build_transaction().read_only(true).start().await.map_err(failed)?;
    let budget_ms = budget.as_millis().max(1);
    transaction
        .batch_execute(&format!(
            "SET LOCAL statement_timeout = {budget_ms}; SET LOCAL idle_in_transaction_session_timeout = {}",
            budget_ms + 1_000
        ))
        .await
        .map_err(failed)?;
    let statement = transaction.prepare(&statement_text).await.map_err(failed)?;
    let values = crate::sql::values_in_order(&names, params);
    let bound = statement
        .params()
        .iter()
        .zip(names.iter().zip(values))
        .map(|(param_type, (name, value))| bind(name, param_type, value))
        .collect::<Result<Vec<_>, _>>()?;
    let references: Vec<&(dyn ToSql + Sync)> = bound.iter().map(|value| value.as_ref() as _).collect();
    let portal = transaction.bind(&statement, &references).await.map_err(failed)?;
    let columns: Vec<(String, Type)> =
        statement.columns().iter().map(|column| (column.name().to_owned(), column.type_().clone())).collect();
    let max_rows = call.limits.max_rows;
    let mut rows = Rows::default();
    loop {
        let wanted = (max_rows + 1 - rows.rows.len()).min(BATCH_ROWS);
        let batch = transaction.query_portal(&portal, wanted as i32).await.map_err(failed)?;
        let exhausted = batch.len() < wanted;
        for row in &batch {
            if rows.rows.len() == max_rows {
                rows.truncated = true;
                break;
            }
            rows.push_columns(&row_cells(row, &columns)?, call.limits.max_bytes)?;
        }
        if exhausted || rows.truncated {
            break;
        }
    }
    drop(portal);
    transaction.rollback().await.map_err(failed)?;
    Ok(rows)
}

/// A parameter as the type PostgreSQL inferred for it.
fn bind(name: &str, param_type: &Type, value: &Value) -> Result<Box<dyn ToSql + Sync + Send>, ProviderError> {
    let field = format!("params.{name}");
    let wrong = || {
        ProviderError::invalid(
            field.clone(),
            format!(
                "PostgreSQL expects `{param_type}` here, and {value} is not one: cast the placeholder, e.g. `{{{{{name}}}}}::text`"
            ),
        )
    };
    let text = || match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let integer = || value.as_i64().or_else(|| value.as_str().and_then(|text| text.parse().ok()));
    Ok(match *param_type {
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => Box::new(text()),
        Type::INT2 => Box::new(integer().and_then(|number| i16::try_from(number).ok()).ok_or_else(wrong)?),
        Type::INT4 => Box::new(integer().and_then(|number| i32::try_from(number).ok()).ok_or_else(wrong)?),
        Type::INT8 => Box::new(integer().ok_or_else(wrong)?),
        Type::FLOAT4 => Box::new(value.as_f64().ok_or_else(wrong)? as f32),
        Type::FLOAT8 => Box::new(value.as_f64().ok_or_else(wrong)?),
        Type::BOOL => Box::new(value.as_bool().ok_or_else(wrong)?),
        Type::JSON | Type::JSONB => Box::new(value.clone()),
        Type::UUID => Box::new(text().parse::<uuid::Uuid>().map_err(|_| wrong())?),
        Type::DATE => Box::new(text().parse::<chrono::NaiveDate>().map_err(|_| wrong())?),
        Type::TIMESTAMP => Box::new(
            chrono::DateTime::parse_from_rfc3339(&text())
                .map(|at| at.naive_utc())
                .or_else(|_| text().parse::<chrono::NaiveDateTime>())
                .map_err(|_| wrong())?,
        ),
        Type::TIMESTAMPTZ => {
            Box::new(chrono::DateTime::parse_from_rfc3339(&text()).map(|at| at.to_utc()).map_err(|_| wrong())?)
        }
        _ => {
            return Err(ProviderError::invalid(
                field.clone(),
                format!(
                    "tally does not bind `{param_type}`: cast the placeholder, e.g. `{{{{{name}}}}}::text::{param_type}`"
                ),
            ));
        }
    })
}

/// One row's cells, in column order.
fn row_cells<'c>(row: &Row, columns: &'c [(String, Type)]) -> Result<Vec<(&'c str, Value)>, ProviderError> {
    let mut cells = Vec::with_capacity(columns.len());
    for (index, (name, column_type)) in columns.iter().enumerate() {
        let value = cell(row, index, column_type).map_err(|error| match error {
            Cell::Unmapped => ProviderError::QueryFailed(format!(
                "column `{name}` has type `{column_type}`, which tally does not map to JSON: cast it in the SQL, e.g. `{name}::text`"
            )),
            Cell::Decode(message) => ProviderError::QueryFailed(format!("column `{name}`: {message}")),
        })?;
        cells.push((name.as_str(), value));
    }
    Ok(cells)
}

enum Cell {
    Unmapped,
    Decode(String),
}

fn get<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<Option<T>, Cell> {
    row.try_get::<_, Option<T>>(index).map_err(|error| Cell::Decode(error.to_string()))
}

fn map<'a, T: FromSql<'a>>(row: &'a Row, index: usize, to_json: impl Fn(T) -> Value) -> Result<Value, Cell> {
    Ok(get::<T>(row, index)?.map_or(Value::Null, to_json))
}

/// A one-dimensional array, NULL elements kept.
fn array<'a, T: FromSql<'a>>(row: &'a Row, index: usize, to_json: impl Fn(T) -> Value) -> Result<Value, Cell> {
    Ok(get::<Vec<Option<T>>>(row, index)?.map_or(Value::Null, |items| {
        Value::Array(items.into_iter().map(|item| item.map_or(Value::Null, &to_json)).collect())
    }))
}

fn float(value: f64) -> Value {
    Number::from_f64(value).map_or_else(
        || {
            Value::String(
                if value.is_nan() {
                    "NaN"
                } else if value > 0.0 {
                    "Infinity"
                } else {
                    "-Infinity"
                }
                .to_owned(),
            )
        },
        Value::Number,
    )
}

fn rfc3339(at: chrono::DateTime<chrono::Utc>) -> Value {
    Value::String(at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

fn cell(row: &Row, index: usize, column_type: &Type) -> Result<Value, Cell> {
    let text = |text: String| Value::String(text);
    let bytes = |bytes: Vec<u8>| Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    let date = |date: chrono::NaiveDate| Value::String(date.format("%Y-%m-%d").to_string());
    let time = |time: chrono::NaiveTime| Value::String(time.format("%H:%M:%S%.f").to_string());
    let timestamp = |at: chrono::NaiveDateTime| rfc3339(at.and_utc());
    let uuid = |id: uuid::Uuid| Value::String(id.to_string());
    match *column_type {
        Type::BOOL => map(row, index, Value::Bool),
        Type::INT2 => map(row, index, |n: i16| Value::from(n)),
        Type::INT4 => map(row, index, |n: i32| Value::from(n)),
        Type::INT8 => map(row, index, |n: i64| Value::from(n)),
        Type::OID => map(row, index, |n: u32| Value::from(n)),
        Type::FLOAT4 => map(row, index, |n: f32| float(f64::from(n))),
        Type::FLOAT8 => map(row, index, float),
        Type::NUMERIC => map(row, index, |n: Numeric| Value::String(n.0)),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => map(row, index, text),
        Type::TIMESTAMPTZ => map(row, index, rfc3339),
        Type::TIMESTAMP => map(row, index, timestamp),
        Type::DATE => map(row, index, date),
        Type::TIME => map(row, index, time),
        Type::JSON | Type::JSONB => map(row, index, |value: Value| value),
        Type::UUID => map(row, index, uuid),
        Type::BYTEA => map(row, index, bytes),
        Type::BOOL_ARRAY => array(row, index, Value::Bool),
        Type::INT2_ARRAY => array(row, index, |n: i16| Value::from(n)),
        Type::INT4_ARRAY => array(row, index, |n: i32| Value::from(n)),
        Type::INT8_ARRAY => array(row, index, |n: i64| Value::from(n)),
        Type::FLOAT4_ARRAY => array(row, index, |n: f32| float(f64::from(n))),
        Type::FLOAT8_ARRAY => array(row, index, float),
        Type::NUMERIC_ARRAY => array(row, index, |n: Numeric| Value::String(n.0)),
        Type::TEXT_ARRAY | Type::VARCHAR_ARRAY | Type::BPCHAR_ARRAY | Type::NAME_ARRAY => array(row, index, text),
        Type::TIMESTAMPTZ_ARRAY => array(row, index, rfc3339),
        Type::TIMESTAMP_ARRAY => array(row, index, timestamp),
        Type::DATE_ARRAY => array(row, index, date),
        Type::JSON_ARRAY | Type::JSONB_ARRAY => array(row, index, |value: Value| value),
        Type::UUID_ARRAY => array(row, index, uuid),
        Type::BYTEA_ARRAY => array(row, index, bytes),
        _ => match column_type.kind() {
            // An enum's label, and an extension's text type (citext).
            Kind::Enum(_) => map(row, index, |label: Label| Value::String(label.0)),
            Kind::Simple if column_type.name() == "citext" => map(row, index, |label: Label| Value::String(label.0)),
            Kind::Array(element) if matches!(element.kind(), Kind::Enum(_)) => {
                array(row, index, |label: Label| Value::String(label.0))
            }
            _ => Err(Cell::Unmapped),
        },
    }
}

/// An enum label or a `citext`: text on the wire in either format.
struct Label(String);

impl<'a> FromSql<'a> for Label {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Label, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Label(std::str::from_utf8(raw)?.to_owned()))
    }

    fn accepts(column_type: &Type) -> bool {
        matches!(column_type.kind(), Kind::Enum(_)) || column_type.name() == "citext"
    }
}

/// A `numeric`, exactly, as its decimal text: the binary format is base
/// 10,000 digits with a weight, a sign and a display scale.
struct Numeric(String);

impl<'a> FromSql<'a> for Numeric {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Numeric, Box<dyn std::error::Error + Sync + Send>> {
        numeric_text(raw).map(Numeric).ok_or_else(|| "a malformed numeric".into())
    }

    fn accepts(column_type: &Type) -> bool {
        *column_type == Type::NUMERIC
    }
}

fn numeric_text(raw: &[u8]) -> Option<String> {
    use std::fmt::Write as _;
    let word = |at: usize| raw.get(at..at + 2).map(|bytes| i16::from_be_bytes([bytes[0], bytes[1]]));
    let digits_count = usize::try_from(word(0)?).ok()?;
    let weight = i32::from(word(2)?);
    let sign = word(4)? as u16;
    let scale = usize::try_from(word(6)?).ok()?;
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        0x0000 | 0x4000 => {}
        _ => return None,
    }
    let digits = (0..digits_count).map(|index| word(8 + 2 * index)).collect::<Option<Vec<i16>>>()?;
    let digit = |position: i32| usize::try_from(position).ok().and_then(|at| digits.get(at)).copied().unwrap_or(0);
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for position in 0..=weight {
            if position == 0 {
                let _ = write!(text, "{}", digit(position));
            } else {
                let _ = write!(text, "{:04}", digit(position));
            }
        }
    }
    if scale > 0 {
        let mut fraction = String::new();
        let mut position = weight + 1;
        while fraction.len() < scale {
            let _ = write!(fraction, "{:04}", digit(position));
            position += 1;
        }
        fraction.truncate(scale);
        text.push('.');
        text.push_str(&fraction);
    }
    Some(text)
}

/// A driver error in the provider's terms.
fn query_error(error: &tokio_postgres::Error, password: Option<&SecretString>) -> ProviderError {
    let message = |text: &str| crate::sql::upstream_message(text, password);
    if let Some(database) = error.as_db_error() {
        let code = database.code();
        let text = message(&format!("{} ({})", database.message(), code.code()));
        return if *code == SqlState::QUERY_CANCELED {
            ProviderError::Timeout(Duration::ZERO)
        } else if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
            ProviderError::AuthFailed(text)
        } else if code.code().starts_with("57P") || code.code().starts_with("08") || code.code().starts_with("53") {
            // Shutdown, crash, connection or resource trouble: the source,
            // not the query.
            ProviderError::Unreachable(text)
        } else {
            ProviderError::QueryFailed(text)
        };
    }
    // The driver's own words name only the step (`error performing TLS
    // handshake`); its causes say why (`invalid peer certificate: …`).
    let step = error.to_string();
    let mut text = step.clone();
    let mut cause = std::error::Error::source(error);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    // Binding and decoding are the query's; authentication the
    // credential's; the rest (connecting, TLS, I/O, a closed connection)
    // the source's.
    if ["error serializing", "error deserializing", "invalid column", "expected "]
        .iter()
        .any(|prefix| step.starts_with(prefix))
    {
        ProviderError::QueryFailed(message(&text))
    } else if step.starts_with("authentication error") {
        ProviderError::AuthFailed(message(&text))
    } else {
        ProviderError::Unreachable(message(&text))
    }
}

fn pool_error(error: deadpool_postgres::PoolError, password: Option<&SecretString>) -> ProviderError {
    match error {
        deadpool_postgres::PoolError::Backend(error) => query_error(&error, password),
        deadpool_postgres::PoolError::Timeout(_) => ProviderError::Unreachable("connecting timed out".into()),
        other => ProviderError::Unreachable(crate::sql::upstream_message(&other.to_string(), password)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(digits: &[i16], weight: i16, negative: bool, scale: u16) -> String {
        let mut raw = Vec::new();
        raw.extend((digits.len() as i16).to_be_bytes());
        raw.extend(weight.to_be_bytes());
        raw.extend((if negative { 0x4000u16 } else { 0 }).to_be_bytes());
        raw.extend(scale.to_be_bytes());
        for digit in digits {
            raw.extend(digit.to_be_bytes());
        }
        numeric_text(&raw).unwrap()
    }

    #[test]
    fn numerics_are_read_exactly_from_base_ten_thousand() {
        assert_eq!(numeric(&[1234, 5678], 1, false, 0), "12345678");
        assert_eq!(numeric(&[12, 3400], 0, true, 2), "-12.34");
        assert_eq!(numeric(&[1234], -2, false, 8), "0.00001234");
        assert_eq!(numeric(&[1], 2, false, 0), "100000000");
        assert_eq!(numeric(&[], 0, false, 3), "0.000");
        assert_eq!(numeric(&[9999, 1], 0, false, 4), "9999.0001");
    }

    #[test]
    fn floats_that_json_cannot_hold_are_strings() {
        assert_eq!(float(f64::NAN), Value::from("NaN"));
        assert_eq!(float(f64::NEG_INFINITY), Value::from("-Infinity"));
        assert_eq!(float(1.5), Value::from(1.5));
    }
}

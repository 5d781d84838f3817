//! The `mysql` provider, for MySQL and MariaDB (DESIGN.md §9): mysql_async
//! and its pool, one per integration, TLS through rustls.
//!
//! A run: the session set to UTC with a statement time limit a little
//! under the call's (MariaDB's `max_statement_time`, in seconds, or
//! MySQL's `max_execution_time`, in milliseconds: the flavour is read from
//! the server's version once per pool) and `sql_select_limit` one past
//! `max_rows`, so the server stops producing rows the answer would drop;
//! then `START TRANSACTION READ ONLY`, the statement prepared (the binary
//! protocol: one statement), its `?` parameters bound, rows read up to
//! `max_rows` and the rest discarded unread-into-memory, and `ROLLBACK`.
//!
//! Types, as JSON: integers (and `BIT`, `YEAR`, `TINYINT(1)`) → integer;
//! `FLOAT/DOUBLE` → number; `DECIMAL` → string (exact); text types → string;
//! binary types → base64; `JSON` → JSON; `DATE` → `YYYY-MM-DD`;
//! `DATETIME/TIMESTAMP` → RFC 3339 in UTC (`…Z`; the session's time zone is
//! UTC); `TIME` → `[-]HH:MM:SS[.ffffff]`; NULL → null.

use crate::provider::{ApiUsage, BoxFuture, CONNECT_TIMEOUT, Call, Provider, ProviderError, Rows};
use crate::query::QuerySpec;
use crate::sql::{IDLE_TIMEOUT, POOL_SIZE_MAX, Placeholders, Pools, SqlConfig, SslMode};
use base64::Engine as _;
use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable;
use mysql_async::{Column, Conn, Params, Pool};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const DEFAULT_PORT: u16 = 3306;
/// The first words of the statements a `mysql` query may be.
const READING: &[&str] = &["select", "with", "show", "describe", "desc", "explain", "table", "values"];
/// The binary character set: a string column holding bytes.
const BINARY_CHARSET: u16 = 63;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    MariaDb,
    MySql,
}

#[derive(Clone)]
struct Source {
    pool: Pool,
    flavour: Arc<OnceLock<Flavour>>,
}

const CONFIG: [crate::form::Field; 6] = crate::sql::sql_config("3306");

pub const FORM: crate::form::Form = crate::form::Form {
    provider: "mysql",
    title: "MySQL / MariaDB",
    help: "read-only SQL against MySQL or MariaDB",
    kinds: &["sql"],
    config: &CONFIG,
    credentials: crate::sql::PASSWORD,
    credential_optional: true,
};

#[derive(Default)]
pub struct MysqlProvider {
    pools: Pools<Source>,
}

impl Provider for MysqlProvider {
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
        crate::sql::validate_sql_query(query)?;
        // MySQL and MariaDB commit before DDL (TRUNCATE, DROP, …), even in
        // a read-only transaction, and a procedure may COMMIT and write:
        // only statements that read are run.
        let sql = query.sql.as_deref().unwrap_or_default();
        let keyword = crate::sql::first_keyword(sql).to_ascii_lowercase();
        if !READING.contains(&keyword.as_str()) {
            return Err(ProviderError::invalid(
                "sql",
                format!("a mysql query reads: it starts with one of {}", READING.join(", ").to_uppercase()),
            ));
        }
        let lowered = sql.to_ascii_lowercase();
        if ["into outfile", "into dumpfile"].iter().any(|into| lowered.contains(into)) {
            return Err(ProviderError::invalid("sql", "SELECT … INTO OUTFILE writes a file on the server"));
        }
        Ok(())
    }

    fn probe<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Option<ApiUsage>, ProviderError>> {
        Box::pin(async move {
            let password = crate::sql::password(call)?;
            let work = async {
                let source = self.source(call, password.as_ref()).await?;
                let mut conn = connect(&source, password.as_ref(), CONNECT_TIMEOUT).await?;
                conn.query_drop("SELECT 1").await.map_err(|error| driver_error(error, password.as_ref()))
            };
            crate::provider::within(call.limits.timeout, work).await.map(|()| None)
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
            let remaining = || call.limits.timeout.saturating_sub(started.elapsed());
            let source = crate::provider::within(remaining(), self.source(call, password.as_ref())).await?;
            let mut conn = connect(&source, password.as_ref(), remaining()).await?;
            let connection_id = conn.id();
            let work = async {
                let flavour = flavour(&mut conn, &source.flavour)
                    .await
                    .map_err(|error| driver_error(error, password.as_ref()))?;
                let budget = crate::sql::statement_budget(remaining());
                read(&mut conn, flavour, call, query, params, budget).await.map_err(|error| match error {
                    Failure::Driver(error) => driver_error(error, password.as_ref()),
                    Failure::Provider(error) => error,
                })
            };
            match tokio::time::timeout(remaining(), work).await {
                Ok(result) => result.map_err(|error| crate::provider::with_timeout(error, call.limits.timeout)),
                Err(_) => {
                    // Our deadline first: the server's own limit covers
                    // SELECT only on MySQL, so the statement is killed from
                    // another connection.
                    drop(conn);
                    let pool = source.pool.clone();
                    tokio::spawn(async move {
                        if let Ok(Ok(mut killer)) = tokio::time::timeout(CONNECT_TIMEOUT, pool.get_conn()).await {
                            let _ = killer.query_drop(format!("KILL QUERY {connection_id}")).await;
                        }
                    });
                    Err(ProviderError::Timeout(call.limits.timeout))
                }
            }
        })
    }
}

impl MysqlProvider {
    async fn source(&self, call: &Call<'_>, password: Option<&SecretString>) -> Result<Source, ProviderError> {
        self.pools
            .get(call, || async {
                let config = SqlConfig::parse(call.config, None, call.http.guard())?;
                let port = config.port.unwrap_or(DEFAULT_PORT);
                let addresses = crate::sql::checked_addresses(call.http.guard(), &config.host, port).await?;
                let constraints = mysql_async::PoolConstraints::new(0, POOL_SIZE_MAX).expect("0 ≤ max");
                let pool_opts = mysql_async::PoolOpts::default()
                    .with_constraints(constraints)
                    .with_inactive_connection_ttl(IDLE_TIMEOUT)
                    .with_ttl_check_interval(Duration::from_secs(30));
                let ssl = match config.sslmode {
                    SslMode::Disable => None,
                    SslMode::Require => Some(mysql_async::SslOpts::default().with_danger_accept_invalid_certs(true)),
                    SslMode::VerifyFull => Some(match &config.ca_cert {
                        Some(pem) => {
                            crate::tls::roots_of(pem)?;
                            mysql_async::SslOpts::default()
                                .with_root_certs(vec![pem.clone().into_bytes().into()])
                                .with_disable_built_in_roots(true)
                        }
                        None => mysql_async::SslOpts::default(),
                    }),
                };
                // The host names the server for TLS; the connection goes to
                // the addresses the guard checked, with no second lookup.
                let opts = mysql_async::OptsBuilder::default()
                    .ip_or_hostname(config.host.trim_start_matches('[').trim_end_matches(']'))
                    .resolved_ips(Some(addresses))
                    .tcp_port(port)
                    .prefer_socket(false)
                    .user(Some(config.user.clone()))
                    .pass(password.map(|secret| secret.expose_secret().to_owned()))
                    .db_name(Some(config.database.clone()))
                    .ssl_opts(ssl)
                    .pool_opts(pool_opts)
                    .init(vec!["SET time_zone = '+00:00'"]);
                Ok(Source { pool: Pool::new(opts), flavour: Arc::new(OnceLock::new()) })
            })
            .await
    }
}

async fn flavour(conn: &mut Conn, known: &OnceLock<Flavour>) -> Result<Flavour, mysql_async::Error> {
    if let Some(flavour) = known.get() {
        return Ok(*flavour);
    }
    let version: Option<String> = conn.query_first("SELECT VERSION()").await?;
    let flavour = if version.unwrap_or_default().to_ascii_lowercase().contains("mariadb") {
        Flavour::MariaDb
    } else {
        Flavour::MySql
    };
    Ok(*known.get_or_init(|| flavour))
}

enum Failure {
    Driver(mysql_async::Error),
    Provider(ProviderError),
}

impl From<mysql_async::Error> for Failure {
    fn from(error: mysql_async::Error) -> Failure {
        Failure::Driver(error)
    }
}

async fn read(
    conn: &mut Conn,
    flavour: Flavour,
    call: &Call<'_>,
    query: &QuerySpec,
    params: &Map<String, Value>,
    budget: Duration,
) -> Result<Rows, Failure> {
    let max_rows = call.limits.max_rows;
    let limit = match flavour {
        Flavour::MariaDb => format!("max_statement_time = {:.3}", budget.as_secs_f64().max(0.001)),
        Flavour::MySql => format!("max_execution_time = {}", budget.as_millis().max(1)),
    };
    // Every run sets its session: a connection the pool hands back was
    // reset (COM_RESET_CONNECTION), which forgets the time zone too.
    conn.query_drop(format!("SET SESSION {limit}, sql_select_limit = {}, time_zone = '+00:00'", max_rows + 1)).await?;
    conn.query_drop("START TRANSACTION READ ONLY").await?;
    let (statement, names) =
        crate::sql::bind_placeholders(query.sql.as_deref().unwrap_or_default(), Placeholders::Question);
    let values: Vec<mysql_async::Value> = crate::sql::values_in_order(&names, params).into_iter().map(param).collect();
    let params = if values.is_empty() { Params::Empty } else { Params::Positional(values) };
    let mut rows = Rows::default();
    let outcome: Result<(), Failure> = async {
        let mut result = conn.exec_iter(statement.as_str(), params).await?;
        let columns: Arc<[Column]> = result.columns().unwrap_or_else(|| Arc::from(Vec::new()));
        while let Some(row) = result.next().await? {
            if rows.rows.len() == max_rows {
                rows.truncated = true;
                break;
            }
            if let Err(too_large) = rows.push_columns(&row_cells(row, &columns), call.limits.max_bytes) {
                result.drop_result().await?;
                return Err(Failure::Provider(too_large));
            }
        }
        // What is left (a LIMIT of the query's own above max_rows) is read
        // off the wire and dropped, never held.
        result.drop_result().await?;
        Ok(())
    }
    .await;
    conn.query_drop("ROLLBACK").await?;
    outcome.map(|()| rows)
}

fn param(value: &Value) -> mysql_async::Value {
    match value {
        Value::String(text) => mysql_async::Value::Bytes(text.clone().into_bytes()),
        Value::Bool(flag) => mysql_async::Value::Int(i64::from(*flag)),
        Value::Number(number) => match (number.as_i64(), number.as_u64()) {
            (Some(signed), _) => mysql_async::Value::Int(signed),
            (None, Some(unsigned)) => mysql_async::Value::UInt(unsigned),
            _ => mysql_async::Value::Double(number.as_f64().unwrap_or_default()),
        },
        Value::Null => mysql_async::Value::NULL,
        other => mysql_async::Value::Bytes(other.to_string().into_bytes()),
    }
}

/// One row's cells, in column order.
fn row_cells(row: mysql_async::Row, columns: &[Column]) -> Vec<(String, Value)> {
    columns
        .iter()
        .zip(row.unwrap())
        .map(|(column, value)| (column.name_str().into_owned(), cell(column, value)))
        .collect()
}

fn float(value: f64) -> Value {
    serde_json::Number::from_f64(value).map_or(Value::Null, Value::Number)
}

fn cell(column: &Column, value: mysql_async::Value) -> Value {
    use mysql_async::Value as My;
    let column_type = column.column_type();
    match value {
        My::NULL => Value::Null,
        My::Int(number) => Value::from(number),
        My::UInt(number) => Value::from(number),
        My::Float(number) => float(f64::from(number)),
        My::Double(number) => float(number),
        My::Date(year, month, day, hour, minute, second, micros) => {
            if matches!(column_type, ColumnType::MYSQL_TYPE_DATE | ColumnType::MYSQL_TYPE_NEWDATE) {
                Value::String(format!("{year:04}-{month:02}-{day:02}"))
            } else if micros == 0 {
                Value::String(format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z"))
            } else {
                Value::String(format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{micros:06}Z"))
            }
        }
        My::Time(negative, days, hours, minutes, seconds, micros) => {
            let sign = if negative { "-" } else { "" };
            let hours = days * 24 + u32::from(hours);
            if micros == 0 {
                Value::String(format!("{sign}{hours:02}:{minutes:02}:{seconds:02}"))
            } else {
                Value::String(format!("{sign}{hours:02}:{minutes:02}:{seconds:02}.{micros:06}"))
            }
        }
        My::Bytes(bytes) => match column_type {
            ColumnType::MYSQL_TYPE_JSON => {
                serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
            }
            ColumnType::MYSQL_TYPE_BIT => {
                Value::from(bytes.iter().fold(0u64, |number, byte| (number << 8) | u64::from(*byte)))
            }
            ColumnType::MYSQL_TYPE_DECIMAL | ColumnType::MYSQL_TYPE_NEWDECIMAL => {
                Value::String(String::from_utf8_lossy(&bytes).into_owned())
            }
            _ if column.character_set() == BINARY_CHARSET => {
                Value::String(base64::engine::general_purpose::STANDARD.encode(&bytes))
            }
            _ => Value::String(
                String::from_utf8(bytes).unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned()),
            ),
        },
    }
}

/// A driver error in the provider's terms.
fn driver_error(error: mysql_async::Error, password: Option<&SecretString>) -> ProviderError {
    let message = |text: &str| crate::sql::upstream_message(text, password);
    match &error {
        mysql_async::Error::Server(server) => {
            let text = message(&format!("{} ({})", server.message, server.code));
            match server.code {
                // Access denied (user, database, no password).
                1044 | 1045 | 1698 => ProviderError::AuthFailed(text),
                // MariaDB's max_statement_time, MySQL's max_execution_time.
                1969 | 3024 => ProviderError::Timeout(Duration::ZERO),
                // Shutdown in progress, connection killed, too many connections.
                1053 | 1927 | 1040 => ProviderError::Unreachable(text),
                _ => ProviderError::QueryFailed(text),
            }
        }
        mysql_async::Error::Io(_) => ProviderError::Unreachable(message(&error.to_string())),
        mysql_async::Error::Driver(mysql_async::DriverError::StmtParamsMismatch { .. }) => {
            ProviderError::QueryFailed(message(&error.to_string()))
        }
        _ => ProviderError::Unreachable(message(&error.to_string())),
    }
}

/// A connection from the pool: an idle one, a new one, or the next one
/// freed, within `wait`.
async fn connect(source: &Source, password: Option<&SecretString>, wait: Duration) -> Result<Conn, ProviderError> {
    match tokio::time::timeout(wait, source.pool.get_conn()).await {
        Ok(conn) => conn.map_err(|error| driver_error(error, password)),
        Err(_) => Err(ProviderError::Timeout(wait)),
    }
}

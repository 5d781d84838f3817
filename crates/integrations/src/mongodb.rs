//! The `mongodb` provider (DESIGN.md §9): the official driver, one client
//! (with its own small pool) per integration.
//!
//! Config: `{"hosts": ["host:port", …], "database", "user", "auth_source",
//! "sslmode"}` with the credential `{"password"}`; or only
//! `{"database"}` with the credential `{"uri"}`, a whole `mongodb://`
//! connection string kept in the vault (its hosts are checked when it is
//! used). `sslmode` as for SQL: `verify-full` (the default), `require`
//! (any certificate), `disable` (allow-listed addresses only).
//!
//! Query kinds: `find` (`collection`, `filter`, `projection`, `sort`,
//! `limit`) and `aggregate` (`collection`, `pipeline`), in Extended JSON
//! with `{{name}}` placeholders taking typed values; `$out` and `$merge`
//! (the stages that write) are refused at any depth before anything is
//! sent. `maxTimeMS` is set from the timeout; `find` gets `limit` and an
//! aggregation a final `$limit` of one past `max_rows`, so the server stops
//! there. Documents come back as relaxed Extended JSON.
//!
//! One host, connected to directly (no replica-set discovery: members the
//! server names would not pass the guard); SCRAM or no authentication (the
//! driver's other mechanisms read this machine's own credentials). The
//! guard checks the host (resolved, every address) before the client is
//! built; with `sslmode` `disable` or `require` the client is given the
//! checked address itself, and with `verify-full` the name, whose
//! certificate a rebound address could not present.

use crate::provider::{ApiUsage, BoxFuture, CONNECT_TIMEOUT, Call, Provider, ProviderError, Rows};
use crate::query::{QuerySpec, render_json};
use crate::sql::{IDLE_TIMEOUT, POOL_SIZE_MAX, Pools, SslMode};
use bson::{Bson, Document};
use mongodb::Client;
use mongodb::options::{AuthMechanism, ClientOptions, Credential, ServerAddress, Tls, TlsOptions};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

const DEFAULT_PORT: u16 = 27017;
const ONE_HOST: &str =
    "one host: tally connects to it directly (the members a replica set names itself would not pass the target guard)";
const MECHANISMS: &str = "authentication is SCRAM (or none): other mechanisms read this machine's own credentials";
/// Stages that write, refused at any depth.
const WRITE_STAGES: &[&str] = &["$out", "$merge"];
const BATCH_SIZE: u32 = 500;
const NAME_MAX: usize = 120;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MongoConfig {
    #[serde(default)]
    hosts: Vec<String>,
    database: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    auth_source: Option<String>,
    #[serde(default)]
    sslmode: SslMode,
}

/// `host:port`, `host`, `[v6]:port`.
fn split_host(text: &str) -> Result<(String, u16), ProviderError> {
    let refuse = || ProviderError::invalid("config.hosts", format!("`{text}` is not host:port"));
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && (!host.starts_with('[') || host.ends_with(']')) => {
            (host, port.parse::<u16>().map_err(|_| refuse())?)
        }
        _ => (text, DEFAULT_PORT),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(refuse());
    }
    Ok((host.to_owned(), port))
}

/// The hosts of a `mongodb://` connection string, read without the
/// driver (to check them when the integration is saved).
fn uri_hosts(uri: &str) -> Result<Vec<(String, u16)>, ProviderError> {
    let refuse = |message: &str| ProviderError::invalid("credential.uri", message.to_owned());
    if uri.starts_with("mongodb+srv://") {
        return Err(refuse("mongodb+srv:// is not supported: list the hosts in a mongodb:// string"));
    }
    let rest = uri.strip_prefix("mongodb://").ok_or_else(|| refuse("must start with mongodb://"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, hosts)| hosts);
    hosts.split(',').map(|host| split_host(host).map_err(|_| refuse("a host is not host:port"))).collect()
}

impl MongoConfig {
    /// The config as saved (checked then).
    fn read(config: &Value) -> Result<MongoConfig, ProviderError> {
        serde_json::from_value(config.clone()).map_err(|error| ProviderError::invalid("config", error.to_string()))
    }

    fn parse(
        config: &Value,
        credential: Option<&Map<String, Value>>,
        guard: &crate::guard::Guard,
    ) -> Result<MongoConfig, ProviderError> {
        let parsed = MongoConfig::read(config)?;
        if parsed.database.is_empty()
            || parsed.database.len() > NAME_MAX
            || parsed.database.contains(['/', '.', '\0', ' '])
        {
            return Err(ProviderError::invalid("config.database", "a database name"));
        }
        if parsed.hosts.len() > 1 {
            return Err(ProviderError::invalid("config.hosts", ONE_HOST));
        }
        let encrypted = parsed.sslmode != SslMode::Disable;
        for host in &parsed.hosts {
            let (host, _) = split_host(host)?;
            guard.check_host(&host, encrypted).map_err(crate::sql::host_refusal)?;
        }
        match credential {
            Some(fields) if fields.contains_key("uri") => {
                if fields.len() != 1 || !parsed.hosts.is_empty() || parsed.user.is_some() {
                    return Err(ProviderError::invalid(
                        "credential.uri",
                        "a connection string stands alone: no hosts, user or other credential field beside it",
                    ));
                }
                let uri = fields.get("uri").and_then(Value::as_str).unwrap_or_default();
                let hosts = uri_hosts(uri)?;
                if hosts.len() != 1 {
                    return Err(ProviderError::invalid("credential.uri", ONE_HOST));
                }
                for (host, _) in hosts {
                    guard.check_host(&host, encrypted).map_err(crate::sql::host_refusal)?;
                }
                let options = uri.split_once('?').map_or("", |(_, options)| options).to_ascii_lowercase();
                for option in options.split('&') {
                    let (name, value) = option.split_once('=').unwrap_or((option, ""));
                    let refused = match name {
                        "replicaset" | "loadbalanced" => Some(ONE_HOST),
                        "authmechanism" if !value.starts_with("scram-sha-") => Some(MECHANISMS),
                        "authmechanismproperties" => Some(MECHANISMS),
                        _ => None,
                    };
                    if let Some(message) = refused {
                        return Err(ProviderError::invalid("credential.uri", message));
                    }
                }
            }
            _ => {
                if parsed.hosts.is_empty() {
                    return Err(ProviderError::invalid("config.hosts", "at least one host (or a credential `uri`)"));
                }
                crate::sql::password_shape(credential)?;
                if credential.is_some() && parsed.user.is_none() {
                    return Err(ProviderError::invalid("config.user", "a password needs a user"));
                }
            }
        }
        Ok(parsed)
    }
}

const CONFIG: &[crate::form::Field] = {
    use crate::form::{Kind, field};
    &[
        field("hosts", Kind::List, "one `host:port` (27017 when no port); none when the credential is a `uri`"),
        field("database", Kind::String, "the database to read").required().max_length(NAME_MAX),
        field("user", Kind::String, "the user tally signs in as (SCRAM), with the credential's password"),
        field("auth_source", Kind::String, "the database that holds the user; `database` when absent"),
        field("sslmode", Kind::Enum, "TLS, as for the SQL providers")
            .options(&["verify-full", "require", "disable"])
            .default("\"verify-full\""),
    ]
};

pub const FORM: crate::form::Form = crate::form::Form {
    provider: "mongodb",
    title: "MongoDB",
    help: "find and aggregate (never $out or $merge) against one MongoDB server",
    kinds: &["find", "aggregate"],
    config: CONFIG,
    credentials: &[
        crate::form::CredentialForm {
            name: "password",
            when: None,
            fields: &[crate::form::field("password", crate::form::Kind::String, "the user's password")
                .required()
                .secret()],
        },
        crate::form::CredentialForm {
            name: "uri",
            when: None,
            fields: &[crate::form::field(
                "uri",
                crate::form::Kind::String,
                "a whole mongodb:// connection string (one host), instead of hosts, user and password",
            )
            .required()
            .secret()
            .max_length(4_096)],
        },
    ],
    credential_optional: true,
};

#[derive(Default)]
pub struct MongodbProvider {
    clients: Pools<Client>,
}

impl Provider for MongodbProvider {
    fn form(&self) -> &'static crate::form::Form {
        &FORM
    }

    fn validate_config(
        &self,
        config: &Value,
        credential: Option<&Map<String, Value>>,
        guard: &crate::guard::Guard,
    ) -> Result<(), ProviderError> {
        MongoConfig::parse(config, credential, guard).map(|_| ())
    }

    fn validate_query(&self, _config: &Value, query: &QuerySpec) -> Result<(), ProviderError> {
        match query.kind.as_str() {
            "find" => query.only_fields(&["collection", "filter", "projection", "sort", "limit"])?,
            "aggregate" => query.only_fields(&["collection", "pipeline"])?,
            _ => return Err(ProviderError::invalid("kind", "a mongodb integration runs `find` and `aggregate`")),
        }
        let collection = query.collection.as_deref().unwrap_or_default();
        if collection.is_empty()
            || collection.len() > NAME_MAX
            || collection.starts_with("system.")
            || collection.contains(['$', '\0'])
        {
            return Err(ProviderError::invalid("collection", "a collection name is required"));
        }
        for (field, document) in [("filter", &query.filter), ("projection", &query.projection)] {
            if let Some(document) = document {
                if !document.is_object() {
                    return Err(ProviderError::invalid(field, "must be an Extended JSON object"));
                }
                extended(document, field)?;
            }
        }
        if let Some(sort) = &query.sort {
            check_sort(sort, "sort")?;
        }
        if query.kind == "aggregate" {
            let Some(pipeline) = &query.pipeline else {
                return Err(ProviderError::invalid("pipeline", "is required for kind `aggregate`"));
            };
            for (index, stage) in pipeline.iter().enumerate() {
                let field = format!("pipeline.{index}");
                if stage.as_object().is_none_or(|stage| stage.len() != 1) {
                    return Err(ProviderError::invalid(field, "a stage is an object with one operator"));
                }
                extended(stage, &field)?;
                check_sorts(stage, &field)?;
            }
            if let Some(stage) = write_stage(&Value::Array(pipeline.clone())) {
                return Err(ProviderError::invalid("pipeline", format!("`{stage}` writes, and tally runs reads only")));
            }
        }
        Ok(())
    }

    fn probe<'a>(&'a self, call: &'a Call<'a>) -> BoxFuture<'a, Result<Option<ApiUsage>, ProviderError>> {
        Box::pin(async move {
            let work = async {
                let (client, database) = self.client(call).await?;
                client.database(&database).run_command(bson::doc! {"ping": 1}).await.map_err(driver_error)?;
                Ok(())
            };
            crate::provider::within(call.limits.timeout, work)
                .await
                .map(|()| None)
                .map_err(|error| scrubbed(error, call))
        })
    }

    fn forget(&self, integration_key: &str) {
        self.clients.forget(integration_key);
    }

    fn run<'a>(
        &'a self,
        call: &'a Call<'a>,
        query: &'a QuerySpec,
        params: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Rows, ProviderError>> {
        Box::pin(async move {
            let started = Instant::now();
            let work = async {
                let (client, database) = self.client(call).await?;
                let collection =
                    client.database(&database).collection::<Document>(query.collection.as_deref().unwrap_or_default());
                let budget = crate::sql::statement_budget(call.limits.timeout.saturating_sub(started.elapsed()));
                let wanted = call.limits.max_rows as u64 + 1;
                let mut cursor = if query.kind == "aggregate" {
                    let mut pipeline = Vec::new();
                    for (index, stage) in query.pipeline.iter().flatten().enumerate() {
                        let mut stage =
                            Bson::Document(document(&render_json(stage, params), &format!("pipeline.{index}"))?);
                        ordered_sorts(&mut stage);
                        let Bson::Document(stage) = stage else { unreachable!("a document stays one") };
                        pipeline.push(stage);
                    }
                    pipeline.push(bson::doc! {"$limit": wanted as i64});
                    collection
                        .aggregate(pipeline)
                        .max_time(budget)
                        .batch_size(BATCH_SIZE)
                        .await
                        .map_err(driver_error)?
                } else {
                    let part = |value: &Option<Value>, field: &str| -> Result<Option<Document>, ProviderError> {
                        value.as_ref().map(|value| document(&render_json(value, params), field)).transpose()
                    };
                    let limit = query.limit.map_or(wanted, |limit| limit.min(wanted));
                    let mut find = collection
                        .find(part(&query.filter, "filter")?.unwrap_or_default())
                        .limit(limit as i64)
                        .max_time(budget)
                        .batch_size(BATCH_SIZE);
                    if let Some(projection) = part(&query.projection, "projection")? {
                        find = find.projection(projection);
                    }
                    if let Some(sort) = query.sort.as_ref().map(|sort| sort_document(sort, "sort")).transpose()? {
                        find = find.sort(sort);
                    }
                    find.await.map_err(driver_error)?
                };
                let mut rows = Rows::default();
                while cursor.advance().await.map_err(driver_error)? {
                    if rows.rows.len() == call.limits.max_rows {
                        rows.truncated = true;
                        break;
                    }
                    let document = cursor.deserialize_current().map_err(driver_error)?;
                    rows.push(&Bson::Document(document).into_relaxed_extjson(), call.limits.max_bytes)?;
                }
                Ok(rows)
            };
            match tokio::time::timeout(call.limits.timeout.saturating_sub(started.elapsed()), work).await {
                Ok(result) => result.map_err(|error| scrubbed(error, call)),
                Err(_) => Err(ProviderError::Timeout(call.limits.timeout)),
            }
        })
    }
}

impl MongodbProvider {
    /// The integration's client and its database.
    async fn client(&self, call: &Call<'_>) -> Result<(Client, String), ProviderError> {
        let guard = call.http.guard();
        let config = MongoConfig::read(call.config)?;
        let fields = crate::rest::credential_fields(call)?;
        let client = self
            .clients
            .get(call, || async {
                let mut options = match fields.get("uri").and_then(Value::as_str) {
                    Some(uri) => ClientOptions::parse(uri).await.map_err(|error| {
                        ProviderError::invalid("credential.uri", crate::sql::upstream_message(&error.to_string(), None))
                    })?,
                    None => {
                        let mut options = ClientOptions::builder().build();
                        options.hosts = config
                            .hosts
                            .iter()
                            .map(|host| {
                                split_host(host).map(|(host, port)| ServerAddress::Tcp { host, port: Some(port) })
                            })
                            .collect::<Result<_, _>>()?;
                        if let Some(user) = &config.user {
                            let mut credential = Credential::default();
                            credential.username = Some(user.clone());
                            credential.password = fields.get("password").and_then(Value::as_str).map(str::to_owned);
                            credential.source = config.auth_source.clone();
                            options.credential = Some(credential);
                        }
                        options
                    }
                };
                // One host, reached directly: a replica set's other members,
                // named by the server itself, would not pass the guard.
                if options.hosts.len() != 1 || options.repl_set_name.is_some() || options.load_balanced == Some(true) {
                    return Err(ProviderError::invalid("credential.uri", ONE_HOST));
                }
                options.repl_set_name = None;
                options.direct_connection = Some(true);
                // SCRAM or no authentication only: the other mechanisms
                // read the machine's own credentials (cloud roles, token
                // files) and would hand them to the host.
                if let Some(credential) = options.credential.as_mut() {
                    if !matches!(
                        credential.mechanism,
                        None | Some(AuthMechanism::ScramSha1 | AuthMechanism::ScramSha256)
                    ) {
                        return Err(ProviderError::invalid("credential.uri", MECHANISMS));
                    }
                    credential.mechanism_properties = None;
                }
                let encrypted = config.sslmode != SslMode::Disable;
                options.tls = Some(match config.sslmode {
                    SslMode::Disable => Tls::Disabled,
                    SslMode::Require => {
                        let mut tls = TlsOptions::default();
                        tls.allow_invalid_certificates = Some(true);
                        Tls::Enabled(tls)
                    }
                    SslMode::VerifyFull => Tls::Enabled(TlsOptions::default()),
                });
                for address in options.hosts.iter_mut() {
                    let ServerAddress::Tcp { host, port } = address else {
                        return Err(ProviderError::invalid("config.hosts", "TCP hosts only"));
                    };
                    guard.check_host(host, encrypted).map_err(crate::sql::host_refusal)?;
                    let checked = crate::sql::checked_addresses(guard, host, port.unwrap_or(DEFAULT_PORT)).await?;
                    // Without a verified certificate, the name is not needed
                    // and the connection goes to the checked address itself;
                    // with one, a name that now points elsewhere fails the
                    // certificate check.
                    if config.sslmode != SslMode::VerifyFull {
                        *host = checked[0].to_string();
                    }
                }
                options.app_name = Some("tally".into());
                options.connect_timeout = Some(CONNECT_TIMEOUT);
                options.server_selection_timeout = Some(CONNECT_TIMEOUT);
                options.max_pool_size = Some(POOL_SIZE_MAX as u32);
                options.max_idle_time = Some(IDLE_TIMEOUT);
                Client::with_options(options).map_err(driver_error)
            })
            .await?;
        Ok((client, config.database))
    }
}

/// A sort: one key as an object, or several as a list of pairs in order
/// (`[["total", -1], ["_id", 1]]`): a JSON object's keys lose their order
/// here, and a sort's order is its meaning.
fn check_sort(sort: &Value, field: &str) -> Result<(), ProviderError> {
    let several =
        "several keys lose their order in a JSON object: give them as a list of pairs, [[\"total\", -1], [\"_id\", 1]]";
    match sort {
        Value::Object(keys) if keys.len() <= 1 => extended(sort, field).map(|_| ()),
        Value::Object(_) => Err(ProviderError::invalid(field, several)),
        Value::Array(pairs) => {
            for pair in pairs {
                match pair.as_array().map(Vec::as_slice) {
                    Some([Value::String(_), Value::Number(_) | Value::Object(_)]) => {}
                    _ => return Err(ProviderError::invalid(field, "a sort pair is [\"field\", 1 or -1]")),
                }
            }
            Ok(())
        }
        _ => Err(ProviderError::invalid(field, "a sort is an object of one key, or a list of pairs")),
    }
}

/// Every `$sort` of a stage, at any depth, checked as [`check_sort`].
fn check_sorts(value: &Value, field: &str) -> Result<(), ProviderError> {
    match value {
        Value::Object(fields) => fields.iter().try_for_each(|(key, inner)| {
            if key == "$sort" { check_sort(inner, field) } else { check_sorts(inner, field) }
        }),
        Value::Array(items) => items.iter().try_for_each(|item| check_sorts(item, field)),
        _ => Ok(()),
    }
}

/// A checked sort as an ordered document.
fn sort_document(sort: &Value, field: &str) -> Result<Document, ProviderError> {
    let mut sort = Bson::Document(bson::doc! {"$sort": extended(sort, field)?});
    ordered_sorts(&mut sort);
    match sort {
        Bson::Document(mut wrapper) => match wrapper.remove("$sort") {
            Some(Bson::Document(sort)) => Ok(sort),
            _ => Err(ProviderError::invalid(field, "a sort is an object of one key, or a list of pairs")),
        },
        _ => unreachable!("a document stays one"),
    }
}

/// Turns every `$sort` given as a list of pairs into a document, in the
/// pairs' order.
fn ordered_sorts(value: &mut Bson) {
    match value {
        Bson::Document(fields) => {
            for (key, inner) in fields.iter_mut() {
                match inner {
                    Bson::Array(pairs) if key == "$sort" => {
                        let mut sort = Document::new();
                        for pair in pairs.iter() {
                            if let Bson::Array(pair) = pair
                                && let [Bson::String(name), direction] = pair.as_slice()
                            {
                                sort.insert(name.clone(), direction.clone());
                            }
                        }
                        *inner = Bson::Document(sort);
                    }
                    other => ordered_sorts(other),
                }
            }
        }
        Bson::Array(items) => items.iter_mut().for_each(ordered_sorts),
        _ => {}
    }
}

/// An Extended JSON document, as BSON.
fn document(value: &Value, field: &str) -> Result<Document, ProviderError> {
    match extended(value, field)? {
        Bson::Document(document) => Ok(document),
        _ => Err(ProviderError::invalid(field, "must be an Extended JSON object")),
    }
}

fn extended(value: &Value, field: &str) -> Result<Bson, ProviderError> {
    Bson::try_from(value.clone()).map_err(|error| ProviderError::invalid(field, format!("not Extended JSON: {error}")))
}

/// The first stage that writes, at any depth (`$lookup`, `$facet` and
/// `$unionWith` nest pipelines).
fn write_stage(value: &Value) -> Option<&'static str> {
    match value {
        Value::Object(fields) => fields.iter().find_map(|(key, inner)| {
            WRITE_STAGES.iter().find(|stage| **stage == key).copied().or_else(|| write_stage(inner))
        }),
        Value::Array(items) => items.iter().find_map(write_stage),
        _ => None,
    }
}

/// A driver error in the provider's terms.
fn driver_error(error: mongodb::error::Error) -> ProviderError {
    use mongodb::error::ErrorKind;
    let text = error.to_string();
    match &*error.kind {
        ErrorKind::Authentication { .. } => ProviderError::AuthFailed(text),
        ErrorKind::Command(command) => match command.code {
            // MaxTimeMSExpired.
            50 => ProviderError::Timeout(Duration::ZERO),
            // AuthenticationFailed (Unauthorized, 13, is a permission of
            // the query's: integration_query_failed).
            18 => ProviderError::AuthFailed(format!("{} ({})", command.message, command.code)),
            _ => ProviderError::QueryFailed(format!("{} ({})", command.message, command.code)),
        },
        ErrorKind::InvalidArgument { .. } | ErrorKind::Write(_) | ErrorKind::BsonDeserialization(_) => {
            ProviderError::QueryFailed(text)
        }
        _ => ProviderError::Unreachable(text),
    }
}

/// Without the call's secrets, bounded.
fn scrubbed(error: ProviderError, call: &Call<'_>) -> ProviderError {
    let fields = crate::rest::credential_fields(call).unwrap_or_default();
    let clean = |text: String| {
        let mut text = crate::provider::scrub(&text, call.credential);
        if let Some(uri) = fields.get("uri").and_then(Value::as_str) {
            text = text.replace(uri, "[redacted]");
        }
        crate::sql::upstream_message(&text, None::<&SecretString>)
    };
    match error {
        ProviderError::AuthFailed(text) => ProviderError::AuthFailed(clean(text)),
        ProviderError::QueryFailed(text) => ProviderError::QueryFailed(clean(text)),
        ProviderError::Unreachable(text) => ProviderError::Unreachable(clean(text)),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stages_that_write_are_found_at_any_depth() {
        assert_eq!(write_stage(&json!([{"$match": {}}, {"$out": "copy"}])), Some("$out"));
        let nested = json!([{"$facet": {"a": [{"$match": {}}], "b": [{"$lookup": {"from": "x", "pipeline": [{"$merge": {"into": "y"}}], "as": "z"}}]}}]);
        assert_eq!(write_stage(&nested), Some("$merge"));
        assert_eq!(write_stage(&json!([{"$match": {"out": 1}}, {"$group": {"_id": "$kind"}}])), None);
    }

    #[test]
    fn hosts_and_connection_strings_are_read_for_the_guard() {
        assert_eq!(split_host("db.example.com").unwrap(), ("db.example.com".into(), 27017));
        assert_eq!(split_host("127.0.0.1:27100").unwrap(), ("127.0.0.1".into(), 27100));
        assert_eq!(split_host("[::1]:5").unwrap(), ("::1".into(), 5));
        assert!(split_host("h:0").is_err());
        assert_eq!(
            uri_hosts("mongodb://u:p@a.example:1,b.example/db?tls=true").unwrap(),
            vec![("a.example".into(), 1), ("b.example".into(), 27017)]
        );
        let open = crate::guard::Guard::new(vec![]);
        for refused in [
            "mongodb://a.example,b.example/db",
            "mongodb://a.example/db?replicaSet=rs0",
            "mongodb://a.example/db?authMechanism=MONGODB-OIDC&authMechanismProperties=ENVIRONMENT:k8s",
            "mongodb://a.example/db?authMechanism=MONGODB-AWS",
        ] {
            let credential = json!({"uri": refused});
            let error = MongoConfig::parse(&json!({"database": "db"}), credential.as_object(), &open).unwrap_err();
            assert_eq!(error.code(), "validation_failed", "{refused}: {error}");
        }
        let scram = json!({"uri": "mongodb://u:p@a.example/db?authMechanism=SCRAM-SHA-256"});
        assert!(MongoConfig::parse(&json!({"database": "db"}), scram.as_object(), &open).is_ok());
        assert!(uri_hosts("mongodb+srv://cluster.example").is_err());
        let credential = json!({"uri": "mongodb://u:p@10.1.2.3:27017/db"});
        let error = MongoConfig::parse(&json!({"database": "db"}), credential.as_object(), &open).unwrap_err();
        assert_eq!(error.code(), "target_forbidden", "{error}");
    }
}

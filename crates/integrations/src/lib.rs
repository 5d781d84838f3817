//! tally's data sources (DESIGN.md §9): no HTTP serving and no ledger here,
//! only what reaches out and what keeps secrets.
//!
//! - [`provider`]: the [`Provider`](provider::Provider) trait every source
//!   implements (validate config, probe, run with limits, rows as JSON),
//!   its limits and its errors with their stable codes;
//! - [`rest`] and [`graphql`]: the HTTP providers;
//! - [`postgres`], [`mysql`] (MySQL and MariaDB) and [`mongodb`]: the
//!   database providers, sharing [`sql`] (config, bind parameters, pools)
//!   and [`tls`] (rustls for them);
//! - [`query`]: saved queries, typed parameters and `{{name}}` templates,
//!   bound, never spliced;
//! - [`guard`] and [`http`]: the target guard against server-side request
//!   forgery, and the one HTTP client that goes through it;
//! - [`cache`]: the result cache, bounded by bytes (moka);
//! - [`vault`]: the credential vault, envelope encryption with AES-256-GCM.
//!
//! Invariant: a secret is only ever plaintext inside a `secrecy` type, in
//! a request to its own source, or in the vault's sealed rows.

pub mod cache;
pub mod graphql;
pub mod guard;
pub mod http;
pub mod mongodb;
pub mod mysql;
pub mod postgres;
pub mod provider;
pub mod query;
pub mod rest;
pub mod sql;
pub mod tls;
pub mod vault;

pub use provider::{Call, Limits, Provider, ProviderError, Rows};

/// The providers this build has, by name.
pub fn provider(name: &str) -> Option<&'static dyn Provider> {
    use std::sync::LazyLock;
    static REST: LazyLock<rest::RestProvider> = LazyLock::new(rest::RestProvider::default);
    static GRAPHQL: LazyLock<graphql::GraphqlProvider> = LazyLock::new(graphql::GraphqlProvider::default);
    static POSTGRES: LazyLock<postgres::PostgresProvider> = LazyLock::new(postgres::PostgresProvider::default);
    static MYSQL: LazyLock<mysql::MysqlProvider> = LazyLock::new(mysql::MysqlProvider::default);
    static MONGODB: LazyLock<mongodb::MongodbProvider> = LazyLock::new(mongodb::MongodbProvider::default);
    match name {
        "rest" => Some(&*REST),
        "graphql" => Some(&*GRAPHQL),
        "postgres" => Some(&*POSTGRES),
        "mysql" => Some(&*MYSQL),
        "mongodb" => Some(&*MONGODB),
        _ => None,
    }
}

/// Names of the providers, for error messages and the OpenAPI document.
pub const PROVIDERS: &[&str] = &["rest", "graphql", "postgres", "mysql", "mongodb"];

/// Closes what any provider keeps open for an integration
/// (`member/integration`): after a change of config or credential, a
/// disable or a removal.
pub fn forget(integration_key: &str) {
    for name in PROVIDERS {
        if let Some(provider) = provider(name) {
            provider.forget(integration_key);
        }
    }
}

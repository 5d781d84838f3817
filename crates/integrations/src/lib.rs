//! tally's data sources (DESIGN.md §9): no HTTP serving and no ledger here,
//! only what reaches out and what keeps secrets.
//!
//! - [`provider`]: the [`Provider`](provider::Provider) trait every source
//!   implements (validate config, probe, run with limits, rows as JSON),
//!   its limits and its errors with their stable codes;
//! - [`form`]: what each provider asks for (config and credential
//!   fields), shown by `GET /v1/providers` and checked by [`validate_config`];
//! - [`rest`] and [`graphql`]: the HTTP providers;
//! - [`airtable`], [`google_sheets`] and [`salesforce`]: presets over those
//!   services' REST APIs, with their auth flows, pagination and rate
//!   limits, sharing [`saas`] (literals, pacing, tokens);
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

pub mod airtable;
pub mod cache;
pub mod form;
pub mod google_sheets;
pub mod graphql;
pub mod guard;
pub mod http;
pub mod mongodb;
pub mod mysql;
pub mod postgres;
pub mod provider;
pub mod query;
pub mod rest;
pub mod saas;
pub mod salesforce;
pub mod sql;
pub mod tls;
pub mod vault;

pub use provider::{ApiUsage, Call, Limits, Provider, ProviderError, Rows};

/// The providers this build has, by name.
pub fn provider(name: &str) -> Option<&'static dyn Provider> {
    use std::sync::LazyLock;
    static REST: LazyLock<rest::RestProvider> = LazyLock::new(rest::RestProvider::default);
    static GRAPHQL: LazyLock<graphql::GraphqlProvider> = LazyLock::new(graphql::GraphqlProvider::default);
    static POSTGRES: LazyLock<postgres::PostgresProvider> = LazyLock::new(postgres::PostgresProvider::default);
    static MYSQL: LazyLock<mysql::MysqlProvider> = LazyLock::new(mysql::MysqlProvider::default);
    static MONGODB: LazyLock<mongodb::MongodbProvider> = LazyLock::new(mongodb::MongodbProvider::default);
    static AIRTABLE: LazyLock<airtable::AirtableProvider> = LazyLock::new(airtable::AirtableProvider::default);
    static SHEETS: LazyLock<google_sheets::SheetsProvider> = LazyLock::new(google_sheets::SheetsProvider::default);
    static SALESFORCE: LazyLock<salesforce::SalesforceProvider> =
        LazyLock::new(salesforce::SalesforceProvider::default);
    match name {
        "rest" => Some(&*REST),
        "graphql" => Some(&*GRAPHQL),
        "postgres" => Some(&*POSTGRES),
        "mysql" => Some(&*MYSQL),
        "mongodb" => Some(&*MONGODB),
        "airtable" => Some(&*AIRTABLE),
        "google_sheets" => Some(&*SHEETS),
        "salesforce" => Some(&*SALESFORCE),
        _ => None,
    }
}

/// Names of the providers, for error messages and the OpenAPI document.
pub const PROVIDERS: &[&str] =
    &["rest", "graphql", "postgres", "mysql", "mongodb", "airtable", "google_sheets", "salesforce"];

/// Checks a config and the credential given with it: first their shape
/// against the provider's form, then what the provider checks (addresses
/// through the guard, certificates, …). Nothing is contacted.
pub fn validate_config(
    provider: &dyn Provider,
    config: &serde_json::Value,
    credential: Option<&serde_json::Map<String, serde_json::Value>>,
    guard: &guard::Guard,
) -> Result<(), ProviderError> {
    provider.form().check(config, credential)?;
    provider.validate_config(config, credential, guard)
}

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

#[cfg(test)]
mod tests {
    /// Every name the build lists is a provider whose form has that name,
    /// and every config field says what it is for.
    #[test]
    fn every_provider_is_listed_under_its_forms_name() {
        for name in super::PROVIDERS {
            let provider = super::provider(name).unwrap_or_else(|| panic!("{name} is listed but not built"));
            assert_eq!(provider.name(), *name);
            let document = provider.form().document();
            assert_eq!(document["provider"], *name);
            for field in document["config"].as_array().unwrap() {
                assert!(field["help"].as_str().is_some_and(|help| !help.is_empty()), "{name}: {field}");
            }
        }
    }
}

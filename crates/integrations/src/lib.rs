//! tally's data sources (DESIGN.md §9): no HTTP serving and no ledger here,
//! only what reaches out and what keeps secrets.
//!
//! - [`provider`]: the [`Provider`](provider::Provider) trait every source
//!   implements (validate config, probe, run with limits, rows as JSON),
//!   its limits and its errors with their stable codes;
//! - [`rest`] and [`graphql`]: the HTTP providers;
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
pub mod provider;
pub mod query;
pub mod rest;
pub mod vault;

pub use provider::{Call, Limits, Provider, ProviderError, Rows};

/// The providers this build has, by name.
pub fn provider(name: &str) -> Option<&'static dyn Provider> {
    static REST: std::sync::LazyLock<rest::RestProvider> = std::sync::LazyLock::new(rest::RestProvider::default);
    static GRAPHQL: std::sync::LazyLock<graphql::GraphqlProvider> =
        std::sync::LazyLock::new(graphql::GraphqlProvider::default);
    match name {
        "rest" => Some(&*REST),
        "graphql" => Some(&*GRAPHQL),
        _ => None,
    }
}

/// Names of the providers, for error messages and the OpenAPI document.
pub const PROVIDERS: &[&str] = &["rest", "graphql"];

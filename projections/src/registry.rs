//! The set of projectors a process runs, and the read models they serve.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::ProjectionError;
use crate::models::{
    AlertsProjector, AnalyticsProjector, CreditsProjector, DailyUsageProjector, IntegrationsProjector,
    InvoicesProjector, SubscriptionsProjector,
};
use crate::projector::Projector;

/// The read models of DESIGN.md §5, each served by one projector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadModel {
    CreditBalances,
    CreditTransactions,
    DailyUsageStats,
    Invoices,
    Subscriptions,
    Integrations,
    QueryExecutions,
    QueryStats,
    Alerts,
    Analytics,
}

impl ReadModel {
    pub const ALL: [ReadModel; 10] = [
        ReadModel::CreditBalances,
        ReadModel::CreditTransactions,
        ReadModel::DailyUsageStats,
        ReadModel::Invoices,
        ReadModel::Subscriptions,
        ReadModel::Integrations,
        ReadModel::QueryExecutions,
        ReadModel::QueryStats,
        ReadModel::Alerts,
        ReadModel::Analytics,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ReadModel::CreditBalances => "credit_balances",
            ReadModel::CreditTransactions => "credit_transactions",
            ReadModel::DailyUsageStats => "daily_usage_stats",
            ReadModel::Invoices => "invoices",
            ReadModel::Subscriptions => "subscriptions",
            ReadModel::Integrations => "integrations",
            ReadModel::QueryExecutions => "query_executions",
            ReadModel::QueryStats => "query_stats",
            ReadModel::Alerts => "alerts",
            ReadModel::Analytics => "analytics",
        }
    }

    /// The projector that builds it. Balances and transactions share one:
    /// a transaction's amount is the change of the balance it leads to, so
    /// both come from the same per-grant rows in the same transaction.
    pub fn projector(self) -> &'static str {
        match self {
            ReadModel::CreditBalances | ReadModel::CreditTransactions => crate::models::credits::PROJECTOR_NAME,
            ReadModel::DailyUsageStats => crate::models::daily_usage::PROJECTOR_NAME,
            ReadModel::Invoices => crate::models::invoices::PROJECTOR_NAME,
            ReadModel::Subscriptions => crate::models::subscriptions::PROJECTOR_NAME,
            ReadModel::Integrations | ReadModel::QueryExecutions | ReadModel::QueryStats => {
                crate::models::integrations::PROJECTOR_NAME
            }
            ReadModel::Alerts => crate::models::alerts::PROJECTOR_NAME,
            ReadModel::Analytics => crate::models::analytics::PROJECTOR_NAME,
        }
    }

    pub fn from_name(name: &str) -> Option<ReadModel> {
        ReadModel::ALL.into_iter().find(|read_model| read_model.name() == name)
    }
}

impl std::fmt::Display for ReadModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// The projectors tally ships, in the order they are applied to each event.
pub fn builtin_projectors() -> Vec<Arc<dyn Projector>> {
    vec![
        Arc::new(CreditsProjector),
        Arc::new(DailyUsageProjector),
        Arc::new(InvoicesProjector),
        Arc::new(SubscriptionsProjector),
        Arc::new(IntegrationsProjector),
        Arc::new(AlertsProjector),
        Arc::new(AnalyticsProjector),
    ]
}

/// The projectors of one process.
pub(crate) struct Registry {
    projectors: Vec<Arc<dyn Projector>>,
}

impl Registry {
    pub(crate) fn new(projectors: Vec<Arc<dyn Projector>>) -> Registry {
        let mut names: Vec<&str> = projectors.iter().map(|projector| projector.name()).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "projector names are unique");
        Registry { projectors }
    }

    pub(crate) fn projectors(&self) -> &[Arc<dyn Projector>] {
        &self.projectors
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Arc<dyn Projector>> {
        self.projectors.iter().find(|projector| projector.name() == name)
    }

    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.projectors.iter().position(|projector| projector.name() == name)
    }

    /// A projector named directly, or the projector of a read model named.
    pub(crate) fn resolve(&self, name: &str) -> Result<usize, ProjectionError> {
        let projector_name: &str = match ReadModel::from_name(name) {
            Some(read_model) => read_model.projector(),
            None => name,
        };
        self.index_of(projector_name).ok_or_else(|| ProjectionError::UnknownProjector { name: name.to_owned() })
    }
}

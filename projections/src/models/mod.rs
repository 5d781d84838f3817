//! The read models of DESIGN.md §5: one module per projector, each with its
//! tables, its `apply`, its row types and its query functions.

pub mod alerts;
pub mod analytics;
pub mod credits;
pub mod daily_usage;
pub mod integrations;
pub mod invoices;
pub mod subscriptions;

pub use alerts::AlertsProjector;
pub use analytics::AnalyticsProjector;
pub use credits::CreditsProjector;
pub use daily_usage::DailyUsageProjector;
pub use integrations::IntegrationsProjector;
pub use invoices::InvoicesProjector;
pub use subscriptions::SubscriptionsProjector;

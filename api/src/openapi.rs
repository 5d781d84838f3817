//! The OpenAPI document, generated from the handlers' annotations and the
//! DTOs: the contract of the API.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "tally", description = "An event-sourced credits ledger. Errors are application/problem+json with a stable `code`."),
    paths(
        crate::commands::put_member,
        crate::commands::post_plan,
        crate::commands::start_subscription,
        crate::commands::change_subscription,
        crate::commands::cancel_subscription,
        crate::commands::grant_credits,
        crate::commands::debit_credits,
        crate::commands::record_usage,
        crate::commands::reverse_usage,
        crate::commands::check,
        crate::commands::reserve,
        crate::commands::settle,
        crate::commands::release,
        crate::commands::pay_invoice,
        crate::commands::void_invoice,
        crate::commands::uncollectible_invoice,
        crate::reads::balance,
        crate::reads::transactions,
        crate::reads::daily_usage,
        crate::reads::invoices,
        crate::reads::invoice,
        crate::reads::subscription,
        crate::reads::audit,
        crate::admin::list_plans,
        crate::admin::issue_key,
        crate::admin::list_keys,
        crate::admin::events,
        crate::admin::advance_clock,
        crate::ops::projections_status,
        crate::ops::rebuild_projections,
        crate::admin::healthz,
        crate::admin::readyz,
        crate::admin::metrics,
        crate::stripe::webhook,
    ),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

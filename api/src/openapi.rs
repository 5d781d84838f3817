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

/// Every operation may answer with these problems, whatever its own
/// annotation lists; errors are `application/problem+json`.
struct ProblemResponses;

const COMMON_PROBLEMS: &[(&str, &str)] = &[
    ("400", "malformed_request: the body or a parameter is not what the route reads"),
    ("401", "unauthorized: no or an unknown bearer key"),
    ("403", "forbidden: the key may not do this"),
    ("404", "not_found"),
    ("405", "method_not_allowed"),
    ("413", "payload_too_large"),
    ("422", "validation_failed, naming the field"),
    ("429", "rate_limited, with Retry-After"),
    ("503", "service_unavailable: busy, full or lagging; retry"),
];

impl Modify for ProblemResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let problem = || ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build();
        for item in openapi.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for operation in operations.into_iter().flatten() {
                let responses = &mut operation.responses.responses;
                for (status, response) in responses.iter_mut() {
                    if let RefOr::T(response) = response
                        && (status.starts_with('4') || status.starts_with('5'))
                        && let Some(content) = response.content.shift_remove("application/json")
                    {
                        response.content.insert("application/problem+json".to_owned(), content);
                    }
                }
                for (status, description) in COMMON_PROBLEMS {
                    responses.entry((*status).to_owned()).or_insert_with(|| {
                        RefOr::T(
                            ResponseBuilder::new()
                                .description(*description)
                                .content("application/problem+json", problem())
                                .build(),
                        )
                    });
                }
            }
        }
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
        crate::stripe::replay,
    ),
    modifiers(&BearerAuth, &ProblemResponses)
)]
pub struct ApiDoc;

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

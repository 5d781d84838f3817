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

/// The limits the server enforces, written into the document from the same
/// constants and rules the validation uses, so that generated clients (and
/// fuzzers) know them: ranges of amounts, lengths and patterns of ids and
/// text, enums, the bounds of query parameters, and the `Idempotency-Key`
/// header on the routes that require it.
struct Limits;

enum Rule {
    Range(i64, i64),
    Identifier,
    Text,
    Pattern(&'static str),
    Enum(Vec<String>),
    /// A calendar day, `YYYY-MM-DD`.
    Date,
}

/// (schema, property, rule) for request bodies.
fn body_rules() -> Vec<(&'static str, &'static str, Rule)> {
    use Rule::*;
    use tally_ledger::domain::limits::*;
    let credits = || Range(1, COMMAND_CREDITS_MAX);
    let plan_credits = || Range(0, PLAN_CREDITS_MAX);
    let words = |words: &[&str]| Enum(words.iter().map(|word| (*word).to_owned()).collect());
    let time_zones = Enum(tally_ledger::domain::validate::time_zone_names().map(str::to_owned).collect());
    vec![
        ("MemberBody", "time_zone", time_zones),
        ("MemberBody", "currency", Pattern(CURRENCY_PATTERN)),
        ("MemberBody", "stripe_customer_id", Identifier),
        ("PlanBody", "plan_id", Identifier),
        ("PlanBody", "name", Text),
        ("PlanBody", "price", Range(0, PRICE_MINOR_MAX)),
        ("PlanBody", "currency", Pattern(CURRENCY_PATTERN)),
        ("PlanBody", "interval", words(&["month"])),
        ("PlanBody", "monthly_credits", plan_credits()),
        ("PlanBody", "rate_limit_per_minute", Range(1, i64::from(RATE_LIMIT_PER_MINUTE_MAX))),
        ("PlanBody", "stripe_price_id", Identifier),
        ("RolloverBody", "max_credits", plan_credits()),
        ("OverageBody", "limit_credits", plan_credits()),
        ("OverageBody", "unit_price", Range(0, UNIT_PRICE_MINOR_MAX)),
        ("PlanChoiceBody", "plan_id", Identifier),
        ("StartSubscriptionBody", "plan_id", Identifier),
        ("StartSubscriptionBody", "billing", words(&["tally", "stripe"])),
        ("GrantBody", "source", words(&["purchase", "promotional", "adjustment"])),
        ("GrantBody", "amount", credits()),
        ("GrantBody", "priority", Range(0, i64::from(PRIORITY_MAX))),
        ("GrantBody", "category", words(&["paid", "promotional"])),
        ("GrantBody", "reason", Text),
        ("GrantBody", "price", Range(0, PRICE_MINOR_MAX)),
        ("DebitBody", "amount", credits()),
        ("DebitBody", "reason", Text),
        ("UsageBody", "usage_id", Identifier),
        ("UsageBody", "metric", Identifier),
        ("UsageBody", "quantity", Range(1, QUANTITY_MAX)),
        ("UsageBody", "credits", credits()),
        ("UsageBody", "integration_id", Identifier),
        ("UsageBody", "query_id", Identifier),
        ("ReverseBody", "reason", Text),
        ("CheckBody", "credits", credits()),
        ("ReserveBody", "amount", credits()),
        ("ReserveBody", "ttl_s", Range(1, RESERVATION_TIMEOUT_MAX_S)),
        ("SettleBody", "amount", Range(0, COMMAND_CREDITS_MAX)),
        ("QueryBody", "integration_id", Identifier),
        ("QueryBody", "query_id", Identifier),
        ("QueryBody", "status", words(&["succeeded", "failed"])),
        ("QueryBody", "duration_ms", Range(0, QUERY_DURATION_MS_MAX)),
        ("QueryBody", "rows", Range(0, i64::MAX)),
    ]
}

const CURRENCY_PATTERN: &str = "^[A-Z]{3}$";
/// What `Cursor::sequence` accepts: a positive decimal within `i64`.
const CURSOR_PATTERN: &str = "^[1-9][0-9]{0,18}$";
/// The member the document's examples name: one of `serve --demo`'s.
const MEMBER_EXAMPLE: &str = "acme";

/// Write routes outside [`crate::commands::WRITE_ROUTES`] that take an
/// optional `Idempotency-Key`.
const IDEMPOTENCY_KEY_OPTIONAL: &[(&str, &str)] = &[("POST", "/v1/plans"), ("PUT", "/v1/members/{member}/alert-rules")];
/// Write routes outside [`crate::commands::WRITE_ROUTES`] that require one.
const IDEMPOTENCY_KEY_REQUIRED: &[(&str, &str)] = &[
    ("POST", "/v1/members/{member}/integrations/{integration}/queries/{query}/execute"),
    ("POST", "/v1/members/{member}/integrations/{integration}/execute"),
];

fn apply(schema: &mut utoipa::openapi::schema::Object, rule: &Rule) {
    use tally_ledger::domain::limits::{ID_LENGTH_MAX, TEXT_LENGTH_MAX};
    use tally_ledger::domain::validate::{TEXT_PATTERN, identifier_pattern};
    use utoipa::Number;
    match rule {
        Rule::Range(minimum, maximum) => {
            schema.minimum = Some(Number::Int(*minimum as isize));
            schema.maximum = Some(Number::Int(*maximum as isize));
        }
        Rule::Identifier => {
            schema.min_length = Some(1);
            schema.max_length = Some(ID_LENGTH_MAX);
            schema.pattern = Some(identifier_pattern());
        }
        Rule::Text => {
            schema.min_length = Some(1);
            schema.max_length = Some(TEXT_LENGTH_MAX);
            schema.pattern = Some(TEXT_PATTERN.to_owned());
        }
        Rule::Pattern(pattern) => schema.pattern = Some((*pattern).to_owned()),
        Rule::Enum(words) => {
            schema.enum_values = Some(words.iter().map(|word| serde_json::Value::from(word.as_str())).collect());
        }
        Rule::Date => {
            schema.format =
                Some(utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::schema::KnownFormat::Date));
        }
    }
}

fn object_mut(
    schema: &mut utoipa::openapi::RefOr<utoipa::openapi::Schema>,
) -> Option<&mut utoipa::openapi::schema::Object> {
    match schema {
        utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object(object)) => Some(object),
        _ => None,
    }
}

fn idempotency_header(required: bool) -> utoipa::openapi::path::Parameter {
    use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
    use utoipa::openapi::{ObjectBuilder, Required, Type};
    let description = if required {
        "Required: the same key with the same request returns the first answer (and writes nothing again); \
         with another request it is refused (idempotency_key_reused)."
    } else {
        "Optional: the same key with the same request returns the first answer."
    };
    ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(if required { Required::True } else { Required::False })
        .description(Some(description))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(crate::commands::IDEMPOTENCY_KEY_BYTES_MAX))
                .pattern(Some("^[!-~]+$")),
        ))
        .build()
}

impl Modify for Limits {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::ParameterIn;
        let components = openapi.components.get_or_insert_with(Default::default);
        for (schema_name, property, rule) in body_rules() {
            let property = components
                .schemas
                .get_mut(schema_name)
                .and_then(object_mut)
                .and_then(|object| object.properties.get_mut(property))
                .and_then(object_mut)
                .unwrap_or_else(|| panic!("the document has no property {schema_name}.{property}"));
            apply(property, &rule);
        }
        // A record of the admin's batch is a usage record with its member.
        let mut record = components.schemas.get("UsageBody").cloned().expect("UsageBody is in the document");
        if let Some(object) = object_mut(&mut record) {
            let mut member_id = utoipa::openapi::ObjectBuilder::new()
                .schema_type(utoipa::openapi::Type::String)
                .description(Some("The member the usage is recorded for."))
                .build();
            apply(&mut member_id, &Rule::Identifier);
            object.properties.insert("member_id".to_owned(), member_id.into());
            object.required.insert(0, "member_id".to_owned());
        }
        components.schemas.insert("MemberUsageRecord".to_owned(), record);
        for (batch, items) in [("UsageBatchBody", "UsageBody"), ("MemberUsageBatchBody", "MemberUsageRecord")] {
            if let Some(object) = components.schemas.get_mut(batch).and_then(object_mut) {
                let array = utoipa::openapi::ArrayBuilder::new()
                    .items(utoipa::openapi::Ref::from_schema_name(items))
                    .min_items(Some(1))
                    .max_items(Some(crate::batch::USAGE_BATCH_RECORDS_MAX))
                    .build();
                object.properties.insert("records".to_owned(), array.into());
            }
        }

        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for operation in operations.into_iter().flatten() {
                let parameters = operation.parameters.get_or_insert_with(Vec::new);
                for parameter in parameters.iter_mut() {
                    let utoipa::openapi::RefOr::T(parameter) = parameter else { continue };
                    let rule = match (&parameter.parameter_in, parameter.name.as_str()) {
                        (ParameterIn::Path, "member" | "usage" | "reservation") => Rule::Identifier,
                        (ParameterIn::Query, "limit") if path == "/v1/events" => {
                            Rule::Range(1, crate::admin::EVENTS_PAGE_SIZE_MAX as i64)
                        }
                        (ParameterIn::Query, "limit") => Rule::Range(1, tally_projections::PAGE_SIZE_MAX as i64),
                        (ParameterIn::Query, "min_position" | "after") => Rule::Range(0, i64::MAX),
                        (ParameterIn::Query, "from" | "to") if path.ends_with("/usage/daily") => Rule::Date,
                        // The daily list's cursors are a day and a metric, not a sequence.
                        (ParameterIn::Query, "cursor") if !path.ends_with("/usage/daily") => {
                            Rule::Pattern(CURSOR_PATTERN)
                        }
                        _ => continue,
                    };
                    if let Some(schema) = parameter.schema.as_mut().and_then(object_mut) {
                        apply(schema, &rule);
                        // A member of `serve --demo`, so examples reach real books.
                        if parameter.name == "member" {
                            schema.examples = vec![serde_json::Value::from(MEMBER_EXAMPLE)];
                        }
                    }
                }
            }
        }
        let keyed = crate::commands::WRITE_ROUTES
            .iter()
            .map(|route| (route.method, route.path, route.idempotency_required))
            .chain(IDEMPOTENCY_KEY_OPTIONAL.iter().map(|(method, path)| (*method, *path, false)))
            .chain(IDEMPOTENCY_KEY_REQUIRED.iter().map(|(method, path)| (*method, *path, true)));
        for (method, path, required) in keyed {
            let item = openapi.paths.paths.get_mut(path).unwrap_or_else(|| panic!("the document has no path {path}"));
            let operation = match method {
                "PUT" => item.put.as_mut(),
                _ => item.post.as_mut(),
            };
            let operation = operation.unwrap_or_else(|| panic!("the document has no {method} {path}"));
            operation.parameters.get_or_insert_with(Vec::new).push(idempotency_header(required).into());
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
        crate::batch::member_batch,
        crate::batch::admin_batch,
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
        crate::reads::executions,
        crate::reads::audit,
        crate::analytics::usage,
        crate::analytics::resources,
        crate::analytics::queries,
        crate::analytics::cost,
        crate::analytics::overview,
        crate::alerts::get_alert_rules,
        crate::alerts::put_alert_rules,
        crate::alerts::member_alerts,
        crate::alerts::all_alerts,
        crate::webhooks::list_event_types,
        crate::webhooks::create_endpoint,
        crate::webhooks::list_endpoints,
        crate::webhooks::get_endpoint,
        crate::webhooks::update_endpoint,
        crate::webhooks::delete_endpoint,
        crate::webhooks::rotate_secret,
        crate::webhooks::deliveries,
        crate::webhooks::redeliver,
        crate::webhooks::test_endpoint,
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
        crate::stripe_sync::sync,
        crate::integrations::list_providers,
        crate::integrations::get_provider,
        crate::integrations::list_integrations,
        crate::integrations::put_integration,
        crate::integrations::get_integration,
        crate::integrations::delete_integration,
        crate::integrations::rotate_credential,
        crate::integrations::test_integration,
        crate::integrations::disable_integration,
        crate::integrations::enable_integration,
        crate::integrations::execute_query,
        crate::integrations::execute_adhoc,
        crate::integrations::list_queries,
        crate::integrations::put_query,
        crate::integrations::get_query,
        crate::integrations::delete_query,
    ),
    modifiers(&BearerAuth, &ProblemResponses, &Limits)
)]
pub struct ApiDoc;

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The modifiers panic on a schema, property or route they cannot
    /// find: building the document here catches a renamed field before a
    /// server ever answers `/openapi.json`.
    #[test]
    fn the_document_builds_with_every_limit_in_place() {
        let document = serde_json::to_value(document()).unwrap();
        let usage = &document["components"]["schemas"]["UsageBody"]["properties"];
        assert_eq!(usage["credits"]["maximum"], tally_ledger::domain::limits::COMMAND_CREDITS_MAX);
        let keyed = crate::commands::WRITE_ROUTES.iter().filter(|route| route.idempotency_required).count();
        assert_eq!(keyed, 13);
    }
}

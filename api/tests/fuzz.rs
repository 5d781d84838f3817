//! Fuzz target for request bodies: [`tally_api::body::parse`] into every
//! request DTO of [`tally_api::dto`], and [`tally_api::body::fingerprint`].
//!
//! cargo-fuzz needs a nightly toolchain, so this is a proptest run driven by
//! a fixed seed: CI runs it briefly and gets the same cases every time, and a
//! long run explores further with a seed of its own:
//!
//! ```text
//! TALLY_FUZZ_CASES=1000000 TALLY_FUZZ_SEED=$RANDOM \
//!     cargo test --release -p tally-api --test fuzz -- --nocapture
//! ```
//!
//! - `TALLY_FUZZ_CASES`: cases per target; 10,000 by default, a second or
//!   two each in a debug build (a `request_body` case parses one body into
//!   fourteen DTOs).
//! - `TALLY_FUZZ_SEED`: a u64, decimal or `0x` hex; 0x7a117a11 by default.
//!   A failure names its seed and the shrunk input; the same seed and case
//!   count reproduce it.
//!
//! Each target ends by printing `fuzz <target>: <N> cases, seed <S>` on
//! stderr (shown with `--nocapture`).
//!
//! The targets:
//! - `request_body`: random bytes, random JSON shaped like requests, and
//!   valid bodies of every DTO damaged as text and as JSON. `parse` never
//!   panics; it accepts exactly what serde accepts from the same JSON
//!   object; anything else is `malformed_request` (400) when the body is not
//!   a JSON object and `validation_failed` (422) otherwise, naming a field
//!   of the body or the missing one, and the problem response says so.
//! - `request_fingerprint`: the fingerprint of a JSON body does not depend
//!   on key order or whitespace, and an empty body is `{}`.
//!
//! The routes turn DTOs into ledger commands in private functions, so this
//! stops at the DTO; the ledger's own validation is covered by its tests.

use actix_web::ResponseError;
use actix_web::body::MessageBody;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};
use std::fmt::Debug;
use tally_api::body::{fingerprint, parse};
use tally_api::dto::*;
use tally_api::error::ApiError;
use tally_testkit::fuzz::{TextDamage, TextMutation, fuzz, json_paths};

// ---------------------------------------------------------------------------------------------------------------------
// Case counts (the runner, `tally_testkit::fuzz`, reads TALLY_FUZZ_CASES and TALLY_FUZZ_SEED)
// ---------------------------------------------------------------------------------------------------------------------

const BODY_CASES_DEFAULT: u32 = 10_000;
const FINGERPRINT_CASES_DEFAULT: u32 = 10_000;

// ---------------------------------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------------------------------

/// A valid body of each request DTO, with every optional field present.
const VALID_BODIES: &[&str] = &[
    r#"{"time_zone":"Europe/Paris","currency":"EUR","stripe_customer_id":"cus_1"}"#,
    r#"{"plan_id":"starter","name":"Starter","price":1000,"currency":"USD","interval":"month","monthly_credits":1000,
        "rollover":{"enabled":true,"max_credits":500},"overage":{"allowed":true,"limit_credits":200,"unit_price":2},
        "rate_limit_per_minute":600,"stripe_price_id":"price_1"}"#,
    r#"{"plan_id":"pro"}"#,
    r#"{"plan_id":"pro","billing":"stripe"}"#,
    r#"{"at_period_end":true}"#,
    r#"{"source":"adjustment","amount":500,"priority":50,"category":"paid","expires_at":"2026-03-01T00:00:00Z",
        "effective_at":"2026-02-01T00:00:00Z","reason":"goodwill","price":999}"#,
    r#"{"amount":5,"reason":"correction"}"#,
    r#"{"usage_id":"u1","metric":"api_calls","quantity":3,"credits":12,"occurred_at":"2026-01-01T00:00:00Z",
        "integration_id":"int_1","query_id":"q1"}"#,
    r#"{"reason":"mistake"}"#,
    r#"{"credits":10}"#,
    r#"{"amount":10,"ttl_s":600}"#,
    r#"{"amount":4,"query":{"integration_id":"int_1","query_id":"q1","status":"succeeded","duration_ms":1250,"rows":40}}"#,
    r#"{}"#,
    r#"{"now":"2026-02-01T00:00:00Z"}"#,
];

/// Every field name of the request DTOs, and a few that are none.
const FIELD_NAMES: &[&str] = &[
    "time_zone",
    "currency",
    "stripe_customer_id",
    "plan_id",
    "name",
    "price",
    "interval",
    "monthly_credits",
    "rollover",
    "enabled",
    "max_credits",
    "overage",
    "allowed",
    "limit_credits",
    "unit_price",
    "rate_limit_per_minute",
    "stripe_price_id",
    "billing",
    "at_period_end",
    "source",
    "amount",
    "priority",
    "category",
    "expires_at",
    "effective_at",
    "reason",
    "usage_id",
    "metric",
    "quantity",
    "credits",
    "occurred_at",
    "integration_id",
    "query_id",
    "ttl_s",
    "query",
    "status",
    "duration_ms",
    "rows",
    "now",
    "color",
    "",
    "a.b",
    "`",
    "é",
];

const STRINGS: &[&str] = &[
    "",
    "u1",
    "api_calls",
    "month",
    "year",
    "USD",
    "purchase",
    "promotional",
    "adjustment",
    "paid",
    "stripe",
    "tally",
    "succeeded",
    "2026-01-01T00:00:00Z",
    "2026-01-01T00:00:00+14:00",
    "2026-02-30T00:00:00Z",
    "+275760-09-13T00:00:00Z",
    "9999-12-31T23:59:60.999999999Z",
    "not a date",
    "`field`",
    "missing field `amount`",
    "\u{0}",
];

fn json_leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        2 => prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(100),
            Just(i64::from(u32::MAX) + 1),
            Just(i64::MIN),
            Just(i64::MAX),
            any::<i64>(),
        ]
        .prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        1 => prop_oneof![Just(1.0f64), Just(0.5), Just(1e30), Just(-0.0), any::<f64>()]
            .prop_map(|float| Number::from_f64(float).map_or(Value::Null, Value::Number)),
        3 => prop_oneof![3 => prop::sample::select(STRINGS).prop_map(str::to_owned), 1 => Strategy::boxed("\\PC{0,12}")]
            .prop_map(Value::String),
    ]
    .boxed()
}

fn json_tree() -> BoxedStrategy<Value> {
    json_leaf()
        .prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                1 => prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                3 => prop::collection::vec((prop::sample::select(FIELD_NAMES), inner), 0..8).prop_map(|pairs| {
                    Value::Object(pairs.into_iter().map(|(key, value)| (key.to_owned(), value)).collect())
                }),
            ]
        })
        .boxed()
}

const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ",",
    ":",
    "null",
    "-",
    "1e400",
    "\\",
    "\\ud800",
    " ",
    "\u{feff}",
    "\"amount\":1,",
    "\"color\":1,",
    "99999999999999999999",
];

/// Damage to request bodies (no number replacements).
const TEXT_DAMAGE: TextDamage = TextDamage { tokens: JSON_TOKENS, numbers: &[], keys_after_braces: false };

/// Damage that keeps the body JSON.
#[derive(Clone, Debug)]
enum JsonMutation {
    Remove(Index),
    Replace(Index, Value),
    Add(&'static str, Value),
}

fn json_mutation() -> BoxedStrategy<JsonMutation> {
    prop_oneof![
        2 => any::<Index>().prop_map(JsonMutation::Remove),
        4 => (any::<Index>(), json_leaf()).prop_map(|(at, value)| JsonMutation::Replace(at, value)),
        1 => (any::<Index>(), json_tree()).prop_map(|(at, value)| JsonMutation::Replace(at, value)),
        1 => (prop::sample::select(FIELD_NAMES), json_leaf()).prop_map(|(key, value)| JsonMutation::Add(key, value)),
    ]
    .boxed()
}

fn apply_json_mutation(root: &mut Value, mutation: &JsonMutation) {
    if let JsonMutation::Add(key, value) = mutation {
        if let Value::Object(map) = root {
            map.insert((*key).to_owned(), value.clone());
        }
        return;
    }
    let mut paths = Vec::new();
    json_paths(root, "", &mut paths);
    if paths.is_empty() {
        return;
    }
    match mutation {
        JsonMutation::Replace(at, value) => {
            *root.pointer_mut(&paths[at.index(paths.len())]).expect("a listed path") = value.clone();
        }
        JsonMutation::Remove(at) => {
            let path = &paths[at.index(paths.len())];
            let (parent, last) = path.rsplit_once('/').expect("paths start with '/'");
            match root.pointer_mut(parent).expect("the parent of a listed path") {
                Value::Object(map) => {
                    map.remove(&last.replace("~1", "/").replace("~0", "~"));
                }
                Value::Array(items) => {
                    items.remove(last.parse::<usize>().expect("an array index"));
                }
                _ => unreachable!("only objects and arrays have children"),
            }
        }
        JsonMutation::Add(..) => unreachable!("handled above"),
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    Text(TextMutation),
    Json(JsonMutation),
}

/// How a body is made.
#[derive(Clone, Debug)]
enum BodyRecipe {
    Valid(Index, Vec<Mutation>),
    Tree(Value),
    Bytes(Vec<u8>),
}

fn body_recipe() -> BoxedStrategy<BodyRecipe> {
    let mutation = prop_oneof![
        1 => TEXT_DAMAGE.mutation().prop_map(Mutation::Text),
        3 => json_mutation().prop_map(Mutation::Json),
    ];
    prop_oneof![
        4 => (any::<Index>(), prop::collection::vec(mutation, 0..3))
            .prop_map(|(body, mutations)| BodyRecipe::Valid(body, mutations)),
        3 => json_tree().prop_map(BodyRecipe::Tree),
        1 => prop_oneof![
            prop::collection::vec(any::<u8>(), 0..48),
            "\\PC{0,48}".prop_map(String::into_bytes),
            "[ \t\r\n]{0,4}".prop_map(String::into_bytes),
        ]
        .prop_map(BodyRecipe::Bytes),
    ]
    .boxed()
}

fn build_body(recipe: &BodyRecipe) -> Vec<u8> {
    match recipe {
        BodyRecipe::Valid(body, mutations) => {
            let mut bytes = VALID_BODIES[body.index(VALID_BODIES.len())].as_bytes().to_vec();
            for mutation in mutations {
                match mutation {
                    Mutation::Text(mutation) => TEXT_DAMAGE.apply(&mut bytes, mutation),
                    Mutation::Json(mutation) => {
                        if let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) {
                            apply_json_mutation(&mut value, mutation);
                            bytes = serde_json::to_vec(&value).expect("a Value serialises");
                        }
                    }
                }
            }
            bytes
        }
        BodyRecipe::Tree(tree) => serde_json::to_vec(tree).expect("a Value serialises"),
        BodyRecipe::Bytes(bytes) => bytes.clone(),
    }
}

// ---------------------------------------------------------------------------------------------------------------------
// The properties
// ---------------------------------------------------------------------------------------------------------------------

/// The problem response of an error: its status and its JSON body.
fn problem_of(error: &ApiError) -> (u16, Value) {
    let response = error.error_response();
    let status = response.status().as_u16();
    let content_type = response.headers().get("content-type").and_then(|value| value.to_str().ok()).map(str::to_owned);
    assert_eq!(content_type.as_deref(), Some("application/problem+json"), "{error:?}");
    let bytes = response.into_body().try_into_bytes().unwrap_or_else(|_| panic!("a problem body is in memory"));
    (status, serde_json::from_slice(&bytes).expect("a problem is JSON"))
}

/// `parse::<T>` against what serde makes of the same JSON, and the problem
/// it answers otherwise.
fn check_parse<T: DeserializeOwned + Debug>(dto: &str, bytes: &[u8]) -> Result<(), TestCaseError> {
    let parsed = parse::<T>(bytes);
    let effective = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { bytes };
    let object = match serde_json::from_slice::<Value>(effective) {
        Ok(Value::Object(object)) => Some(object),
        _ => None,
    };
    let serde_accepts =
        object.as_ref().map(|object| serde_json::from_value::<T>(Value::Object(object.clone())).is_ok());
    match (&parsed, &object) {
        (Ok(_), None) => prop_assert!(false, "{dto}: parse accepted a body that is not a JSON object"),
        (Ok(_), Some(_)) => prop_assert_eq!(serde_accepts, Some(true), "{}: parse accepted what serde refuses", dto),
        (Err(ApiError::Malformed(_)), None) => {}
        (Err(ApiError::Validation { field, message }), Some(object)) => {
            prop_assert_eq!(serde_accepts, Some(false), "{}: parse refused what serde accepts", dto);
            check_field(dto, field, message, object)?;
        }
        (Err(error), _) => prop_assert!(
            false,
            "{dto}: {error:?} for a body that is {}a JSON object",
            if object.is_some() { "" } else { "not " }
        ),
    }
    if let Err(error) = &parsed {
        let (status, problem) = problem_of(error);
        let code = problem.get("code").and_then(Value::as_str);
        match error {
            ApiError::Malformed(_) => prop_assert_eq!((status, code), (400, Some("malformed_request"))),
            _ => {
                prop_assert_eq!((status, code), (422, Some("validation_failed")));
                let ApiError::Validation { field, .. } = error else { unreachable!("checked above") };
                prop_assert_eq!(problem.get("field").and_then(Value::as_str), Some(field.as_str()));
            }
        }
    }
    Ok(())
}

/// A refusal names a field of the body, or the missing field, or the body.
fn check_field(dto: &str, field: &str, message: &str, object: &Map<String, Value>) -> Result<(), TestCaseError> {
    if field == "body" {
        return Ok(());
    }
    let top = field.split(['.', '[']).next().unwrap_or(field);
    let named_in_message = message.contains(&format!("`{field}`"));
    prop_assert!(
        object.contains_key(top) || object.contains_key(field) || named_in_message,
        "{dto}: field {field:?} is neither in the body {object:?} nor named by {message:?}"
    );
    Ok(())
}

#[test]
fn request_body() {
    fuzz("request_body", BODY_CASES_DEFAULT, body_recipe(), |recipe| {
        let bytes = build_body(&recipe);
        check_parse::<MemberBody>("MemberBody", &bytes)?;
        check_parse::<PlanBody>("PlanBody", &bytes)?;
        check_parse::<PlanChoiceBody>("PlanChoiceBody", &bytes)?;
        check_parse::<StartSubscriptionBody>("StartSubscriptionBody", &bytes)?;
        check_parse::<CancelBody>("CancelBody", &bytes)?;
        check_parse::<GrantBody>("GrantBody", &bytes)?;
        check_parse::<DebitBody>("DebitBody", &bytes)?;
        check_parse::<UsageBody>("UsageBody", &bytes)?;
        check_parse::<ReverseBody>("ReverseBody", &bytes)?;
        check_parse::<CheckBody>("CheckBody", &bytes)?;
        check_parse::<ReserveBody>("ReserveBody", &bytes)?;
        check_parse::<SettleBody>("SettleBody", &bytes)?;
        check_parse::<EmptyBody>("EmptyBody", &bytes)?;
        check_parse::<ClockBody>("ClockBody", &bytes)?;
        Ok(())
    });
}

/// The same JSON with every object's keys in reverse order.
fn reversed_keys(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let members: Vec<String> = map
                .iter()
                .rev()
                .map(|(key, value)| format!("{}:{}", Value::from(key.as_str()), reversed_keys(value)))
                .collect();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(reversed_keys).collect::<Vec<_>>().join(",")),
        leaf => leaf.to_string(),
    }
}

#[test]
fn request_fingerprint() {
    let strategy = (json_tree(), body_recipe(), prop::sample::select(&["POST", "PUT"][..]), "/v1/[a-z/{}0-9]{0,20}");
    fuzz("request_fingerprint", FINGERPRINT_CASES_DEFAULT, strategy, |(tree, recipe, method, path)| {
        let compact = serde_json::to_vec(&tree).unwrap();
        let expected = fingerprint(method, &path, &compact);
        prop_assert_eq!(fingerprint(method, &path, &serde_json::to_vec_pretty(&tree).unwrap()), expected);
        prop_assert_eq!(fingerprint(method, &path, reversed_keys(&tree).as_bytes()), expected);
        prop_assert_eq!(fingerprint(method, &path, b" \n"), fingerprint(method, &path, b"{}"));
        // Any bytes at all: no panic, and the same bytes give the same fingerprint.
        let bytes = build_body(&recipe);
        prop_assert_eq!(fingerprint(method, &path, &bytes), fingerprint(method, &path, &bytes));
        Ok(())
    });
}

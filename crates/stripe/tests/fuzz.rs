//! Fuzz targets for the bytes a webhook request brings: the
//! `Stripe-Signature` header, the signature check over the raw body, and the
//! event body itself through [`tally_stripe::parse`] and [`tally_stripe::map`].
//!
//! cargo-fuzz needs a nightly toolchain, so these are proptest runs driven by
//! a fixed seed: CI runs each target briefly and gets the same cases every
//! time, and a long run explores further with a seed of its own:
//!
//! ```text
//! TALLY_FUZZ_CASES=1000000 TALLY_FUZZ_SEED=$RANDOM \
//!     cargo test --release -p tally-stripe --test fuzz -- --nocapture
//! ```
//!
//! - `TALLY_FUZZ_CASES`: cases per target; 20,000 by default for the
//!   signature targets and 5,000 for event parsing (each case runs
//!   async-stripe's typed reader over a body of several kilobytes), about a
//!   second each in a debug build.
//! - `TALLY_FUZZ_SEED`: a u64, decimal or `0x` hex; 0x7a117a11 by default.
//!   A failure names its seed and the shrunk input; the same seed and case
//!   count reproduce it.
//!
//! Each target ends by printing `fuzz <target>: <N> cases, seed <S>` on
//! stderr (shown with `--nocapture`).
//!
//! The targets:
//! - `signature_header`: random and structured headers (`t`/`v1`/`v0` and
//!   near-miss keys, repeated keys, huge and signed numbers, spaces, empty
//!   pairs, lengths around [`HEADER_BYTES_MAX`]). [`parse_header`] never
//!   panics and its outcome is the one the strict policy of
//!   `signature.rs` states, computed here from the split pairs.
//! - `signature_verify`: [`verify`] on those headers with genuine, altered
//!   and foreign signatures, any body, secret, clock and tolerance. Every
//!   refusal is one of the five reasons, and the outcome is the one the
//!   scheme states: in particular an accepted header carries a `v1` equal to
//!   `hmac_hex(secret, "{t}." ++ body)`.
//! - `event_parse`: event-shaped JSON trees, the fixtures of
//!   `fixtures/stripe/events/**` damaged as text and as JSON, and random
//!   bytes. [`parse`] never panics, refuses the envelope exactly as its
//!   documentation says, reports the envelope's own id, type and `created`,
//!   and reads an object only for the types that carry one; [`map`] never
//!   panics and ignores what it does not handle.

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::{Map, Number, Value};
use std::fmt::Debug;
use std::path::Path;
use tally_stripe::signature::{HEADER_BYTES_MAX, V1_ENTRIES_MAX, hmac_hex};
use tally_stripe::{
    EventObject, Mapped, ParseError, SignatureError, SignatureHeader, map, parse, parse_header, sign, verify,
};
use tally_testkit::fuzz::{TextDamage, TextMutation, fuzz, json_paths};

// ---------------------------------------------------------------------------------------------------------------------
// Case counts (the runner, `tally_testkit::fuzz`, reads TALLY_FUZZ_CASES and TALLY_FUZZ_SEED)
// ---------------------------------------------------------------------------------------------------------------------

const SIGNATURE_CASES_DEFAULT: u32 = 20_000;
const EVENT_CASES_DEFAULT: u32 = 5_000;

// ---------------------------------------------------------------------------------------------------------------------
// Signature headers
// ---------------------------------------------------------------------------------------------------------------------

const SIGNATURE_REASONS: [&str; 5] =
    ["missing_header", "malformed_header", "no_v1_signature", "signature_mismatch", "timestamp_outside_tolerance"];

const SECRET: &str = "whsec_test_secret";

/// Keys Stripe sends, and the near misses the strict policy must not read.
const HEADER_KEYS: &[&str] =
    &["t", "v1", "v0", " v1", "v1 ", " t", "t ", "T", "V1", "", "t1", "v2", "v1=", "=", "\u{a0}t"];

/// What one pair's value is made of; a genuine signature is computed when
/// the header is built, from the case's secret, timestamp and body.
#[derive(Clone, Debug)]
enum HeaderValue {
    /// The case's timestamp, as Stripe writes it.
    Timestamp,
    Literal(String),
    Genuine(SignatureChange),
}

#[derive(Clone, Debug)]
enum SignatureChange {
    None,
    Uppercase,
    FlipHexDigit(Index),
    Truncate(Index),
    /// Signed over other bytes: a replay of another body.
    OtherBody,
    OtherSecret,
    /// Signed at another timestamp than the header's `t`.
    OtherTimestamp(i64),
    Padded,
}

fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_owned()),
        Just("-0".to_owned()),
        Just("+5".to_owned()),
        Just("1767225600".to_owned()),
        Just(i64::MIN.to_string()),
        Just(i64::MAX.to_string()),
        Just("9223372036854775808".to_owned()),
        Just("-9223372036854775809".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("1e3".to_owned()),
        Just("1.5".to_owned()),
        Just(" 1".to_owned()),
        Just("1 ".to_owned()),
        Just("٣".to_owned()),
        any::<i64>().prop_map(|number| number.to_string()),
    ]
}

fn signature_change() -> BoxedStrategy<SignatureChange> {
    prop_oneof![
        6 => Just(SignatureChange::None),
        1 => Just(SignatureChange::Uppercase),
        1 => any::<Index>().prop_map(SignatureChange::FlipHexDigit),
        1 => any::<Index>().prop_map(SignatureChange::Truncate),
        1 => Just(SignatureChange::OtherBody),
        1 => Just(SignatureChange::OtherSecret),
        1 => any::<i64>().prop_map(SignatureChange::OtherTimestamp),
        1 => Just(SignatureChange::Padded),
    ]
    .boxed()
}

fn any_header_value() -> BoxedStrategy<HeaderValue> {
    prop_oneof![
        1 => Just(HeaderValue::Timestamp),
        1 => signature_change().prop_map(HeaderValue::Genuine),
        2 => number_text().prop_map(HeaderValue::Literal),
        1 => "[0-9a-f]{64}".prop_map(HeaderValue::Literal),
        1 => "[ -~]{0,12}".prop_map(HeaderValue::Literal),
        1 => "\\PC{0,8}".prop_map(HeaderValue::Literal),
    ]
    .boxed()
}

#[derive(Clone, Debug)]
struct HeaderPair {
    key: String,
    value: HeaderValue,
    /// A piece without `=` instead of `key=value`.
    bare: bool,
}

/// Mostly what Stripe sends (`t` with the timestamp, `v1` with a signature),
/// sometimes a near miss.
fn header_pair() -> BoxedStrategy<HeaderPair> {
    let pair = prop_oneof![
        4 => prop_oneof![9 => Just(HeaderValue::Timestamp), 1 => any_header_value()]
            .prop_map(|value| ("t".to_owned(), value)),
        4 => prop_oneof![
            9 => signature_change().prop_map(HeaderValue::Genuine),
            1 => any_header_value(),
        ]
        .prop_map(|value| ("v1".to_owned(), value)),
        1 => (prop::sample::select(HEADER_KEYS).prop_map(str::to_owned), any_header_value()),
        1 => ("[a-z0-9 ]{0,3}", any_header_value()),
    ];
    (pair, prop::bool::weighted(0.02)).prop_map(|((key, value), bare)| HeaderPair { key, value, bare }).boxed()
}

/// How a header is made: from pairs, or from nothing but random text.
#[derive(Clone, Debug)]
enum HeaderRecipe {
    Pairs {
        /// The `t` pair and where it goes among the others (Stripe puts it first).
        timestamp: Option<(Index, HeaderValue)>,
        pairs: Vec<HeaderPair>,
        /// Separators other than `,` at some joins.
        separators: Vec<(Index, &'static str)>,
        /// Grows the header with an ignored `x=` pair to this many bytes
        /// around [`HEADER_BYTES_MAX`].
        length_near_max: Option<i8>,
    },
    Text(String),
}

fn header_recipe() -> BoxedStrategy<HeaderRecipe> {
    let timestamp = prop::option::weighted(
        0.9,
        (any::<Index>(), prop_oneof![9 => Just(HeaderValue::Timestamp), 1 => any_header_value()]),
    );
    let pairs = prop_oneof![
        4 => prop::collection::vec(header_pair(), 1..3),
        1 => prop::collection::vec(header_pair(), 0..(V1_ENTRIES_MAX + 4)),
    ];
    let separator = (any::<Index>(), prop::sample::select(&[", ", ",,", ";", " ,", "\n"][..]));
    let separators = prop_oneof![9 => Just(Vec::new()), 1 => prop::collection::vec(separator, 1..3)];
    let recipe = (timestamp, pairs, separators, prop::option::weighted(0.05, -2i8..=2)).prop_map(
        |(timestamp, pairs, separators, length_near_max)| HeaderRecipe::Pairs {
            timestamp,
            pairs,
            separators,
            length_near_max,
        },
    );
    prop_oneof![
        12 => recipe,
        1 => "\\PC{0,40}".prop_map(HeaderRecipe::Text),
        1 => "[tv01=, a-f]{0,40}".prop_map(HeaderRecipe::Text),
        1 => any::<String>().prop_map(HeaderRecipe::Text),
    ]
    .boxed()
}

/// The inputs of one signature check.
#[derive(Clone, Debug)]
struct SignedRequest {
    secret: String,
    body: Vec<u8>,
    timestamp: i64,
    header: HeaderRecipe,
}

fn timestamp() -> impl Strategy<Value = i64> {
    prop_oneof![Just(1_767_225_600i64), Just(0), Just(-1), Just(i64::MIN), Just(i64::MAX), any::<i64>()]
}

fn signed_request() -> BoxedStrategy<SignedRequest> {
    let secret = prop_oneof![
        4 => Just(SECRET.to_owned()),
        1 => Just(String::new()),
        1 => Just("é".to_owned()),
        1 => "\\PC{0,70}",
    ];
    let body = prop_oneof![
        Just(br#"{"id":"evt_1","object":"event"}"#.to_vec()),
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..64),
    ];
    (secret, body, timestamp(), header_recipe())
        .prop_map(|(secret, body, timestamp, header)| SignedRequest { secret, body, timestamp, header })
        .boxed()
}

fn signature_of(request: &SignedRequest, change: &SignatureChange) -> String {
    let genuine = |secret: &str, timestamp: i64, body: &[u8]| {
        let header = sign(body, secret, timestamp);
        header.split_once(",v1=").expect("sign writes t=…,v1=…").1.to_owned()
    };
    let signature = genuine(&request.secret, request.timestamp, &request.body);
    match change {
        SignatureChange::None => signature,
        SignatureChange::Uppercase => signature.to_uppercase(),
        SignatureChange::FlipHexDigit(at) => {
            let mut digits = signature.into_bytes();
            let at = at.index(digits.len());
            digits[at] = if digits[at] == b'0' { b'1' } else { b'0' };
            String::from_utf8(digits).expect("hex is ASCII")
        }
        SignatureChange::Truncate(at) => signature[..at.index(signature.len())].to_owned(),
        SignatureChange::OtherBody => {
            let mut body = request.body.clone();
            body.push(b' ');
            genuine(&request.secret, request.timestamp, &body)
        }
        SignatureChange::OtherSecret => genuine(&format!("{}x", request.secret), request.timestamp, &request.body),
        SignatureChange::OtherTimestamp(timestamp) => genuine(&request.secret, *timestamp, &request.body),
        SignatureChange::Padded => format!(" {signature}"),
    }
}

fn build_header(request: &SignedRequest) -> String {
    let (timestamp, pairs, separators, length_near_max) = match &request.header {
        HeaderRecipe::Text(text) => return text.clone(),
        HeaderRecipe::Pairs { timestamp, pairs, separators, length_near_max } => {
            (timestamp, pairs, separators, length_near_max)
        }
    };
    let value_text = |value: &HeaderValue| match value {
        HeaderValue::Timestamp => request.timestamp.to_string(),
        HeaderValue::Literal(text) => text.clone(),
        HeaderValue::Genuine(change) => signature_of(request, change),
    };
    let mut pieces: Vec<String> = pairs
        .iter()
        .map(|pair| {
            let value = value_text(&pair.value);
            if pair.bare { format!("{}{value}", pair.key) } else { format!("{}={value}", pair.key) }
        })
        .collect();
    if let Some((at, value)) = timestamp {
        pieces.insert(at.index(pieces.len() + 1), format!("t={}", value_text(value)));
    }
    if let Some(offset) = length_near_max {
        let length: usize = pieces.iter().map(String::len).sum::<usize>() + pieces.len();
        let wanted = (HEADER_BYTES_MAX as i64 + i64::from(*offset)) as usize;
        // `x=` and its separator take three bytes.
        pieces.push(format!("x={}", "a".repeat(wanted.saturating_sub(length + 2))));
    }
    let mut joins = vec![","; pieces.len().saturating_sub(1)];
    for (at, separator) in separators {
        if !joins.is_empty() {
            let at = at.index(joins.len());
            joins[at] = separator;
        }
    }
    let mut header = pieces.first().cloned().unwrap_or_default();
    for (join, piece) in joins.iter().zip(pieces.iter().skip(1)) {
        header.push_str(join);
        header.push_str(piece);
    }
    header
}

/// The outcome the strict policy states for a header: split on `,` without
/// trimming, each pair at its first `=`, the last `t` wins but every `t` must
/// be an integer, `v1` entries kept in order up to the limit.
fn expected_header(header: &str) -> Result<SignatureHeader, &'static str> {
    if header.len() > HEADER_BYTES_MAX {
        return Err("malformed_header");
    }
    let pairs: Option<Vec<(&str, &str)>> = header.split(',').map(|pair| pair.split_once('=')).collect();
    let pairs = pairs.ok_or("malformed_header")?;
    let timestamps: Option<Vec<i64>> =
        pairs.iter().filter(|(key, _)| *key == "t").map(|(_, value)| value.parse().ok()).collect();
    let timestamps = timestamps.ok_or("malformed_header")?;
    let v1: Vec<String> = pairs.iter().filter(|(key, _)| *key == "v1").map(|(_, value)| (*value).to_owned()).collect();
    if v1.len() > V1_ENTRIES_MAX {
        return Err("malformed_header");
    }
    let timestamp = *timestamps.last().ok_or("malformed_header")?;
    if v1.is_empty() {
        return Err("no_v1_signature");
    }
    Ok(SignatureHeader { timestamp, v1 })
}

fn reason_of<T>(result: &Result<T, SignatureError>) -> Result<&T, &'static str> {
    result.as_ref().map_err(SignatureError::reason)
}

#[test]
fn signature_header() {
    fuzz("signature_header", SIGNATURE_CASES_DEFAULT, signed_request(), |request| {
        let header = build_header(&request);
        let parsed = parse_header(&header);
        if let Err(error) = &parsed {
            prop_assert!(SIGNATURE_REASONS.contains(&error.reason()), "{error:?}");
            // Parsing alone can only find the header malformed or without v1.
            prop_assert!(
                matches!(error, SignatureError::MalformedHeader(_) | SignatureError::NoV1Signature),
                "{error:?}"
            );
        }
        let expected = expected_header(&header);
        prop_assert_eq!(reason_of(&parsed), expected.as_ref().map_err(|reason| *reason));
        Ok(())
    });
}

#[derive(Clone, Debug)]
struct VerifyCase {
    request: SignedRequest,
    /// `now` as a distance from the request's timestamp, or as an instant.
    now: Now,
    tolerance_s: Option<i64>,
    /// Sends no header at all, or an empty one.
    header_missing: Option<bool>,
}

#[derive(Clone, Debug)]
enum Now {
    After(i64),
    At(i64),
}

fn verify_case() -> BoxedStrategy<VerifyCase> {
    let now = prop_oneof![
        4 => prop_oneof![Just(0i64), Just(300), Just(-300), Just(301), Just(-301), -600i64..600].prop_map(Now::After),
        1 => timestamp().prop_map(Now::At),
    ];
    let tolerance = prop_oneof![
        3 => Just(Some(300i64)),
        1 => Just(None),
        1 => prop_oneof![Just(0i64), Just(-1), Just(i64::MAX), Just(i64::MIN), any::<i64>()].prop_map(Some),
    ];
    (signed_request(), now, tolerance, prop::option::weighted(0.03, any::<bool>()))
        .prop_map(|(request, now, tolerance_s, header_missing)| VerifyCase {
            request,
            now,
            tolerance_s,
            header_missing,
        })
        .boxed()
}

#[test]
fn signature_verify() {
    fuzz("signature_verify", SIGNATURE_CASES_DEFAULT, verify_case(), |case| {
        let request = &case.request;
        let built = build_header(request);
        let header = match case.header_missing {
            Some(true) => None,
            Some(false) => Some(""),
            None => Some(built.as_str()),
        };
        let now = match case.now {
            Now::After(seconds) => request.timestamp.saturating_add(seconds),
            Now::At(now) => now,
        };
        let verified = verify(header, &request.body, &request.secret, now, case.tolerance_s);
        if let Err(error) = &verified {
            prop_assert!(SIGNATURE_REASONS.contains(&error.reason()), "{error:?}");
        }

        // The outcome the scheme states, from the header's parts and the HMAC primitive.
        let expected = match header {
            None | Some("") => Err(SignatureError::MissingHeader),
            Some(header) => parse_header(header).and_then(|parsed| {
                let mut message = format!("{}.", parsed.timestamp).into_bytes();
                message.extend_from_slice(&request.body);
                let signature = hmac_hex(&request.secret, &message);
                if !parsed.v1.contains(&signature) {
                    return Err(SignatureError::SignatureMismatch);
                }
                match case.tolerance_s {
                    Some(tolerance)
                        if (i128::from(now) - i128::from(parsed.timestamp)).abs() > i128::from(tolerance) =>
                    {
                        Err(SignatureError::TimestampOutsideTolerance { timestamp: parsed.timestamp, now, tolerance })
                    }
                    _ => Ok(parsed),
                }
            }),
        };
        prop_assert_eq!(&verified, &expected);

        // Whatever was verified was signed with this secret over these bytes.
        if let Ok(parsed) = &verified {
            let mut message = format!("{}.", parsed.timestamp).into_bytes();
            message.extend_from_slice(&request.body);
            prop_assert!(parsed.v1.contains(&hmac_hex(&request.secret, &message)));
        }
        // And a header made by `sign` always verifies without a tolerance.
        let signed = sign(&request.body, &request.secret, request.timestamp);
        prop_assert!(verify(Some(&signed), &request.body, &request.secret, now, None).is_ok());
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------------------------------
// Event bodies
// ---------------------------------------------------------------------------------------------------------------------

const SUBSCRIPTION_TYPES: [&str; 3] =
    ["customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted"];
const REQUIRED_INVOICE_TYPES: [&str; 3] = ["invoice.finalized", "invoice.paid", "invoice.payment_failed"];
const CHECKOUT_TYPE: &str = "checkout.session.completed";

const EVENT_TYPES: &[&str] = &[
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.finalized",
    "invoice.paid",
    "invoice.payment_failed",
    "invoice.updated",
    "invoice.upcoming",
    "invoice.created",
    "checkout.session.completed",
    "checkout.session.expired",
    "customer.updated",
    "charge.succeeded",
    "",
    "invoice.",
    "v2.core.event",
];

/// The keys of events and of the objects tally reads.
const STRIPE_KEYS: &[&str] = &[
    "id",
    "object",
    "type",
    "created",
    "livemode",
    "api_version",
    "data",
    "previous_attributes",
    "customer",
    "subscription",
    "status",
    "items",
    "lines",
    "price",
    "plan",
    "current_period_start",
    "current_period_end",
    "cancel_at_period_end",
    "canceled_at",
    "metadata",
    "tally_member_id",
    "tally_purchase_credits",
    "amount",
    "total",
    "amount_due",
    "amount_paid",
    "amount_total",
    "currency",
    "billing_reason",
    "parent",
    "subscription_details",
    "period",
    "start",
    "end",
    "pricing",
    "price_details",
    "proration",
    "subscription_item_details",
    "invoice_item_details",
    "description",
    "mode",
    "payment_status",
    "has_more",
    "url",
    "request",
    "pending_webhooks",
];

const STRIPE_STRINGS: &[&str] = &[
    "",
    "evt_1",
    "cus_1",
    "sub_1",
    "in_1",
    "cs_1",
    "price_1",
    "si_1",
    "il_1",
    "m1",
    "500",
    "-3",
    "active",
    "past_due",
    "canceled",
    "trialing",
    "incomplete",
    "paid",
    "unpaid",
    "open",
    "draft",
    "usd",
    "eur",
    "EUR",
    "xxx",
    "payment",
    "subscription",
    "subscription_create",
    "subscription_cycle",
    "subscription_update",
    "manual",
    "list",
    "event",
    "invoice",
    "line_item",
    "checkout.session",
    "v2.core.event",
    "2020-03-02",
    "2026-07-29.dahlia",
    "\u{0}",
];

fn stripe_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(STRIPE_STRINGS).prop_map(str::to_owned),
        2 => prop::sample::select(EVENT_TYPES).prop_map(str::to_owned),
        1 => "\\PC{0,12}",
    ]
}

fn json_number() -> BoxedStrategy<Value> {
    prop_oneof![
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(1_767_225_600),
            Just(1_769_904_000),
            Just(i64::MIN),
            Just(i64::MAX),
            Just(8_210_298_412_800),
            Just(-8_334_601_228_800),
            any::<i64>(),
        ]
        .prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        prop_oneof![Just(0.5f64), Just(1e300), Just(-0.0), any::<f64>()]
            .prop_map(|float| Number::from_f64(float).map_or(Value::Null, Value::Number)),
    ]
    .boxed()
}

fn json_leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        3 => json_number(),
        4 => stripe_string().prop_map(Value::String),
    ]
    .boxed()
}

/// Stripe-shaped trees: objects keyed by Stripe's field names, lists as
/// Stripe embeds them (`{"object":"list","data":[…]}`).
fn json_tree() -> BoxedStrategy<Value> {
    json_leaf()
        .prop_recursive(5, 64, 6, |inner| {
            prop_oneof![
                3 => prop::collection::vec((prop::sample::select(STRIPE_KEYS), inner.clone()), 0..8).prop_map(|pairs| {
                    Value::Object(pairs.into_iter().map(|(key, value)| (key.to_owned(), value)).collect())
                }),
                1 => prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|items| serde_json::json!({"object": "list", "data": items, "has_more": false})),
                1 => prop::collection::vec(inner, 0..4).prop_map(Value::Array),
            ]
        })
        .boxed()
}

/// An envelope that passes the envelope checks most of the time, around a
/// random object.
fn event_tree() -> BoxedStrategy<Value> {
    (
        prop_oneof![4 => stripe_string().prop_map(Value::String), 1 => json_leaf()],
        prop_oneof![4 => prop::sample::select(EVENT_TYPES).prop_map(Value::from), 1 => json_leaf()],
        prop_oneof![4 => json_number(), 1 => json_leaf()],
        prop::option::of(json_leaf()),
        prop::option::of(json_leaf()),
        json_tree(),
    )
        .prop_map(|(id, event_type, created, livemode, api_version, object)| {
            let mut root = Map::new();
            root.insert("id".into(), id);
            root.insert("object".into(), "event".into());
            root.insert("type".into(), event_type);
            root.insert("created".into(), created);
            if let Some(livemode) = livemode {
                root.insert("livemode".into(), livemode);
            }
            if let Some(api_version) = api_version {
                root.insert("api_version".into(), api_version);
            }
            root.insert("data".into(), serde_json::json!({ "object": object }));
            Value::Object(root)
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
    "true",
    "-",
    "1e400",
    "\\",
    "\\ud800",
    // Repeated envelope keys: the typed reader and the raw JSON must agree on which one counts.
    "\"id\":\"evt_dup\",",
    "\"type\":\"invoice.paid\",",
    "\"created\":1,",
    "\"created\":-1,",
    "\"object\":\"v2.core.event\",",
    "\"customer\":\"cus_dup\",",
    "\u{0}",
];

const NUMBER_REPLACEMENTS: &[&str] = &[
    "0",
    "-1",
    "1.5",
    "1e3",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "18446744073709551616",
    "8210298412800",
    "-8334601228801",
    "00",
];

/// Damage to Stripe bodies. Key tokens go right after an opening brace:
/// repeated keys, on which the typed reader and the raw JSON must agree.
const TEXT_DAMAGE: TextDamage =
    TextDamage { tokens: JSON_TOKENS, numbers: NUMBER_REPLACEMENTS, keys_after_braces: true };

/// Damage that keeps the body JSON: the shapes other API versions, other
/// event types or a hostile signer with the secret could send.
#[derive(Clone, Debug)]
enum JsonMutation {
    Remove(Index),
    Replace(Index, Value),
    /// Replaces a string, number or boolean with another of its kind.
    ReplaceLeaf(Index, String, Value),
    SetType(&'static str),
}

fn json_mutation() -> BoxedStrategy<JsonMutation> {
    prop_oneof![
        2 => any::<Index>().prop_map(JsonMutation::Remove),
        2 => (any::<Index>(), json_tree()).prop_map(|(at, value)| JsonMutation::Replace(at, value)),
        4 => (any::<Index>(), stripe_string(), json_number())
            .prop_map(|(at, text, number)| JsonMutation::ReplaceLeaf(at, text, number)),
        1 => prop::sample::select(EVENT_TYPES).prop_map(JsonMutation::SetType),
    ]
    .boxed()
}

fn apply_json_mutation(root: &mut Value, mutation: &JsonMutation) {
    if let JsonMutation::SetType(event_type) = mutation {
        if let Value::Object(map) = root {
            map.insert("type".to_owned(), Value::from(*event_type));
        }
        return;
    }
    let mut paths = Vec::new();
    json_paths(root, "", &mut paths);
    if let JsonMutation::ReplaceLeaf(..) = mutation {
        paths.retain(|path| matches!(root.pointer(path), Some(Value::String(_) | Value::Number(_) | Value::Bool(_))));
    }
    if paths.is_empty() {
        return;
    }
    match mutation {
        JsonMutation::Replace(at, value) => {
            *root.pointer_mut(&paths[at.index(paths.len())]).expect("a listed path") = value.clone();
        }
        JsonMutation::ReplaceLeaf(at, text, number) => {
            let leaf = root.pointer_mut(&paths[at.index(paths.len())]).expect("a listed path");
            *leaf = match leaf {
                Value::String(_) => Value::String(text.clone()),
                Value::Number(_) => number.clone(),
                Value::Bool(flag) => Value::Bool(!*flag),
                _ => unreachable!("only leaves were kept"),
            };
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
        JsonMutation::SetType(_) => unreachable!("handled above"),
    }
}

#[derive(Clone, Debug)]
enum Mutation {
    Text(TextMutation),
    Json(JsonMutation),
}

fn mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![1 => TEXT_DAMAGE.mutation().prop_map(Mutation::Text), 2 => json_mutation().prop_map(Mutation::Json)]
        .boxed()
}

fn apply_mutations(body: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut body = body.to_vec();
    for mutation in mutations {
        match mutation {
            Mutation::Text(mutation) => TEXT_DAMAGE.apply(&mut body, mutation),
            Mutation::Json(mutation) => {
                if let Ok(mut value) = serde_json::from_slice::<Value>(&body) {
                    apply_json_mutation(&mut value, mutation);
                    body = serde_json::to_vec(&value).expect("a Value serialises");
                }
            }
        }
    }
    body
}

/// How a body is made.
#[derive(Clone, Debug)]
enum BodyRecipe {
    Fixture(Index, Vec<Mutation>),
    Tree(Value, Vec<Mutation>),
    Bytes(Vec<u8>),
}

fn body_recipe() -> BoxedStrategy<BodyRecipe> {
    prop_oneof![
        4 => (any::<Index>(), prop::collection::vec(mutation(), 0..4))
            .prop_map(|(fixture, mutations)| BodyRecipe::Fixture(fixture, mutations)),
        3 => (event_tree(), prop::collection::vec(mutation(), 0..2))
            .prop_map(|(tree, mutations)| BodyRecipe::Tree(tree, mutations)),
        1 => prop_oneof![prop::collection::vec(any::<u8>(), 0..64), "\\PC{0,64}".prop_map(String::into_bytes)]
            .prop_map(BodyRecipe::Bytes),
    ]
    .boxed()
}

fn event_fixtures(directory: &Path, found: &mut Vec<Vec<u8>>) {
    let mut entries: Vec<_> = std::fs::read_dir(directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            event_fixtures(&path, found);
        } else if path.extension().is_some_and(|extension| extension == "json") {
            found.push(std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display())));
        }
    }
}

/// The envelope refusal `parse` documents, from the raw JSON.
fn expected_envelope_error(body: &[u8]) -> Option<&'static str> {
    let Ok(Value::Object(root)) = serde_json::from_slice::<Value>(body) else {
        return Some("invalid_json");
    };
    if root.get("object").and_then(Value::as_str) == Some("v2.core.event") {
        return Some("not_a_v1_event");
    }
    let missing = root.get("id").and_then(Value::as_str).is_none()
        || root.get("type").and_then(Value::as_str).is_none()
        || root.get("created").and_then(Value::as_i64).is_none();
    missing.then_some("missing_field")
}

fn check_event(body: &[u8]) -> Result<(), TestCaseError> {
    let parsed = parse(body);
    let envelope_error = expected_envelope_error(body);
    let root = serde_json::from_slice::<Value>(body).ok();
    let field = |key: &str| root.as_ref().and_then(|root| root.get(key)).cloned();
    let event_type = field("type").and_then(|value| value.as_str().map(str::to_owned)).unwrap_or_default();
    let event_type = event_type.as_str();
    let carries_object = SUBSCRIPTION_TYPES.contains(&event_type)
        || REQUIRED_INVOICE_TYPES.contains(&event_type)
        || event_type == CHECKOUT_TYPE;
    match &parsed {
        Err(error) => {
            let reason = error.reason();
            prop_assert!(
                ["invalid_json", "missing_field", "not_a_v1_event", "unreadable_object"].contains(&reason),
                "{error:?}"
            );
            match error {
                ParseError::UnreadableObject { event_id, event_type: named_type, .. } => {
                    prop_assert_eq!(envelope_error, None);
                    prop_assert_eq!(Some(Value::from(event_id.as_str())), field("id"));
                    prop_assert_eq!(named_type.as_str(), event_type);
                    prop_assert!(carries_object, "{event_type} has no object tally must read");
                }
                _ => prop_assert_eq!(Some(reason), envelope_error),
            }
        }
        Ok(event) => {
            prop_assert_eq!(envelope_error, None);
            // The facts name the envelope's own event, whichever reader ran.
            prop_assert_eq!(Some(Value::from(event.id.as_str())), field("id"), "id, read by {:?}", event.parsed_by);
            prop_assert_eq!(event.event_type.as_str(), event_type, "type, read by {:?}", event.parsed_by);
            prop_assert_eq!(
                Some(event.created),
                field("created").and_then(|created| created.as_i64()),
                "created, read by {:?}",
                event.parsed_by
            );
            prop_assert_eq!(
                event.livemode,
                field("livemode").and_then(|livemode| livemode.as_bool()).unwrap_or(false),
                "livemode, read by {:?}",
                event.parsed_by
            );
            match &event.object {
                EventObject::Subscription(_) => prop_assert!(SUBSCRIPTION_TYPES.contains(&event_type)),
                EventObject::Invoice(_) => prop_assert!(event_type.starts_with("invoice.")),
                EventObject::CheckoutSession(_) => prop_assert!(event_type.starts_with("checkout.session.")),
                EventObject::Charge(_) => prop_assert_eq!(event_type, "charge.refunded"),
                EventObject::Refund(_) => {
                    prop_assert!(event_type == "refund.created" || event_type == "refund.updated")
                }
                EventObject::CreditNote(_) => prop_assert_eq!(event_type, "credit_note.created"),
                EventObject::Other => prop_assert!(!carries_object, "{event_type} read without its object"),
            }
            check_mapping(event)?;
        }
    }
    Ok(())
}

fn check_mapping(event: &tally_stripe::ParsedEvent) -> Result<(), TestCaseError> {
    let mapped = map(event);
    match (&event.object, &mapped) {
        (EventObject::Other, Mapped::Ignored { .. }) => {}
        (EventObject::Other, other) => prop_assert!(false, "an event tally does not read mapped to {other:?}"),
        (EventObject::Subscription(facts), Mapped::Command { customer_id, member_hint, .. }) => {
            prop_assert_eq!(customer_id.as_ref(), Some(&facts.customer));
            prop_assert_eq!(member_hint.as_ref(), facts.metadata.get("tally_member_id"));
        }
        (_, Mapped::Ignored { reason } | Mapped::Unprocessed { reason }) => prop_assert!(!reason.is_empty()),
        (_, Mapped::Command { .. }) => {}
    }
    Ok(())
}

#[test]
fn event_parse() {
    let mut fixtures = Vec::new();
    event_fixtures(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/stripe/events"), &mut fixtures);
    assert!(fixtures.len() >= 16, "the event fixtures were not found");
    fuzz("event_parse", EVENT_CASES_DEFAULT, body_recipe(), |recipe| {
        let body = match &recipe {
            BodyRecipe::Fixture(fixture, mutations) => {
                apply_mutations(&fixtures[fixture.index(fixtures.len())], mutations)
            }
            BodyRecipe::Tree(tree, mutations) => apply_mutations(&serde_json::to_vec(tree).unwrap(), mutations),
            BodyRecipe::Bytes(bytes) => bytes.clone(),
        };
        check_event(&body)
    });
}

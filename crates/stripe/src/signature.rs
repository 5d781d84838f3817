//! `Stripe-Signature` verification over the raw request body.
//!
//! Verification is kept apart from parsing (DESIGN §8): a genuine event that tally cannot type must still be
//! recognised as genuine, and a forged one must be refused before any of its bytes are interpreted. The scheme, its
//! edge cases and the vectors this module is tested against are in `fixtures/stripe/signature-cases.md`.
//!
//! The policy is the strict one those vectors call `expect`:
//! - the header is split on `,` without trimming, each pair at its first `=`; only `t` and `v1` are read;
//! - the body is accepted when **any** `v1` equals the expected lowercase hex digest (Stripe sends two during a
//!   secret roll), compared as strings in constant time, so uppercase hex is a mismatch;
//! - the timestamp check is two-sided (a timestamp too far in the future is refused like one too old) and runs after
//!   the signature check, so an unsigned request never learns whether its timestamp was acceptable.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};

/// Replay window in seconds, the value every Stripe SDK uses.
pub const DEFAULT_TOLERANCE_S: i64 = 300;

/// Longest `Stripe-Signature` header accepted. Stripe's own headers are about 150 bytes (one `t`, one or two `v1`, an
/// optional `v0`); the bound keeps a hostile header from costing more than a few hashes' worth of work.
pub const HEADER_BYTES_MAX: usize = 8 * 1024;

/// Most `v1` entries accepted in one header. Stripe sends two at most, during a secret roll; each entry costs one
/// constant-time comparison, so the bound caps the work a hostile header can ask for.
pub const V1_ENTRIES_MAX: usize = 16;

/// The parts of a `Stripe-Signature` header that verification reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureHeader {
    /// Unix seconds at which Stripe signed the payload; part of the signed message.
    pub timestamp: i64,
    /// Every `v1` candidate in header order, verbatim (not validated as hex).
    pub v1: Vec<String>,
}

/// Why a webhook request was refused. Every variant is answered with HTTP 400 and never retried by tally; Stripe
/// retries on its side, which heals a clock skew or a secret being rolled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header, or an empty one: the request did not come from Stripe.
    #[error("missing Stripe-Signature header")]
    MissingHeader,
    /// The header is not `t=<int>,v1=<hex>…`, or is beyond [`HEADER_BYTES_MAX`] / [`V1_ENTRIES_MAX`].
    #[error("malformed Stripe-Signature header: {0}")]
    MalformedHeader(String),
    /// The header is well formed but carries no `v1` entry (only `v0` or unknown schemes).
    #[error("no v1 signature in Stripe-Signature header")]
    NoV1Signature,
    /// No `v1` entry matches: wrong secret, altered body or altered timestamp. Log it; it may be an attack or a
    /// misconfigured secret.
    #[error("no v1 signature matches the payload")]
    SignatureMismatch,
    /// The signature is genuine but `|now - timestamp|` exceeds the tolerance: a replay, or a clock out of sync.
    #[error("timestamp {timestamp} is more than {tolerance} s away from now ({now})")]
    TimestampOutsideTolerance { timestamp: i64, now: i64, tolerance: i64 },
}

impl SignatureError {
    /// A stable, machine-readable name for metrics, logs and the vectors' `expect` values.
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::MissingHeader => "missing_header",
            SignatureError::MalformedHeader(_) => "malformed_header",
            SignatureError::NoV1Signature => "no_v1_signature",
            SignatureError::SignatureMismatch => "signature_mismatch",
            SignatureError::TimestampOutsideTolerance { .. } => "timestamp_outside_tolerance",
        }
    }
}

/// Parses a `Stripe-Signature` header.
///
/// Pairs are split on `,` and are not trimmed, so `, v1=…` has the unknown key ` v1` and is ignored, as in Stripe's
/// node, python and go libraries. A repeated `t` keeps the last value (node, go); `v0` and unknown keys are ignored.
pub fn parse_header(header: &str) -> Result<SignatureHeader, SignatureError> {
    if header.len() > HEADER_BYTES_MAX {
        return Err(malformed(format!("header is {} bytes, more than {HEADER_BYTES_MAX}", header.len())));
    }
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for pair in header.split(',') {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(malformed("a pair has no '='".to_owned()));
        };
        match key {
            "t" => {
                let parsed = value.parse::<i64>().map_err(|_| malformed("t is not an integer".to_owned()))?;
                timestamp = Some(parsed);
            }
            "v1" => {
                if v1.len() == V1_ENTRIES_MAX {
                    return Err(malformed(format!("more than {V1_ENTRIES_MAX} v1 entries")));
                }
                v1.push(value.to_owned());
            }
            _ => {}
        }
    }
    let Some(timestamp) = timestamp else {
        return Err(malformed("no t".to_owned()));
    };
    if v1.is_empty() {
        return Err(SignatureError::NoV1Signature);
    }
    Ok(SignatureHeader { timestamp, v1 })
}

/// Verifies `header` against the raw `body` with the endpoint `secret` (the whole `whsec_…` string).
///
/// Checks run in the order of Stripe's SDKs: header, then signature, then timestamp. `now` is passed in so that the
/// check is deterministic; `tolerance_s` of `None` disables the timestamp check (for replaying stored events), and a
/// difference of exactly the tolerance passes.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secret: &str,
    now: i64,
    tolerance_s: Option<i64>,
) -> Result<SignatureHeader, SignatureError> {
    let header = match header {
        None | Some("") => return Err(SignatureError::MissingHeader),
        Some(header) => header,
    };
    let parsed = parse_header(header)?;

    let expected = expected_v1(secret, parsed.timestamp, body);
    // Every candidate is compared, without stopping at the first match, so the time taken says nothing about which
    // entry matched.
    let matched = parsed
        .v1
        .iter()
        .fold(Choice::from(0), |matched, candidate| matched | expected.as_bytes().ct_eq(candidate.as_bytes()));
    if !bool::from(matched) {
        return Err(SignatureError::SignatureMismatch);
    }

    if let Some(tolerance) = tolerance_s {
        // i128 so that hostile timestamps such as i64::MIN cannot overflow the difference.
        let distance = (i128::from(now) - i128::from(parsed.timestamp)).abs();
        if distance > i128::from(tolerance) {
            return Err(SignatureError::TimestampOutsideTolerance { timestamp: parsed.timestamp, now, tolerance });
        }
    }
    Ok(parsed)
}

/// Builds a `Stripe-Signature` header (`t=…,v1=…`) for `body`, as Stripe would send it. Tests and the end-to-end
/// suite sign their payloads with it.
pub fn sign(body: &[u8], secret: &str, timestamp: i64) -> String {
    format!("t={timestamp},v1={}", expected_v1(secret, timestamp, body))
}

/// Lowercase hex HMAC-SHA256 of `message` keyed with the UTF-8 bytes of `secret`: the primitive under `v1`.
pub fn hmac_hex(secret: &str, message: &[u8]) -> String {
    let mut mac = new_mac(secret);
    mac.update(message);
    hex::encode(mac.finalize().into_bytes())
}

/// The `v1` value Stripe computes: the HMAC of `"<t>." + body`, fed in pieces so the body is not copied.
fn expected_v1(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = new_mac(secret);
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn new_mac(secret: &str) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any length")
}

fn malformed(detail: String) -> SignatureError {
    SignatureError::MalformedHeader(detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use sha2::Digest;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/stripe");
    const VECTORS_COUNT: usize = 57;

    fn read_fixture(relative_path: &str) -> Vec<u8> {
        let path = format!("{FIXTURES}/{relative_path}");
        std::fs::read(&path).unwrap_or_else(|error| panic!("cannot read {path}: {error}"))
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn outcome(result: &Result<SignatureHeader, SignatureError>) -> &'static str {
        match result {
            Ok(_) => "ok",
            Err(error) => error.reason(),
        }
    }

    fn check_verify_vector(name: &str, vector: &Value) {
        let payload = match (vector.get("payload_file"), vector.get("payload_string")) {
            (Some(Value::String(file)), _) => read_fixture(file),
            (_, Some(Value::String(payload))) => payload.as_bytes().to_vec(),
            _ => panic!("{name}: no payload"),
        };
        let payload_sha256 = vector["payload_sha256"].as_str().expect("vectors carry payload_sha256");
        assert_eq!(sha256_hex(&payload), payload_sha256, "{name}: payload bytes differ from the vector's");

        let header = vector["header"].as_str();
        let secret = vector["secret"].as_str().expect("verify vectors carry a secret");
        let now = vector["now"].as_i64().expect("verify vectors carry now");
        let tolerance = match vector.get("tolerance") {
            None => Some(DEFAULT_TOLERANCE_S),
            Some(Value::Null) => None,
            Some(tolerance) => Some(tolerance.as_i64().expect("tolerance is an integer")),
        };
        let result = verify(header, &payload, secret, now, tolerance);
        assert_eq!(outcome(&result), vector["expect"].as_str().expect("expect is a string"), "{name}: {result:?}");
    }

    fn check_parse_vector(name: &str, vector: &Value) {
        let header = vector["header"].as_str().expect("parse vectors carry a header");
        let expected = &vector["expect_parsed"];
        let v1 = expected["v1"].as_array().expect("expect_parsed.v1 is an array");
        let expected = SignatureHeader {
            timestamp: expected["t"].as_i64().expect("expect_parsed.t is an integer"),
            v1: v1.iter().map(|v| v.as_str().expect("v1 entries are strings").to_owned()).collect(),
        };
        assert_eq!(parse_header(header), Ok(expected), "{name}");
    }

    fn check_hmac_vector(name: &str, vector: &Value) {
        let secret = vector["secret"].as_str().expect("hmac vectors carry a secret");
        let message = vector["message"].as_str().expect("hmac vectors carry a message");
        assert_eq!(hmac_hex(secret, message.as_bytes()), vector["expected_hex"].as_str().unwrap_or_default(), "{name}");
    }

    #[test]
    fn every_signature_vector_gives_its_expected_outcome() {
        let vectors: Value =
            serde_json::from_slice(&read_fixture("signature-vectors.json")).expect("signature-vectors.json is JSON");
        let vectors = vectors["vectors"].as_array().expect("vectors is an array");
        let mut checked_count = 0;
        for vector in vectors {
            let name = vector["name"].as_str().expect("vectors are named");
            match vector["kind"].as_str() {
                Some("verify") => check_verify_vector(name, vector),
                Some("parse_only") => check_parse_vector(name, vector),
                Some("hmac_primitive") => check_hmac_vector(name, vector),
                other => panic!("{name}: unknown kind {other:?}"),
            }
            checked_count += 1;
        }
        assert_eq!(checked_count, VECTORS_COUNT);
    }

    #[test]
    fn every_fixture_file_matches_the_manifest() {
        let manifest: Value = serde_json::from_slice(&read_fixture("manifest.json")).expect("manifest.json is JSON");
        let files = manifest["files"].as_array().expect("files is an array");
        assert!(!files.is_empty());
        for file in files {
            let path = file["file"].as_str().expect("file is a path");
            let bytes = read_fixture(path);
            assert_eq!(Some(bytes.len() as u64), file["bytes"].as_u64(), "{path}");
            assert_eq!(Some(sha256_hex(&bytes).as_str()), file["sha256"].as_str(), "{path}: bytes changed (CRLF?)");
        }
    }

    #[test]
    fn sign_produces_a_header_that_verifies() {
        let body = br#"{"id":"evt_1","object":"event"}"#;
        let header = sign(body, "whsec_test_secret", 1_767_225_600);
        let parsed = verify(Some(&header), body, "whsec_test_secret", 1_767_225_600, Some(DEFAULT_TOLERANCE_S));
        assert_eq!(parsed.map(|parsed| parsed.timestamp), Ok(1_767_225_600));
        assert_eq!(
            verify(Some(&header), body, "whsec_other", 1_767_225_600, None),
            Err(SignatureError::SignatureMismatch)
        );
    }

    #[test]
    fn a_header_longer_than_the_limit_is_malformed() {
        let header = format!("t=1,v1={}", "a".repeat(HEADER_BYTES_MAX));
        assert_eq!(parse_header(&header).map_err(|error| error.reason()), Err("malformed_header"));
        let body = b"{}";
        let result = verify(Some(&header), body, "whsec_test_secret", 1, None);
        assert_eq!(result.map_err(|error| error.reason()), Err("malformed_header"));
    }

    #[test]
    fn ten_thousand_commas_are_malformed() {
        let header = format!("t=1,v1=ab{}", ",".repeat(10_000));
        assert_eq!(parse_header(&header).map_err(|error| error.reason()), Err("malformed_header"));
        // Under the length limit, empty pairs are still pairs without '='.
        let header = format!("t=1,v1=ab{}", ",".repeat(1_000));
        assert_eq!(parse_header(&header).map_err(|error| error.reason()), Err("malformed_header"));
    }

    #[test]
    fn more_v1_entries_than_the_limit_are_malformed() {
        let body = b"{}";
        let valid = sign(body, "whsec_test_secret", 100);
        let at_limit = format!("{valid}{}", ",v1=00".repeat(V1_ENTRIES_MAX - 1));
        assert!(verify(Some(&at_limit), body, "whsec_test_secret", 100, None).is_ok());
        let over_limit = format!("{valid}{}", ",v1=00".repeat(V1_ENTRIES_MAX));
        assert_eq!(
            verify(Some(&over_limit), body, "whsec_test_secret", 100, None).map_err(|error| error.reason()),
            Err("malformed_header")
        );
    }

    #[test]
    fn extreme_timestamps_never_overflow() {
        let body = b"{}";
        for timestamp in [i64::MIN, i64::MAX, -1, 0] {
            let header = sign(body, "whsec_test_secret", timestamp);
            for now in [i64::MIN, i64::MAX, 0, 1_767_225_600] {
                let result = verify(Some(&header), body, "whsec_test_secret", now, Some(DEFAULT_TOLERANCE_S));
                let expected = if (i128::from(now) - i128::from(timestamp)).abs() <= 300 {
                    "ok"
                } else {
                    "timestamp_outside_tolerance"
                };
                assert_eq!(outcome(&result), expected, "t={timestamp} now={now}");
            }
        }
        let header = "t=-9223372036854775808,v1=00";
        assert_eq!(parse_header(header).map(|parsed| parsed.timestamp), Ok(i64::MIN));
        let result = verify(Some(header), body, "whsec_test_secret", i64::MAX, Some(i64::MAX));
        assert_eq!(outcome(&result), "signature_mismatch");
    }

    #[test]
    fn a_timestamp_beyond_i64_is_malformed() {
        for header in ["t=99999999999999999999,v1=00", "t=-99999999999999999999,v1=00", "t=1e3,v1=00", "t= 1,v1=00"] {
            assert_eq!(parse_header(header).map_err(|error| error.reason()), Err("malformed_header"), "{header}");
        }
    }

    #[test]
    fn header_parsing_follows_the_strict_policy() {
        assert_eq!(
            parse_header("t=1,t=2,v1=a,v0=b,x=y,v1=c=d"),
            Ok(SignatureHeader { timestamp: 2, v1: vec!["a".to_owned(), "c=d".to_owned()] })
        );
        assert_eq!(parse_header("t=1, v1=a"), Err(SignatureError::NoV1Signature));
        assert_eq!(parse_header("t=1"), Err(SignatureError::NoV1Signature));
        assert_eq!(parse_header("v1=a").map_err(|error| error.reason()), Err("malformed_header"));
        assert_eq!(parse_header("").map_err(|error| error.reason()), Err("malformed_header"));
        assert_eq!(verify(None, b"", "s", 0, None), Err(SignatureError::MissingHeader));
        assert_eq!(verify(Some(""), b"", "s", 0, None), Err(SignatureError::MissingHeader));
    }

    #[test]
    fn a_negative_tolerance_refuses_every_timestamp() {
        let header = sign(b"{}", "s", 10);
        assert_eq!(
            verify(Some(&header), b"{}", "s", 10, Some(-1)),
            Err(SignatureError::TimestampOutsideTolerance { timestamp: 10, now: 10, tolerance: -1 })
        );
    }
}

//! Request bodies: parsed from raw bytes so that every failure names the
//! field at fault, and fingerprinted for idempotency.

use crate::error::ApiError;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// Parse a JSON body. Syntax errors are `malformed_request`; a wrong type,
/// a missing or unknown field is `validation_failed` naming the field.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { bytes };
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|error| ApiError::Malformed(format!("the body is not valid JSON: {error}")))?;
    if !value.is_object() {
        return Err(ApiError::Malformed("the body must be a JSON object".to_owned()));
    }
    parse_value(value)
}

/// Read an already parsed JSON value (a record of a batch) as `T`; a wrong
/// type, a missing or unknown field is `validation_failed` naming the field.
pub fn parse_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner().to_string();
        let field = if path == "." { field_in_message(&inner).unwrap_or_else(|| "body".to_owned()) } else { path };
        ApiError::validation(field, inner)
    })
}

/// serde names a missing or unknown field only inside its message.
pub(crate) fn field_in_message(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let end = start + message[start..].find('`')?;
    Some(message[start..end].to_owned())
}

/// SHA-256 of method, path and canonical body (keys sorted, no whitespace),
/// so that the same request with reordered keys is the same request.
pub fn fingerprint(method: &str, path: &str, bytes: &[u8]) -> [u8; 32] {
    // An empty body is parsed as `{}`, so it is the same request.
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}".as_slice() } else { bytes };
    let canonical = serde_json::from_slice::<serde_json::Value>(bytes)
        .map(|value| value.to_string())
        .unwrap_or_else(|_| String::from_utf8_lossy(bytes).into_owned());
    let mut hasher = Sha256::new();
    hasher.update(method.as_bytes());
    hasher.update(b"\n");
    hasher.update(path.as_bytes());
    hasher.update(b"\n");
    hasher.update(canonical.as_bytes());
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        amount: i64,
        reason: Option<String>,
    }

    fn field(bytes: &[u8]) -> String {
        match parse::<Body>(bytes) {
            Err(ApiError::Validation { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn failures_name_their_field() {
        assert_eq!(field(br#"{"amount": "ten"}"#), "amount");
        assert_eq!(field(br#"{"amount": 1e30}"#), "amount");
        assert_eq!(field(br#"{"amount": 99999999999999999999}"#), "amount");
        assert_eq!(field(br#"{"reason": "x"}"#), "amount");
        assert_eq!(field(br#"{"amount": 1, "color": "red"}"#), "color");
        assert!(matches!(parse::<Body>(b"{not json"), Err(ApiError::Malformed(_))));
        assert!(matches!(parse::<Body>(b"[1]"), Err(ApiError::Malformed(_))));
        assert_eq!(parse::<Body>(br#"{"amount": 5}"#).unwrap().amount, 5);
    }

    #[test]
    fn fingerprints_ignore_key_order_and_whitespace() {
        let one = fingerprint("POST", "/v1/x", br#"{"a":1,"b":2}"#);
        assert_eq!(one, fingerprint("POST", "/v1/x", b"{ \"b\": 2, \"a\": 1 }"));
        assert_ne!(one, fingerprint("POST", "/v1/y", br#"{"a":1,"b":2}"#));
        assert_ne!(one, fingerprint("POST", "/v1/x", br#"{"a":1,"b":3}"#));
        assert_eq!(fingerprint("POST", "/v1/x", b""), fingerprint("POST", "/v1/x", b"{}"));
    }
}

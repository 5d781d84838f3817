//! Webhook signatures per the Standard Webhooks spec
//! (<https://www.standardwebhooks.com/>, "Signature scheme"): the signed
//! content is `{webhook-id}.{webhook-timestamp}.{body}`, the signature
//! HMAC-SHA256 under the endpoint's secret, base64, written `v1,<sig>`;
//! several are separated by spaces (a rotation signs with both secrets).
//! A secret is `whsec_` and the base64 of its key bytes (24 to 64 bytes;
//! tally makes 32).
//!
//! Proven against the spec's published test vector (below) so that its
//! reference libraries, in any language, verify tally's deliveries.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// The prefix of a secret's text.
pub const SECRET_PREFIX: &str = "whsec_";
/// Key bytes tally makes.
pub const SECRET_BYTES: usize = 32;
/// Key bytes a secret may have (the spec's bounds).
pub const SECRET_BYTES_MIN: usize = 24;
pub const SECRET_BYTES_MAX: usize = 64;
/// How far a receiver lets a timestamp be from its clock (the spec's
/// advice: five minutes).
pub const TOLERANCE_S: i64 = 300;

/// An endpoint's signing secret: its key bytes, zeroed when dropped, never
/// printed.
#[derive(Clone)]
pub struct Secret {
    key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Secret([redacted])")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("a secret is `whsec_` and the base64 of 24 to 64 bytes")]
    MalformedSecret,
    #[error("a header is missing or malformed: {0}")]
    MalformedHeader(&'static str),
    #[error("the timestamp is more than {TOLERANCE_S} s from now")]
    Stale,
    #[error("no signature matches")]
    NoMatch,
}

impl Secret {
    /// A new random secret of [`SECRET_BYTES`].
    pub fn generate() -> Secret {
        let mut key = Zeroizing::new(vec![0u8; SECRET_BYTES]);
        getrandom::fill(key.as_mut_slice()).expect("the operating system's random source works");
        Secret { key }
    }

    /// A secret from its text (`whsec_…`; the prefix may be left out, as
    /// the reference libraries allow).
    pub fn parse(text: &str) -> Result<Secret, SignatureError> {
        let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
        let key = Zeroizing::new(STANDARD.decode(encoded).map_err(|_| SignatureError::MalformedSecret)?);
        if !(SECRET_BYTES_MIN..=SECRET_BYTES_MAX).contains(&key.len()) {
            return Err(SignatureError::MalformedSecret);
        }
        Ok(Secret { key })
    }

    /// The text shown once to the endpoint's owner: `whsec_<base64>`.
    pub fn expose(&self) -> Zeroizing<String> {
        Zeroizing::new(format!("{SECRET_PREFIX}{}", STANDARD.encode(self.key.as_slice())))
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

/// The `webhook-signature` header of a message: one `v1,<base64>` per
/// secret, space-separated, in the order given.
pub fn sign(secrets: &[&Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| format!("v1,{}", STANDARD.encode(secret.mac(id, timestamp, body).finalize().into_bytes())))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What a receiver does: the timestamp within [`TOLERANCE_S`] of `now`,
/// and one `v1` signature of the header made by `secret` (compared in
/// constant time). Other versions are skipped, as the spec says.
pub fn verify(
    secret: &Secret,
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    if id.is_empty() {
        return Err(SignatureError::MalformedHeader("webhook-id"));
    }
    let timestamp: i64 = timestamp.trim().parse().map_err(|_| SignatureError::MalformedHeader("webhook-timestamp"))?;
    if (now - timestamp).abs() > TOLERANCE_S {
        return Err(SignatureError::Stale);
    }
    let expected = secret.mac(id, timestamp, body);
    for entry in signatures.split(' ').filter(|entry| !entry.is_empty()) {
        let Some(("v1", encoded)) = entry.split_once(',') else { continue };
        let Ok(given) = STANDARD.decode(encoded) else { continue };
        if expected.clone().verify_slice(&given).is_ok() {
            return Ok(());
        }
    }
    Err(SignatureError::NoMatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The spec's published test vector (the Standard Webhooks reference
    // libraries' tests use the same).
    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TIMESTAMP: i64 = 1_614_265_330;
    const VECTOR_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_the_specs_test_vector() {
        let secret = Secret::parse(VECTOR_SECRET).unwrap();
        assert_eq!(sign(&[&secret], VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY), VECTOR_SIGNATURE);
        let bare = Secret::parse(VECTOR_SECRET.trim_start_matches(SECRET_PREFIX)).unwrap();
        assert_eq!(sign(&[&bare], VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY), VECTOR_SIGNATURE);
        assert_eq!(secret.expose().as_str(), VECTOR_SECRET);
    }

    #[test]
    fn verifies_the_specs_test_vector_and_refuses_any_change() {
        let secret = Secret::parse(VECTOR_SECRET).unwrap();
        let at = "1614265330";
        let now = VECTOR_TIMESTAMP + 10;
        assert_eq!(verify(&secret, VECTOR_ID, at, VECTOR_SIGNATURE, VECTOR_BODY, now), Ok(()));
        let refusals = [
            verify(&secret, VECTOR_ID, at, VECTOR_SIGNATURE, br#"{"test": 2432232315}"#, now),
            verify(&secret, "msg_other", at, VECTOR_SIGNATURE, VECTOR_BODY, now),
            verify(&secret, VECTOR_ID, "1614265331", VECTOR_SIGNATURE, VECTOR_BODY, now),
            verify(&Secret::generate(), VECTOR_ID, at, VECTOR_SIGNATURE, VECTOR_BODY, now),
            verify(&secret, VECTOR_ID, at, "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", VECTOR_BODY, now),
        ];
        for refusal in refusals {
            assert_eq!(refusal, Err(SignatureError::NoMatch));
        }
        let late = VECTOR_TIMESTAMP + TOLERANCE_S + 1;
        assert_eq!(verify(&secret, VECTOR_ID, at, VECTOR_SIGNATURE, VECTOR_BODY, late), Err(SignatureError::Stale));
        assert_eq!(
            verify(&secret, VECTOR_ID, "soon", VECTOR_SIGNATURE, VECTOR_BODY, now),
            Err(SignatureError::MalformedHeader("webhook-timestamp"))
        );
    }

    #[test]
    fn during_a_rotation_both_secrets_sign_and_each_verifies() {
        let (old, new) = (Secret::parse(VECTOR_SECRET).unwrap(), Secret::generate());
        let header = sign(&[&new, &old], VECTOR_ID, VECTOR_TIMESTAMP, VECTOR_BODY);
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1], VECTOR_SIGNATURE, "the old secret's signature is the same as alone");
        for secret in [&old, &new] {
            assert_eq!(verify(secret, VECTOR_ID, "1614265330", &header, VECTOR_BODY, VECTOR_TIMESTAMP), Ok(()));
        }
    }

    #[test]
    fn secrets_are_made_random_parsed_strictly_and_never_printed() {
        let secret = Secret::generate();
        let text = secret.expose();
        assert!(text.starts_with(SECRET_PREFIX));
        assert_eq!(Secret::parse(&text).unwrap().key.len(), SECRET_BYTES);
        assert_ne!(text.as_str(), Secret::generate().expose().as_str());
        assert!(!format!("{secret:?}").contains(&text[SECRET_PREFIX.len()..]));
        for bad in ["whsec_not base64!", "whsec_c2hvcnQ=", ""] {
            assert_eq!(Secret::parse(bad).unwrap_err(), SignatureError::MalformedSecret, "{bad}");
        }
    }
}

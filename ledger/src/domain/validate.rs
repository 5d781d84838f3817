//! Small checks shared by the deciders. Each names the field it checks, so a
//! rejection tells the caller exactly what to fix.

use super::error::DomainError;
use super::limits::{ID_LENGTH_MAX, TEXT_LENGTH_MAX};

/// The punctuation an identifier may hold beside ASCII letters and digits
/// (`-` last, so that the pattern's character class reads it literally).
pub const IDENTIFIER_PUNCTUATION: &[u8] = b"_.:-";

/// [`identifier`]'s rule as a regular expression, for the OpenAPI document.
pub fn identifier_pattern() -> String {
    let punctuation: String = IDENTIFIER_PUNCTUATION.iter().map(|byte| *byte as char).collect();
    format!("^[A-Za-z0-9{punctuation}]{{1,{ID_LENGTH_MAX}}}$")
}

/// [`text`]'s rule as a regular expression: no control character (Unicode
/// `Cc`, what `char::is_control` means) and at least one that is not
/// white space. The length is stated apart.
pub const TEXT_PATTERN: &str =
    "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$";

/// Caller-chosen identifiers: 1..=128 characters of `[A-Za-z0-9_.:-]`. The
/// alphabet keeps ids safe in URLs, stream names and logs.
pub fn identifier(field: &'static str, value: &str) -> Result<(), DomainError> {
    if value.is_empty() || value.len() > ID_LENGTH_MAX {
        return Err(DomainError::invalid(field, format!("must be 1 to {ID_LENGTH_MAX} characters")));
    }
    if !value.bytes().all(|byte| byte.is_ascii_alphanumeric() || IDENTIFIER_PUNCTUATION.contains(&byte)) {
        return Err(DomainError::invalid(field, "may contain only letters, digits, '_', '-', '.' and ':'"));
    }
    Ok(())
}

/// Free text: non-blank, at most 500 characters, no control characters.
pub fn text(field: &'static str, value: &str) -> Result<(), DomainError> {
    if value.trim().is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    if value.chars().count() > TEXT_LENGTH_MAX {
        return Err(DomainError::invalid(field, format!("must be at most {TEXT_LENGTH_MAX} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(DomainError::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

pub fn currency(field: &'static str, value: &str) -> Result<(), DomainError> {
    if value.len() == 3 && value.bytes().all(|byte| byte.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(DomainError::invalid(field, "must be an ISO 4217 code such as USD"))
    }
}

/// Every name [`time_zone`] accepts (the IANA database chrono-tz ships).
pub fn time_zone_names() -> impl Iterator<Item = &'static str> {
    chrono_tz::TZ_VARIANTS.iter().map(|zone| zone.name())
}

pub fn time_zone(field: &'static str, value: &str) -> Result<(), DomainError> {
    value
        .parse::<chrono_tz::Tz>()
        .map(|_| ())
        .map_err(|_| DomainError::invalid(field, format!("unknown IANA time zone {value:?}")))
}

pub fn range(field: &'static str, value: i64, min: i64, max: i64) -> Result<(), DomainError> {
    if value < min || value > max {
        return Err(DomainError::invalid(field, format!("must be between {min} and {max}")));
    }
    Ok(())
}

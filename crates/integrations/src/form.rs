//! What each provider asks of a person: its config and credential fields
//! (name, type, required, secret, help), as `GET /v1/providers` shows them
//! for the dashboard's forms, and as [`check`] checks them before the
//! provider's own checks. One description does both, so a form cannot
//! offer a field the check refuses, nor miss one it requires.
//!
//! The check is of shape: every field known, the required ones present,
//! each of its type. What a value means (an address the guard accepts, a
//! certificate that parses) is the provider's to check after.

use crate::provider::ProviderError;
use serde_json::{Map, Value, json};

/// A provider's form.
#[derive(Debug)]
pub struct Form {
    pub provider: &'static str,
    pub title: &'static str,
    pub help: &'static str,
    pub kinds: &'static [&'static str],
    pub config: &'static [Field],
    /// The credential's shapes. The ones whose `when` holds for the config
    /// are the candidates; a credential is checked against each in turn
    /// and the first that fits is it. No candidate: no credential.
    pub credentials: &'static [CredentialForm],
    /// A config with candidates may still go without a credential (a
    /// database without a password).
    pub credential_optional: bool,
}

#[derive(Debug)]
pub struct CredentialForm {
    /// What a form calls this shape (`token`, `service_account`, …).
    pub name: &'static str,
    pub when: Option<When>,
    pub fields: &'static [Field],
}

/// A credential shape applies when a config field (a dotted path) has
/// this value; an absent field has the value `absent`.
#[derive(Debug)]
pub struct When {
    pub field: &'static str,
    pub equals: &'static str,
    pub absent: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A non-empty string of at most `max_length` characters.
    String,
    /// An `http(s)` URL (the guard checks its address after).
    Url,
    /// An integer from `min` to `max`.
    Integer,
    Boolean,
    /// One of `options`.
    Enum,
    /// PEM text.
    Pem,
    /// A string holding a JSON object (a service-account key file).
    Json,
    /// A JSON object, checked further by the provider.
    Object,
    /// A list of strings.
    List,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Url => "url",
            Kind::Integer => "integer",
            Kind::Boolean => "boolean",
            Kind::Enum => "enum",
            Kind::Pem => "pem",
            Kind::Json => "json",
            Kind::Object => "object",
            Kind::List => "list",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Field {
    pub name: &'static str,
    pub kind: Kind,
    pub required: bool,
    pub secret: bool,
    pub help: &'static str,
    /// What an absent field means, as JSON text.
    pub default: Option<&'static str>,
    pub options: &'static [&'static str],
    pub max_length: usize,
    pub min: i64,
    pub max: i64,
}

/// Strings are at most this long unless a field says otherwise.
pub const TEXT_MAX: usize = 1_024;
/// PEM and JSON key texts, at most.
pub const DOCUMENT_MAX: usize = 64 * 1024;

/// A field of `kind`: optional, not secret, until said otherwise.
pub const fn field(name: &'static str, kind: Kind, help: &'static str) -> Field {
    let max_length = match kind {
        Kind::Pem | Kind::Json => DOCUMENT_MAX,
        _ => TEXT_MAX,
    };
    Field { name, kind, required: false, secret: false, help, default: None, options: &[], max_length, min: 0, max: 0 }
}

impl Field {
    pub const fn required(mut self) -> Field {
        self.required = true;
        self
    }

    pub const fn secret(mut self) -> Field {
        self.secret = true;
        self
    }

    pub const fn default(mut self, json: &'static str) -> Field {
        self.default = Some(json);
        self
    }

    pub const fn options(mut self, options: &'static [&'static str]) -> Field {
        self.options = options;
        self
    }

    pub const fn range(mut self, min: i64, max: i64) -> Field {
        self.min = min;
        self.max = max;
        self
    }

    pub const fn max_length(mut self, max_length: usize) -> Field {
        self.max_length = max_length;
        self
    }

    fn document(&self) -> Value {
        let mut document = json!({
            "name": self.name,
            "type": self.kind.name(),
            "required": self.required,
            "secret": self.secret,
            "help": self.help,
        });
        if let Some(default) = self.default {
            document["default"] = serde_json::from_str(default).expect("a field's default is JSON");
        }
        if !self.options.is_empty() {
            document["options"] = json!(self.options);
        }
        match self.kind {
            Kind::Integer => {
                document["min"] = json!(self.min);
                document["max"] = json!(self.max);
            }
            Kind::String | Kind::Url | Kind::Pem | Kind::Json => document["max_length"] = json!(self.max_length),
            _ => {}
        }
        document
    }

    /// Checks one value; `path` names it in the refusal.
    fn check(&self, path: &str, value: &Value) -> Result<(), ProviderError> {
        let refuse = |message: String| Err(ProviderError::invalid(path, message));
        let text = value.as_str();
        let within = |text: &str| !text.is_empty() && text.chars().count() <= self.max_length;
        match self.kind {
            Kind::String | Kind::Url | Kind::Pem | Kind::Json if !text.is_some_and(within) => {
                refuse(format!("must be a non-empty string of at most {} characters", self.max_length))
            }
            Kind::Url => match url::Url::parse(text.unwrap_or_default()) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(()),
                _ => refuse("must be an http(s) URL".into()),
            },
            Kind::Pem if !text.unwrap_or_default().contains("-----BEGIN ") => refuse("must be PEM text".into()),
            Kind::Json => match serde_json::from_str::<Value>(text.unwrap_or_default()) {
                Ok(Value::Object(_)) => Ok(()),
                // The parser's message may quote the text: never echo a secret.
                _ => refuse("must be the text of a JSON object (the key file's content)".into()),
            },
            Kind::Integer => match value.as_i64() {
                Some(number) if (self.min..=self.max).contains(&number) => Ok(()),
                _ => refuse(format!("must be an integer from {} to {}", self.min, self.max)),
            },
            Kind::Boolean if !value.is_boolean() => refuse("must be true or false".into()),
            Kind::Enum if !text.is_some_and(|text| self.options.contains(&text)) => {
                refuse(format!("must be one of {}", self.options.join(", ")))
            }
            Kind::Object if !value.is_object() => refuse("must be a JSON object".into()),
            Kind::List if !value.as_array().is_some_and(|items| items.iter().all(Value::is_string)) => {
                refuse("must be a list of strings".into())
            }
            _ => Ok(()),
        }
    }
}

impl When {
    fn holds(&self, config: &Value) -> bool {
        let pointer = format!("/{}", self.field.replace('.', "/"));
        let value = config.pointer(&pointer).and_then(Value::as_str).unwrap_or(self.absent);
        value == self.equals
    }
}

/// The fields of `fields` checked against `given`: each known, the
/// required ones present, each of its type. `prefix` names them
/// (`config`, `credential`).
fn check_fields(fields: &[Field], given: &Map<String, Value>, prefix: &str) -> Result<(), ProviderError> {
    for (name, value) in given {
        let Some(field) = fields.iter().find(|field| field.name == name) else {
            let names: Vec<&str> = fields.iter().map(|field| field.name).collect();
            let message = if names.is_empty() {
                "is not a field here: there are none".to_owned()
            } else {
                format!("is not a field here; the fields are {}", names.join(", "))
            };
            return Err(ProviderError::invalid(format!("{prefix}.{name}"), message));
        };
        if !value.is_null() {
            field.check(&format!("{prefix}.{name}"), value)?;
        }
    }
    for field in fields.iter().filter(|field| field.required) {
        if given.get(field.name).is_none_or(Value::is_null) {
            return Err(ProviderError::invalid(format!("{prefix}.{}", field.name), "is required"));
        }
    }
    Ok(())
}

impl Form {
    /// The credential shapes that apply to a config.
    fn candidates(&self, config: &Value) -> Vec<&CredentialForm> {
        self.credentials.iter().filter(|shape| shape.when.as_ref().is_none_or(|when| when.holds(config))).collect()
    }

    /// Checks the shape of a config and of the credential given with it.
    pub fn check(&self, config: &Value, credential: Option<&Map<String, Value>>) -> Result<(), ProviderError> {
        let Some(fields) = config.as_object() else {
            return Err(ProviderError::invalid("config", "must be a JSON object"));
        };
        check_fields(self.config, fields, "config")?;
        let candidates = self.candidates(config);
        let Some(credential) = credential else {
            if candidates.is_empty() || self.credential_optional {
                return Ok(());
            }
            let wanted = shapes(&candidates);
            return Err(ProviderError::invalid("credential", format!("is required: {wanted}")));
        };
        if candidates.is_empty() {
            return Err(ProviderError::invalid("credential", "this config takes no credential"));
        }
        let mut closest = None;
        for shape in &candidates {
            match check_fields(shape.fields, credential, "credential") {
                Ok(()) => return Ok(()),
                // The shape whose fields the credential names is the one
                // meant: its refusal says what is wrong.
                Err(error) if candidates.len() == 1 || shape.names_all(credential) => {
                    closest.get_or_insert(error);
                }
                Err(_) => {}
            }
        }
        match closest {
            Some(error) => Err(error),
            None => Err(ProviderError::invalid("credential", format!("must be one of: {}", shapes(&candidates)))),
        }
    }

    /// The form as `GET /v1/providers` shows it.
    pub fn document(&self) -> Value {
        let credentials: Vec<Value> = self
            .credentials
            .iter()
            .map(|shape| {
                let mut document = json!({
                    "name": shape.name,
                    "fields": shape.fields.iter().map(Field::document).collect::<Vec<_>>(),
                });
                if let Some(when) = &shape.when {
                    document["when"] = json!({"field": when.field, "equals": when.equals});
                }
                document
            })
            .collect();
        json!({
            "provider": self.provider,
            "title": self.title,
            "help": self.help,
            "kinds": self.kinds,
            "config": self.config.iter().map(Field::document).collect::<Vec<_>>(),
            "credentials": credentials,
            "credential_optional": self.credential_optional,
        })
    }
}

impl CredentialForm {
    /// Every field of `given` is one of this shape's.
    fn names_all(&self, given: &Map<String, Value>) -> bool {
        !given.is_empty() && given.keys().all(|name| self.fields.iter().any(|field| field.name == name))
    }
}

/// `{a, b} (token) or {c} (api_key)`.
fn shapes(candidates: &[&CredentialForm]) -> String {
    let shapes: Vec<String> = candidates
        .iter()
        .map(|shape| {
            let names: Vec<&str> = shape.fields.iter().filter(|field| field.required).map(|field| field.name).collect();
            format!("{{{}}} ({})", names.join(", "), shape.name)
        })
        .collect();
    shapes.join(" or ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &[Field] = &[
        field("base_url", Kind::Url, "where").required(),
        field("port", Kind::Integer, "port").range(1, 65_535).default("443"),
        field("flow", Kind::Enum, "how").options(&["a", "b"]).default("\"a\""),
    ];
    const A: &[Field] = &[field("token", Kind::String, "t").required().secret()];
    const B: &[Field] = &[field("key", Kind::String, "k").required().secret()];
    const FORM: Form = Form {
        provider: "test",
        title: "Test",
        help: "",
        kinds: &["x"],
        config: CONFIG,
        credentials: &[
            CredentialForm { name: "token", when: Some(When { field: "flow", equals: "a", absent: "a" }), fields: A },
            CredentialForm { name: "key", when: Some(When { field: "flow", equals: "b", absent: "a" }), fields: B },
        ],
        credential_optional: false,
    };

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    #[test]
    fn a_config_is_checked_field_by_field_with_the_field_named() {
        let token = object(json!({"token": "t0k"}));
        assert_eq!(FORM.check(&json!({"base_url": "https://x.test"}), Some(&token)), Ok(()));
        for (config, field) in [
            (json!({}), "config.base_url"),
            (json!({"base_url": "ftp://x"}), "config.base_url"),
            (json!({"base_url": "https://x", "port": 0}), "config.port"),
            (json!({"base_url": "https://x", "flow": "c"}), "config.flow"),
            (json!({"base_url": "https://x", "surprise": 1}), "config.surprise"),
            (json!([]), "config"),
        ] {
            match FORM.check(&config, Some(&token)) {
                Err(ProviderError::Invalid { field: refused, .. }) => assert_eq!(refused, field, "{config}"),
                other => panic!("{config}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_credential_shape_follows_the_config() {
        let config_b = json!({"base_url": "https://x", "flow": "b"});
        let key = object(json!({"key": "k3y"}));
        assert_eq!(FORM.check(&config_b, Some(&key)), Ok(()));
        let refused = FORM.check(&config_b, Some(&object(json!({"token": "t"})))).unwrap_err();
        assert_eq!(refused, ProviderError::invalid("credential.token", "is not a field here; the fields are key"));
        let missing = FORM.check(&json!({"base_url": "https://x"}), None).unwrap_err();
        assert_eq!(missing, ProviderError::invalid("credential", "is required: {token} (token)"));
    }

    #[test]
    fn a_secret_value_is_never_echoed_by_a_refusal() {
        const KEY: &[Field] = &[field("service_account_json", Kind::Json, "k").required().secret()];
        let form = Form { credentials: &[CredentialForm { name: "service_account", when: None, fields: KEY }], ..FORM };
        let secret = "{\"private_key\": \"-----BEGIN PRIVATE KEY-----s3cr3t\" ";
        let error = form
            .check(&json!({"base_url": "https://x"}), Some(&object(json!({"service_account_json": secret}))))
            .unwrap_err();
        assert!(!error.to_string().contains("s3cr3t"), "{error}");
    }

    #[test]
    fn the_document_says_what_the_check_checks() {
        let document = FORM.document();
        assert_eq!(
            document["config"][1],
            json!({"name": "port", "type": "integer", "required": false,
            "secret": false, "help": "port", "default": 443, "min": 1, "max": 65_535})
        );
        assert_eq!(document["credentials"][0]["when"], json!({"field": "flow", "equals": "a"}));
        assert_eq!(document["credentials"][0]["fields"][0]["secret"], json!(true));
    }
}

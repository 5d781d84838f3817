//! Integrations (DESIGN.md §9): a member's connected data sources and their
//! saved queries, each integration in a stream of its own,
//! `integration-{member}/{integration}` (the `/` cannot occur in an id, so
//! two members' streams never meet), never in the member stream: member
//! state stays small.
//!
//! The ledger keeps what an integration is (provider, name, non-secret
//! config, the reference to its current credential, status and saved
//! queries) and decides the lifecycle: registered → changed, tested,
//! disabled, enabled → removed (its history stays; the id may be
//! registered anew). What a config or a query means is the provider's to
//! check (`tally-integrations`, called by the API before the command): here
//! they are opaque JSON, bounded in size. Secrets never come here: a
//! credential is its id, version, keyed fingerprint and masked hint.
//!
//! Status: `untested` → `healthy` after a successful test, `failing` after
//! [`FAILING_AFTER`] consecutive failed probes or executions, `disabled` by
//! a person or an operator (which refuses executions); a changed config or
//! credential is `untested` again.

use super::error::DomainError;
use super::member::Timestamp;
use super::validate;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

pub const INTEGRATION_STREAM_PREFIX: &str = "integration-";
/// Integration and query ids are shorter than other ids, so that the
/// stream id fits the store's limit.
pub const INTEGRATION_ID_MAX: usize = 64;
/// Consecutive failures that make an integration `failing`.
pub const FAILING_AFTER: u32 = 3;
/// A config or a saved query, serialised.
pub const SPEC_BYTES_MAX: usize = 64 * 1024;
pub const QUERIES_MAX: usize = 100;
pub const ERROR_CODE_MAX: usize = 64;

pub fn integration_stream(member_id: &str, integration_id: &str) -> String {
    format!("{INTEGRATION_STREAM_PREFIX}{member_id}/{integration_id}")
}

/// The member and integration of an integration stream id.
pub fn parse_integration_stream(stream_id: &str) -> Option<(&str, &str)> {
    stream_id.strip_prefix(INTEGRATION_STREAM_PREFIX)?.split_once('/')
}

/// A credential as the log may know it: never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRef {
    pub credential_id: String,
    pub version: i64,
    /// A keyed HMAC of the secret (the vault's fingerprint key).
    pub fingerprint: String,
    /// The last four characters of a secret of 16 or more, else none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// A source's count of API calls against its allowance (Salesforce's
/// daily one), as the source reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiUsage {
    pub used: u64,
    pub limit: u64,
}

/// A count of API calls larger than this is no source's.
pub const API_USAGE_MAX: u64 = 1_000_000_000_000;

impl ApiUsage {
    /// Both counts within [`API_USAGE_MAX`] (read models keep them as
    /// SQLite integers).
    pub fn validate(&self, field: &'static str) -> Result<(), DomainError> {
        if self.used > API_USAGE_MAX || self.limit > API_USAGE_MAX {
            return Err(DomainError::invalid(field, format!("counts are at most {API_USAGE_MAX}")));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntegrationStatus {
    Untested,
    Healthy,
    Failing,
    Disabled,
}

impl IntegrationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            IntegrationStatus::Untested => "untested",
            IntegrationStatus::Healthy => "healthy",
            IntegrationStatus::Failing => "failing",
            IntegrationStatus::Disabled => "disabled",
        }
    }
}

/// Where a health fact came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestSource {
    /// `POST …/test` or the health scheduler.
    Probe,
    /// An execution's outcome (failures, and the first success after them).
    Execution,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum IntegrationEvent {
    IntegrationRegistered {
        member_id: String,
        integration_id: String,
        provider: String,
        name: String,
        config: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential: Option<CredentialRef>,
    },
    /// The whole name and config after the change.
    IntegrationConfigChanged {
        name: String,
        config: Value,
    },
    IntegrationCredentialRotated {
        credential: CredentialRef,
    },
    IntegrationTested {
        ok: bool,
        latency_ms: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error_code: Option<String>,
        source: TestSource,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        api_usage: Option<ApiUsage>,
    },
    IntegrationDisabled {
        reason: String,
    },
    IntegrationEnabled {},
    /// Its credentials were shredded; its history stays.
    IntegrationRemoved {},
    QuerySaved {
        query_id: String,
        spec: Value,
    },
    QueryRemoved {
        query_id: String,
    },
}

impl IntegrationEvent {
    pub fn event_type(&self) -> &'static str {
        match self {
            IntegrationEvent::IntegrationRegistered { .. } => "IntegrationRegistered",
            IntegrationEvent::IntegrationConfigChanged { .. } => "IntegrationConfigChanged",
            IntegrationEvent::IntegrationCredentialRotated { .. } => "IntegrationCredentialRotated",
            IntegrationEvent::IntegrationTested { .. } => "IntegrationTested",
            IntegrationEvent::IntegrationDisabled { .. } => "IntegrationDisabled",
            IntegrationEvent::IntegrationEnabled { .. } => "IntegrationEnabled",
            IntegrationEvent::IntegrationRemoved { .. } => "IntegrationRemoved",
            IntegrationEvent::QuerySaved { .. } => "QuerySaved",
            IntegrationEvent::QueryRemoved { .. } => "QueryRemoved",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum IntegrationCommand {
    /// Create, or change name and config (the provider cannot change), with
    /// a new credential version when given.
    Put {
        provider: String,
        name: String,
        config: Value,
        credential: Option<CredentialRef>,
    },
    RotateCredential {
        credential: CredentialRef,
    },
    RecordTest {
        ok: bool,
        latency_ms: i64,
        error_code: Option<String>,
        source: TestSource,
        api_usage: Option<ApiUsage>,
    },
    Disable {
        reason: String,
    },
    Enable,
    Remove,
    SaveQuery {
        query_id: String,
        spec: Value,
    },
    RemoveQuery {
        query_id: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastTest {
    pub at: Timestamp,
    pub ok: bool,
    pub latency_ms: i64,
    pub error_code: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IntegrationState {
    /// The stream version: how many events were folded.
    pub version: u64,
    /// Registered and not removed since.
    pub live: bool,
    pub provider: String,
    pub name: String,
    pub config: Value,
    /// The stream version of the last config or credential change: part of
    /// the result cache's key, so a change never serves an old result.
    pub config_version: u64,
    pub credential: Option<CredentialRef>,
    /// The last credential version used, across removals: versions are
    /// never reused, so a vault row and a cache key name one secret only.
    pub last_credential_version: i64,
    pub status: Option<IntegrationStatus>,
    pub consecutive_failures: u32,
    pub last_test: Option<LastTest>,
    pub queries: BTreeMap<String, Value>,
}

impl IntegrationState {
    pub fn status(&self) -> IntegrationStatus {
        self.status.unwrap_or(IntegrationStatus::Untested)
    }

    /// Fold one event that took effect at `at`.
    pub fn apply(&mut self, event: &IntegrationEvent, at: Timestamp) {
        self.version += 1;
        match event {
            IntegrationEvent::IntegrationRegistered { provider, name, config, credential, .. } => {
                *self = IntegrationState {
                    version: self.version,
                    last_credential_version: credential
                        .as_ref()
                        .map_or(self.last_credential_version, |credential| credential.version),
                    live: true,
                    provider: provider.clone(),
                    name: name.clone(),
                    config: config.clone(),
                    config_version: self.version,
                    credential: credential.clone(),
                    ..IntegrationState::default()
                };
            }
            IntegrationEvent::IntegrationConfigChanged { name, config } => {
                self.name = name.clone();
                self.config = config.clone();
                self.config_version = self.version;
                self.untested();
            }
            IntegrationEvent::IntegrationCredentialRotated { credential } => {
                self.last_credential_version = credential.version;
                self.credential = Some(credential.clone());
                self.config_version = self.version;
                self.untested();
            }
            IntegrationEvent::IntegrationTested { ok, latency_ms, error_code, .. } => {
                self.last_test =
                    Some(LastTest { at, ok: *ok, latency_ms: *latency_ms, error_code: error_code.clone() });
                self.consecutive_failures = if *ok { 0 } else { self.consecutive_failures + 1 };
                if self.status() != IntegrationStatus::Disabled {
                    self.status = Some(if *ok {
                        IntegrationStatus::Healthy
                    } else if self.consecutive_failures >= FAILING_AFTER {
                        IntegrationStatus::Failing
                    } else {
                        self.status()
                    });
                }
            }
            IntegrationEvent::IntegrationDisabled { .. } => self.status = Some(IntegrationStatus::Disabled),
            IntegrationEvent::IntegrationEnabled {} => {
                self.status = Some(IntegrationStatus::Untested);
                self.consecutive_failures = 0;
            }
            IntegrationEvent::IntegrationRemoved {} => {
                self.live = false;
                self.credential = None;
                self.queries.clear();
            }
            IntegrationEvent::QuerySaved { query_id, spec } => {
                self.queries.insert(query_id.clone(), spec.clone());
            }
            IntegrationEvent::QueryRemoved { query_id } => {
                self.queries.remove(query_id);
            }
        }
    }

    fn untested(&mut self) {
        if self.status() != IntegrationStatus::Disabled {
            self.status = Some(IntegrationStatus::Untested);
        }
        self.consecutive_failures = 0;
    }
}

pub struct IntegrationContext<'a> {
    pub member_id: &'a str,
    pub integration_id: &'a str,
    /// The member stream exists.
    pub member_registered: bool,
}

/// Validates an integration or query id.
pub fn short_identifier(field: &'static str, value: &str) -> Result<(), DomainError> {
    validate::identifier(field, value)?;
    if value.len() > INTEGRATION_ID_MAX {
        return Err(DomainError::invalid(field, format!("must be at most {INTEGRATION_ID_MAX} characters")));
    }
    Ok(())
}

fn bounded_json(field: &'static str, value: &Value) -> Result<(), DomainError> {
    if !value.is_object() {
        return Err(DomainError::invalid(field, "must be a JSON object"));
    }
    let bytes = serde_json::to_string(value).map(|text| text.len()).unwrap_or(usize::MAX);
    if bytes > SPEC_BYTES_MAX {
        return Err(DomainError::invalid(field, format!("must be at most {SPEC_BYTES_MAX} bytes")));
    }
    Ok(())
}

fn check_credential(state: &IntegrationState, credential: &CredentialRef) -> Result<(), DomainError> {
    short_identifier("credential.id", &credential.credential_id)?;
    validate::identifier("credential.fingerprint", &credential.fingerprint)?;
    let next = state.last_credential_version + 1;
    if credential.version != next {
        return Err(DomainError::invalid("credential.version", format!("the next version is {next}")));
    }
    if credential.hint.as_ref().is_some_and(|hint| hint.chars().count() > 5) {
        return Err(DomainError::invalid("credential.hint", "at most the last four characters"));
    }
    Ok(())
}

/// Decide a command against an integration's state: the events to append
/// (none for a change that changes nothing).
pub fn decide_integration(
    state: &IntegrationState,
    command: &IntegrationCommand,
    context: &IntegrationContext<'_>,
) -> Result<Vec<IntegrationEvent>, DomainError> {
    validate::identifier("member_id", context.member_id)?;
    short_identifier("integration_id", context.integration_id)?;
    let not_found = || DomainError::IntegrationNotFound {
        member_id: context.member_id.to_owned(),
        integration_id: context.integration_id.to_owned(),
    };
    if let IntegrationCommand::Put { provider, name, config, credential } = command {
        if !context.member_registered {
            return Err(DomainError::MemberNotFound { member_id: context.member_id.to_owned() });
        }
        validate::identifier("provider", provider)?;
        validate::text("name", name)?;
        bounded_json("config", config)?;
        if !state.live {
            if let Some(credential) = credential {
                check_credential(state, credential)?;
            }
            return Ok(vec![IntegrationEvent::IntegrationRegistered {
                member_id: context.member_id.to_owned(),
                integration_id: context.integration_id.to_owned(),
                provider: provider.clone(),
                name: name.clone(),
                config: config.clone(),
                credential: credential.clone(),
            }]);
        }
        if *provider != state.provider {
            return Err(DomainError::invalid(
                "provider",
                "an integration's provider cannot change: remove it and create anew",
            ));
        }
        let mut events = Vec::new();
        if *name != state.name || *config != state.config {
            events.push(IntegrationEvent::IntegrationConfigChanged { name: name.clone(), config: config.clone() });
        }
        // The current credential named again (a PUT sent twice) is no change.
        if let Some(credential) =
            credential.as_ref().filter(|credential| state.credential.as_ref() != Some(*credential))
        {
            check_credential(state, credential)?;
            events.push(IntegrationEvent::IntegrationCredentialRotated { credential: credential.clone() });
        }
        return Ok(events);
    }
    if !state.live {
        return Err(not_found());
    }
    let events = match command {
        IntegrationCommand::Put { .. } => unreachable!("handled above"),
        IntegrationCommand::RotateCredential { credential } => {
            check_credential(state, credential)?;
            vec![IntegrationEvent::IntegrationCredentialRotated { credential: credential.clone() }]
        }
        IntegrationCommand::RecordTest { ok, latency_ms, error_code, source, api_usage } => {
            validate::range("latency_ms", *latency_ms, 0, 3_600_000)?;
            if let Some(usage) = api_usage {
                usage.validate("api_usage")?;
            }
            if let Some(code) = error_code {
                validate::identifier("error_code", code)?;
                if code.len() > ERROR_CODE_MAX {
                    return Err(DomainError::invalid("error_code", format!("at most {ERROR_CODE_MAX} characters")));
                }
            }
            // An execution's success after successes says nothing new.
            if *source == TestSource::Execution && *ok && state.consecutive_failures == 0 {
                return Ok(Vec::new());
            }
            vec![IntegrationEvent::IntegrationTested {
                ok: *ok,
                latency_ms: *latency_ms,
                error_code: error_code.clone(),
                source: *source,
                api_usage: *api_usage,
            }]
        }
        IntegrationCommand::Disable { reason } => {
            validate::text("reason", reason)?;
            if state.status() == IntegrationStatus::Disabled {
                return Ok(Vec::new());
            }
            vec![IntegrationEvent::IntegrationDisabled { reason: reason.clone() }]
        }
        IntegrationCommand::Enable => {
            if state.status() != IntegrationStatus::Disabled {
                return Ok(Vec::new());
            }
            vec![IntegrationEvent::IntegrationEnabled {}]
        }
        IntegrationCommand::Remove => vec![IntegrationEvent::IntegrationRemoved {}],
        IntegrationCommand::SaveQuery { query_id, spec } => {
            short_identifier("query_id", query_id)?;
            bounded_json("query", spec)?;
            if state.queries.get(query_id) == Some(spec) {
                return Ok(Vec::new());
            }
            if !state.queries.contains_key(query_id) && state.queries.len() >= QUERIES_MAX {
                return Err(DomainError::invalid(
                    "query_id",
                    format!("an integration has at most {QUERIES_MAX} queries"),
                ));
            }
            vec![IntegrationEvent::QuerySaved { query_id: query_id.clone(), spec: spec.clone() }]
        }
        IntegrationCommand::RemoveQuery { query_id } => {
            if !state.queries.contains_key(query_id) {
                return Err(DomainError::QueryNotFound {
                    integration_id: context.integration_id.to_owned(),
                    query_id: query_id.clone(),
                });
            }
            vec![IntegrationEvent::QueryRemoved { query_id: query_id.clone() }]
        }
    };
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use serde_json::json;

    fn context(member_registered: bool) -> IntegrationContext<'static> {
        IntegrationContext { member_id: "acme", integration_id: "weather", member_registered }
    }

    fn credential(version: i64) -> CredentialRef {
        CredentialRef {
            credential_id: "c1".into(),
            version,
            fingerprint: "0a1b2c3d4e5f6071".into(),
            hint: Some("…abcd".into()),
        }
    }

    fn put(config: Value, credential: Option<CredentialRef>) -> IntegrationCommand {
        IntegrationCommand::Put { provider: "rest".into(), name: "Weather".into(), config, credential }
    }

    fn run(state: &mut IntegrationState, command: IntegrationCommand) -> Result<Vec<IntegrationEvent>, DomainError> {
        let events = decide_integration(state, &command, &context(true))?;
        for event in &events {
            state.apply(event, Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap());
        }
        Ok(events)
    }

    fn types(events: &[IntegrationEvent]) -> Vec<&'static str> {
        events.iter().map(IntegrationEvent::event_type).collect()
    }

    #[test]
    fn stream_ids_of_two_members_never_meet() {
        assert_ne!(integration_stream("a-b", "c"), integration_stream("a", "b-c"));
        assert_eq!(parse_integration_stream(&integration_stream("a-b", "c")), Some(("a-b", "c")));
        assert!(integration_stream(&"m".repeat(128), &"i".repeat(INTEGRATION_ID_MAX)).len() <= 256);
    }

    #[test]
    fn an_integration_lives_changes_and_is_removed_with_its_credential_versions_counting_on() {
        let mut state = IntegrationState::default();
        assert!(matches!(
            decide_integration(&state, &put(json!({}), None), &context(false)),
            Err(DomainError::MemberNotFound { .. })
        ));
        assert_eq!(
            types(&run(&mut state, put(json!({"base_url": "https://a"}), Some(credential(1)))).unwrap()),
            ["IntegrationRegistered"]
        );
        assert_eq!(state.status(), IntegrationStatus::Untested);
        // The same put again changes nothing; a new config and credential change both.
        assert!(run(&mut state, put(json!({"base_url": "https://a"}), None)).unwrap().is_empty());
        let changed = run(&mut state, put(json!({"base_url": "https://b"}), Some(credential(2)))).unwrap();
        assert_eq!(types(&changed), ["IntegrationConfigChanged", "IntegrationCredentialRotated"]);
        let stale = run(&mut state, IntegrationCommand::RotateCredential { credential: credential(2) }).unwrap_err();
        assert_eq!(stale.field(), Some("credential.version"));
        let other = IntegrationCommand::Put {
            provider: "graphql".into(),
            name: "W".into(),
            config: json!({}),
            credential: None,
        };
        assert_eq!(run(&mut state, other).unwrap_err().field(), Some("provider"));
        run(
            &mut state,
            IntegrationCommand::SaveQuery { query_id: "forecast".into(), spec: json!({"kind": "request"}) },
        )
        .unwrap();
        assert_eq!(state.queries.len(), 1);
        assert_eq!(types(&run(&mut state, IntegrationCommand::Remove).unwrap()), ["IntegrationRemoved"]);
        assert!(matches!(run(&mut state, IntegrationCommand::Enable), Err(DomainError::IntegrationNotFound { .. })));
        // Registered anew: versions go on from the last one.
        let again = run(&mut state, put(json!({}), Some(credential(1)))).unwrap_err();
        assert_eq!(again.field(), Some("credential.version"));
        assert_eq!(types(&run(&mut state, put(json!({}), Some(credential(3)))).unwrap()), ["IntegrationRegistered"]);
        assert!(state.queries.is_empty(), "a removed integration's queries went with it");
    }

    #[test]
    fn three_failures_in_a_row_make_it_failing_and_a_success_heals_it() {
        let mut state = IntegrationState::default();
        run(&mut state, put(json!({}), None)).unwrap();
        let test = |ok: bool, source: TestSource| IntegrationCommand::RecordTest {
            ok,
            latency_ms: 12,
            error_code: (!ok).then(|| "integration_timeout".to_owned()),
            api_usage: None,
            source,
        };
        run(&mut state, test(true, TestSource::Probe)).unwrap();
        assert_eq!(state.status(), IntegrationStatus::Healthy);
        assert!(run(&mut state, test(true, TestSource::Execution)).unwrap().is_empty(), "nothing new to say");
        run(&mut state, test(false, TestSource::Execution)).unwrap();
        run(&mut state, test(false, TestSource::Probe)).unwrap();
        assert_eq!(state.status(), IntegrationStatus::Healthy);
        run(&mut state, test(false, TestSource::Execution)).unwrap();
        assert_eq!(state.status(), IntegrationStatus::Failing);
        assert_eq!(types(&run(&mut state, test(true, TestSource::Execution)).unwrap()), ["IntegrationTested"]);
        assert_eq!(state.status(), IntegrationStatus::Healthy);
        run(&mut state, IntegrationCommand::Disable { reason: "by a person".into() }).unwrap();
        run(&mut state, test(true, TestSource::Probe)).unwrap();
        assert_eq!(state.status(), IntegrationStatus::Disabled, "tests do not enable");
        assert!(run(&mut state, IntegrationCommand::Disable { reason: "again".into() }).unwrap().is_empty());
        run(&mut state, IntegrationCommand::Enable).unwrap();
        assert_eq!(state.status(), IntegrationStatus::Untested);
    }

    #[test]
    fn bad_input_is_refused_with_its_field() {
        let mut state = IntegrationState::default();
        let long = "x".repeat(INTEGRATION_ID_MAX + 1);
        let context = IntegrationContext { member_id: "acme", integration_id: &long, member_registered: true };
        assert_eq!(
            decide_integration(&state, &put(json!({}), None), &context).unwrap_err().field(),
            Some("integration_id")
        );
        assert_eq!(run(&mut state, put(json!([1]), None)).unwrap_err().field(), Some("config"));
        let huge = json!({"blob": "x".repeat(SPEC_BYTES_MAX)});
        assert_eq!(run(&mut state, put(huge, None)).unwrap_err().field(), Some("config"));
        assert!(matches!(run(&mut state, IntegrationCommand::Remove), Err(DomainError::IntegrationNotFound { .. })));
        run(&mut state, put(json!({}), None)).unwrap();
        let missing = run(&mut state, IntegrationCommand::RemoveQuery { query_id: "nope".into() }).unwrap_err();
        assert_eq!(missing.code(), "not_found");
    }
}

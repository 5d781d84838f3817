//! Outbound webhook signatures (DESIGN.md §11) checked by an implementation
//! that is not tally's: the Standard Webhooks reference library for Python
//! (`standardwebhooks` from PyPI, pinned in tests/servers/requirements.txt
//! and installed by .ci/test-servers), as a receiver would run it.

use serde_json::{Value, json};
use std::io::Write;
use std::process::{Command, Stdio};
use tally_notify::signature::{Secret, sign};

/// Runs the reference verifier on each case: `[{secret, id, timestamp,
/// signature, body}]` → one `true`/`false` a case.
fn reference_verdicts(cases: &Value) -> Vec<bool> {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-venv/bin/python");
    let script = r#"
import json, sys
from standardwebhooks import Webhook
verdicts = []
for case in json.load(sys.stdin):
    headers = {"webhook-id": case["id"], "webhook-timestamp": str(case["timestamp"]),
               "webhook-signature": case["signature"]}
    try:
        Webhook(case["secret"]).verify(case["body"].encode(), headers)
        verdicts.append(True)
    except Exception:
        verdicts.append(False)
print(json.dumps(verdicts))
"#;
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{python} (bash .ci/test-servers installs it): {error}"));
    child.stdin.take().unwrap().write_all(cases.to_string().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "the reference verifier failed");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn signatures_verify_with_the_standard_webhooks_reference_library() {
    let (old, new) = (Secret::generate(), Secret::generate());
    let now = chrono::Utc::now().timestamp();
    let body = r#"{"type":"usage.recorded","id":"evt_1","created_at":"2026-12-06T06:00:00Z","data":{"credits":25}}"#;
    let alone = sign(&[&old], "msg_1", now, body.as_bytes());
    // A rotation: both secrets sign, and each alone verifies.
    let both = sign(&[&new, &old], "msg_2", now, body.as_bytes());
    let case = |secret: &Secret, id: &str, timestamp: i64, signature: &str, body: &str| {
        json!({"secret": secret.expose().as_str(), "id": id, "timestamp": timestamp, "signature": signature,
            "body": body})
    };
    let cases = json!([
        case(&old, "msg_1", now, &alone, body),
        case(&old, "msg_2", now, &both, body),
        case(&new, "msg_2", now, &both, body),
        // What the reference must refuse: another secret, a changed body,
        // id or timestamp.
        case(&new, "msg_1", now, &alone, body),
        case(&old, "msg_1", now, &alone, &body.replace("25", "26")),
        case(&old, "msg_9", now, &alone, body),
        case(&old, "msg_1", now + 1, &alone, body),
    ]);
    assert_eq!(reference_verdicts(&cases), [true, true, true, false, false, false, false]);
}

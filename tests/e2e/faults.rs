//! Faults through the real binary: the log's disk fills up (its byte budget,
//! `--max-log-bytes`, which fails writes exactly as SQLite's `SQLITE_FULL`
//! does). Writes get a 503 and write nothing, reads go on, and after a
//! restart with room the refused requests apply once.

use crate::support::*;
use serde_json::{Value, json};

#[test]
fn a_full_disk_refuses_writes_with_503_keeps_reads_and_recovers_after_a_restart() {
    let server = Server::start(&["--max-log-bytes", "262144"]);
    let (status, _) =
        server.admin_post("/v1/members/m1/credits/grants", json!({"source": "promotional", "amount": 1_000_000}));
    assert_eq!(status, 201);
    let usage = |index: usize| json!({"usage_id": format!("u{index}"), "metric": "calls", "credits": 1});
    let mut accepted = 0;
    let refused: Value = loop {
        let response = server.post("/v1/members/m1/usage", ADMIN_KEY, &usage(accepted), Some(&format!("k{accepted}")));
        match response.status().as_u16() {
            201 => accepted += 1,
            503 => break response.json().unwrap(),
            other => panic!("unexpected {other}: {}", response.text().unwrap()),
        }
        assert!(accepted < 50_000, "the budget never filled");
    };
    assert_eq!(refused["code"], "service_unavailable", "{refused}");
    assert!(refused["detail"].as_str().unwrap().contains("full"), "{refused}");
    let head = server.head_position();
    // Reads go on, from the writer's state and from the read models.
    server.sync("m1");
    let (status, balance) = server.admin_get("/v1/members/m1/balance");
    assert_eq!((status, balance["available"].as_i64()), (200, Some(1_000_000 - accepted as i64)));
    let (status, check) = server.admin_post("/v1/members/m1/check", json!({"credits": 5}));
    assert!(status == 200 || status == 503, "{status} {check}");
    assert_eq!(server.admin_get("/healthz").0, 200);
    let again = server.post("/v1/members/m1/usage", ADMIN_KEY, &usage(accepted), Some(&format!("k{accepted}")));
    assert_eq!(again.status(), 503);
    assert_eq!(server.head_position(), head, "refused writes wrote nothing");

    // Space is freed: restart with room; the refused request applies once.
    let data_dir = server.terminate();
    let server = Server::start_in(data_dir, &[]);
    let retried = server.post("/v1/members/m1/usage", ADMIN_KEY, &usage(accepted), Some(&format!("k{accepted}")));
    assert_eq!(retried.status(), 201);
    assert!(retried.headers().get("Idempotent-Replayed").is_none());
    let replayed = server.post("/v1/members/m1/usage", ADMIN_KEY, &usage(0), Some("k0"));
    assert_eq!(replayed.headers().get("Idempotent-Replayed").map(|value| value.to_str().unwrap()), Some("true"));
    let position = server.head_position();
    let (_, balance) = server.admin_get(&format!("/v1/members/m1/balance?min_position={position}"));
    assert_eq!(balance["available"].as_i64(), Some(1_000_000 - accepted as i64 - 1));
    let data_dir = server.terminate();
    let verified = std::process::Command::new(tally_binary())
        .arg("--data-dir")
        .arg(data_dir.path())
        .args(["audit", "verify"])
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stdout));
}

//! Crash recovery: concurrent usage and grants while the server is SIGKILLed
//! at seeded pseudo-random moments. Afterwards every acknowledged request is
//! in the log exactly once, retries never double-apply, the audit verifies and
//! the balances equal a fold of the log.

use crate::support::*;
use reqwest::blocking::Client;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

const CLOCK: [&str; 3] = ["--test-clock", "--start", "2026-01-01T00:00:00Z"];
const MEMBERS: [&str; 3] = ["crash-a", "crash-b", "crash-c"];
const CLIENTS: u64 = 4;
/// `TALLY_CRASH_KILLS` (24), `TALLY_CRASH_SECONDS` (28) and `TALLY_CRASH_SEED`
/// set a longer or different run.
fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// Knuth's MMIX linear congruential generator.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

#[derive(Clone, Debug)]
enum Kind {
    Usage { usage_id: String },
    Grant { reason: String },
}

#[derive(Clone, Debug)]
struct Sent {
    member: &'static str,
    kind: Kind,
    key: String,
    body: Value,
    /// The command's position and the position of its event, if it got a 2xx.
    acknowledged: Option<(u64, u64)>,
}

impl Sent {
    fn path(&self) -> String {
        match self.kind {
            Kind::Usage { .. } => format!("/v1/members/{}/usage", self.member),
            Kind::Grant { .. } => format!("/v1/members/{}/credits/grants", self.member),
        }
    }

    fn id(&self) -> &str {
        match &self.kind {
            Kind::Usage { usage_id } => usage_id,
            Kind::Grant { reason } => reason,
        }
    }

    fn event_type(&self) -> &'static str {
        match self.kind {
            Kind::Usage { .. } => "UsageRecorded",
            Kind::Grant { .. } => "CreditsGranted",
        }
    }
}

enum Outcome {
    /// A 2xx: status, `Idempotent-Replayed`, body.
    Done(bool, Value),
    /// Sent, but no answer (killed mid-request or timed out): may or may not be applied.
    Unknown,
    /// An answer that is neither a 2xx nor a transient 409/503.
    Refused(u16, String),
}

fn send(client: &Client, base: &str, sent: &Sent) -> Result<Outcome, ()> {
    let response = client
        .post(format!("{base}{}", sent.path()))
        .bearer_auth(ADMIN_KEY)
        .header("Idempotency-Key", &sent.key)
        .json(&sent.body)
        .send();
    match response {
        Err(error) if error.is_connect() => Err(()),
        Err(_) => Ok(Outcome::Unknown),
        Ok(response) => {
            let status = response.status().as_u16();
            let replayed = response.headers().get("Idempotent-Replayed").is_some_and(|value| value == "true");
            let text = response.text().unwrap_or_default();
            if (200..300).contains(&status) {
                match serde_json::from_str(&text) {
                    Ok(body) => Ok(Outcome::Done(replayed, body)),
                    Err(_) => Ok(Outcome::Unknown),
                }
            } else if status == 409 || status == 503 {
                Err(())
            } else {
                Ok(Outcome::Refused(status, text))
            }
        }
    }
}

/// (command position, position of the request's own event).
fn positions(sent: &Sent, body: &Value) -> (u64, u64) {
    let position = body["position"].as_u64().expect("position");
    let event = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .find(|event| event["type"] == sent.event_type())
        .unwrap_or_else(|| panic!("no {} in {body}", sent.event_type()));
    (position, event["position"].as_u64().expect("event position"))
}

/// Every `UsageRecorded` / `CreditsGranted` of the crash members: id → (positions, member, credits).
type Log = BTreeMap<String, (Vec<u64>, String, i64)>;

fn read_log(server: &Server) -> Log {
    let mut log = Log::new();
    let mut after = 0;
    loop {
        let (status, page) = server.admin_get(&format!("/v1/events?after={after}&limit=1000"));
        assert_eq!(status, 200, "{page}");
        for event in page["events"].as_array().expect("events") {
            let Some(member) = event["stream_id"].as_str().and_then(|stream| stream.strip_prefix("member-")) else {
                continue;
            };
            let payload = &event["payload"];
            let (id, credits) = match event["event_type"].as_str() {
                Some("UsageRecorded") => (payload["usage_id"].as_str(), payload["credits"].as_i64()),
                Some("CreditsGranted") => (payload["reason"].as_str(), payload["amount"].as_i64()),
                _ => continue,
            };
            let (Some(id), Some(credits)) = (id, credits) else { panic!("unexpected payload {event}") };
            let entry = log.entry(id.to_owned()).or_insert_with(|| (Vec::new(), member.to_owned(), credits));
            entry.0.push(event["position"].as_u64().expect("position"));
        }
        match page["next_after"].as_u64() {
            Some(next) => after = next,
            None => return log,
        }
    }
}

fn check_log(log: &Log, requests: &[Sent], phase: &str) {
    for sent in requests {
        let count = log.get(sent.id()).map_or(0, |entry| entry.0.len());
        assert!(count <= 1, "{phase}: {} applied {count} times", sent.id());
        if let Some((_, event_position)) = sent.acknowledged {
            assert_eq!(count, 1, "{phase}: acknowledged {} is not in the log", sent.id());
            assert_eq!(log[sent.id()].0, vec![event_position], "{phase}: {} moved", sent.id());
        }
    }
}

fn audit_verify(data_dir: &Path) {
    let output = Command::new(tally_binary())
        .arg("--data-dir")
        .arg(data_dir)
        .args(["audit", "verify"])
        .env_remove("TALLY_ADMIN_KEY")
        .env_remove("TALLY_LOG")
        .output()
        .expect("tally runs");
    assert!(
        output.status.success(),
        "audit verify exited with {}:\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn acknowledged_writes_survive_repeated_sigkills_and_retries_never_double_apply() {
    let started = Instant::now();
    let mut server = Server::start(&CLOCK);
    for member in MEMBERS {
        let (status, body) = server.admin_post(
            &format!("/v1/members/{member}/credits/grants"),
            json!({"source": "promotional", "amount": 100_000_000, "reason": format!("seed-{member}")}),
        );
        assert_eq!(status, 201, "{body}");
    }

    let base = Arc::new(RwLock::new(server.base.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client_index| {
            let (base, stop, refused) = (base.clone(), stop.clone(), refused.clone());
            thread::spawn(move || {
                let client = Client::builder()
                    .timeout(Duration::from_secs(3))
                    .connect_timeout(Duration::from_secs(1))
                    .build()
                    .expect("client");
                let mut rng = Lcg(0x5eed_0000 + client_index);
                let mut requests = Vec::new();
                for n in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let member = MEMBERS[rng.below(MEMBERS.len() as u64) as usize];
                    let id = format!("c{client_index}-{n}");
                    let (kind, body) = if rng.below(8) == 0 {
                        let reason = format!("grant-{id}");
                        let body = json!({"source": "promotional", "amount": 1 + rng.below(50), "reason": reason});
                        (Kind::Grant { reason }, body)
                    } else {
                        let usage_id = format!("usage-{id}");
                        let body = json!({"usage_id": usage_id, "metric": "api_calls", "credits": 1 + rng.below(20)});
                        (Kind::Usage { usage_id }, body)
                    };
                    let mut sent = Sent { member, kind, key: format!("crash-key-{id}"), body, acknowledged: None };
                    // Retry until answered; give up on some whose fate is unknown.
                    while !stop.load(Ordering::Relaxed) {
                        let current = base.read().expect("base").clone();
                        match send(&client, &current, &sent) {
                            Err(()) => thread::sleep(Duration::from_millis(20)),
                            Ok(Outcome::Done(_, body)) => {
                                sent.acknowledged = Some(positions(&sent, &body));
                                break;
                            }
                            Ok(Outcome::Unknown) if rng.below(2) == 0 => break,
                            Ok(Outcome::Unknown) => {}
                            Ok(Outcome::Refused(status, text)) => {
                                refused.lock().expect("refused").push(format!("{}: {status} {text}", sent.key));
                                break;
                            }
                        }
                    }
                    requests.push(sent);
                }
                requests
            })
        })
        .collect();

    // Kill at seeded moments and restart on the same directory.
    let (kills_wanted, chaos) =
        (knob("TALLY_CRASH_KILLS", 24) as usize, Duration::from_secs(knob("TALLY_CRASH_SECONDS", 28)));
    let mut rng = Lcg(knob("TALLY_CRASH_SEED", 20_260_101));
    let mut kills = 0;
    while kills < kills_wanted && started.elapsed() < chaos {
        thread::sleep(Duration::from_millis(50 + rng.below(700)));
        let data_dir = server.kill();
        kills += 1;
        server = Server::start_in(data_dir, &CLOCK);
        *base.write().expect("base") = server.base.clone();
    }
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let mut requests: Vec<Sent> =
        clients.into_iter().flat_map(|client| client.join().expect("client thread")).collect();
    let refused = refused.lock().expect("refused").clone();
    assert!(refused.is_empty(), "refused during the crashes: {refused:#?}");
    assert!(kills >= 20, "only {kills} kills in {:?}", started.elapsed());
    let acknowledged = requests.iter().filter(|sent| sent.acknowledged.is_some()).count();
    assert!(acknowledged > 0);

    // (1) Every acknowledged request is in the log once; the others at most once.
    let log = read_log(&server);
    check_log(&log, &requests, "after the crashes");
    let unacknowledged_applied =
        requests.iter().filter(|sent| sent.acknowledged.is_none() && log.contains_key(sent.id())).count();

    // (2) Retrying every request with its original key and body never double-applies.
    let client = Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    for sent in &mut requests {
        let outcome = send(&client, &server.base, sent).unwrap_or_else(|()| panic!("{} was not answered", sent.key));
        let Outcome::Done(replayed, body) = outcome else { panic!("retrying {} failed", sent.key) };
        let answered = positions(sent, &body);
        match sent.acknowledged {
            Some(first) => {
                assert!(replayed, "acknowledged {} was not replayed: {body}", sent.key);
                assert_eq!(answered, first, "{} replayed at another position", sent.key);
            }
            None => sent.acknowledged = Some(answered),
        }
    }
    let log = read_log(&server);
    check_log(&log, &requests, "after the retries");

    // (3) The audit verifies the hash chain and rebuilt read models.
    let data_dir = server.kill();
    audit_verify(data_dir.path());

    // (4) Balances equal the fold of the log: granted − used.
    let server = Server::start_in(data_dir, &CLOCK);
    let head = server.head_position();
    for member in MEMBERS {
        let expected: i64 = log
            .iter()
            .filter(|(_, (_, owner, _))| owner == member)
            .map(|(id, (_, _, credits))| if id.starts_with("usage-") { -credits } else { *credits })
            .sum();
        let (status, balance) = server.admin_get(&format!("/v1/members/{member}/balance?min_position={head}"));
        assert_eq!(status, 200, "{balance}");
        assert_eq!((balance["balance"].as_i64(), balance["available"].as_i64()), (Some(expected), Some(expected)));
    }
    println!(
        "crash recovery: {kills} kills, {} requests, {acknowledged} acknowledged during the crashes, \
         {unacknowledged_applied} unacknowledged but applied, {:.1} s",
        requests.len(),
        started.elapsed().as_secs_f64()
    );
}

//! A bounded soak: the real server on loopback at a fixed request rate, a
//! mix of durable usage writes and balance reads over many members, for
//! `TALLY_SOAK_SECONDS` (20 by default; `TALLY_SOAK_SECONDS=60 cargo test
//! --release --test e2e soak -- --nocapture` for the documented run). It
//! prints p50/p99/max latency and error counts, and checks: no errors, no
//! missed writes, and resident memory growing less than a stated bound.
//! Load and server share the machine's 2 cores.

use crate::support::*;
use serde_json::json;
use std::time::{Duration, Instant};

const CLIENTS: usize = 4;
const RATE_PER_CLIENT: u64 = 50; // 200 requests/s in all
const MEMBERS: usize = 200;
/// Resident memory may grow by at most this much after warm-up.
const RSS_GROWTH_MAX_KIB: u64 = 64 * 1024;

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    sorted[((sorted.len() as f64 * fraction) as usize).min(sorted.len() - 1)]
}

#[test]
fn a_bounded_soak_at_a_fixed_rate_has_no_errors_and_bounded_memory() {
    let seconds: u64 = std::env::var("TALLY_SOAK_SECONDS").ok().and_then(|value| value.parse().ok()).unwrap_or(20);
    let server = Server::start(&[]);
    for member in 0..MEMBERS {
        let (status, _) = server.admin_post(
            &format!("/v1/members/s{member}/credits/grants"),
            json!({"source": "promotional", "amount": 1_000_000}),
        );
        assert_eq!(status, 201);
    }
    // Warm-up: caches and buffers settle before memory is measured.
    for index in 0..200 {
        let member = index % MEMBERS;
        server.admin_post(
            &format!("/v1/members/s{member}/usage"),
            json!({"usage_id": format!("w{index}"), "metric": "calls", "credits": 1}),
        );
    }
    let rss_start = resident_kib(server.pid());

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let results: Vec<(Vec<Duration>, Vec<Duration>, u64, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let server = &server;
                scope.spawn(move || {
                    let interval = Duration::from_micros(1_000_000 / RATE_PER_CLIENT);
                    let (mut writes, mut reads, mut errors, mut sent) = (Vec::new(), Vec::new(), 0u64, 0u64);
                    let mut next = Instant::now();
                    while next < deadline {
                        // Fixed rate: wait for the slot; latency counts from the slot
                        // (corrected for coordinated omission).
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let member = (sent as usize * CLIENTS + client) % MEMBERS;
                        let ok = if sent % 2 == 0 {
                            let body =
                                json!({"usage_id": format!("c{client}-{sent}"), "metric": "calls", "credits": 1});
                            let key = format!("c{client}-{sent}");
                            let status = server
                                .post(&format!("/v1/members/s{member}/usage"), ADMIN_KEY, &body, Some(&key))
                                .status();
                            writes.push(next.elapsed());
                            status == 201
                        } else {
                            let status = server.get(&format!("/v1/members/s{member}/balance"), ADMIN_KEY).status();
                            reads.push(next.elapsed());
                            status == 200
                        };
                        errors += u64::from(!ok);
                        sent += 1;
                        next += interval;
                    }
                    (writes, reads, errors, sent)
                })
            })
            .collect();
        handles.into_iter().map(|handle| handle.join().unwrap()).collect()
    });
    let rss_end = resident_kib(server.pid());

    let mut writes: Vec<Duration> = results.iter().flat_map(|result| result.0.iter().copied()).collect();
    let mut reads: Vec<Duration> = results.iter().flat_map(|result| result.1.iter().copied()).collect();
    let errors: u64 = results.iter().map(|result| result.2).sum();
    let sent: u64 = results.iter().map(|result| result.3).sum();
    writes.sort();
    reads.sort();
    for (name, latencies) in [("usage POST", &writes), ("balance GET", &reads)] {
        eprintln!(
            "soak {name}: {} requests, p50 {:?}, p99 {:?}, max {:?}",
            latencies.len(),
            percentile(latencies, 0.50),
            percentile(latencies, 0.99),
            latencies.last().unwrap()
        );
    }
    eprintln!(
        "soak: {sent} requests in {seconds} s ({} req/s offered), {errors} errors, RSS {rss_start} KiB → {rss_end} KiB",
        CLIENTS as u64 * RATE_PER_CLIENT
    );
    assert_eq!(errors, 0, "no request failed");
    assert!(sent >= CLIENTS as u64 * RATE_PER_CLIENT * seconds * 9 / 10, "the rate was held: {sent} requests");
    // Every acknowledged write is in the log: the grants, the warm-up, the soak's writes.
    let expected = MEMBERS as u64 * 2 + 200 * 2 + writes.len() as u64 * 2;
    assert_eq!(server.head_position(), expected, "each usage is a UsageRecorded and a CreditsDeducted");
    assert!(rss_start > 0, "memory is measured");
    assert!(rss_end.saturating_sub(rss_start) < RSS_GROWTH_MAX_KIB, "RSS grew from {rss_start} to {rss_end} KiB");
}

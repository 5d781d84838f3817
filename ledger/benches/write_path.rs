//! Micro-benchmarks of the CPU work the writer does per usage command, apart
//! from SQLite: deciding, folding, encoding, hashing, cloning state, and
//! member snapshots. `tally-bench` measures the whole durable path; these say
//! where its microseconds go.
//!
//! ```text
//! cargo bench -p tally-ledger --bench write_path
//! ```

use std::hint::black_box;

use chrono::{DateTime, TimeZone, Utc};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use tally_ledger::codec;
use tally_ledger::domain::{
    Catalog, Context, Credits, GrantCredits, GrantSource, MemberCommand, MemberState, RecordUsage, decide,
};
use tally_ledger::store::{ChainLink, chain_hash};

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).single().expect("a valid instant")
}

fn usage(index: u64) -> MemberCommand {
    MemberCommand::RecordUsage(RecordUsage {
        usage_id: format!("0193a3a4-7c1e-7d2a-9f00-{index:012}"),
        metric: "api_calls".to_owned(),
        quantity: 1,
        credits: Credits(1),
        occurred_at: None,
        integration_id: None,
        query_id: None,
    })
}

/// A member with four grants of different sources and expiries and some
/// usage behind it: what a typical cached state looks like.
fn member(catalog: &Catalog) -> MemberState {
    let mut state = MemberState::default();
    let run = |state: &mut MemberState, command: MemberCommand| {
        let context = Context { member_id: "m000042", now: now(), catalog, usage: None };
        for occurred in decide(state, &command, &context).expect("accepted") {
            state.apply(&occurred.event);
        }
    };
    for (source, amount, days) in [
        (GrantSource::Promotional, 5_000, Some(30)),
        (GrantSource::Purchase, 100_000, None),
        (GrantSource::Promotional, 300, Some(90)),
        (GrantSource::Promotional, 2_000, Some(7)),
    ] {
        let mut grant = GrantCredits::new(source, amount);
        grant.expires_at = days.map(|days| now() + chrono::Duration::days(days));
        run(&mut state, MemberCommand::GrantCredits(grant));
    }
    for index in 0..20 {
        run(&mut state, usage(index));
    }
    state
}

fn write_path(c: &mut Criterion) {
    let catalog = Catalog::default();
    let state = member(&catalog);
    let command = usage(1_000);
    let context = Context { member_id: "m000042", now: now(), catalog: &catalog, usage: None };
    let decision = decide(&state, &command, &context).expect("accepted");

    c.bench_function("decide RecordUsage", |b| b.iter(|| decide(black_box(&state), &command, &context)));
    c.bench_function("clone member state", |b| b.iter(|| black_box(&state).clone()));
    c.bench_function("apply a usage decision", |b| {
        b.iter_batched(
            || state.clone(),
            |mut state| {
                for occurred in &decision {
                    state.apply(&occurred.event);
                }
                state
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("encode a usage decision", |b| {
        b.iter(|| decision.iter().map(|occurred| codec::encode_member(&occurred.event)).collect::<Vec<_>>())
    });

    let encoded = codec::encode_member(&decision[0].event);
    let metadata = br#"{"command_id":"0193a3a4-7c1e-7d2a-9f00-000000000001","actor":"member_key:m000042","correlation_id":"0193a3a4-7c1e-7d2a-9f00-000000000002"}"#;
    let link = ChainLink {
        position: 1_000_001,
        stream_id: b"member-m000042",
        version: 43,
        event_type: encoded.event_type.as_bytes(),
        schema_version: encoded.schema_version,
        event_id: &[7; 16],
        payload: encoded.payload.as_bytes(),
        metadata,
        recorded_at: b"2026-03-01T12:00:00.000000Z",
    };
    c.bench_function("chain hash of one event", |b| b.iter(|| chain_hash(black_box(&[1; 32]), &link)));

    let snapshot = serde_json::to_string(&state).expect("serialises");
    c.bench_function("member snapshot: write", |b| b.iter(|| serde_json::to_string(black_box(&state))));
    c.bench_function("member snapshot: read", |b| {
        b.iter(|| serde_json::from_str::<MemberState>(black_box(&snapshot)).expect("reads"))
    });
}

criterion_group!(benches, write_path);
criterion_main!(benches);

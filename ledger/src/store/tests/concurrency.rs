//! Several writers (one EventStore each, as separate processes would have)
//! on one file: positions and versions stay gapless and the chain valid.

use std::collections::{BTreeMap, HashSet};
use std::thread;

use super::{event, instant, temp_log};
use crate::store::{EventStore, ExpectedVersion, StoreError, StoreOptions};

const WRITERS_COUNT: usize = 4;
const APPENDS_PER_WRITER_COUNT: usize = 200;
const STREAMS: [&str; 3] = ["member-a", "member-b", "member-c"];
/// A writer that loses this many races in a row on one append is stuck, not unlucky.
const CONFLICT_RETRIES_MAX: usize = 10_000;

#[test]
fn concurrent_writers_keep_positions_and_versions_gapless() {
    let log = temp_log();
    // Created up front so that every writer opens an existing log.
    drop(EventStore::open(&log.path, StoreOptions::default()).expect("create"));

    let handles: Vec<_> = (0..WRITERS_COUNT)
        .map(|writer| {
            let path = log.path.clone();
            thread::spawn(move || -> usize {
                let mut store = EventStore::open(&path, StoreOptions::default()).expect("open");
                let reader = store.reader().expect("reader");
                let mut conflicts_count = 0;
                for index in 0..APPENDS_PER_WRITER_COUNT {
                    let stream_id = STREAMS[(writer + index) % STREAMS.len()];
                    let payload = format!("{{\"writer\":{writer},\"index\":{index}}}");
                    let mut retries = 0;
                    loop {
                        // Read the version outside the write transaction, as a
                        // writer with a cached state does, so races are real.
                        let version = reader.stream_version(stream_id).expect("version");
                        match store.append(
                            stream_id,
                            ExpectedVersion::Exact(version),
                            vec![event("Raced", &payload)],
                            instant(index as i64),
                        ) {
                            Ok(_) => break,
                            Err(StoreError::VersionConflict { .. }) => {
                                conflicts_count += 1;
                                retries += 1;
                                assert!(retries < CONFLICT_RETRIES_MAX, "writer {writer} is stuck");
                            }
                            Err(other) => panic!("writer {writer}: {other:?}"),
                        }
                    }
                }
                conflicts_count
            })
        })
        .collect();
    let conflicts_count: usize = handles.into_iter().map(|handle| handle.join().expect("a writer thread")).sum();

    let events_count = (WRITERS_COUNT * APPENDS_PER_WRITER_COUNT) as u64;
    let reader = crate::store::EventReader::open(&log.path).expect("reader");
    let report = reader.verify_chain(|_| {}).expect("a valid chain");
    assert_eq!(report.events_checked, events_count);

    let mut positions = Vec::new();
    let mut versions_by_stream: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut payloads = HashSet::new();
    for recorded in reader.catch_up(0, 128) {
        let recorded = recorded.expect("readable");
        positions.push(recorded.position);
        versions_by_stream.entry(recorded.stream_id.clone()).or_default().push(recorded.version);
        assert!(payloads.insert(recorded.payload), "each append landed once");
    }
    assert_eq!(positions, (1..=events_count).collect::<Vec<u64>>());
    for (stream_id, versions) in &versions_by_stream {
        let expected: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, &expected, "versions of {stream_id}");
    }
    assert_eq!(payloads.len() as u64, events_count);
    // Not asserted: how many races there were depends on scheduling.
    eprintln!("{conflicts_count} version conflicts were retried");
}

#[test]
fn writers_opening_a_new_file_at_once_create_one_schema() {
    let log = temp_log();
    let handles: Vec<_> = (0..WRITERS_COUNT)
        .map(|writer| {
            let path = log.path.clone();
            thread::spawn(move || {
                let mut store = EventStore::open(&path, StoreOptions::default()).expect("open");
                store
                    .append(
                        &format!("member-{writer}"),
                        ExpectedVersion::NoStream,
                        vec![event("Registered", "{}")],
                        instant(0),
                    )
                    .expect("append");
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("a writer thread");
    }
    let reader = crate::store::EventReader::open(&log.path).expect("reader");
    let report = reader.verify_chain(|_| {}).expect("a valid chain");
    assert_eq!(report.events_checked, WRITERS_COUNT as u64);
}

//! Append-only is enforced by SQLite itself, whoever writes the file.

use super::{append_many, open_store, raw, temp_log};

fn assert_refused(connection: &rusqlite::Connection, sql: &str, message: &str) {
    let error = connection.execute_batch(sql).expect_err("the database refuses the statement");
    assert!(error.to_string().contains(message), "{sql}: unexpected error {error}");
}

#[test]
fn update_and_delete_on_events_fail_in_the_database() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 3);

    let connection = raw(&log.path);
    assert_refused(
        &connection,
        "UPDATE events SET payload = '{\"credits\":1000000}' WHERE position = 2",
        "events are append-only",
    );
    assert_refused(&connection, "DELETE FROM events WHERE position = 3", "events are append-only");
    assert_refused(&connection, "DELETE FROM events", "events are append-only");

    store.reader().expect("reader").verify_chain(|_| {}).expect("nothing changed");
}

#[test]
fn inserts_must_land_at_the_next_position_and_version() {
    let log = temp_log();
    let mut store = open_store(&log.path);
    append_many(&mut store, "member-a", 2);
    let connection = raw(&log.path);
    let insert = |position: i64, version: i64, id: u8, conflict: &str| {
        format!(
            "INSERT {conflict} INTO events (position, stream_id, version, event_type, schema_version, event_id, payload, metadata, recorded_at, hash)
             VALUES ({position}, 'member-a', {version}, 'Forged', 1, x'{id:032x}', '{{}}', '{{}}', '2025-01-01T00:00:00.000000Z', zeroblob(32))"
        )
    };
    let refusal = "appended at the next position";
    // A gap in positions.
    assert_refused(&connection, &insert(4, 3, 1, ""), refusal);
    // A gap in versions.
    assert_refused(&connection, &insert(3, 4, 2, ""), refusal);
    // Overwriting a row through REPLACE.
    assert_refused(&connection, &insert(2, 2, 3, "OR REPLACE"), refusal);
    let count: i64 = connection.query_row("SELECT count(*) FROM events", [], |row| row.get(0)).expect("count");
    assert_eq!(count, 2);
}

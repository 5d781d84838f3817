//! End-to-end tests of tally through real SQLite files and real processes.

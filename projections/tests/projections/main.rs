//! Integration tests of the projections on real SQLite files, with logs
//! written by the real ledger. One binary: it links once.

mod daily_usage;
mod month_of_life;
mod properties;
mod reference_model;
mod runner;
mod support;

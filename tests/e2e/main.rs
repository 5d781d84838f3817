//! End-to-end tests of tally through real SQLite files, real processes and
//! real HTTP on loopback.

mod alerts;
mod analytics;
mod answers;
mod api;
mod cli;
mod crash;
mod databases;
mod executions;
mod fake_stripe;
mod faults;
mod integrations;
mod saas;
mod saas_fakes;
mod security;
mod soak;
mod sources;
mod stripe;
mod support;
mod upstream;
mod webhooks;

//! Prometheus metrics: requests, latencies, commands and the events they
//! appended, projection lag. Served as text at `/metrics`.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    commands: IntCounterVec,
    appended_events: IntCounterVec,
    stripe_webhooks: IntCounterVec,
    pub projection_lag_events: IntGauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("tally_http_requests_total", "HTTP requests by route and status"),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new("tally_http_request_duration_seconds", "HTTP request latency by route")
                .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["route", "method"],
        )
        .expect("valid metric");
        let commands =
            IntCounterVec::new(Opts::new("tally_commands_total", "Accepted ledger commands by route"), &["route"])
                .expect("valid metric");
        let appended_events = IntCounterVec::new(
            Opts::new("tally_appended_events_total", "Events appended by commands, by route"),
            &["route"],
        )
        .expect("valid metric");
        let stripe_webhooks = IntCounterVec::new(
            Opts::new(
                "tally_stripe_webhooks_total",
                "Stripe webhooks by outcome (applied, ignored, unprocessed: kept for an operator, refused, \
                 invalid_signature), by the reader that understood the event (typed: async-stripe's events; \
                 fallback: the tolerant reader, as for an endpoint pinned to an old API version; unreadable; \
                 none before a signature checked) and by the event's API version",
            ),
            &["outcome", "parsed_by", "api_version"],
        )
        .expect("valid metric");
        let projection_lag_events =
            IntGauge::new("tally_projection_lag_events", "Events the slowest projection is behind the log head")
                .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(commands.clone()),
            Box::new(appended_events.clone()),
            Box::new(stripe_webhooks.clone()),
            Box::new(projection_lag_events.clone()),
        ] {
            registry.register(collector).expect("metric registered once");
        }
        Metrics { registry, requests, latency, commands, appended_events, stripe_webhooks, projection_lag_events }
    }

    pub fn request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.requests.with_label_values(&[route, method, &status.to_string()]).inc();
        self.latency.with_label_values(&[route, method]).observe(seconds);
    }

    pub fn command(&self, route: &str, events: usize) {
        self.commands.with_label_values(&[route]).inc();
        self.appended_events.with_label_values(&[route]).inc_by(events as u64);
    }

    pub fn stripe_webhook(&self, outcome: &str, parsed_by: &str, api_version: &str) {
        self.stripe_webhooks.with_label_values(&[outcome, parsed_by, api_version]).inc();
    }

    /// The registry's metrics, then the writer's group-commit counters.
    pub fn render(&self, writer: &tally_ledger::service::WriterStats) -> String {
        use std::fmt::Write;
        use std::sync::atomic::Ordering::Relaxed;
        let mut buffer = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buffer).expect("text encoding");
        let mut text = String::from_utf8(buffer).expect("prometheus text is UTF-8");
        let batches = writer.batches.load(Relaxed);
        let jobs = writer.jobs.load(Relaxed);
        let _ = write!(
            text,
            "# HELP tally_writer_batches_total Transactions (fsyncs) the writer committed or tried.\n\
             # TYPE tally_writer_batches_total counter\ntally_writer_batches_total {batches}\n\
             # HELP tally_writer_jobs_total Commands and reads the writer handled, across batches.\n\
             # TYPE tally_writer_jobs_total counter\ntally_writer_jobs_total {jobs}\n\
             # HELP tally_writer_failed_commits_total Batches whose commit failed.\n\
             # TYPE tally_writer_failed_commits_total counter\ntally_writer_failed_commits_total {}\n\
             # HELP tally_writer_last_batch_jobs Jobs in the last batch.\n\
             # TYPE tally_writer_last_batch_jobs gauge\ntally_writer_last_batch_jobs {}\n",
            writer.failed_commits.load(Relaxed),
            writer.last_batch_jobs.load(Relaxed),
        );
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

//! Per-backend counters that must never reset: carried across reloads by backend id,
//! even when the backend's address (and so its connection pool) changes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use prometheus::{Histogram, HistogramOpts};

/// Request duration buckets for a proxy: 100 µs to 30 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// 1 for 1xx … 5 for 5xx (anything outside folds into the nearest class).
pub fn status_class(status: u16) -> usize {
    usize::from(status / 100).clamp(1, 5)
}

/// Responses counted by status class.
#[derive(Debug, Default)]
pub struct ByClass([AtomicU64; 6]);

impl ByClass {
    /// Counts a response with `status`.
    pub fn count(&self, status: u16) {
        self.0[status_class(status)].fetch_add(1, Ordering::Relaxed);
    }

    /// Responses of class `class` (1 to 5).
    pub fn get(&self, class: usize) -> u64 {
        self.0[class].load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct BackendStats {
    /// Requests sent and not yet finished, the response body included.
    pub(super) in_flight: AtomicUsize,
    /// Responses by status class.
    responses: ByClass,
    /// Time until the response headers, labelled with pool and backend.
    pub duration: Histogram,
    connect_errors: AtomicU64,
    /// Connections the backend closed or reset before a complete response head.
    resets: AtomicU64,
    connections_opened: AtomicU64,
}

impl BackendStats {
    pub fn new(pool: &str, backend: &str) -> Self {
        let opts = HistogramOpts::new(
            "switchyard_request_duration_seconds",
            "Time from receiving a request to the backend's response headers.",
        )
        .const_label("pool", pool)
        .const_label("backend", backend)
        .buckets(DURATION_BUCKETS.to_vec());
        BackendStats {
            in_flight: AtomicUsize::new(0),
            responses: Default::default(),
            duration: Histogram::with_opts(opts).expect("valid histogram options"),
            connect_errors: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            connections_opened: AtomicU64::new(0),
        }
    }

    /// Counts a response with `status` (an error response made by the proxy included).
    pub fn count_response(&self, status: u16) {
        self.responses.count(status);
    }

    /// Responses of class `class` (1 to 5).
    pub fn responses(&self, class: usize) -> u64 {
        self.responses.get(class)
    }

    pub fn total_responses(&self) -> u64 {
        (1..=5).map(|c| self.responses(c)).sum()
    }

    pub fn count_connect_error(&self) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connect_errors(&self) -> u64 {
        self.connect_errors.load(Ordering::Relaxed)
    }

    pub fn count_reset(&self) {
        self.resets.fetch_add(1, Ordering::Relaxed);
    }

    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }

    pub fn count_connection_opened(&self) {
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connections_opened(&self) -> u64 {
        self.connections_opened.load(Ordering::Relaxed)
    }
}

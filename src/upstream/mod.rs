//! Upstream side: backends with their lasting state, and the connections to them.

pub mod backend;
pub mod client;
pub mod health;
pub mod stats;
pub mod upload;

pub use backend::{clock_ms, Backend, InFlight};
pub use client::{ConnPool, PooledConn, UpstreamError};
pub use stats::BackendStats;

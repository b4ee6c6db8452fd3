//! Backend selection: one algorithm per file, built once per snapshot from an immutable
//! backend list. A selector returns a [`Candidates`] order, so the caller can move on
//! to another backend (connect failure, later health) within a fixed bound.

pub mod consistent_hash;
pub mod key;
pub mod learned;
pub mod least_request;
pub mod round_robin;
pub mod sticky_cookie;

use crate::config::Policy;

pub use least_request::LeastRequest;
pub use round_robin::RoundRobin;

/// The selection algorithm of one pool in one snapshot.
#[derive(Debug)]
pub enum Selector {
    RoundRobin(RoundRobin),
    LeastRequest(LeastRequest),
}

impl Selector {
    /// A selector over backends with `weights`, going on from `turn` (see
    /// [`Self::turn`]). Stateful policies balance new sessions with smooth weighted
    /// round robin.
    pub fn build(policy: Policy, weights: &[u32], turn: usize) -> Self {
        match policy {
            Policy::LeastRequest => Selector::LeastRequest(LeastRequest::new(weights.len())),
            Policy::RoundRobin
            | Policy::StickyCookie
            | Policy::StickyLearn
            | Policy::ConsistentHash => Selector::RoundRobin(RoundRobin::from_turn(weights, turn)),
        }
    }

    /// Where a rotation stands, for the selector that replaces this one on a reload.
    pub fn turn(&self) -> usize {
        match self {
            Selector::RoundRobin(rr) => rr.turn(),
            Selector::LeastRequest(_) => 0,
        }
    }

    /// The order in which to try the backends; `load(i)` gives backend `i`'s
    /// (in-flight, weight).
    pub fn candidates(&self, load: impl Fn(usize) -> (usize, u32)) -> Candidates {
        match self {
            Selector::RoundRobin(rr) => Candidates::new(rr.next(), rr.len()),
            Selector::LeastRequest(lr) => Candidates::new(lr.pick(load), lr.len()),
        }
    }

    /// Another order, for a request whose first pick was passed over (down, or in slow
    /// start): round robin draws at random by weight, rather than taking the next turn,
    /// which would be the same backend's for each request so passed over; least request
    /// samples again.
    pub fn candidates_again(&self, load: impl Fn(usize) -> (usize, u32)) -> Candidates {
        match self {
            Selector::RoundRobin(rr) => Candidates::new(rr.random(), rr.len()),
            Selector::LeastRequest(lr) => Candidates::new(lr.pick(load), lr.len()),
        }
    }
}

/// Indices into a pool's backend list: the selected one first, then each other backend
/// once, in list order after it. Never yields an index twice.
#[derive(Debug, Clone)]
pub struct Candidates {
    first: usize,
    len: usize,
    k: usize,
}

impl Candidates {
    pub fn new(first: usize, len: usize) -> Self {
        Candidates { first, len, k: 0 }
    }
}

impl Iterator for Candidates {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.k >= self.len {
            return None;
        }
        let i = (self.first + self.k) % self.len;
        self.k += 1;
        Some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_visit_each_index_once() {
        let all: Vec<usize> = Candidates::new(2, 4).collect();
        assert_eq!(all, vec![2, 3, 0, 1]);
        assert_eq!(Candidates::new(0, 0).count(), 0);
    }
}

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
use crate::runtime::Member;

pub use least_request::LeastRequest;
pub use round_robin::RoundRobin;

/// The selection algorithm of one pool in one snapshot.
#[derive(Debug)]
pub enum Selector {
    RoundRobin(RoundRobin),
    LeastRequest(LeastRequest),
}

impl Selector {
    pub fn build(policy: Policy, members: &[Member]) -> Self {
        let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
        match policy {
            Policy::RoundRobin => Selector::RoundRobin(RoundRobin::new(&weights)),
            Policy::LeastRequest => Selector::LeastRequest(LeastRequest::new(members.len())),
        }
    }

    /// The order in which to try `members` (the list this selector was built from).
    pub fn candidates(&self, members: &[Member]) -> Candidates {
        let first = match self {
            Selector::RoundRobin(rr) => rr.next(),
            Selector::LeastRequest(lr) => {
                lr.pick(|i| (members[i].backend.in_flight(), members[i].weight))
            }
        };
        Candidates::new(first, members.len())
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

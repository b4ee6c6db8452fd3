//! Smooth weighted round robin, the interleaving variant used by nginx
//! (`ngx_http_upstream_get_peer`): each step every backend gains its weight, the
//! richest is picked and pays the total. Weights 5,1,1 give `a a b a c a a`.
//!
//! The whole cycle is computed once when the snapshot is built; the hot path is one
//! relaxed `fetch_add` and a table lookup, with no lock.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct RoundRobin {
    /// One full cycle of picks (length = sum of weights divided by their gcd).
    schedule: Box<[u32]>,
    next: AtomicUsize,
    len: usize,
}

impl RoundRobin {
    /// `weights` are all at least 1 (validation guarantees it).
    pub fn new(weights: &[u32]) -> Self {
        Self::from_turn(weights, 0)
    }

    /// Starts at pick number `turn`: a pool rebuilt by a reload goes on from where its
    /// previous selector was, rather than sending the next request to its first backend.
    pub fn from_turn(weights: &[u32], turn: usize) -> Self {
        RoundRobin {
            schedule: schedule(weights).into_boxed_slice(),
            next: AtomicUsize::new(turn),
            len: weights.len(),
        }
    }

    /// The number of the next pick.
    pub fn turn(&self) -> usize {
        self.next.load(Ordering::Relaxed)
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A backend drawn at random, each with the chance of its weight; the rotation
    /// stays where it is.
    pub fn random(&self) -> usize {
        if self.schedule.len() <= 1 {
            return 0;
        }
        self.schedule[fastrand::usize(..self.schedule.len())] as usize
    }

    /// Index of the next backend.
    pub fn next(&self) -> usize {
        if self.schedule.len() <= 1 {
            return 0;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.schedule[n % self.schedule.len()] as usize
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The steps [`schedule`] takes for `weights`: picks in a cycle times backends.
pub fn schedule_work(weights: &[u32]) -> u64 {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let cycle: u64 = weights.iter().map(|&x| u64::from(x / g)).sum();
    cycle.saturating_mul(weights.len() as u64)
}

/// One cycle of smooth weighted round robin.
pub fn schedule(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let w: Vec<i64> = weights.iter().map(|&x| i64::from(x / g)).collect();
    let total: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaves_weights() {
        assert_eq!(schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn equal_weights_rotate_and_gcd_shortens_cycle() {
        assert_eq!(schedule(&[1, 1, 1]), vec![0, 1, 2]);
        assert_eq!(schedule(&[4, 4, 4]), vec![0, 1, 2]);
        assert_eq!(schedule(&[2, 4]), vec![1, 0, 1]);
    }

    #[test]
    fn each_backend_gets_its_weight_per_cycle() {
        let w = [7, 3, 1, 9];
        let s = schedule(&w);
        for (i, &wi) in w.iter().enumerate() {
            assert_eq!(s.iter().filter(|&&x| x as usize == i).count(), wi as usize);
        }
    }

    #[test]
    fn next_follows_schedule_and_wraps() {
        let rr = RoundRobin::new(&[2, 1]);
        let picks: Vec<usize> = (0..6).map(|_| rr.next()).collect();
        assert_eq!(picks, vec![0, 1, 0, 0, 1, 0]);
        assert_eq!(RoundRobin::new(&[3]).next(), 0);
    }
}

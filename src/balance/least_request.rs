//! Least request by the power of two choices (Mitzenmacher, "The Power of Two Choices
//! in Randomized Load Balancing", 2001): sample two distinct backends at random and take
//! the one with fewer in-flight requests relative to its weight. Nearly as good as a
//! full scan, O(1), and without the herd effect of always picking the global minimum.

#[derive(Debug)]
pub struct LeastRequest {
    len: usize,
}

impl LeastRequest {
    pub fn new(len: usize) -> Self {
        LeastRequest { len }
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Picks an index; `load(i)` returns backend `i`'s (in-flight, weight).
    pub fn pick(&self, load: impl Fn(usize) -> (usize, u32)) -> usize {
        self.pick_by(|n| fastrand::usize(..n), load)
    }

    /// Same as [`pick`](Self::pick) with a caller-supplied generator (seeded in tests).
    pub fn pick_with(
        &self,
        rng: &mut fastrand::Rng,
        load: impl Fn(usize) -> (usize, u32),
    ) -> usize {
        self.pick_by(|n| rng.usize(..n), load)
    }

    fn pick_by(
        &self,
        mut below: impl FnMut(usize) -> usize,
        load: impl Fn(usize) -> (usize, u32),
    ) -> usize {
        match self.len {
            0 | 1 => 0,
            n => {
                let a = below(n);
                let mut b = below(n - 1);
                if b >= a {
                    b += 1;
                }
                let (fa, wa) = load(a);
                let (fb, wb) = load(b);
                // fa/wa <= fb/wb without division (nor overflow: a backend that is
                // out counts as carrying half of all there is).
                if (fa as u128) * u128::from(wb) <= (fb as u128) * u128::from(wa) {
                    a
                } else {
                    b
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_backends_always_prefer_the_idle_one() {
        let lr = LeastRequest::new(2);
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..100 {
            assert_eq!(
                lr.pick_with(&mut rng, |i| (if i == 0 { 5 } else { 0 }, 1)),
                1
            );
        }
    }

    #[test]
    fn weight_scales_load() {
        let lr = LeastRequest::new(2);
        let mut rng = fastrand::Rng::with_seed(1);
        // 4 in flight at weight 4 beats 2 in flight at weight 1.
        for _ in 0..50 {
            assert_eq!(
                lr.pick_with(&mut rng, |i| if i == 0 { (4, 4) } else { (2, 1) }),
                0
            );
        }
    }

    #[test]
    fn never_picks_the_busiest_of_three() {
        let lr = LeastRequest::new(3);
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..200 {
            assert_ne!(
                lr.pick_with(&mut rng, |i| (if i == 2 { 9 } else { 0 }, 1)),
                2
            );
        }
    }
}

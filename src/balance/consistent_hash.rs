//! Consistent hashing: weighted rendezvous hashing (Thaler and Ravishankar, "Using
//! Name-Based Mappings to Increase Hit Rates", 1998; weights by the logarithmic method of
//! Schindelhauer and Schomaker, "Weighted Distributed Hash Tables", 2005) evaluated once
//! per slot of a fixed table of 2^18 slots when the snapshot is built.
//!
//! A key hashes to a slot; the slot's owner is the backend with the highest score for
//! that slot. Lookups cost one key hash and one table read. Because each slot's owner is
//! decided by a rendezvous among backends:
//!
//! - removing a backend moves only its own slots, adding one takes slots only for itself:
//!   a key whose backend survived never moves;
//! - shares follow weights, and with 2^18 slots the per-backend deviation is a fraction
//!   of a percent (unlike ketama rings, and unlike Maglev's permutation fill, which moves
//!   more keys than needed);
//! - placement depends only on the (id, weight) set, never on list order, and uses fixed
//!   seeds: two proxies with the same backends agree on every key.
//!
//! The next candidates for a key (backend down, draining, or over its bounded load) are
//! the slot's rendezvous ranking, computed only when needed.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// log2 of the number of slots.
pub const SLOT_BITS: u32 = 18;
/// Most backends a consistent-hash pool's configuration may list: building a table
/// scores every backend for every slot.
pub const MAX_BACKENDS: usize = 1000;
/// Most backends a table is built over: the configured ones and, at most as many again,
/// backends that left the configuration and still drain.
pub const MAX_MEMBERS: usize = 2 * MAX_BACKENDS;
/// Fixed seed for key hashing: placement must not vary between processes.
const KEY_SEED: u64 = 0x5377_6974_6368_7961; // "Switchya"

/// Hashes a request key.
pub fn hash_key(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, KEY_SEED)
}

/// The slot table of one pool in one snapshot.
#[derive(Debug)]
pub struct HashTable {
    /// Owner (index into the backend list given to `new`) of each slot.
    slots: Box<[u16]>,
    seeds: Vec<u64>,
    weights: Vec<f64>,
    equal_weights: bool,
    /// Ties between equal scores go to the smaller id, independent of list order.
    ids: Vec<Box<str>>,
}

fn mix(mut z: u64) -> u64 {
    // splitmix64's finaliser: a bijection with full avalanche.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl HashTable {
    /// Builds the table for backends `ids` with `weights` (same length, at most 65535).
    pub fn new(ids: &[&str], weights: &[u32]) -> HashTable {
        assert_eq!(ids.len(), weights.len());
        assert!(ids.len() <= usize::from(u16::MAX));
        let seeds: Vec<u64> = ids
            .iter()
            .map(|id| xxh3_64_with_seed(id.as_bytes(), 0))
            .collect();
        let equal_weights = weights.windows(2).all(|w| w[0] == w[1]);
        let mut t = HashTable {
            slots: Box::new([]),
            seeds,
            weights: weights.iter().map(|&w| f64::from(w)).collect(),
            equal_weights,
            ids: ids.iter().map(|&s| Box::from(s)).collect(),
        };
        if ids.is_empty() {
            return t;
        }
        // One score per backend and slot: the leader's is kept, not recomputed.
        let slots: Vec<u16> = (0..1u64 << SLOT_BITS)
            .map(|slot| {
                let mut best = 0;
                if t.equal_weights {
                    let mut best_raw = t.raw(slot, 0);
                    for i in 1..ids.len() {
                        let r = t.raw(slot, i);
                        if r > best_raw || (r == best_raw && t.ids[i] < t.ids[best]) {
                            (best, best_raw) = (i, r);
                        }
                    }
                } else {
                    let mut best_score = t.score(slot, 0);
                    // A backend that `cannot_win` has its logarithm not taken: with N
                    // backends, about ln N of the N are taken per slot. The table is the
                    // same as with every score taken.
                    let mut floor = best_score * MARGIN;
                    for i in 1..ids.len() {
                        let u = t.unit(slot, i);
                        if cannot_win(t.weights[i], u, floor) {
                            continue;
                        }
                        let s = t.weights[i] / -u.ln();
                        if s > best_score || (s == best_score && t.ids[i] < t.ids[best]) {
                            (best, best_score) = (i, s);
                            floor = best_score * MARGIN;
                        }
                    }
                }
                best as u16
            })
            .collect();
        t.slots = slots.into_boxed_slice();
        t
    }

    pub fn len(&self) -> usize {
        self.seeds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seeds.is_empty()
    }

    /// The slot of a key hash (top bits: the table is indifferent to which bits).
    pub fn slot(key_hash: u64) -> u64 {
        key_hash >> (64 - SLOT_BITS)
    }

    /// The backend owning `key_hash`, or `None` for an empty table.
    pub fn owner(&self, key_hash: u64) -> Option<usize> {
        self.slots
            .get(Self::slot(key_hash) as usize)
            .map(|&i| usize::from(i))
    }

    fn raw(&self, slot: u64, i: usize) -> u64 {
        mix(self.seeds[i] ^ mix(slot.wrapping_add(0x9e37_79b9_7f4a_7c15)))
    }

    /// Backend `i`'s draw for `slot`, uniform in (0, 1]: the top 53 bits of its hash plus
    /// one half, over 2^53 (the half is rounded away for draws of one half and above, and
    /// the draw is 1 when all 53 bits are set).
    fn unit(&self, slot: u64, i: usize) -> f64 {
        ((self.raw(slot, i) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Weighted rendezvous score: w / -ln(u) for u uniform in (0, 1]. At 1 it is minus
    /// infinity (`-ln 1` is `-0.0`): such a draw never wins.
    fn score(&self, slot: u64, i: usize) -> f64 {
        self.weights[i] / -self.unit(slot, i).ln()
    }

    /// Every backend, best first, for `key_hash`: the owner, then the backends that
    /// would own the key if those before them were gone.
    pub fn ranking(&self, key_hash: u64) -> Vec<usize> {
        let slot = Self::slot(key_hash);
        let mut order: Vec<usize> = (0..self.len()).collect();
        // Each backend scored once; ties go to the smaller id, as in `beats`.
        if self.equal_weights {
            let raw: Vec<u64> = order.iter().map(|&i| self.raw(slot, i)).collect();
            order.sort_unstable_by(|&a, &b| {
                raw[b]
                    .cmp(&raw[a])
                    .then_with(|| self.ids[a].cmp(&self.ids[b]))
            });
        } else {
            let score: Vec<f64> = order.iter().map(|&i| self.score(slot, i)).collect();
            order.sort_unstable_by(|&a, &b| {
                score[b]
                    .total_cmp(&score[a])
                    .then_with(|| self.ids[a].cmp(&self.ids[b]))
            });
        }
        order
    }
}

/// What a leader's score is multiplied by to give [`cannot_win`]'s `floor`: a margin
/// far wider than the rounding of a score or its bound.
const MARGIN: f64 = 1.0 - 1e-9;

/// Whether a backend of weight `w` and draw `u` scores below a leader whose score
/// times [`MARGIN`] is `floor`. Since -ln(u) ≥ 1 - u, w / (1 - u) bounds its score from
/// above; the margin is far more than rounding could make up, so a backend this says
/// cannot win would not even tie. Never true at u = 1 (0 or NaN on the right).
fn cannot_win(w: f64, u: f64, floor: f64) -> bool {
    w < floor * (1.0 - u)
}

/// Bounded load (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
/// Loads", SODA 2018): a backend takes a new request only while its in-flight count is
/// below `ceil(c × (total in flight + 1) / n)`.
pub fn load_cap(c: f64, total_in_flight: usize, n: usize) -> usize {
    if n == 0 {
        return usize::MAX;
    }
    ((c * (total_in_flight as f64 + 1.0)) / n as f64)
        .ceil()
        .max(1.0) as usize
}

/// Bounded load over weighted backends: `load_cap` scaled by the backend's share of the
/// total weight, `ceil(c × (total in flight + 1) × weight / total_weight)`. With equal
/// weights it equals `load_cap`; the caps still sum to more than the total in flight, so
/// some backend is always below its cap.
pub fn weighted_load_cap(c: f64, total_in_flight: usize, weight: u32, total_weight: u64) -> usize {
    if total_weight == 0 {
        return usize::MAX;
    }
    ((c * (total_in_flight as f64 + 1.0) * f64::from(weight)) / total_weight as f64)
        .ceil()
        .max(1.0) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_starts_with_the_owner_and_is_a_permutation() {
        let ids = ["a", "b", "c", "d", "e"];
        let t = HashTable::new(&ids, &[1, 2, 1, 3, 1]);
        for k in 0..2000u64 {
            let h = hash_key(&k.to_le_bytes());
            let r = t.ranking(h);
            assert_eq!(Some(r[0]), t.owner(h));
            let mut sorted = r.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn removal_promotes_the_runner_up() {
        let t = HashTable::new(&["a", "b", "c", "d"], &[1, 1, 1, 1]);
        let without_first = |h: u64| {
            let r = t.ranking(h);
            let ids: Vec<&str> = ["a", "b", "c", "d"]
                .into_iter()
                .filter(|&x| x != ["a", "b", "c", "d"][r[0]])
                .collect();
            let t2 = HashTable::new(&ids, &[1, 1, 1]);
            (ids[t2.owner(h).unwrap()], ["a", "b", "c", "d"][r[1]])
        };
        for k in 0..40u64 {
            let (owner, runner_up) = without_first(hash_key(&k.to_le_bytes()));
            assert_eq!(owner, runner_up);
        }
    }

    /// The owner of every slot by scoring every backend, as `ranking` orders them.
    fn best_by_every_score(t: &HashTable, slot: u64) -> usize {
        (1..t.len()).fold(0, |best, i| {
            let (s, b) = (t.score(slot, i), t.score(slot, best));
            if s > b || (s == b && t.ids[i] < t.ids[best]) {
                i
            } else {
                best
            }
        })
    }

    #[test]
    fn weighted_tables_give_each_slot_to_the_best_score() {
        let ids: Vec<String> = (0..40).map(|i| format!("10.1.0.{i}:80")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let weight_sets: [Vec<u32>; 3] = [
            (0..40).map(|i| i % 10 + 1).collect(),
            // One heavy backend among light ones, and the other way round.
            (0..40).map(|i| if i == 7 { 1000 } else { 1 }).collect(),
            (0..40).map(|i| if i == 7 { 1 } else { 1000 }).collect(),
        ];
        for weights in &weight_sets {
            let t = HashTable::new(&ids, weights);
            for slot in 0..1u64 << SLOT_BITS {
                assert_eq!(
                    usize::from(t.slots[slot as usize]),
                    best_by_every_score(&t, slot),
                    "slot {slot}, weights {weights:?}"
                );
            }
        }
    }

    /// Placement is part of the contract: proxies of different versions with the same
    /// backends must send every key to the same one.
    #[test]
    fn placement_does_not_change_between_versions() {
        let fingerprint = |ids: &[&str], weights: &[u32]| {
            let t = HashTable::new(ids, weights);
            let bytes: Vec<u8> = t.slots.iter().flat_map(|s| s.to_le_bytes()).collect();
            xxh3_64_with_seed(&bytes, 0)
        };
        let ids = ["web-1", "web-2", "web-3", "10.0.0.4:8080", "10.0.0.5:8080"];
        assert_eq!(fingerprint(&ids, &[1, 1, 1, 1, 1]), 15912727231843335890);
        assert_eq!(fingerprint(&ids, &[1, 5, 1, 2, 10]), 10950465974745555627);
    }

    /// The skip rule on draws within a few steps of its threshold, for leaders of
    /// several weights and draws up to the largest below 1: whatever it skips scores
    /// below the leader. (A rule that also skipped backends whose bound is up to one part
    /// in 10^12 above the leader's score fails here.)
    #[test]
    fn a_skipped_backend_scores_below_the_leader() {
        let unit = |k: u64| (k as f64 + 0.5) / (1u64 << 53) as f64;
        let top = (1u64 << 53) - 2; // the largest k whose draw is below 1
                                    // Leaders' draws from near 0 to near 1, denser towards 1, where the bound is
                                    // tight.
        let mut leaders: Vec<u64> = (0..53).map(|b| 1u64 << b).collect();
        leaders.extend((1..52).map(|b| top - (top >> b)));
        leaders.push(top);
        let mut skipped = 0u64;
        for &k_leader in &leaders {
            for wb in [1.0, 7.0, 1000.0] {
                let best = wb / -unit(k_leader).ln();
                let floor = best * MARGIN;
                for w in [1.0, 2.0, 999.0, 1000.0] {
                    let at = 1.0 - w / floor;
                    if at <= 0.0 {
                        continue;
                    }
                    let k0 = (at * (1u64 << 53) as f64) as u64;
                    for k in k0.saturating_sub(32)..=(k0 + 32).min(top) {
                        let u = unit(k);
                        if cannot_win(w, u, floor) {
                            skipped += 1;
                            assert!(w / -u.ln() < best, "w {w}, u {u:e}, leader {best:e}");
                        }
                    }
                }
            }
        }
        assert!(skipped > 0);
        // A draw of 1 scores minus infinity and is never skipped.
        assert_eq!(unit(top + 1), 1.0);
        assert_eq!(1.0 / -unit(top + 1).ln(), f64::NEG_INFINITY);
        assert!(!cannot_win(1.0, 1.0, 5.0));
        assert!(!cannot_win(1.0, 1.0, f64::NEG_INFINITY));
        assert!(!cannot_win(1.0, 0.5, f64::NEG_INFINITY));
    }

    #[test]
    fn load_cap_follows_the_paper() {
        assert_eq!(load_cap(1.25, 0, 4), 1);
        assert_eq!(load_cap(1.25, 99, 4), 32);
        assert_eq!(load_cap(2.0, 9, 10), 2);
        assert_eq!(load_cap(1.5, 5, 0), usize::MAX);
    }

    #[test]
    fn weighted_load_cap_scales_with_weight() {
        // Equal weights: the same as load_cap.
        assert_eq!(weighted_load_cap(1.25, 99, 3, 12), load_cap(1.25, 99, 4));
        // Weights 1..=10 (55): weight 10 may hold c × 10/55 of the total.
        assert_eq!(weighted_load_cap(1.25, 999, 10, 55), 228);
        assert_eq!(weighted_load_cap(1.25, 999, 1, 55), 23);
        assert_eq!(weighted_load_cap(1.25, 0, 1, 55), 1);
    }
}

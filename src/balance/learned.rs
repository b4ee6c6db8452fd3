//! Learned session affinity: remembers which backend issued each value of the
//! application's own session cookie (e.g. `JSESSIONID`), so later requests carrying that
//! value go back to it.
//!
//! Entries expire after `ttl` without use. The table holds at most `max_entries`
//! (inserts racing on several threads may pass it by a few, until the next insert makes
//! room; while an eviction pass is under way, inserts may pass it by up to a sixty-fourth
//! rather than scan the table a second time). Room is made in batches, by evicting the
//! least recently used entries (by a logical clock of uses) down to `max_entries` less a
//! thirty-second, so the scan is paid once per many inserts rather than on each. A scan
//! of a large table takes tens of milliseconds, so, in tables of 64 entries or more, it
//! is asked for early, when the table is within a sixty-fourth of its limit, from
//! whoever waits on [`Learned::room_wanted`] (the pool's tending task, on a thread that
//! serves no traffic). Only a table that fills up anyway (faster than that eviction
//! runs, with no one waiting, or under 64 entries) is evicted on the inserting thread,
//! and that insert waits out the whole pass.
//!
//! Otherwise an insert waits for about one shard's part of each pass under way, the
//! parts that hold that shard's lock. Tables get one shard per 16,384 entries of the
//! `max_entries` they are made with (at least four per CPU, and up to 64, so shards of
//! tables past about a million entries hold more; a limit raised later adds none). The
//! table keeps its own count of entries rather than asking the map, since counting the
//! map takes each shard's lock in turn and, behind a pass doing the same, would wait
//! out the whole pass.

use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::Notify;

/// The session table of one pool; outlives configuration snapshots.
#[derive(Debug)]
pub struct Learned {
    map: DashMap<Box<str>, Entry>,
    /// Entries in `map`, kept by whoever inserts or removes one. Signed: a removal can
    /// be counted just before the insert it removes.
    len: AtomicIsize,
    ttl_secs: AtomicU64,
    max_entries: AtomicUsize,
    /// Logical clock for recency: strictly orders uses, even within one second.
    ticks: AtomicU64,
    /// Woken when the table is nearly full; see [`Learned::room_wanted`].
    room_wanted: Arc<Notify>,
    /// Whether room has been asked for and not yet made.
    room_asked: AtomicBool,
    /// Eviction passes under way (the tending task's and an insert's may overlap).
    passes: AtomicUsize,
}

#[derive(Debug)]
struct Entry {
    backend: Arc<str>,
    /// Unix seconds of the last request that used this entry (for the ttl).
    last_used: AtomicU64,
    /// `ticks` at the last use (for evicting the least recently used).
    stamp: AtomicU64,
}

/// What the table knows of a session value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The backend id that owns the session.
    Hit(Arc<str>),
    /// It was known, but unused for longer than the ttl; now forgotten.
    Expired,
    Unknown,
}

impl Learned {
    pub fn new(ttl_secs: u64, max_entries: usize) -> Self {
        Learned {
            map: DashMap::with_shard_amount(shard_amount(max_entries)),
            len: AtomicIsize::new(0),
            ttl_secs: AtomicU64::new(ttl_secs),
            max_entries: AtomicUsize::new(max_entries.max(1)),
            ticks: AtomicU64::new(0),
            room_wanted: Arc::new(Notify::new()),
            room_asked: AtomicBool::new(false),
            passes: AtomicUsize::new(0),
        }
    }

    /// Notified when the table is nearly full: the waiter should call
    /// [`Learned::make_room`], away from threads that serve requests.
    pub fn room_wanted(&self) -> Arc<Notify> {
        self.room_wanted.clone()
    }

    /// Applies new limits from a reloaded configuration. A table now over its limit
    /// asks for room at once rather than at the next insert.
    pub fn set_limits(&self, ttl_secs: u64, max_entries: usize) {
        let max = max_entries.max(1);
        self.ttl_secs.store(ttl_secs, Ordering::Relaxed);
        self.max_entries.store(max, Ordering::Relaxed);
        if self.len() >= max {
            self.ask_for_room();
        }
    }

    fn ask_for_room(&self) {
        if !self.room_asked.swap(true, Ordering::Relaxed) {
            self.room_wanted.notify_one();
        }
    }

    /// Forgets every session.
    pub fn clear(&self) {
        let mut n = 0;
        self.map.retain(|_, _| {
            n += 1;
            false
        });
        self.removed(n);
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed).max(0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn removed(&self, n: usize) {
        if n > 0 {
            self.len.fetch_sub(n as isize, Ordering::Relaxed);
        }
    }

    pub fn lookup(&self, value: &str, now: u64) -> Lookup {
        let ttl = self.ttl_secs.load(Ordering::Relaxed);
        let expired = match self.map.get(value) {
            None => return Lookup::Unknown,
            Some(e) => {
                if now.saturating_sub(e.last_used.load(Ordering::Relaxed)) < ttl {
                    e.last_used.store(now, Ordering::Relaxed);
                    e.stamp.store(self.tick(), Ordering::Relaxed);
                    return Lookup::Hit(e.backend.clone());
                }
                true
            }
        };
        if expired {
            let gone = self.map.remove_if(value, |_, e| {
                now.saturating_sub(e.last_used.load(Ordering::Relaxed)) >= ttl
            });
            self.removed(gone.is_some().into());
        }
        Lookup::Expired
    }

    /// Remembers that `value` belongs to `backend`.
    pub fn learn(&self, value: &str, backend: &Arc<str>, now: u64) {
        if let Some(e) = self.map.get(value) {
            if *e.backend == **backend {
                e.last_used.store(now, Ordering::Relaxed);
                e.stamp.store(self.tick(), Ordering::Relaxed);
                return;
            }
        }
        let max = self.max_entries.load(Ordering::Relaxed);
        let len = self.len();
        // Asked early only where a sixty-fourth is at least one entry: a smaller table
        // is cheap to scan here, and keeps every one of its entries until it is full.
        let early = max / 64;
        if len >= max && !self.map.contains_key(value) {
            // A pass under way is making room already: a second one here would scan the
            // whole table again.
            if !(self.passes.load(Ordering::Relaxed) > 0 && len < max + early) {
                self.make_room();
            }
        } else if early > 0 && len + 1 >= max - early {
            self.ask_for_room();
        }
        let entry = Entry {
            backend: backend.clone(),
            last_used: AtomicU64::new(now),
            stamp: AtomicU64::new(self.tick()),
        };
        if self.map.insert(value.into(), entry).is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Remembers that `value` belongs to `backend` only while the table has room for
    /// it without evicting (nor asking for eviction): for a value a request brought
    /// that no backend set, which must never push out a session a backend did set.
    pub fn learn_if_room(&self, value: &str, backend: &Arc<str>, now: u64) {
        let max = self.max_entries.load(Ordering::Relaxed);
        let early = max / 64;
        let limit = if early > 0 { max - early - 1 } else { max };
        if self.len() < limit {
            self.learn(value, backend, now);
        }
    }

    fn tick(&self) -> u64 {
        self.ticks.fetch_add(1, Ordering::Relaxed)
    }

    /// Drops a session the application ended (it cleared the cookie).
    pub fn forget(&self, value: &str) {
        let gone = self.map.remove(value);
        self.removed(gone.is_some().into());
    }

    /// Removes entries unused for longer than the ttl.
    pub fn sweep(&self, now: u64) {
        let ttl = self.ttl_secs.load(Ordering::Relaxed);
        let mut removed = 0;
        self.map.retain(|_, e| {
            let keep = now.saturating_sub(e.last_used.load(Ordering::Relaxed)) < ttl;
            removed += usize::from(!keep);
            keep
        });
        self.removed(removed);
    }

    /// Makes room: removes the least recently used entries, down to `max_entries` less a
    /// thirty-second (at least one below it).
    pub fn make_room(&self) {
        self.passes.fetch_add(1, Ordering::Relaxed);
        let _under_way = PassUnderWay(&self.passes);
        self.evict_least_recently_used();
    }

    fn evict_least_recently_used(&self) {
        self.room_asked.store(false, Ordering::Relaxed);
        let max = self.max_entries.load(Ordering::Relaxed);
        let target = max.saturating_sub((max / 32).max(1));
        let batch = self.len().saturating_sub(target);
        if batch == 0 {
            return;
        }
        let mut ages: Vec<u64> = self
            .map
            .iter()
            .map(|e| e.stamp.load(Ordering::Relaxed))
            .collect();
        if ages.is_empty() {
            return;
        }
        let k = batch.min(ages.len()) - 1;
        let (_, cutoff, _) = ages.select_nth_unstable(k);
        let cutoff = *cutoff;
        // Counted as they go, and no further than the target: a pass that overlaps
        // another (which chose its batch from the same count) stops where that one left
        // the table rather than evicting a second batch.
        let mut removed = 0;
        self.map.retain(|_, e| {
            let old = e.stamp.load(Ordering::Relaxed) <= cutoff;
            if old && removed < batch && self.len() > target {
                removed += 1;
                self.removed(1);
                false
            } else {
                true
            }
        });
    }
}

/// Counts an eviction pass as over when it ends, however it ends.
struct PassUnderWay<'a>(&'a AtomicUsize);

impl Drop for PassUnderWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Enough shards that one holds at most about 16,384 entries, so that its part of an
/// eviction pass, under its lock, stays near a millisecond; up to 64 (so a table past
/// about a million entries has larger shards), and never fewer than DashMap would
/// choose (four per CPU).
fn shard_amount(max_entries: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let by_cpus = (cpus * 4).next_power_of_two();
    let by_size = max_entries.div_ceil(16_384).next_power_of_two().min(64);
    by_cpus.max(by_size).max(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    /// Learns sessions `s0` .. `s{n-1}`, all on backend `a`, in that order.
    fn fill(t: &Learned, n: u64) {
        for i in 0..n {
            t.learn(&format!("s{i}"), &id("a"), 7);
        }
    }

    #[test]
    fn learns_and_finds() {
        let t = Learned::new(60, 100);
        t.learn("s1", &id("a"), 1000);
        assert_eq!(t.lookup("s1", 1010), Lookup::Hit(id("a")));
        assert_eq!(t.lookup("s2", 1010), Lookup::Unknown);
    }

    #[test]
    fn ttl_counts_from_last_use() {
        let t = Learned::new(60, 100);
        t.learn("s1", &id("a"), 1000);
        assert_eq!(t.lookup("s1", 1050), Lookup::Hit(id("a")));
        assert_eq!(t.lookup("s1", 1100), Lookup::Hit(id("a")), "use renews it");
        assert_eq!(t.lookup("s1", 1160), Lookup::Expired);
        assert_eq!(t.lookup("s1", 1160), Lookup::Unknown);
        assert!(t.is_empty());
    }

    #[test]
    fn never_exceeds_max_entries_and_evicts_oldest() {
        let t = Learned::new(1_000_000, 128);
        for i in 0..1000u64 {
            // All within one second: recency, not the clock, decides.
            t.learn(&format!("s{i}"), &id("a"), 7);
            assert!(t.len() <= 128);
        }
        // Using an old entry makes it recent: it survives the next evictions.
        assert_eq!(t.lookup("s900", 7), Lookup::Hit(id("a")));
        for i in 1000..1100u64 {
            t.learn(&format!("s{i}"), &id("a"), 7);
        }
        assert_eq!(t.lookup("s900", 7), Lookup::Hit(id("a")));
        assert_eq!(t.lookup("s1099", 7), Lookup::Hit(id("a")));
        assert_eq!(t.lookup("s0", 7), Lookup::Unknown);
        assert_eq!(t.lookup("s950", 7), Lookup::Unknown);
    }

    #[test]
    fn values_no_backend_set_never_push_out_others() {
        use futures_util::FutureExt;
        for max in [8, 128] {
            let t = Learned::new(1_000_000, max);
            let wanted = t.room_wanted();
            t.learn("set-by-a-backend", &id("a"), 7);
            for i in 0..1000 {
                t.learn_if_room(&format!("made-up-{i}"), &id("b"), 7);
            }
            assert_eq!(t.lookup("set-by-a-backend", 7), Lookup::Hit(id("a")));
            // Up to where eviction is asked for, and not asked for.
            let limit = if max >= 64 { max - max / 64 - 1 } else { max };
            assert_eq!(t.len(), limit, "max {max}");
            assert!(wanted.notified().now_or_never().is_none(), "max {max}");
            // Sessions backends set still go in, evicting as before.
            t.learn("set-later", &id("a"), 7);
            assert_eq!(t.lookup("set-later", 7), Lookup::Hit(id("a")));
        }
    }

    #[test]
    fn asks_for_room_before_it_is_full() {
        use futures_util::FutureExt;
        let t = Learned::new(1_000_000, 128);
        let wanted = t.room_wanted();
        // 128 less a sixty-fourth: asked for when the 126th session is learned.
        fill(&t, 125);
        assert!(
            wanted.notified().now_or_never().is_none(),
            "asked too early"
        );
        t.learn("s125", &id("a"), 7);
        assert!(wanted.notified().now_or_never().is_some(), "not asked");
        // Asked once until room is made.
        t.learn("s126", &id("a"), 7);
        assert!(wanted.notified().now_or_never().is_none(), "asked twice");
        // 128 less a thirty-second, the least recently used going first.
        t.make_room();
        assert_eq!(t.len(), 124);
        assert_eq!(t.lookup("s0", 7), Lookup::Unknown);
        assert_eq!(t.lookup("s2", 7), Lookup::Unknown);
        assert_eq!(t.lookup("s3", 7), Lookup::Hit(id("a")));
        // Nearly full again: asked again.
        t.learn("s127", &id("a"), 7);
        t.learn("s128", &id("a"), 7);
        assert!(
            wanted.notified().now_or_never().is_some(),
            "not asked again"
        );
    }

    #[test]
    fn a_lowered_limit_asks_for_room_at_once() {
        use futures_util::FutureExt;
        let t = Learned::new(1_000_000, 100);
        let wanted = t.room_wanted();
        fill(&t, 60);
        t.set_limits(1_000_000, 80);
        assert!(wanted.notified().now_or_never().is_none(), "still under");
        t.set_limits(1_000_000, 50);
        assert!(wanted.notified().now_or_never().is_some(), "not asked");
        t.make_room();
        // 50 less a thirty-second (at least one).
        assert_eq!(t.len(), 49);
    }

    #[test]
    fn small_tables_keep_every_entry_until_full() {
        use futures_util::FutureExt;
        for max in [1usize, 3, 63] {
            let t = Learned::new(1_000_000, max);
            let wanted = t.room_wanted();
            fill(&t, max as u64);
            assert_eq!(t.len(), max);
            assert!(wanted.notified().now_or_never().is_none(), "max {max}");
            // Full: the insert makes room itself, and the new session is kept.
            t.learn("new", &id("a"), 7);
            assert!(t.len() <= max, "max {max}");
            assert_eq!(t.lookup("new", 7), Lookup::Hit(id("a")), "max {max}");
        }
    }

    /// The table's own count against the map's.
    fn assert_counted(t: &Learned) {
        assert_eq!(t.len(), t.map.len(), "count and map disagree");
    }

    #[test]
    fn the_count_follows_every_insert_and_removal() {
        let t = Learned::new(10, 128);
        for i in 0..200u64 {
            t.learn(&format!("s{i}"), &id("a"), i / 20);
            assert_counted(&t);
        }
        // Relearned on another backend, renewed: no new entries.
        t.learn("s199", &id("b"), 9);
        t.learn("s199", &id("b"), 9);
        assert_counted(&t);
        t.forget("s199");
        t.forget("s199");
        assert_counted(&t);
        // Expired at lookup, then swept.
        assert_eq!(t.lookup("s100", 15), Lookup::Expired);
        assert_counted(&t);
        t.sweep(16);
        assert_counted(&t);
        assert!(t.len() < 128, "the sweep removed entries");
        t.make_room();
        assert_counted(&t);
    }

    #[test]
    fn the_count_stays_exact_with_inserts_racing_an_eviction_pass() {
        let t = Arc::new(Learned::new(1_000_000, 4096));
        fill(&t, 4096);
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for i in 0..20_000u64 {
                        t.learn(&format!("w{w}-{i}"), &id("a"), 7);
                        if i % 7 == 0 {
                            t.forget(&format!("w{w}-{}", i / 2));
                        }
                    }
                })
            })
            .collect();
        // Passes back to back until both writers are done, each racing their inserts.
        let mut passes = 0;
        while passes < 2 || !writers.iter().all(|w| w.is_finished()) {
            t.make_room();
            passes += 1;
        }
        for w in writers {
            w.join().expect("writer");
        }
        assert_counted(&t);
        // A sixty-fourth over while a pass runs, and each of two writers one more in a race.
        assert!(t.len() <= 4096 + 4096 / 64 + 2, "{} entries", t.len());
    }

    #[test]
    fn a_full_table_waits_for_a_pass_under_way_within_a_sixty_fourth() {
        let t = Learned::new(1_000_000, 128);
        fill(&t, 128);
        assert_eq!(t.len(), 128);
        // Another thread is making room: two more (a sixty-fourth of 128) go in at once.
        t.passes.fetch_add(1, Ordering::Relaxed);
        t.learn("x1", &id("a"), 7);
        t.learn("x2", &id("a"), 7);
        assert_eq!(t.len(), 130);
        // Used, so recent: the pass below passes it over.
        assert_eq!(
            t.lookup("s0", 7),
            Lookup::Hit(id("a")),
            "nothing evicted yet"
        );
        // Beyond that, the insert makes room itself: 128 less a thirty-second, and itself.
        t.learn("x3", &id("a"), 7);
        assert_eq!(t.len(), 125);
        assert_eq!(t.lookup("x3", 7), Lookup::Hit(id("a")));
        assert_eq!(t.lookup("s0", 7), Lookup::Hit(id("a")));
        assert_eq!(t.lookup("s1", 7), Lookup::Unknown);
        assert_eq!(t.lookup("s6", 7), Lookup::Unknown);
        assert_eq!(t.lookup("s7", 7), Lookup::Hit(id("a")));
        assert_eq!(t.passes.load(Ordering::Relaxed), 1, "its own pass is over");
        assert_counted(&t);
    }

    #[test]
    fn overlapping_passes_are_each_counted_until_they_end() {
        let t = Arc::new(Learned::new(1_000_000, 128));
        fill(&t, 128);
        // With the first shard locked, passes stop at it: they are under way, not over.
        let shard = t.map.shards()[0].write();
        let passes: Vec<_> = (0..2)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || t.make_room())
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        // Spins until `done`; a failure, not a hang, if that takes until the deadline.
        let wait_for = |done: &dyn Fn() -> bool, what: &str| {
            while !done() {
                assert!(std::time::Instant::now() < deadline, "{what}");
                std::thread::yield_now();
            }
        };
        wait_for(
            &|| t.passes.load(Ordering::Relaxed) == 2,
            "passes never started",
        );
        // Inserts into other shards do not start a third: up to a sixty-fourth goes in.
        // On a thread of their own: a third pass would wait for the lock held here.
        let inserts = {
            let t = t.clone();
            std::thread::spawn(move || {
                let others = (0..)
                    .map(|i| format!("x{i}"))
                    .filter(|k| t.map.determine_map(k.as_str()) != 0)
                    .take(2);
                for k in others {
                    t.learn(&k, &id("a"), 7);
                }
            })
        };
        wait_for(
            &|| inserts.is_finished(),
            "an insert waited for a pass of its own",
        );
        inserts.join().expect("inserts");
        assert_eq!(t.len(), 130);
        assert_eq!(t.passes.load(Ordering::Relaxed), 2);
        drop(shard);
        for p in passes {
            p.join().expect("pass");
        }
        assert_eq!(t.passes.load(Ordering::Relaxed), 0);
        // Each pass chose a batch of four to six (128 less a thirty-second is 124, and the
        // table held 128 to 130 when it counted): between them they evict four to six,
        // and the second to evict stops at 124 rather than take a batch of its own below.
        assert!((124..=126).contains(&t.len()), "{} entries", t.len());
        assert_counted(&t);
    }

    #[test]
    fn large_tables_get_small_shards() {
        let cpus = (std::thread::available_parallelism().map_or(1, usize::from) * 4)
            .next_power_of_two()
            .max(2);
        assert_eq!(shard_amount(1), cpus);
        assert_eq!(shard_amount(100_000), cpus.max(8));
        assert_eq!(shard_amount(1_000_000), cpus.max(64));
        assert_eq!(shard_amount(100_000_000), cpus.max(64));
        for max in [1, 3, 16_385, 300_000, 5_000_000] {
            assert!(shard_amount(max).is_power_of_two(), "max {max}");
        }
        for max in [1, 1_000_000] {
            let t = Learned::new(60, max);
            assert_eq!(t.map.shards().len(), shard_amount(max), "max {max}");
        }
    }

    #[test]
    fn relearning_moves_a_session() {
        let t = Learned::new(60, 10);
        t.learn("s", &id("a"), 1);
        t.learn("s", &id("b"), 2);
        assert_eq!(t.lookup("s", 3), Lookup::Hit(id("b")));
        t.forget("s");
        assert_eq!(t.lookup("s", 3), Lookup::Unknown);
    }

    #[test]
    fn sweep_drops_stale_entries() {
        let t = Learned::new(10, 100);
        t.learn("old", &id("a"), 0);
        t.learn("new", &id("a"), 95);
        t.sweep(100);
        assert_eq!(t.len(), 1);
    }
}

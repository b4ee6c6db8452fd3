//! Memory per learned-session entry (`balance::learned::Learned`).
//!
//! `cargo bench --bench learned_memory`
//!
//! Inserts 1,000,000 entries with 32-character session values (the length of a typical
//! JSESSIONID) spread over 10 backends, and reports bytes per entry measured two ways:
//!
//! - live heap bytes, counted by `stats_alloc` around `std::alloc::System` (requested
//!   sizes, so independent of the allocator's own overhead);
//! - the VmRSS delta from /proc/self/status (what the process really costs, with glibc
//!   malloc's overhead; the proxy binary itself runs on mimalloc).
//!
//! A second phase inserts 100,000 more values into the full table (max_entries =
//! 1,000,000), so the eviction pass runs on the inserting thread, and reports the peak
//! RSS during it (VmHWM, reset through /proc/self/clear_refs) and the slowest single
//! insert. A third phase inserts 100,000 more with a second thread making room whenever
//! the table asks for it, as the proxy's tending task does, and reports the slowest
//! single insert then: what a request that learns a session can wait at worst.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};
use switchyard::balance::learned::{Learned, Lookup};

/// `std::alloc::System`, counting what is requested of it.
#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Live heap: requested bytes and blocks not yet freed.
fn live() -> (usize, usize) {
    // Reallocations count their growth in `bytes_allocated`, their shrinking in
    // `bytes_deallocated`.
    let s = GLOBAL.stats();
    (
        s.bytes_allocated.saturating_sub(s.bytes_deallocated),
        s.allocations.saturating_sub(s.deallocations),
    )
}

const ENTRIES: usize = 1_000_000;
const EXTRA: usize = 100_000;
const VALUE_LEN: usize = 32;

/// A size line of /proc/self/status (`VmRSS`, `VmHWM`), in bytes.
fn status_bytes(field: &str) -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} line in /proc/self/status"));
    kb * 1024
}

fn rss() -> usize {
    status_bytes("VmRSS")
}

/// Peak RSS since the last [`reset_peak_rss`].
fn peak_rss() -> usize {
    status_bytes("VmHWM")
}

/// Starts a new peak RSS period (Linux 4.0 and later); where that is refused, the peak
/// stays the process's whole-life peak, which the output says.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Writes the `i`-th session value (32 uppercase hex characters, random but
/// reproducible) into `buf` without allocating.
fn session_value(rng: &mut fastrand::Rng, buf: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    buf.clear();
    for _ in 0..VALUE_LEN {
        buf.push(char::from(HEX[rng.usize(..16)]));
    }
}

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Learns `EXTRA` new sessions; the time taken in all, and by the slowest insert.
fn insert_more(
    table: &Learned,
    rng: &mut fastrand::Rng,
    backends: &[Arc<str>],
    now: u64,
) -> (Duration, Duration) {
    let mut value = String::with_capacity(VALUE_LEN);
    let mut slowest = Duration::ZERO;
    let start = Instant::now();
    for i in 0..EXTRA {
        session_value(rng, &mut value);
        let t = Instant::now();
        table.learn(&value, &backends[i % backends.len()], now + 1 + i as u64);
        slowest = slowest.max(t.elapsed());
    }
    (start.elapsed(), slowest)
}

fn main() {
    let backends: Vec<Arc<str>> = (0..10)
        .map(|i| Arc::from(format!("10.0.0.{i}:8080")))
        .collect();
    let mut rng = fastrand::Rng::with_seed(0x4a53_4553);
    let mut value = String::with_capacity(VALUE_LEN);
    let now = 1_700_000_000u64;

    let ((heap0, allocs0), rss0) = (live(), rss());
    let reset = reset_peak_rss();
    let table = Arc::new(Learned::new(1800, ENTRIES));
    let start = Instant::now();
    for i in 0..ENTRIES {
        session_value(&mut rng, &mut value);
        table.learn(&value, &backends[i % backends.len()], now);
    }
    let elapsed = start.elapsed();
    let ((heap1, allocs1), rss1, peak1) = (live(), rss(), peak_rss());
    assert_eq!(
        table.len(),
        ENTRIES,
        "every value is distinct and none evicted"
    );
    assert_eq!(
        table.lookup(&value, now + 1),
        Lookup::Hit(backends[(ENTRIES - 1) % backends.len()].clone())
    );

    let n = ENTRIES as f64;
    println!("learned sessions: {ENTRIES} entries, {VALUE_LEN}-character values, 10 backends");
    println!(
        "  insert time:            {:.0} ns/entry",
        elapsed.as_nanos() as f64 / n
    );
    println!(
        "  live heap (allocator):  {:.1} B/entry  ({:.1} MiB; {:.2} allocations/entry)",
        (heap1 - heap0) as f64 / n,
        mib(heap1 - heap0),
        (allocs1 - allocs0) as f64 / n
    );
    println!("    of which value copies: {VALUE_LEN} B/entry requested (one Box<str> each)");
    println!(
        "  RSS delta (VmRSS):      {:.1} B/entry  ({:.1} MiB, glibc malloc)",
        rss1.saturating_sub(rss0) as f64 / n,
        mib(rss1.saturating_sub(rss0))
    );
    println!(
        "  peak RSS while growing: {:.1} B/entry  ({:.1} MiB above the start{})",
        peak1.saturating_sub(rss0) as f64 / n,
        mib(peak1.saturating_sub(rss0)),
        if reset { "" } else { "; peak of the whole run" }
    );

    // Full table: each further insert may trigger the eviction pass.
    let reset = reset_peak_rss();
    let (elapsed, slowest) = insert_more(&table, &mut rng, &backends, now);
    let ((heap2, _), rss2, peak2) = (live(), rss(), peak_rss());
    assert!(table.len() <= ENTRIES);
    println!(
        "full table, {EXTRA} more inserts: {} entries, {:.0} ns/insert with evictions, slowest insert {:.1} ms",
        table.len(),
        elapsed.as_nanos() as f64 / EXTRA as f64,
        slowest.as_secs_f64() * 1000.0
    );
    println!(
        "  live heap: {:.1} B/entry; RSS {:.1} MiB above the start, at peak {:.1} MiB above the RSS before{}",
        (heap2 - heap0) as f64 / table.len() as f64,
        mib(rss2.saturating_sub(rss0)),
        mib(peak2.saturating_sub(rss1)),
        if reset { "" } else { " (peak of the whole run)" }
    );

    // Tended: another thread makes room when asked, as the proxy's tending task does; the
    // inserting thread does not scan.
    let stop = Arc::new(AtomicBool::new(false));
    let tender = {
        let (table, stop) = (table.clone(), stop.clone());
        let wanted = table.room_wanted();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut made = 0;
                loop {
                    wanted.notified().await;
                    if stop.load(Relaxed) {
                        return made;
                    }
                    table.make_room();
                    made += 1;
                }
            })
        })
    };
    let (elapsed, slowest) = insert_more(&table, &mut rng, &backends, now);
    stop.store(true, Relaxed);
    table.room_wanted().notify_one();
    let made = tender.join().expect("tending thread");
    assert!(table.len() <= ENTRIES);
    println!(
        "tended, {EXTRA} more inserts: {} entries, {:.0} ns/insert, slowest insert {:.1} ms, room made {made} times off the inserting thread",
        table.len(),
        elapsed.as_nanos() as f64 / EXTRA as f64,
        slowest.as_secs_f64() * 1000.0
    );

    drop(table);
    println!(
        "after drop: {} B still live above the start (stdout's buffer, allocated after the first figures)",
        live().0 as isize - heap0 as isize
    );
}

//! Consistent-hash micro-benchmarks: the request-path lookup and the per-snapshot build.
//!
//! `cargo bench --bench hash`
//! Quick run: `cargo bench --bench hash -- --warm-up-time 1 --measurement-time 3`
//!
//! - `hash_lookup/nN/keyL`: `owner(hash_key(key))` for random keys of L bytes over N
//!   equal-weight backends, cycling through 4096 keys so each call reads another slot
//!   (target: ≤ 100 ns at N = 50);
//! - `hash_lookup_cold/n10/key32`: the same, but on one of 128 tables in turn, with
//!   each key depending on the previous result: the slot read misses the cache, and the
//!   time is a miss's latency (`hash_lookup_cold/baseline_read` is the same chain over
//!   a plain 64 MiB array, for comparison);
//! - `hash_ranking/nN`: `ranking(key_hash)`, the fallback order computed only when the
//!   owner is unusable or over its bounded load;
//! - `hash_build/nN/{equal,weighted}`: `HashTable::new` (2^18 slots × N scores), done
//!   once per pool per configuration snapshot, up to N = 1,000, the most a pool may list.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchyard::balance::consistent_hash::{hash_key, HashTable};

/// Number of distinct keys cycled through (a power of two).
const KEYS: usize = 4096;

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.0.0.{i}:8080")).collect()
}

fn table(ids: &[String], weights: &[u32]) -> HashTable {
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    HashTable::new(&refs, weights)
}

/// Mixed weights, deterministic per index.
fn mixed_weights(n: usize) -> Vec<u32> {
    const PATTERN: [u32; 7] = [1, 5, 1, 2, 10, 1, 3];
    (0..n).map(|i| PATTERN[i % PATTERN.len()]).collect()
}

fn random_keys(len: usize) -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(42);
    (0..KEYS)
        .map(|_| {
            let mut k = vec![0u8; len];
            rng.fill(&mut k);
            k
        })
        .collect()
}

fn bench_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("hash_lookup");
    group.throughput(Throughput::Elements(1));
    for n in [10usize, 50] {
        let t = table(&ids(n), &vec![1; n]);
        for len in [16usize, 32] {
            let keys = random_keys(len);
            group.bench_function(
                BenchmarkId::new(format!("n{n}"), format!("key{len}")),
                |b| {
                    let mut i = 0;
                    b.iter(|| {
                        i = (i + 1) & (KEYS - 1);
                        t.owner(hash_key(black_box(&keys[i])))
                    })
                },
            );
        }
    }
    group.finish();
}

/// Lookups that miss the cache: a different table on each call (of 128, 64 MiB in all,
/// twice the test machine's L3) and one of 2^20 keys, and each call's key depends on
/// the previous owner so the misses cannot overlap: the latency of a request that finds
/// the table evicted. A lookup reads one slot whatever N is, so 10 backends keep the
/// setup short.
fn bench_lookup_cold(c: &mut Criterion) {
    const TABLES: usize = 128;
    const COLD_KEYS: usize = 1 << 20;
    let mut group = c.benchmark_group("hash_lookup_cold");
    group.throughput(Throughput::Elements(1));
    let ids = ids(10);
    let tables: Vec<HashTable> = (0..TABLES).map(|_| table(&ids, &[1; 10])).collect();
    let mut rng = fastrand::Rng::with_seed(43);
    let keys: Vec<[u8; 32]> = (0..COLD_KEYS)
        .map(|_| {
            let mut k = [0u8; 32];
            rng.fill(&mut k);
            k
        })
        .collect();
    group.bench_function(BenchmarkId::new("n10", "key32"), |b| {
        let mut i = 0;
        b.iter(|| {
            let owner = tables[i % TABLES]
                .owner(hash_key(black_box(&keys[i])))
                .unwrap();
            i = (i + 1 + owner) & (COLD_KEYS - 1);
            owner
        })
    });
    // Baseline: the same chain reading a random u16 of a plain 64 MiB array, i.e. this
    // machine's cache and TLB miss latency plus the key hash.
    let flat = vec![1u16; TABLES << 18];
    group.bench_function(BenchmarkId::new("baseline_read", "key32"), |b| {
        let mut i = 0;
        b.iter(|| {
            let slot = (hash_key(black_box(&keys[i])) >> (64 - 25)) as usize;
            let v = usize::from(flat[slot]);
            i = (i + 1 + v) & (COLD_KEYS - 1);
            v
        })
    });
    group.finish();
}

fn bench_ranking(c: &mut Criterion) {
    let mut group = c.benchmark_group("hash_ranking");
    group.throughput(Throughput::Elements(1));
    for n in [10usize, 50] {
        let t = table(&ids(n), &vec![1; n]);
        let hashes: Vec<u64> = random_keys(16).iter().map(|k| hash_key(k)).collect();
        group.bench_function(BenchmarkId::from_parameter(format!("n{n}")), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) & (KEYS - 1);
                t.ranking(black_box(hashes[i]))
            })
        });
    }
    group.finish();
}

fn bench_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("hash_build");
    group.sample_size(10);
    // 1,000: the most a consistent-hash pool may list.
    for n in [10usize, 50, 1000] {
        let ids = ids(n);
        for (label, weights) in [("equal", vec![1; n]), ("weighted", mixed_weights(n))] {
            group.bench_function(BenchmarkId::new(format!("n{n}"), label), |b| {
                b.iter(|| table(black_box(&ids), black_box(&weights)))
            });
        }
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_lookup,
    bench_lookup_cold,
    bench_ranking,
    bench_build
);
criterion_main!(benches);

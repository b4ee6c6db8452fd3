//! Micro-benchmarks for the backend selectors on the request hot path.
//!
//! `cargo bench --bench selectors`
//! Quick run: `cargo bench --bench selectors -- --warm-up-time 1 --measurement-time 2`

use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchyard::balance::round_robin::schedule;
use switchyard::balance::{LeastRequest, RoundRobin};

/// Mixed weights: mostly 1, with some heavier backends, deterministic per index.
fn mixed_weights(n: usize) -> Vec<u32> {
    const PATTERN: [u32; 7] = [1, 5, 1, 2, 10, 1, 3];
    (0..n).map(|i| PATTERN[i % PATTERN.len()]).collect()
}

fn bench_round_robin(c: &mut Criterion) {
    let mut group = c.benchmark_group("round_robin_next");
    group.throughput(Throughput::Elements(1));
    for n in [3usize, 10, 50] {
        let rr = RoundRobin::new(&mixed_weights(n));
        group.bench_with_input(BenchmarkId::from_parameter(n), &rr, |b, rr| {
            b.iter(|| black_box(rr).next())
        });
    }
    group.finish();
}

fn bench_least_request(c: &mut Criterion) {
    let mut group = c.benchmark_group("least_request_pick");
    group.throughput(Throughput::Elements(1));
    for n in [10usize, 50] {
        let lr = LeastRequest::new(n);
        let weights = mixed_weights(n);
        // Uneven in-flight counts, as a live pool would have them.
        let in_flight: Vec<AtomicUsize> = (0..n).map(|i| AtomicUsize::new((i * 7) % 13)).collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &lr, |b, lr| {
            b.iter(|| black_box(lr).pick(|i| (in_flight[i].load(Ordering::Relaxed), weights[i])))
        });
    }
    group.finish();
}

fn bench_schedule(c: &mut Criterion) {
    let mut group = c.benchmark_group("round_robin_schedule");
    // 50 backends with weights 1..=100, spread deterministically (sum = cycle length).
    let weights: Vec<u32> = (0..50u32).map(|i| (i * 37) % 100 + 1).collect();
    let cycle: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    group.throughput(Throughput::Elements(cycle));
    group.bench_function("n50_w1..=100", |b| b.iter(|| schedule(black_box(&weights))));
    group.finish();
}

criterion_group!(
    benches,
    bench_round_robin,
    bench_least_request,
    bench_schedule
);
criterion_main!(benches);

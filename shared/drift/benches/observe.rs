//! Cost of counting one value of one feature into a window.
#![allow(missing_docs, reason = "criterion_group! defines an undocumented public function")]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tern_drift::{BaselineBuilder, DEFAULT_BINS, WINDOW_K};

const FEATURES: usize = 30;
const ROWS: usize = 4096;

fn rows(seed: u64) -> Vec<Vec<f64>> {
    let mut z = seed;
    let mut next = || {
        z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (z >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..ROWS).map(|_| (0..FEATURES).map(|j| next() * (j + 1) as f64).collect()).collect()
}

fn observe(c: &mut Criterion) {
    let reference = rows(1);
    let mut b = BaselineBuilder::new();
    for j in 0..FEATURES {
        let column: Vec<f64> = reference.iter().map(|r| r[j]).collect();
        b.numeric(&format!("f{j}"), &column, DEFAULT_BINS).unwrap();
    }
    let baseline = b.build().unwrap();
    let data = rows(2);
    let mut group = c.benchmark_group("observe");
    group.throughput(Throughput::Elements((FEATURES * ROWS) as u64));
    for (label, k) in [("window with sketches", Some(WINDOW_K)), ("window without sketches", None)] {
        group.bench_function(label, |bench| {
            let mut window = baseline.window(k, 3);
            bench.iter(|| {
                for row in &data {
                    window.observe_row(&baseline.layout, black_box(row)).unwrap();
                }
            });
        });
    }
    group.finish();
    c.bench_function("compare 30 features", |bench| {
        let mut window = baseline.window(Some(WINDOW_K), 3);
        for row in &data {
            window.observe_row(&baseline.layout, row).unwrap();
        }
        bench.iter(|| baseline.compare(black_box(&window)).unwrap());
    });
}

criterion_group!(benches, observe);
criterion_main!(benches);

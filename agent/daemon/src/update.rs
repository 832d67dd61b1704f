//! The daemon's side of a staged update: the self-test on golden vectors,
//! the shadow that runs a candidate beside the serving version, and the
//! latency record probation is judged on. The core decides; these measure.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;
use tern_agent_core::ShadowReport;
use tern_proto::{DType, ModelManifest, ShadowCompare, Tensor, TensorData, compare_outputs, decode_golden};
use tern_runtime::{Backend, run_guarded};

/// Buckets per doubling of the latency histogram: a p99 read from it is at
/// most 19 % (2^(1/4)) above the true one.
const SUB: u32 = 4;
/// Buckets: 1 µs up to 2^40 µs.
const BUCKETS: usize = 40 * SUB as usize;

/// Run times of one served version, as a log-scale histogram that requests
/// add to without locking.
pub struct Latency {
    buckets: Box<[AtomicU64]>,
}

impl Default for Latency {
    fn default() -> Self {
        Self { buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect() }
    }
}

impl Latency {
    fn bucket(us: u64) -> usize {
        let us = us.max(1) as f64;
        ((us.log2() * f64::from(SUB)).ceil() as usize).min(BUCKETS - 1)
    }

    /// Records one run.
    pub fn record(&self, d: Duration) {
        self.buckets[Self::bucket(d.as_micros() as u64)].fetch_add(1, Ordering::Relaxed);
    }

    /// The 99th percentile in microseconds, as the upper edge of its bucket
    /// (0 when nothing was recorded).
    pub fn p99_us(&self) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = total - total / 100;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return 2f64.powf(i as f64 / f64::from(SUB)).round() as u64;
            }
        }
        unreachable!("rank <= total")
    }
}

/// Inputs that fit `m`'s signature (dynamic dimensions 1), all zero: what
/// a candidate without golden vectors is run on.
fn zero_inputs(m: &ModelManifest) -> Vec<Tensor> {
    m.inputs
        .iter()
        .map(|spec| {
            let shape: Vec<usize> = spec.shape.iter().map(|d| d.unwrap_or(1) as usize).collect();
            let n = shape.iter().product();
            let data = match spec.dtype {
                DType::F32 => TensorData::F32(vec![0.0; n]),
                DType::F64 => TensorData::F64(vec![0.0; n]),
                DType::I8 => TensorData::I8(vec![0; n]),
                DType::I16 => TensorData::I16(vec![0; n]),
                DType::I32 => TensorData::I32(vec![0; n]),
                DType::I64 => TensorData::I64(vec![0; n]),
                DType::U8 => TensorData::U8(vec![0; n]),
                DType::U16 => TensorData::U16(vec![0; n]),
                DType::U32 => TensorData::U32(vec![0; n]),
                DType::U64 => TensorData::U64(vec![0; n]),
                DType::Bool => TensorData::Bool(vec![false; n]),
                DType::F16 => TensorData::F16(vec![tern_proto::f16::ZERO; n]),
                DType::BF16 => TensorData::BF16(vec![tern_proto::bf16::ZERO; n]),
            };
            Tensor { shape, data }
        })
        .collect()
}

/// Runs the candidate on its golden vectors (`golden`, the verified file),
/// or without any on zeros, checking that it answers in its signature's
/// types and ranks. The error names the case, output and element.
pub fn selftest(m: &ModelManifest, backend: &dyn Backend, golden: Option<&[u8]>) -> Result<(), String> {
    let (cases, tolerance) = match (golden, m.selftest) {
        (Some(bytes), Some(t)) => (decode_golden(bytes)?, t.tolerance_ppm),
        _ => {
            let outputs = run_guarded(backend, zero_inputs(m)).map_err(|e| format!("a run on zeros failed: {e}"))?;
            if outputs.len() != m.outputs.len() {
                return Err(format!("{} outputs, the signature has {}", outputs.len(), m.outputs.len()));
            }
            for (i, (t, spec)) in outputs.iter().zip(&m.outputs).enumerate() {
                if t.dtype() != spec.dtype || t.shape.len() != spec.shape.len() {
                    return Err(format!(
                        "output {i} is {}[rank {}], the signature says {spec}",
                        t.dtype(),
                        t.shape.len()
                    ));
                }
            }
            return Ok(());
        }
    };
    if cases.is_empty() {
        return Err("the golden file has no cases".into());
    }
    for (i, case) in cases.into_iter().enumerate() {
        let got = run_guarded(backend, case.inputs).map_err(|e| format!("case {i}: the run failed: {e}"))?;
        compare_outputs(&got, &case.outputs, tolerance).map_err(|e| format!("case {i}, {e}"))?;
    }
    Ok(())
}

/// How a candidate's answer is judged against the serving version's in
/// shadow, as the policy says (see [`ShadowCompare`]): top-1 compares the
/// index of the largest element per row (the last axis); relative wants
/// every float element within `tolerance_ppm` millionths of
/// `1 + |serving|`; integers and booleans match exactly. An output whose
/// last axis is 1 (a sigmoid score, a scalar) has no top-1 to compare and
/// is compared relatively whatever the policy says.
pub fn agree(candidate: &[Tensor], serving: &[Tensor], how: ShadowCompare, tolerance_ppm: u32) -> bool {
    candidate.len() == serving.len()
        && candidate.iter().zip(serving).all(|(c, s)| {
            if c.shape != s.shape {
                return false;
            }
            let classes = s.shape.last().copied().unwrap_or(1);
            let top1 = classes > 1 && how != ShadowCompare::Relative;
            let floats = |t: &Tensor| t.data.is_float().then(|| t.data.to_f64());
            let tol = f64::from(tolerance_ppm) * 1e-6;
            match (floats(c), floats(s)) {
                (Some(a), Some(b)) if top1 => {
                    a.chunks(classes.max(1)).zip(b.chunks(classes.max(1))).all(|(x, y)| argmax(x) == argmax(y))
                }
                (Some(a), Some(b)) => a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs())),
                _ => c.data == s.data,
            }
        })
}

fn argmax(v: &[f64]) -> usize {
    v.iter().enumerate().fold((0, f64::NEG_INFINITY), |best, (i, x)| if *x > best.1 { (i, *x) } else { best }).0
}

/// A candidate running beside the serving version. Requests hand it a copy
/// of their inputs and answer only when it is idle (`offer`), and never
/// wait for it: the serving answer is delayed by that copy alone. It runs
/// on one thread of its own at the lowest scheduling priority, so it takes
/// CPU the serving runs leave.
pub struct Shadow {
    /// The candidate's manifest.
    pub manifest: ModelManifest,
    idle: Arc<AtomicBool>,
    tx: mpsc::SyncSender<Sample>,
}

/// One request's inputs, the serving version's answer and its run time.
type Sample = (Vec<Tensor>, Vec<Tensor>, Duration);

impl Shadow {
    /// Starts the shadow thread; `report` gets the running comparison after
    /// each sample. The thread ends when the shadow is dropped.
    pub fn start(
        manifest: ModelManifest,
        backend: Arc<dyn Backend>,
        report: impl Fn(ShadowReport) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Sample>(1);
        let idle = Arc::new(AtomicBool::new(true));
        let flag = idle.clone();
        let policy = manifest.policy();
        std::thread::Builder::new().name("shadow".into()).spawn(move || {
            lower_priority();
            let mut r = ShadowReport::default();
            let (candidate, served) = (Latency::default(), Latency::default());
            while let Ok((inputs, serving, serving_ran)) = rx.recv() {
                // Said before the run: one that never ends is seen as such.
                let started = std::time::Instant::now();
                r.offered += 1;
                r.running_since = Some(started);
                report(r);
                let ran = std::time::Instant::now();
                let got = run_guarded(backend.as_ref(), inputs);
                r.running_since = None;
                // The first run pays for warming up (allocations, caches):
                // left out of the latency, which compares steady runs.
                if r.offered > 1 {
                    candidate.record(ran.elapsed());
                    served.record(serving_ran);
                }
                let how = policy.shadow_compare;
                let ok = got.is_ok_and(|c| agree(&c, &serving, how, policy.shadow_tolerance_ppm));
                r.compared += 1;
                r.agreed += u64::from(ok);
                r.candidate_p99_us = candidate.p99_us();
                r.serving_p99_us = served.p99_us();
                flag.store(true, Ordering::Release);
                report(r);
            }
        })?;
        Ok(Self { manifest, idle, tx })
    }

    /// Takes the shadow for one sample if it is idle: only then may a
    /// request copy its inputs, so at most one sample (one request's inputs
    /// and answer, outside the request memory) is ever held for it.
    pub fn claim(&self) -> Option<Claim<'_>> {
        self.idle.swap(false, Ordering::AcqRel).then_some(Claim { shadow: self, sent: false })
    }
}

/// The right to hand the shadow one sample; given back if dropped unsent.
pub struct Claim<'a> {
    shadow: &'a Shadow,
    sent: bool,
}

impl Claim<'_> {
    /// Hands over one request's inputs, the serving version's answer and
    /// how long the serving version ran on them.
    pub fn send(mut self, inputs: Vec<Tensor>, serving: Vec<Tensor>, ran: Duration) {
        self.sent = self.shadow.tx.try_send((inputs, serving, ran)).is_ok();
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.sent {
            self.shadow.idle.store(true, Ordering::Release);
        }
    }
}

/// Makes the calling thread the last to run: nice 19 (on Linux,
/// `setpriority` for "this process" sets the calling thread's own).
fn lower_priority() {
    if let Err(e) = rustix::process::setpriority_process(None, 19) {
        tracing::warn!("shadow thread keeps its priority: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(shape: Vec<usize>, v: Vec<f32>) -> Tensor {
        Tensor::new(shape, TensorData::F32(v)).unwrap()
    }

    #[test]
    fn p99_is_within_a_bucket_of_the_truth() {
        let l = Latency::default();
        assert_eq!(l.p99_us(), 0);
        for us in 1..=1000u64 {
            l.record(Duration::from_micros(us));
        }
        let p99 = l.p99_us();
        assert!((990..=990 * 119 / 100).contains(&p99), "{p99}");
    }

    #[test]
    fn top1_for_class_scores_relative_error_for_values() {
        let agree = |c: &[Tensor], s: &[Tensor]| agree(c, s, ShadowCompare::Auto, 10_000);
        let scores = |v| f(vec![2, 3], v);
        assert!(agree(&[scores(vec![0.1, 0.8, 0.1, 0.5, 0.2, 0.3])], &[scores(vec![0.2, 0.7, 0.1, 0.9, 0.0, 0.1])]));
        assert!(!agree(&[scores(vec![0.8, 0.1, 0.1, 0.5, 0.2, 0.3])], &[scores(vec![0.2, 0.7, 0.1, 0.9, 0.0, 0.1])]));
        assert!(agree(&[f(vec![1, 1], vec![10.05])], &[f(vec![1, 1], vec![10.0])]));
        assert!(!agree(&[f(vec![1, 1], vec![10.5])], &[f(vec![1, 1], vec![10.0])]));
        assert!(!agree(&[f(vec![1], vec![1.0])], &[f(vec![1, 1], vec![1.0])]), "shapes differ");
    }

    #[test]
    fn the_policy_chooses_top1_or_relative_and_the_tolerance() {
        // A box regressor: four floats a row, where top-1 would be wrong.
        let boxed = |v| f(vec![1, 4], v);
        let (c, s) = ([boxed(vec![10.0, 20.0, 30.0, 45.0])], [boxed(vec![10.0, 20.0, 30.0, 40.0])]);
        assert!(agree(&c, &s, ShadowCompare::Auto, 10_000), "auto takes it for class scores");
        assert!(!agree(&c, &s, ShadowCompare::Relative, 10_000), "45 is not within 1 % of 40");
        assert!(agree(&c, &s, ShadowCompare::Relative, 200_000), "within 20 %");
        // A one-score output has no top-1: compared relatively even when
        // the policy says top1 (top-1 of one column always agrees).
        let one = |v| f(vec![2, 1], v);
        assert!(!agree(&[one(vec![0.9, 0.1])], &[one(vec![0.1, 0.9])], ShadowCompare::Top1, 10_000));
        assert!(agree(&[one(vec![0.9, 0.1])], &[one(vec![0.9, 0.1])], ShadowCompare::Top1, 0));
        assert!(!agree(&[one(vec![0.9, 0.1])], &[one(vec![0.1, 0.9])], ShadowCompare::Auto, 10_000));
    }
}

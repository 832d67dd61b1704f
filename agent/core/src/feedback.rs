//! Ground truth for past predictions, without I/O: each answer's
//! predictions are kept under its inference id for a while (bounded), an
//! app's later feedback is counted against them into a quality window
//! (`tern_drift::quality`), and a window closes by rows or age, `now`
//! passed in as milliseconds on the daemon's clock.

use std::collections::{HashMap, VecDeque};
use tern_drift::quality;
use tern_proto::{QualityCounts, Tensor, TensorData};

/// What a model answered, row by row.
#[derive(Debug, Clone, PartialEq)]
pub enum Prediction {
    /// A class per row: an integer output, or the highest score of a row.
    Classes(Vec<i64>),
    /// A value per row (a regressor, or a binary classifier's one score).
    Values(Vec<f64>),
}

/// The ground truth an app posts for one answer, row by row.
#[derive(Debug, Clone, PartialEq)]
pub enum Truth {
    /// A label per row.
    Labels(Vec<i64>),
    /// A value per row.
    Values(Vec<f64>),
}

/// Why feedback was not counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    /// No prediction is kept under the id: never made, answered already,
    /// or forgotten (too old, or too many since).
    #[error("no prediction is kept under inference id {0:?} (unknown, already answered, or expired)")]
    Unknown(String),
    /// The truth has another number of rows than the answer.
    #[error("the answer had {expected} rows; the feedback gives {got}")]
    Rows {
        /// Rows of the answer.
        expected: usize,
        /// Rows of the feedback.
        got: usize,
    },
    /// Values for a classifier's classes.
    #[error("this model answers classes: post `label` or `labels`")]
    WantsLabels,
    /// Labels and values both counted in one window.
    #[error("this window counts {0}; the feedback is of the other kind")]
    Mixed(&'static str),
    /// A label other than 0 or 1 for a model that answers one score per
    /// row (a binary classifier's probability).
    #[error("this model answers one score per row: labels are 0 or 1")]
    NotBinary,
}

/// How long predictions are kept and when windows close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedbackConfig {
    /// Answers kept at most (the oldest forgotten first).
    pub keep: usize,
    /// How long an answer waits for its feedback (milliseconds).
    pub keep_ms: u64,
    /// A window closes when it has counted this many rows…
    pub window_rows: u64,
    /// …or, with at least one, is this old (milliseconds).
    pub window_ms: u64,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        Self { keep: 4096, keep_ms: 3_600_000, window_rows: 100, window_ms: 300_000 }
    }
}

/// A closed quality window.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityReport {
    /// Windows closed before it.
    pub seq: u64,
    /// When it opened and closed.
    pub opened_ms: u64,
    /// See `opened_ms`.
    pub closed_ms: u64,
    /// What it counted.
    pub counts: QualityCounts,
}

/// One served version's predictions and quality window.
#[derive(Debug)]
pub struct Feedback {
    config: FeedbackConfig,
    kept: HashMap<String, Prediction>,
    /// Rows of the predictions kept.
    rows: usize,
    order: VecDeque<(u64, String)>,
    window: Option<QualityCounts>,
    opened_ms: u64,
    seq: u64,
}

/// Rows of a prediction.
fn len(p: &Prediction) -> usize {
    match p {
        Prediction::Classes(v) => v.len(),
        Prediction::Values(v) => v.len(),
    }
}

/// Most rows of an answer kept for its feedback: larger answers get none.
pub const MAX_ROWS: usize = 1024;

/// Most rows kept of all answers awaiting feedback, per version (8 bytes
/// each): past it the oldest answers are forgotten.
pub const MAX_KEPT_ROWS: usize = 65_536;

/// Rows of `width` scores each read through `get`: the value of each row
/// when it holds one, else the index of its highest score.
fn by_row(rows: usize, width: usize, get: impl Fn(usize) -> f64) -> Prediction {
    if width == 1 {
        return Prediction::Values((0..rows).map(get).collect());
    }
    let classes = (0..rows)
        .map(|r| {
            let (mut best, mut top) = (0, get(r * width));
            for i in 1..width {
                let x = get(r * width + i);
                if x > top || top.is_nan() {
                    (best, top) = (i, x);
                }
            }
            best as i64
        })
        .collect();
    Prediction::Classes(classes)
}

/// What `outputs` predict, read from the first output: an integer tensor
/// is a label per element (rank 0 or 1) or per row; a float one is a value
/// per row when a row holds one element, else the row's highest score.
/// Rows are the first dimension. `None` for an empty or boolean output,
/// or one of more than [`MAX_ROWS`] rows.
pub fn prediction(outputs: &[Tensor]) -> Option<Prediction> {
    let t = outputs.first()?;
    let rows = if t.shape.len() <= 1 { t.shape.first().copied().unwrap_or(1) } else { t.shape[0] };
    let n = t.data.len();
    if rows == 0 || rows > MAX_ROWS || n == 0 || n % rows != 0 {
        return None;
    }
    let width = n / rows;
    let ints = |v: Vec<i64>| (width == 1).then_some(Prediction::Classes(v));
    match &t.data {
        TensorData::I8(v) => ints(v.iter().map(|x| i64::from(*x)).collect()),
        TensorData::I16(v) => ints(v.iter().map(|x| i64::from(*x)).collect()),
        TensorData::I32(v) => ints(v.iter().map(|x| i64::from(*x)).collect()),
        TensorData::I64(v) => ints(v.clone()),
        TensorData::U8(v) => ints(v.iter().map(|x| i64::from(*x)).collect()),
        TensorData::U16(v) => ints(v.iter().map(|x| i64::from(*x)).collect()),
        TensorData::U32(v) => ints(v.iter().map(|x| i64::from(*x)).collect()),
        TensorData::U64(v) => ints(v.iter().map(|x| i64::try_from(*x).unwrap_or(i64::MAX)).collect()),
        TensorData::F32(v) => Some(by_row(rows, width, |i| f64::from(v[i]))),
        TensorData::F64(v) => Some(by_row(rows, width, |i| v[i])),
        TensorData::F16(v) => Some(by_row(rows, width, |i| f64::from(v[i].to_f32()))),
        TensorData::BF16(v) => Some(by_row(rows, width, |i| f64::from(v[i].to_f32()))),
        TensorData::Bool(_) => None,
    }
}

impl Feedback {
    /// Nothing kept yet; the first window opens at `now_ms`.
    pub fn new(config: FeedbackConfig, now_ms: u64) -> Self {
        Self { config, kept: HashMap::new(), rows: 0, order: VecDeque::new(), window: None, opened_ms: now_ms, seq: 0 }
    }

    /// Answers waiting for their feedback.
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// Keeps an answer's prediction under its id (the oldest forgotten
    /// past `keep` answers or [`MAX_KEPT_ROWS`] rows).
    pub fn predicted(&mut self, id: String, p: Prediction, now_ms: u64) {
        self.expire(now_ms);
        while self.kept.len() >= self.config.keep.max(1) || self.rows + len(&p) > MAX_KEPT_ROWS {
            let Some((_, oldest)) = self.order.pop_front() else { break };
            self.forget(&oldest);
        }
        self.order.push_back((now_ms, id.clone()));
        self.rows += len(&p);
        if let Some(before) = self.kept.insert(id, p) {
            self.rows -= len(&before);
        }
    }

    fn forget(&mut self, id: &str) {
        if let Some(p) = self.kept.remove(id) {
            self.rows -= len(&p);
        }
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some((at, _)) = self.order.front() {
            // Entries answered already are gone from `kept`; their place in
            // the order goes when it comes up.
            if now_ms.saturating_sub(*at) < self.config.keep_ms && self.order.len() <= 2 * self.config.keep {
                break;
            }
            let (_, id) = self.order.pop_front().expect("front");
            self.forget(&id);
        }
    }

    /// Counts the truth for the answer `id`; the rows counted. The answer
    /// is forgotten once counted. Nothing is counted on an error.
    pub fn feedback(&mut self, id: &str, truth: Truth, now_ms: u64) -> Result<u64, FeedbackError> {
        self.expire(now_ms);
        let p = self.kept.get(id).ok_or_else(|| FeedbackError::Unknown(id.to_owned()))?;
        let got = match &truth {
            Truth::Labels(v) => v.len(),
            Truth::Values(v) => v.len(),
        };
        if got != len(p) {
            return Err(FeedbackError::Rows { expected: len(p), got });
        }
        let mut window = match (&self.window, &truth) {
            (None, Truth::Labels(_)) => quality::empty_classes(),
            (None, Truth::Values(_)) => quality::empty_values(),
            (Some(w @ QualityCounts::Classes { .. }), Truth::Labels(_)) => w.clone(),
            (Some(w @ QualityCounts::Values { .. }), Truth::Values(_)) => w.clone(),
            (Some(QualityCounts::Classes { .. }), Truth::Values(_)) => return Err(FeedbackError::Mixed("labels")),
            (Some(QualityCounts::Values { .. }), Truth::Labels(_)) => return Err(FeedbackError::Mixed("values")),
        };
        match (p, &truth) {
            (Prediction::Classes(ps), Truth::Labels(ls)) => {
                ps.iter().zip(ls).for_each(|(p, l)| _ = quality::add_label(&mut window, *p, *l))
            }
            (Prediction::Values(_), Truth::Labels(ls)) if ls.iter().any(|l| !matches!(l, 0 | 1)) => {
                return Err(FeedbackError::NotBinary);
            }
            // One score per row against labels: a binary classifier's
            // probability of class 1.
            (Prediction::Values(ps), Truth::Labels(ls)) => {
                ps.iter().zip(ls).for_each(|(p, l)| _ = quality::add_label(&mut window, i64::from(*p >= 0.5), *l))
            }
            (Prediction::Values(ps), Truth::Values(vs)) => {
                ps.iter().zip(vs).for_each(|(p, v)| _ = quality::add_value(&mut window, *p, *v))
            }
            (Prediction::Classes(_), Truth::Values(_)) => return Err(FeedbackError::WantsLabels),
        }
        if self.window.is_none() {
            self.opened_ms = now_ms;
        }
        self.window = Some(window);
        self.forget(id);
        Ok(got as u64)
    }

    /// The window, if it is full or old enough to close.
    pub fn poll(&mut self, now_ms: u64) -> Option<QualityReport> {
        self.close(now_ms, false)
    }

    /// The window, closed now if it counted anything: the version is no
    /// longer served, and no more feedback for it is coming.
    pub fn flush(&mut self, now_ms: u64) -> Option<QualityReport> {
        self.close(now_ms, true)
    }

    fn close(&mut self, now_ms: u64, now: bool) -> Option<QualityReport> {
        let rows = self.window.as_ref().map_or(0, quality::rows);
        let full = rows >= self.config.window_rows;
        let old = rows > 0 && (now || now_ms.saturating_sub(self.opened_ms) >= self.config.window_ms);
        if !(full || old) {
            return None;
        }
        let counts = self.window.take().expect("rows counted");
        let report = QualityReport { seq: self.seq, opened_ms: self.opened_ms, closed_ms: now_ms, counts };
        self.seq += 1;
        self.opened_ms = now_ms;
        Some(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: Vec<usize>, data: TensorData) -> Tensor {
        Tensor { shape, data }
    }

    #[test]
    fn predictions_are_read_from_the_first_output() {
        let scores = t(vec![2, 3], TensorData::F32(vec![0.1, 0.7, 0.2, 0.9, 0.05, 0.05]));
        assert_eq!(prediction(&[scores]), Some(Prediction::Classes(vec![1, 0])));
        let labels = t(vec![3], TensorData::I64(vec![2, 0, 1]));
        assert_eq!(prediction(&[labels]), Some(Prediction::Classes(vec![2, 0, 1])));
        let values = t(vec![2, 1], TensorData::F32(vec![1.5, -2.0]));
        assert_eq!(prediction(&[values]), Some(Prediction::Values(vec![1.5, -2.0])));
        assert_eq!(prediction(&[t(vec![0, 3], TensorData::F32(vec![]))]), None);
        assert_eq!(prediction(&[]), None);
    }

    fn config() -> FeedbackConfig {
        FeedbackConfig { keep: 3, keep_ms: 1000, window_rows: 4, window_ms: 500 }
    }

    #[test]
    fn feedback_is_counted_once_and_windows_close_by_rows_or_age() {
        let mut f = Feedback::new(config(), 0);
        f.predicted("a".into(), Prediction::Classes(vec![1, 2]), 0);
        f.predicted("b".into(), Prediction::Classes(vec![0]), 0);
        assert_eq!(f.feedback("a", Truth::Labels(vec![1, 1]), 10), Ok(2));
        assert_eq!(f.feedback("a", Truth::Labels(vec![1, 1]), 10), Err(FeedbackError::Unknown("a".into())));
        assert_eq!(f.feedback("b", Truth::Labels(vec![0, 0]), 10), Err(FeedbackError::Rows { expected: 1, got: 2 }));
        assert_eq!(f.feedback("b", Truth::Values(vec![0.0]), 10), Err(FeedbackError::Mixed("labels")));
        assert_eq!(f.poll(400), None, "neither full nor old");
        let w = f.poll(510).expect("old");
        assert_eq!((w.seq, w.opened_ms, w.closed_ms), (0, 10, 510));
        let m = quality::metrics(&w.counts);
        assert_eq!((m.rows, m.accuracy), (2, Some(0.5)));
        assert_eq!(f.poll(5000), None, "no empty windows");
        assert_eq!(f.feedback("b", Truth::Labels(vec![0]), 600), Ok(1));
        for (i, id) in ["c", "d", "e"].into_iter().enumerate() {
            f.predicted(id.into(), Prediction::Classes(vec![i as i64]), 600);
        }
        for id in ["c", "d", "e"] {
            f.feedback(id, Truth::Labels(vec![0]), 601).unwrap();
        }
        let w = f.poll(601).expect("full: 4 rows");
        assert_eq!((w.seq, quality::rows(&w.counts)), (1, 4));
    }

    #[test]
    fn answers_are_forgotten_when_old_or_too_many() {
        let mut f = Feedback::new(config(), 0);
        for (i, id) in ["a", "b", "c", "d"].into_iter().enumerate() {
            f.predicted(id.into(), Prediction::Values(vec![i as f64]), 0);
        }
        assert_eq!(f.kept(), 3);
        assert!(matches!(f.feedback("a", Truth::Values(vec![0.0]), 1), Err(FeedbackError::Unknown(_))));
        assert_eq!(f.feedback("b", Truth::Values(vec![0.0]), 999), Ok(1));
        assert!(matches!(f.feedback("c", Truth::Values(vec![0.0]), 1000), Err(FeedbackError::Unknown(_))));
        assert_eq!(f.kept(), 0);
        // A window of values takes no labels.
        f.predicted("p".into(), Prediction::Values(vec![0.7, 0.2]), 2000);
        assert_eq!(f.feedback("p", Truth::Labels(vec![1, 1]), 2000), Err(FeedbackError::Mixed("values")));
    }

    #[test]
    fn one_score_per_row_against_labels_is_a_binary_classifier_s_probability() {
        let mut f = Feedback::new(config(), 0);
        f.predicted("p".into(), Prediction::Values(vec![0.7, 0.2, 0.5]), 0);
        assert_eq!(f.feedback("p", Truth::Labels(vec![1, 1, 1]), 1), Ok(3));
        let w = f.poll(1000).expect("old");
        // 0.7 and 0.5 are class 1, 0.2 class 0: two of three right.
        let m = quality::metrics(&w.counts);
        assert!((m.accuracy.unwrap() - 2.0 / 3.0).abs() < 1e-12, "{m:?}");
    }

    #[test]
    fn a_single_score_takes_only_binary_labels_and_a_flush_closes_what_was_counted() {
        let mut f = Feedback::new(config(), 0);
        f.predicted("p".into(), Prediction::Values(vec![0.9]), 0);
        assert_eq!(f.feedback("p", Truth::Labels(vec![2]), 1), Err(FeedbackError::NotBinary));
        assert_eq!(f.flush(2), None, "nothing counted");
        assert_eq!(f.feedback("p", Truth::Labels(vec![1]), 3), Ok(1));
        let w = f.flush(4).expect("one row, closed at once");
        assert_eq!(quality::metrics(&w.counts).accuracy, Some(1.0));
        let big = Tensor { shape: vec![MAX_ROWS + 1], data: TensorData::I64(vec![0; MAX_ROWS + 1]) };
        assert_eq!(prediction(&[big]), None, "too many rows to keep");
    }

    #[test]
    fn kept_rows_are_bounded_whatever_the_number_of_answers() {
        let mut f = Feedback::new(FeedbackConfig { keep: 100_000, ..FeedbackConfig::default() }, 0);
        for i in 0..100 {
            f.predicted(format!("{i}"), Prediction::Classes(vec![0; MAX_ROWS]), 0);
        }
        assert_eq!(f.kept(), MAX_KEPT_ROWS / MAX_ROWS);
        assert!(matches!(f.feedback("0", Truth::Labels(vec![0; MAX_ROWS]), 1), Err(FeedbackError::Unknown(_))));
        assert_eq!(f.feedback("99", Truth::Labels(vec![0; MAX_ROWS]), 1), Ok(MAX_ROWS as u64));
    }

    #[test]
    fn a_classifier_takes_no_values() {
        let mut f = Feedback::new(config(), 0);
        f.predicted("a".into(), Prediction::Classes(vec![1]), 0);
        assert_eq!(f.feedback("a", Truth::Values(vec![1.0]), 1), Err(FeedbackError::WantsLabels));
        assert_eq!(f.poll(10_000), None, "nothing counted");
    }
}

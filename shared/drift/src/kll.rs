//! A mergeable quantile sketch (KLL) with a rank-error bound it keeps
//! itself.

use serde::{Deserialize, Serialize};

/// The smallest and largest `k` a sketch may have.
pub const K_RANGE: std::ops::RangeInclusive<u16> = 8..=4096;
/// How much smaller each level below the top is than the one above it.
pub const SHRINK: f64 = 2.0 / 3.0;
/// Levels a sketch may have (a level holds items of weight `2^level`).
const MAX_LEVELS: usize = 60;

/// A KLL sketch (Karnin, Lang and Liberty, 2016) of finite values: levels
/// of items, an item on level `h` standing for `2^h` values, the top level
/// holding up to `k` and each one below it 2/3 as many (at least 2). A
/// full level is sorted and every other item of it moves up a level; which
/// of each pair is a coin drawn from a pseudo-random sequence (by the
/// sketch's seed, the level and the compaction, independent of the data),
/// so the same values in the same order always give the same sketch.
///
/// Error bounds, for the estimated rank of any `x` (values at or below
/// it). Compacting a sorted level of weight `w` moves it by `-w`, 0 or
/// `+w` (only the one pair that straddles `x` can move it), `±w` each with
/// probability 1/2. So [`Kll::worst_rank_error`], the sum of those weights
/// over every compaction, merges included, bounds the error always; and by
/// the Azuma–Hoeffding inequality the error exceeds
/// `sqrt(2 ln(2/δ) Σ w²)` with probability at most `δ`
/// ([`Kll::rank_error_bound`]), at one `x`. Both are 0 until the sketch
/// first compacts (at `k` values). Sketches merged into one must have been
/// made with different seeds for the second bound to hold (the coins of
/// their compactions must be independent); the first holds regardless.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Kll {
    k: u16,
    seed: u64,
    n: u64,
    /// Sum of the weights of all compactions.
    worst: u64,
    /// Sum of the squared weights of all compactions.
    squares: f64,
    levels: Vec<Level>,
    /// The length of level 0 at which the sketch reaches its size and
    /// must compress (0 when not known: after decoding).
    #[serde(skip)]
    trigger: Trigger,
}

/// A cached number that takes no part in equality.
#[derive(Clone, Copy, Debug, Default)]
struct Trigger(usize);

impl PartialEq for Trigger {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Level {
    items: Vec<f64>,
    /// Compactions of this level so far (the coin's index).
    compactions: u64,
}

/// SplitMix64's finalizer: a bijection of `u64` that mixes every bit.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The coin for compaction `i` of level `h` of a sketch seeded `seed`:
/// mixed in turn, so that no two (seed, level, index) share a coin by
/// construction (as they would if combined by XOR first).
fn coin(seed: u64, h: usize, i: u64) -> bool {
    mix(mix(mix(seed) ^ h as u64) ^ i) & 1 == 1
}

impl Kll {
    /// An empty sketch whose top level holds `k` items (clamped to
    /// [`K_RANGE`]), its coins drawn by `seed`.
    pub fn new(k: u16, seed: u64) -> Self {
        let k = k.clamp(*K_RANGE.start(), *K_RANGE.end());
        Self { k, seed, n: 0, worst: 0, squares: 0.0, levels: vec![Level::default()], trigger: Trigger(usize::from(k)) }
    }

    /// The sketch's `k`.
    pub fn k(&self) -> u16 {
        self.k
    }

    /// Values seen.
    pub fn n(&self) -> u64 {
        self.n
    }

    /// The largest amount by which [`Kll::rank`] can differ from the
    /// true number of values at or below a point, whatever the coins.
    pub fn worst_rank_error(&self) -> u64 {
        self.worst
    }

    /// A rank error that [`Kll::rank`] exceeds with probability at most
    /// `delta` (never more than [`Kll::worst_rank_error`]).
    pub fn rank_error_bound(&self, delta: f64) -> f64 {
        let delta = delta.clamp(f64::MIN_POSITIVE, 1.0);
        (2.0 * (2.0 / delta).ln() * self.squares).sqrt().min(self.worst as f64)
    }

    /// [`Kll::rank_error_bound`] at `delta` as a share of the values seen.
    pub fn normalized_error_bound(&self, delta: f64) -> f64 {
        if self.n == 0 { 0.0 } else { self.rank_error_bound(delta) / self.n as f64 }
    }

    /// Items kept, per level (level `h` items each stand for `2^h`
    /// values): Model Monitor's `sketch.data`.
    pub fn levels(&self) -> impl Iterator<Item = &[f64]> {
        self.levels.iter().map(|l| l.items.as_slice())
    }

    fn capacity(&self, level: usize) -> usize {
        let depth = (self.levels.len() - level - 1) as i32;
        ((f64::from(self.k) * SHRINK.powi(depth)).ceil() as usize).max(2)
    }

    fn max_items(&self) -> usize {
        (0..self.levels.len()).map(|h| self.capacity(h)).sum()
    }

    fn items(&self) -> usize {
        self.levels.iter().map(|l| l.items.len()).sum()
    }

    /// Adds one value; one that is not finite is ignored.
    #[inline]
    pub fn push(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        self.n = self.n.saturating_add(1);
        self.levels[0].items.push(x);
        if self.levels[0].items.len() >= self.trigger.0 {
            self.compress();
        }
    }

    /// Compacts full levels, lowest first, until the sketch is within its
    /// size.
    fn compress(&mut self) {
        self.compact();
        // Push compresses again when the whole reaches its size.
        let room = self.max_items().saturating_sub(self.items()).max(1);
        self.trigger = Trigger(self.levels[0].items.len() + room);
    }

    fn compact(&mut self) {
        while self.items() >= self.max_items() {
            let Some(h) = (0..self.levels.len()).find(|&h| self.levels[h].items.len() >= self.capacity(h)) else {
                return;
            };
            if h + 1 == self.levels.len() {
                if self.levels.len() == MAX_LEVELS {
                    return;
                }
                self.levels.push(Level::default());
            }
            let level = &mut self.levels[h];
            level.items.sort_unstable_by(f64::total_cmp);
            // An odd item out (the smallest) stays; the rest pair up.
            let start = level.items.len() % 2;
            let offset = usize::from(coin(self.seed, h, level.compactions));
            level.compactions = level.compactions.wrapping_add(1);
            let up: Vec<f64> = level.items[start..].iter().skip(offset).step_by(2).copied().collect();
            level.items.truncate(start);
            if !up.is_empty() {
                let w = 1u64 << h;
                self.worst = self.worst.saturating_add(w);
                self.squares += (w as f64) * (w as f64);
            }
            self.levels[h + 1].items.extend(up);
        }
    }

    /// Adds the values `other` summarizes.
    pub fn merge(&mut self, other: &Self) {
        while self.levels.len() < other.levels.len() {
            self.levels.push(Level::default());
        }
        for (mine, theirs) in self.levels.iter_mut().zip(&other.levels) {
            mine.items.extend_from_slice(&theirs.items);
        }
        self.n = self.n.saturating_add(other.n);
        self.worst = self.worst.saturating_add(other.worst);
        self.squares += other.squares;
        // Fresh coins from here on: the ones either side drew before are
        // not drawn again for the merged items.
        self.seed = mix(self.seed ^ mix(other.seed).rotate_left(17));
        self.compress();
    }

    /// The items and their weights, sorted by value.
    pub fn weighted(&self) -> Vec<(f64, u64)> {
        let mut out: Vec<(f64, u64)> =
            self.levels.iter().enumerate().flat_map(|(h, l)| l.items.iter().map(move |x| (*x, 1u64 << h))).collect();
        out.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        out
    }

    /// Estimated number of values at or below `x`.
    pub fn rank(&self, x: f64) -> u64 {
        self.levels.iter().enumerate().map(|(h, l)| l.items.iter().filter(|v| **v <= x).count() as u64 * (1 << h)).sum()
    }

    /// The smallest kept item whose estimated rank reaches `q · n` (`q` in
    /// `[0, 1]`); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let sorted = self.weighted();
        let target = (q.clamp(0.0, 1.0) * self.n as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (x, w) in &sorted {
            seen += w;
            if seen >= target {
                return Some(*x);
            }
        }
        sorted.last().map(|(x, _)| *x)
    }

    /// Checks a sketch that came from elsewhere: `k` in range, finite
    /// items, no level over its capacity, weights adding up to `n`.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !K_RANGE.contains(&self.k) {
            return Err(format!("sketch k {} outside {K_RANGE:?}", self.k));
        }
        if self.levels.is_empty() || self.levels.len() > MAX_LEVELS {
            return Err(format!("sketch has {} levels (1 to {MAX_LEVELS})", self.levels.len()));
        }
        // A level may hold more than its capacity while the whole is within
        // the sketch's size, and level 0 fills before anything compacts.
        let most = self.max_items() + self.capacity(0);
        if self.items() > most {
            return Err(format!("sketch holds {} items, over its size {most}", self.items()));
        }
        let mut weight: u64 = 0;
        for (h, level) in self.levels.iter().enumerate() {
            if level.items.iter().any(|x| !x.is_finite()) {
                return Err(format!("sketch level {h} holds a value that is not finite"));
            }
            weight = (level.items.len() as u64)
                .checked_mul(1 << h)
                .and_then(|w| weight.checked_add(w))
                .ok_or("sketch weights overflow")?;
        }
        if weight != self.n {
            return Err(format!("sketch items weigh {weight}, but it says it saw {} values", self.n));
        }
        if !self.squares.is_finite() || self.squares < 0.0 {
            return Err("sketch error terms are not a finite non-negative number".into());
        }
        Ok(())
    }

    /// A sketch from Model Monitor's `sketch.data` (level `h`'s items each
    /// stand for `2^h` values). Its compactions are unknown: both error
    /// bounds are taken as the count of values above level 0, each of
    /// which a compaction may have moved.
    pub fn from_levels(k: u16, levels: Vec<Vec<f64>>) -> Result<Self, String> {
        if levels.is_empty() || levels.len() > MAX_LEVELS {
            return Err(format!("sketch has {} levels (1 to {MAX_LEVELS})", levels.len()));
        }
        let mut n: u64 = 0;
        for (h, items) in levels.iter().enumerate() {
            n = (items.len() as u64)
                .checked_mul(1 << h)
                .and_then(|w| n.checked_add(w))
                .ok_or("sketch weights overflow")?;
        }
        let k = k.clamp(*K_RANGE.start(), *K_RANGE.end());
        let levels: Vec<Level> = levels.into_iter().map(|items| Level { items, compactions: 0 }).collect();
        let worst = n.saturating_sub(levels[0].items.len() as u64);
        let squares = (worst as f64) * (worst as f64);
        let mut sketch = Self { k, seed: 0, n, worst, squares, levels, trigger: Trigger(0) };
        // A sketch made with a larger k (or other level sizes): widen ours
        // until it holds it.
        while sketch.items() > sketch.max_items() + sketch.capacity(0) && sketch.k < *K_RANGE.end() {
            sketch.k = sketch.k.saturating_mul(2).min(*K_RANGE.end());
        }
        sketch.validate()?;
        Ok(sketch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_streams_are_exact() {
        let mut s = Kll::new(200, 1);
        for x in [3.0, 1.0, 2.0, 2.0] {
            s.push(x);
        }
        assert_eq!(s.worst_rank_error(), 0);
        assert_eq!(s.rank_error_bound(0.01), 0.0);
        assert_eq!(s.rank(2.0), 3);
        assert_eq!(s.rank(0.5), 0);
        assert_eq!(s.quantile(0.5), Some(2.0));
        assert_eq!(s.quantile(1.0), Some(3.0));
    }

    #[test]
    fn a_long_stream_stays_small_and_within_its_bound() {
        let mut s = Kll::new(200, 1);
        let n = 100_000u64;
        // A permutation of 0..n, so the true rank of x is x + 1.
        for i in 0..n {
            s.push(((i * 7919) % n) as f64);
        }
        assert!(s.items() < 700, "{} items", s.items());
        assert_eq!(s.weighted().iter().map(|(_, w)| w).sum::<u64>(), n);
        let bound = s.rank_error_bound(1e-6);
        for x in (0..n).step_by(997) {
            let err = s.rank(x as f64).abs_diff(x + 1);
            assert!(err <= s.worst_rank_error(), "rank of {x}: off by {err} > {}", s.worst_rank_error());
            assert!(err as f64 <= bound, "rank of {x}: off by {err} > {bound}");
        }
        assert!(s.normalized_error_bound(0.01) < 0.05, "{}", s.normalized_error_bound(0.01));
        s.validate().unwrap();
    }
}

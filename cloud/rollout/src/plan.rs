//! A plan and the waves it makes of a target set.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A device a rollout may touch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Its id.
    pub device: String,
    /// Its device profile.
    pub profile: String,
    /// Its group.
    pub group: String,
    /// The version of the model it has now (what a rollback puts back),
    /// if any.
    pub previous: Option<u32>,
}

/// What stops a wave: hawkBit's error threshold over the wave's devices,
/// and limits on what each device measured of the new version.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gates {
    /// The wave fails when more than this share of its devices failed
    /// (0: any one).
    pub max_failed: f64,
    /// A device fails below this agreement with the serving version in
    /// shadow (0 to 1).
    pub min_shadow_agreement: Option<f64>,
    /// A device fails above this error rate on probation (0 to 1).
    pub max_error_rate: Option<f64>,
    /// A device fails above this p99 latency (milliseconds).
    pub max_p99_ms: Option<f64>,
    /// A device fails above this drift distance.
    pub max_drift: Option<f64>,
}

impl Default for Gates {
    fn default() -> Self {
        Self { max_failed: 0.0, min_shadow_agreement: None, max_error_rate: None, max_p99_ms: None, max_drift: None }
    }
}

/// What a failed wave does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop where it is until an operator resumes, aborts or rolls back.
    #[default]
    Pause,
    /// Put every device touched back on its previous version.
    Rollback,
}

/// A rollout plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The model.
    pub model: String,
    /// The version rolled out.
    pub version: u32,
    /// Cumulative shares of the target set in percent, increasing, the
    /// last 100: `[1, 5, 25, 100]`. The first wave is the canary, and also
    /// holds a device of every profile and group in the target set.
    #[serde(default = "default_waves")]
    pub waves: Vec<u32>,
    /// How long a wave's devices must stay healthy, after the last of them
    /// reported, before the next wave starts (seconds).
    #[serde(default = "default_bake")]
    pub bake_secs: u64,
    /// How long a device has to report its update, once sent (seconds; a
    /// device waiting for its maintenance window is not counted down).
    /// Past it the device counts as failed.
    #[serde(default = "default_deadline")]
    pub deadline_secs: u64,
    /// How long a device may wait for its maintenance window before it
    /// counts as failed (seconds).
    #[serde(default = "default_max_wait")]
    pub max_wait_secs: u64,
    /// What stops a wave.
    #[serde(default)]
    pub gates: Gates,
    /// What a failed wave does.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Orders the devices: the same seed and target set give the same
    /// waves.
    #[serde(default)]
    pub seed: u64,
}

/// The longest bake, deadline or wait a plan may give: 30 days.
pub const MAX_SECS: u64 = 30 * 86_400;

fn default_waves() -> Vec<u32> {
    vec![1, 5, 25, 100]
}
fn default_bake() -> u64 {
    600
}
fn default_deadline() -> u64 {
    1800
}
fn default_max_wait() -> u64 {
    86_400
}

/// Why a plan was refused before any device was touched.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The selector matched no device.
    #[error("the target set is empty: no device matches the plan's selector")]
    NoTargets,
    /// The waves are not increasing shares ending at 100 %.
    #[error("waves {0:?}: shares in percent, each above the last, from 1 up, the last 100")]
    Waves(Vec<u32>),
    /// A gate's threshold is out of its range.
    #[error("gate {gate} = {value}: {range}")]
    Gate {
        /// The gate.
        gate: &'static str,
        /// What it was given.
        value: f64,
        /// What it may be.
        range: &'static str,
    },
    /// A duration out of its range.
    #[error("{what} = {secs}: 1 s to 30 days (a bake may be 0)")]
    Duration {
        /// Which.
        what: &'static str,
        /// What it was given.
        secs: u64,
    },
    /// A device is listed twice.
    #[error("device {0} is in the target set twice")]
    Duplicate(String),
}

impl Plan {
    /// Checks what does not depend on the fleet.
    pub fn check(&self) -> Result<(), PlanError> {
        let w = &self.waves;
        if w.is_empty() || w.last() != Some(&100) || w[0] == 0 || w.windows(2).any(|p| p[0] >= p[1]) {
            return Err(PlanError::Waves(w.clone()));
        }
        for (what, secs) in [
            ("bake_secs", self.bake_secs),
            ("deadline_secs", self.deadline_secs),
            ("max_wait_secs", self.max_wait_secs),
        ] {
            if secs > MAX_SECS || (what != "bake_secs" && secs == 0) {
                return Err(PlanError::Duration { what, secs });
            }
        }
        let g = &self.gates;
        let share = |gate, v: f64| {
            (0.0..=1.0).contains(&v).then_some(()).ok_or(PlanError::Gate { gate, value: v, range: "0 to 1" })
        };
        let positive = |gate, v: f64| {
            (v.is_finite() && v >= 0.0).then_some(()).ok_or(PlanError::Gate { gate, value: v, range: "0 or more" })
        };
        share("max_failed", g.max_failed)?;
        g.min_shadow_agreement.map_or(Ok(()), |v| share("min_shadow_agreement", v))?;
        g.max_error_rate.map_or(Ok(()), |v| share("max_error_rate", v))?;
        g.max_p99_ms.map_or(Ok(()), |v| positive("max_p99_ms", v))?;
        g.max_drift.map_or(Ok(()), |v| positive("max_drift", v))?;
        Ok(())
    }

    /// The waves over `targets`, as indexes into it: devices ordered by a
    /// hash of the seed and their id; the canary, in that order, each device
    /// that brings a profile or a group no device before it in the canary
    /// has (so every profile and every group present is in it, with at
    /// most as many devices as there are profiles and groups), then the
    /// next in order up to its share;
    /// each later wave the next in order up to its share (a wave its share
    /// rounds to nothing is left out). Every device is in exactly one wave.
    pub fn waves(&self, targets: &[Target]) -> Result<Vec<Vec<usize>>, PlanError> {
        self.check()?;
        if targets.is_empty() {
            return Err(PlanError::NoTargets);
        }
        let mut seen = BTreeSet::new();
        for t in targets {
            if !seen.insert(t.device.as_str()) {
                return Err(PlanError::Duplicate(t.device.clone()));
            }
        }
        let mut order: Vec<usize> = (0..targets.len()).collect();
        order.sort_by_key(|&i| (hash(self.seed, &targets[i].device), targets[i].device.clone()));
        let n = targets.len();
        let upto = |pct: u32| (n * pct as usize).div_ceil(100);
        let mut placed = vec![false; n];
        let mut canary = Vec::new();
        let (mut profiles, mut groups) = (BTreeSet::new(), BTreeSet::new());
        for &i in &order {
            let new_profile = !profiles.contains(targets[i].profile.as_str());
            let new_group = !groups.contains(targets[i].group.as_str());
            if new_profile || new_group {
                profiles.insert(targets[i].profile.as_str());
                groups.insert(targets[i].group.as_str());
                canary.push(i);
                placed[i] = true;
            }
        }
        let mut rest = order.iter().copied().filter(|i| !placed[*i]);
        while canary.len() < upto(self.waves[0]) {
            canary.push(rest.next().expect("fewer placed than targets"));
        }
        let mut waves = vec![canary];
        let mut count = waves[0].len();
        for &pct in &self.waves[1..] {
            let wave: Vec<usize> = rest.by_ref().take(upto(pct).saturating_sub(count)).collect();
            count += wave.len();
            if !wave.is_empty() {
                waves.push(wave);
            }
        }
        debug_assert_eq!(count, n);
        Ok(waves)
    }
}

/// FNV-1a over the seed and the id: stable across builds and platforms
/// (std's hasher is not promised to be).
fn hash(seed: u64, id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(id.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn fleet(n: usize) -> Vec<Target> {
        (0..n)
            .map(|i| Target {
                device: format!("cam-{i:04}"),
                profile: ["rpi4", "jetson-orin", "x86"][i % 3].into(),
                group: if i % 10 == 0 { "lab".into() } else { "field".into() },
                previous: Some(1),
            })
            .collect()
    }

    pub(crate) fn plan() -> Plan {
        Plan {
            model: "cam".into(),
            version: 2,
            waves: default_waves(),
            bake_secs: 60,
            deadline_secs: 300,
            max_wait_secs: 3600,
            gates: Gates::default(),
            on_failure: OnFailure::Pause,
            seed: 7,
        }
    }

    #[test]
    fn the_canary_covers_every_profile_and_group_and_waves_grow_to_the_whole_set() {
        let targets = fleet(1000);
        let waves = plan().waves(&targets).unwrap();
        let sizes: Vec<usize> = waves.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![10, 40, 200, 750]);
        let profiles: BTreeSet<_> = waves[0].iter().map(|&i| targets[i].profile.clone()).collect();
        let groups: BTreeSet<_> = waves[0].iter().map(|&i| targets[i].group.clone()).collect();
        assert_eq!((profiles.len(), groups.len()), (3, 2), "every profile and group");
        let mut all: Vec<usize> = waves.concat();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>(), "every device once");
        // Deterministic in the seed, and another seed orders otherwise.
        assert_eq!(plan().waves(&targets).unwrap(), waves);
        let other = Plan { seed: 8, ..plan() };
        assert_ne!(other.waves(&targets).unwrap()[0], waves[0]);
    }

    #[test]
    fn a_canary_over_many_groups_stays_near_the_number_of_classes_not_their_product() {
        // 10 profiles × 50 groups over 5,000 devices: a device per class
        // would be 500 (10 %); one per new profile or group is at most 60.
        let targets: Vec<Target> = (0..5000)
            .map(|i| Target {
                device: format!("d{i}"),
                profile: format!("p{}", i % 10),
                group: format!("g{}", (i / 10) % 50),
                previous: None,
            })
            .collect();
        let waves = plan().waves(&targets).unwrap();
        assert!(waves[0].len() <= 60, "{}", waves[0].len());
        let profiles: BTreeSet<_> = waves[0].iter().map(|&i| &targets[i].profile).collect();
        let groups: BTreeSet<_> = waves[0].iter().map(|&i| &targets[i].group).collect();
        assert_eq!((profiles.len(), groups.len()), (10, 50));
    }

    #[test]
    fn a_small_fleet_gets_its_canary_and_no_empty_waves() {
        let targets = fleet(4);
        let waves = plan().waves(&targets).unwrap();
        // 3 profiles and 2 groups in 4 devices: the canary holds 3 or 4 of
        // them (every profile and group), the rest is one more wave.
        let profiles: BTreeSet<_> = waves[0].iter().map(|&i| &targets[i].profile).collect();
        let groups: BTreeSet<_> = waves[0].iter().map(|&i| &targets[i].group).collect();
        assert_eq!((profiles.len(), groups.len()), (3, 2));
        assert!(waves.len() <= 2 && waves.iter().all(|w| !w.is_empty()));
        assert_eq!(waves.concat().len(), 4);
        let waves = Plan { waves: vec![50, 100], ..plan() }.waves(&fleet(20)).unwrap();
        assert_eq!(waves.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 10]);
    }

    #[test]
    fn bad_plans_are_refused_before_anything() {
        for w in [vec![], vec![5, 50], vec![0, 100], vec![10, 10, 100], vec![50, 20, 100]] {
            assert_eq!(Plan { waves: w.clone(), ..plan() }.check(), Err(PlanError::Waves(w)));
        }
        assert_eq!(plan().waves(&[]), Err(PlanError::NoTargets));
        let mut twice = fleet(3);
        twice.push(twice[0].clone());
        assert_eq!(plan().waves(&twice), Err(PlanError::Duplicate("cam-0000".into())));
        let g = Gates { max_failed: 1.5, ..Gates::default() };
        assert!(matches!(Plan { gates: g, ..plan() }.check(), Err(PlanError::Gate { gate: "max_failed", .. })));
        let g = Gates { max_p99_ms: Some(f64::NAN), ..Gates::default() };
        assert!(matches!(Plan { gates: g, ..plan() }.check(), Err(PlanError::Gate { gate: "max_p99_ms", .. })));
    }

    #[test]
    fn a_plan_reads_from_toml_with_its_defaults() {
        let p: Plan = toml_like(
            r#"{"model": "cam", "version": 3, "gates": {"max_failed": 0.05, "max_p99_ms": 40.0}, "on_failure": "rollback"}"#,
        );
        assert_eq!((p.waves, p.bake_secs, p.on_failure), (default_waves(), 600, OnFailure::Rollback));
        assert_eq!(p.gates.max_p99_ms, Some(40.0));
    }

    fn toml_like(json: &str) -> Plan {
        serde_json::from_str(json).unwrap()
    }
}

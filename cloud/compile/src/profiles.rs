//! The device profiles a model is compiled for, as their files in
//! `firmware-targets/profiles` say (the agent reads the same files).

use serde::Deserialize;

include!(concat!(env!("OUT_DIR"), "/profiles.rs"));

/// One device profile, as far as compilation needs it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Profile {
    /// Its name (the file's stem).
    #[serde(skip)]
    pub name: String,
    /// CPU architecture.
    pub arch: String,
    /// What the hardware is.
    pub description: String,
    /// Accelerators the hardware has.
    #[serde(default)]
    pub accelerators: Vec<String>,
    /// What `tern compile` checks against.
    #[serde(default)]
    pub compile: Settings,
}

/// A profile's `[compile]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Pins an open first (batch) axis when no shape is given for it.
    #[serde(default)]
    pub batch: Option<usize>,
    /// Latency on the device ÷ latency on the compiling machine.
    #[serde(default = "one")]
    pub speed_factor: f64,
    /// Where `speed_factor` comes from.
    #[serde(default)]
    pub speed_factor_source: String,
    /// Budget for one model's memory, in MiB.
    #[serde(default)]
    pub max_model_memory_mb: Option<u64>,
    /// Budget for one model's p99 latency, in milliseconds.
    #[serde(default)]
    pub max_p99_ms: Option<u64>,
}

fn one() -> f64 {
    1.0
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            batch: None,
            speed_factor: 1.0,
            speed_factor_source: String::new(),
            max_model_memory_mb: None,
            max_p99_ms: None,
        }
    }
}

impl Settings {
    /// `host_p99_us` on this profile's hardware: an estimate through
    /// [`Settings::speed_factor`], not a measurement.
    pub fn estimate_p99_us(&self, host_p99_us: u64) -> u64 {
        (host_p99_us as f64 * self.speed_factor).round() as u64
    }

    /// Why a model that takes `peak_model_bytes` and is estimated at
    /// `estimated_p99_us` does not fit this profile; `None`: it fits.
    pub fn refusal(&self, peak_model_bytes: u64, estimated_p99_us: u64) -> Option<String> {
        let mut why = Vec::new();
        if let Some(mb) = self.max_model_memory_mb.filter(|mb| peak_model_bytes > mb.saturating_mul(1 << 20)) {
            why.push(format!(
                "it takes {:.1} MiB (measured), the profile allows {mb} MiB for a model",
                peak_model_bytes as f64 / (1 << 20) as f64
            ));
        }
        if let Some(ms) = self.max_p99_ms.filter(|ms| estimated_p99_us > ms.saturating_mul(1000)) {
            why.push(format!(
                "its p99 is estimated at {:.1} ms ({}x this machine's; an estimate), the profile allows {ms} ms",
                estimated_p99_us as f64 / 1000.0,
                self.speed_factor
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// Every built-in profile, by name.
pub fn all() -> Vec<Profile> {
    FILES
        .iter()
        .map(|(name, text)| {
            let mut p: Profile = toml::from_str(text).unwrap_or_else(|e| panic!("profile {name}: {e}"));
            p.name = (*name).to_owned();
            p
        })
        .collect()
}

/// The built-in profile `name`.
pub fn get(name: &str) -> Result<Profile, crate::CompileError> {
    all()
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| crate::CompileError::UnknownProfile { name: name.to_owned(), known: names().join(", ") })
}

/// The built-in profiles' names.
pub fn names() -> Vec<&'static str> {
    FILES.iter().map(|(n, _)| *n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_parses_and_states_where_its_speed_factor_comes_from() {
        let all = all();
        assert!(all.len() >= 5, "{all:?}");
        for p in &all {
            assert!(p.compile.speed_factor > 0.0, "{}", p.name);
            assert!(!p.compile.speed_factor_source.is_empty(), "{} gives no source for its speed factor", p.name);
        }
        assert_eq!(get("rpi4").unwrap().compile.batch, Some(1));
        let s =
            Settings { max_model_memory_mb: Some(64), max_p99_ms: Some(10), speed_factor: 4.0, ..Settings::default() };
        assert_eq!(s.estimate_p99_us(2_600), 10_400);
        assert_eq!(s.refusal(64 << 20, 10_000), None);
        let both = s.refusal((64 << 20) + 1, 10_001).unwrap();
        assert_eq!(
            both,
            "it takes 64.0 MiB (measured), the profile allows 64 MiB for a model; \
             its p99 is estimated at 10.0 ms (4x this machine's; an estimate), the profile allows 10 ms"
        );
        assert_eq!(Settings::default().refusal(u64::MAX, u64::MAX), None, "no budget, no refusal");
        let e = get("rpi9").unwrap_err().to_string();
        assert!(e.starts_with("no device profile \"rpi9\" (built in: generic-linux, "), "{e}");
    }
}

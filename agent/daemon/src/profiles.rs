//! Device profiles (`firmware-targets/profiles/*.toml`), built into the
//! agent: the hardware class a device enrolled as decides its defaults.

use serde::Deserialize;

/// One hardware class.
#[derive(Debug, Clone, Deserialize)]
pub struct Profile {
    /// Format version of the file.
    pub version: u32,
    /// CPU architecture the profile is for.
    pub arch: String,
    /// What the hardware is.
    pub description: String,
    /// CPU cores, when the class fixes them.
    #[serde(default)]
    pub cores: Option<usize>,
    /// Memory, when the class fixes it.
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Accelerators present (informational for now).
    #[serde(default)]
    pub accelerators: Vec<String>,
    /// Worker threads per model; 0 means one per core.
    pub threads_per_model: usize,
    /// Queue slots per model.
    pub queue_per_model: usize,
}

const PROFILES: &[(&str, &str)] = &[
    ("generic-linux", include_str!("../../../firmware-targets/profiles/generic-linux.toml")),
    ("rpi3-armv7", include_str!("../../../firmware-targets/profiles/rpi3-armv7.toml")),
    ("rpi4", include_str!("../../../firmware-targets/profiles/rpi4.toml")),
    ("rpi5", include_str!("../../../firmware-targets/profiles/rpi5.toml")),
    ("jetson-orin-nano", include_str!("../../../firmware-targets/profiles/jetson-orin-nano.toml")),
];

/// The built-in profile of that name.
pub fn lookup(name: &str) -> Option<Profile> {
    PROFILES.iter().find(|(n, _)| *n == name).map(|(_, text)| toml::from_str(text).expect("built-in profiles parse"))
}

/// Concurrent runs and queue places per model: flags first, then the
/// profile, then one run per core and 32 places.
pub fn budget(profile: Option<&Profile>, threads: Option<usize>, queue: Option<usize>) -> (usize, usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let from_profile = profile.map(|p| if p.threads_per_model == 0 { cores } else { p.threads_per_model });
    let threads = threads.or(from_profile).unwrap_or(cores).max(1);
    let queue = queue.or(profile.map(|p| p.queue_per_model)).unwrap_or(32);
    (threads, queue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_profile_parses() {
        for (name, _) in PROFILES {
            let p = lookup(name).unwrap();
            assert_eq!(p.version, 1, "{name}");
            assert!(!p.description.is_empty());
        }
        assert!(lookup("toaster").is_none());
    }

    #[test]
    fn flags_override_the_profile() {
        let rpi4 = lookup("rpi4").unwrap();
        assert_eq!(budget(Some(&rpi4), None, None), (2, 16));
        assert_eq!(budget(Some(&rpi4), Some(1), Some(4)), (1, 4));
        let generic = lookup("generic-linux").unwrap();
        assert!(budget(Some(&generic), None, None).0 >= 1);
        assert_eq!(budget(None, None, None).1, 32);
    }
}

//! Device profiles (`firmware-targets/profiles/*.toml`), built into the
//! agent (turned into constants by `build.rs`): the hardware class a device
//! enrolled as decides its defaults.

/// One hardware class.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Format version of the file.
    pub version: u32,
    /// CPU architecture the profile is for.
    pub arch: &'static str,
    /// What the hardware is.
    pub description: &'static str,
    /// CPU cores, when the class fixes them.
    pub cores: Option<usize>,
    /// Memory, when the class fixes it.
    pub memory_mb: Option<u64>,
    /// Accelerators present (informational for now).
    pub accelerators: &'static [&'static str],
    /// Worker threads per model; 0 means one per core.
    pub threads_per_model: usize,
    /// Queue slots per model.
    pub queue_per_model: usize,
    /// Largest batch per request for models with a dynamic batch axis.
    pub max_batch: Option<usize>,
    /// Request memory of the local API, in MiB.
    pub request_memory_mb: Option<usize>,
    /// Where the device's libonnxruntime is, if it has one.
    pub onnxruntime: Option<&'static str>,
    /// onnxruntime execution providers to ask for before the CPU.
    pub onnxruntime_providers: &'static [&'static str],
}

include!(concat!(env!("OUT_DIR"), "/profiles.rs"));

/// The built-in profile of that name.
pub fn lookup(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|(n, _)| *n == name).map(|(_, p)| p)
}

/// What the flags ask for; `None` takes the profile's value, then the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked {
    pub threads: Option<usize>,
    pub queue: Option<usize>,
    pub max_batch: Option<usize>,
    pub max_elements: Option<usize>,
    pub request_memory_mb: Option<usize>,
}

/// How the agent sizes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizing {
    /// Concurrent runs per model.
    pub threads: usize,
    /// Queue places per model.
    pub queue: usize,
    /// Request limits.
    pub limits: tern_proto::Limits,
    /// Request memory in bytes.
    pub request_memory: usize,
}

/// Flags first, then the profile, then one run per core, 32 places, a
/// batch of 64, 4 Mi elements per input and 64 MiB of request memory.
pub fn sizing(profile: Option<&Profile>, asked: Asked) -> Sizing {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let from_profile = profile.map(|p| if p.threads_per_model == 0 { cores } else { p.threads_per_model });
    let defaults = tern_proto::Limits::default();
    Sizing {
        threads: asked.threads.or(from_profile).unwrap_or(cores).max(1),
        queue: asked.queue.or(profile.map(|p| p.queue_per_model)).unwrap_or(32),
        limits: tern_proto::Limits {
            max_batch: asked.max_batch.or(profile.and_then(|p| p.max_batch)).unwrap_or(defaults.max_batch).max(1),
            max_elements: asked.max_elements.unwrap_or(defaults.max_elements).max(1),
        },
        request_memory: asked
            .request_memory_mb
            .or(profile.and_then(|p| p.request_memory_mb))
            .unwrap_or(64)
            .clamp(1, usize::MAX >> 20)
            .saturating_mul(1 << 20),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_profile_parses() {
        let names: Vec<&str> = PROFILES.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["generic-linux", "jetson-orin-nano", "rpi3-armv7", "rpi4", "rpi5"]);
        for (name, _) in PROFILES {
            let p = lookup(name).unwrap();
            assert_eq!(p.version, 1, "{name}");
            assert!(!p.description.is_empty());
        }
        assert_eq!(lookup("rpi4").unwrap().arch, "aarch64");
        assert!(lookup("toaster").is_none());
        // Only Jetson asks onnxruntime for GPU execution providers.
        assert_eq!(lookup("jetson-orin-nano").unwrap().onnxruntime_providers, ["tensorrt", "cuda"]);
        assert!(lookup("rpi4").unwrap().onnxruntime_providers.is_empty());
    }

    #[test]
    fn flags_override_the_profile() {
        let rpi4 = lookup("rpi4").unwrap();
        let s = sizing(Some(rpi4), Asked::default());
        assert_eq!((s.threads, s.queue, s.limits.max_batch, s.request_memory), (2, 16, 32, 128 << 20));
        let asked = Asked {
            threads: Some(1),
            queue: Some(4),
            max_batch: Some(2),
            max_elements: Some(9),
            request_memory_mb: Some(8),
        };
        let s = sizing(Some(rpi4), asked);
        assert_eq!(
            (s.threads, s.queue, s.limits.max_batch, s.limits.max_elements, s.request_memory),
            (1, 4, 2, 9, 8 << 20)
        );
        let generic = lookup("generic-linux").unwrap();
        assert!(sizing(Some(generic), Asked::default()).threads >= 1);
        let none = sizing(None, Asked::default());
        assert_eq!((none.queue, none.limits, none.request_memory), (32, tern_proto::Limits::default(), 64 << 20));
    }
}

//! Tern's wire protocol: the messages agents and the coordinator exchange, the
//! ids and model manifest they carry, and the versioned, length-prefixed frame
//! codec that encodes them with postcard. Pure data and codecs; no I/O.
//!
//! Every wire version this build speaks stays decodable: [`v1`] holds the
//! message types of version 1 exactly as the first agents encode them, and
//! the frame codec converts between them and the current [`Message`]s, so a
//! fleet can run old and new agents side by side.

mod body;
mod canonical;
mod frame;
mod golden;
mod ids;
mod manifest;
mod msg;
mod tensor;
mod token;
pub mod v1;

pub use body::{JSON_BYTES_PER_ELEMENT, JsonError, Limits, RequestLimits, TooLarge, decode_json};
pub use canonical::{CanonicalError, canonical_json};
pub use frame::{
    FrameDecoder, FrameError, FrameHeader, HEADER_LEN, MAGIC, MAX_FRAME_LEN, decode_frame, decode_payload, encode_frame,
};
pub use golden::{
    GoldenCase, MAX_GOLDEN_BYTES, MAX_GOLDEN_CASES, compare_outputs, decode_golden, element_error, encode_golden,
};
pub use half::{bf16, f16};
pub use ids::{DeviceId, IdError, ModelRef, Sha256Digest};
pub use manifest::{
    Alternative, BaselineRef, CapturePolicy, DEFAULT_READY_SECS, DEFAULT_SHADOW_TOLERANCE_PPM, DType, LocalTime,
    MINUTES_PER_DAY, MaintenanceWindow, ManifestEncoding, ManifestError, ModelFormat, ModelManifest, SelfTestRef,
    ShadowCompare, SignedManifest, TensorSpec, UpdatePolicy,
};
pub use msg::{
    AlertChange, ArtifactHeader, CapturedSample, DesiredState, EnrollRequest, EnrollResponse, ErrorCode, FetchArtifact,
    Hello, LinkDay, MAX_CAPTURE_BYTES, MAX_HISTORY, MAX_QUALITY_CLASSES, MAX_TELEMETRY_BATCH, MAX_TRAFFIC_DAYS,
    Message, ModelState, ModelStatus, MonitorStarted, QualityCounts, QualityWindow, Refusal, SignedDesired,
    StatusReport, TelemetryAck, TelemetryBatch, TelemetryBody, TelemetryRecord, TelemetryRoute, TrafficReport,
    TufMetadata, UpdateEvent, UpdateHistory, Welcome, WindowSummary, WireError, root_intro_statement,
};
pub use tensor::{TENSORS_MEDIA_TYPE, Tensor, TensorData, decode_tensors, encode_tensors};
pub use token::{EnrollTokenText, TokenError};

/// A version of the wire protocol: the encoding of every [`Message`], carried
/// in every frame header and named in the QUIC application protocol (ALPN,
/// `tern/N`) so that the TLS handshake settles it before the first frame.
///
/// A new version is made whenever the encoding of any message changes; each
/// build speaks every version in [`WireVersion::SUPPORTED`], and a connection
/// uses the highest one both sides speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WireVersion(pub u16);

impl WireVersion {
    /// The first version (agents and coordinators up to commit ae5a7d0).
    pub const V1: WireVersion = WireVersion(1);
    /// Version 2: capabilities and version lists in `Hello`, the applied
    /// generation and refusals in `Status`, manifests signed as canonical JSON.
    pub const V2: WireVersion = WireVersion(2);
    /// Version 3: version 2 and the agent's update history
    /// ([`Message::History`]); every other message encodes as in version 2.
    pub const V3: WireVersion = WireVersion(3);
    /// Version 4: version 3 and the signed desired state with the TUF
    /// metadata ([`Message::SignedDesired`]), which replaces `Desired`.
    pub const V4: WireVersion = WireVersion(4);
    /// Version 5: version 4, and manifests may name `f16` and `bf16`
    /// element types (and golden vectors carry them); frames encode as in
    /// version 4. A manifest that names them is not sent to an older agent,
    /// which would refuse the whole desired state over it.
    pub const V5: WireVersion = WireVersion(5);
    /// Version 6: version 5 and the agent's telemetry
    /// ([`Message::Telemetry`], drift windows and alerts, each with an id)
    /// and its acknowledgement ([`Message::TelemetryAck`]), appended after
    /// the others.
    pub const V6: WireVersion = WireVersion(6);
    /// Version 7: version 6 and the agent's traffic counts
    /// ([`Message::Traffic`]), which also say how long it may stay silent:
    /// on older versions it reports every 30 s, as their coordinators
    /// expect.
    pub const V7: WireVersion = WireVersion(7);
    /// Version 8: version 7 and the fleet's telemetry route
    /// ([`Message::Route`]): over this link, or over an MQTT broker (whose
    /// messages are frames of this version). Older agents keep theirs on
    /// QUIC, which every coordinator takes.
    pub const V8: WireVersion = WireVersion(8);
    /// Version 9: version 8, and telemetry records may be model-quality
    /// windows ([`TelemetryBody::Quality`]) and captured samples
    /// ([`TelemetryBody::Capture`]), appended after the others: a batch
    /// holding one is not in an older version, and an agent drops such
    /// records rather than send them to an older coordinator.
    pub const V9: WireVersion = WireVersion(9);
    /// The newest version this build speaks.
    pub const CURRENT: WireVersion = WireVersion::V9;
    /// Every version this build speaks, newest first.
    pub const SUPPORTED: &'static [WireVersion] = &[
        WireVersion::V9,
        WireVersion::V8,
        WireVersion::V7,
        WireVersion::V6,
        WireVersion::V5,
        WireVersion::V4,
        WireVersion::V3,
        WireVersion::V2,
        WireVersion::V1,
    ];

    /// The ALPN protocol name of this version.
    pub fn alpn(self) -> Vec<u8> {
        format!("tern/{}", self.0).into_bytes()
    }

    /// The version an ALPN protocol name stands for, if it is one of ours.
    pub fn from_alpn(alpn: &[u8]) -> Option<WireVersion> {
        let n: u16 = std::str::from_utf8(alpn).ok()?.strip_prefix("tern/")?.parse().ok()?;
        Some(WireVersion(n))
    }

    /// Whether this build can speak it.
    pub fn is_supported(self) -> bool {
        Self::SUPPORTED.contains(&self)
    }

    /// The versions this build speaks up to `max`, newest first: what an
    /// endpoint offers in ALPN.
    pub fn up_to(max: WireVersion) -> Vec<WireVersion> {
        Self::SUPPORTED.iter().copied().filter(|v| *v <= max).collect()
    }

    /// The newest version in both lists.
    pub fn highest_shared(ours: &[WireVersion], theirs: &[u16]) -> Option<WireVersion> {
        ours.iter().copied().filter(|v| theirs.contains(&v.0)).max()
    }
}

impl std::fmt::Display for WireVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpn_names_and_negotiation() {
        assert_eq!(WireVersion::V2.alpn(), b"tern/2");
        assert_eq!(WireVersion::V3.alpn(), b"tern/3");
        assert_eq!(WireVersion::from_alpn(b"tern/1"), Some(WireVersion::V1));
        assert_eq!(WireVersion::from_alpn(b"h3"), None);
        assert_eq!(WireVersion::up_to(WireVersion::V1), [WireVersion::V1]);
        assert_eq!(WireVersion::up_to(WireVersion(10)), WireVersion::SUPPORTED);
        assert_eq!(
            WireVersion::highest_shared(WireVersion::SUPPORTED, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
            Some(WireVersion::V9)
        );
        assert_eq!(
            WireVersion::highest_shared(WireVersion::SUPPORTED, &[1, 2, 3, 4, 5, 6, 7, 8]),
            Some(WireVersion::V8)
        );
        assert_eq!(WireVersion::highest_shared(WireVersion::SUPPORTED, &[1, 2, 3, 4, 5, 6, 7]), Some(WireVersion::V7));
        assert_eq!(WireVersion::highest_shared(WireVersion::SUPPORTED, &[1, 2, 3, 4, 5, 6]), Some(WireVersion::V6));
        assert_eq!(WireVersion::highest_shared(WireVersion::SUPPORTED, &[1, 2, 3, 4, 5]), Some(WireVersion::V5));
        assert_eq!(WireVersion::highest_shared(WireVersion::SUPPORTED, &[1, 2, 3, 4]), Some(WireVersion::V4));
        assert_eq!(WireVersion::highest_shared(WireVersion::SUPPORTED, &[1, 2, 3]), Some(WireVersion::V3));
        assert_eq!(WireVersion::highest_shared(WireVersion::SUPPORTED, &[1, 2]), Some(WireVersion::V2));
        assert_eq!(WireVersion::highest_shared(WireVersion::SUPPORTED, &[1]), Some(WireVersion::V1));
        assert_eq!(WireVersion::highest_shared(WireVersion::SUPPORTED, &[10]), None);
    }
}

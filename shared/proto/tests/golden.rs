//! Wire version 1 stays byte for byte what the first agents and
//! coordinators (commit ae5a7d0) put on the wire: these frames were encoded
//! by that code. Each decodes to the expected current message, and the
//! current message encodes back to exactly these bytes when the connection
//! negotiated version 1.

use tern_proto::*;

const GOLDEN: &[(&str, &str)] = &[
    ("EnrollRequest", "544e010023000000000707070707070707070707070707070703010203010663616d2d303105302e312e30"),
    (
        "EnrollResponse",
        "544e010036000000010663616d2d303102040501060808080808080808080808080808080808080808080808080808080808080808036c61620472706934",
    ),
    ("Hello", "544e01001b0000000205302e312e3002046972697303030003636e6e01050103626164"),
    ("Welcome", "544e01000d000000030663616d2d3031fbe2cfaa06"),
    (
        "Desired",
        "544e01008d00000004050140046972697303c7c5c1d70c5dec4416ab6158afd0b223ef40c29b1dc1f97ed9428b94d4cadb1c850d00010158000200010401056c6162656c05010080e2cfaa0601020304050607084009090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909",
    ),
    ("Status", "544e0100150000000502046972697303030003636e6e01050103626164"),
    ("FetchArtifact", "544e01002200000006c7c5c1d70c5dec4416ab6158afd0b223ef40c29b1dc1f97ed9428b94d4cadb1c64"),
    ("ArtifactHeader", "544e01002400000007c7c5c1d70c5dec4416ab6158afd0b223ef40c29b1dc1f97ed9428b94d4cadb1c850d64"),
    ("Error", "544e01000700000008030475736564"),
];

/// The postcard manifest body version-1 agents verify, as that code encoded it.
const MANIFEST_V1: &str = "046972697303c7c5c1d70c5dec4416ab6158afd0b223ef40c29b1dc1f97ed9428b94d4cadb1c850d00010158000200010401056c6162656c05010080e2cfaa06";

fn manifest() -> ModelManifest {
    ModelManifest {
        name: "iris".into(),
        version: 3,
        sha256: Sha256Digest::of(b"artifact"),
        size: 1669,
        format: ModelFormat::Onnx,
        inputs: vec![TensorSpec { name: "X".into(), dtype: DType::F32, shape: vec![None, Some(4)] }],
        outputs: vec![TensorSpec { name: "label".into(), dtype: DType::I64, shape: vec![None] }],
        created_at: 1_700_000_000,
    }
}

fn status() -> Vec<ModelStatus> {
    vec![
        ModelStatus { name: "iris".into(), version: 3, state: ModelState::Serving, detail: None },
        ModelStatus { name: "cnn".into(), version: 1, state: ModelState::Failed, detail: Some("bad".into()) },
    ]
}

/// The messages the golden frames carry, as the current types see them
/// (what version 1 cannot say is empty or zero).
fn expected(kind: &str) -> Message {
    let id = DeviceId::new("cam-01").unwrap();
    let sha = Sha256Digest::of(b"artifact");
    match kind {
        "EnrollRequest" => Message::EnrollRequest(EnrollRequest {
            secret: [7; 16],
            csr_der: vec![1, 2, 3],
            requested_id: Some(id),
            agent_version: "0.1.0".into(),
        }),
        "EnrollResponse" => Message::EnrollResponse(EnrollResponse {
            device_id: id,
            cert_der: vec![4, 5],
            ca_der: vec![6],
            registry_key: [8; 32],
            group: "lab".into(),
            profile: "rpi4".into(),
        }),
        "Hello" => Message::Hello(Hello {
            agent_version: "0.1.0".into(),
            models: status(),
            wire_versions: vec![],
            formats: vec![],
            backends: vec![],
        }),
        "Welcome" => Message::Welcome(Welcome { device_id: id, server_time: 1_700_000_123, wire_version: 1 }),
        "Desired" => Message::Desired(DesiredState {
            generation: 5,
            models: vec![SignedManifest {
                encoding: ManifestEncoding::Postcard,
                body: manifest().signed_bytes(ManifestEncoding::Postcard).unwrap(),
                key_id: [1, 2, 3, 4, 5, 6, 7, 8],
                signature: vec![9; 64],
            }],
        }),
        "Status" => Message::Status(StatusReport { models: status(), generation: 0, refused: None }),
        "FetchArtifact" => Message::FetchArtifact(FetchArtifact { sha256: sha, offset: 100 }),
        "ArtifactHeader" => Message::ArtifactHeader(ArtifactHeader { sha256: sha, size: 1669, offset: 100 }),
        "Error" => Message::Error(WireError::new(ErrorCode::TokenUsed, "used")),
        other => panic!("no golden message {other}"),
    }
}

#[test]
fn version_1_frames_decode_and_encode_byte_for_byte() {
    for (kind, hex) in GOLDEN {
        let bytes = hex::decode(hex).unwrap();
        let (msg, used) = decode_frame(&bytes, MAX_FRAME_LEN, WireVersion::V1).unwrap().unwrap();
        assert_eq!(used, bytes.len(), "{kind}");
        assert_eq!(msg, expected(kind), "{kind}");
        assert_eq!(encode_frame(&msg, WireVersion::V1).unwrap(), bytes, "{kind} re-encoded differently");
        // The same message travels in version 2 as well (and decodes the same).
        let v2 = encode_frame(&msg, WireVersion::V2).unwrap();
        assert_eq!(decode_frame(&v2, MAX_FRAME_LEN, WireVersion::V2).unwrap().unwrap().0, msg, "{kind} in v2");
    }
}

#[test]
fn version_1_manifest_bodies_are_unchanged() {
    let body = manifest().signed_bytes(ManifestEncoding::Postcard).unwrap();
    assert_eq!(hex::encode(&body), MANIFEST_V1);
    assert_eq!(ModelManifest::from_signed_bytes(&body, ManifestEncoding::Postcard).unwrap(), manifest());
}

#[test]
fn what_version_1_cannot_say_is_dropped_or_refused() {
    let hello = Message::Hello(Hello {
        agent_version: "0.2.0".into(),
        models: status(),
        wire_versions: vec![2, 1],
        formats: vec![ModelFormat::Nnef],
        backends: vec!["tract".into()],
    });
    let v1 = encode_frame(&hello, WireVersion::V1).unwrap();
    let Message::Hello(back) = decode_frame(&v1, MAX_FRAME_LEN, WireVersion::V1).unwrap().unwrap().0 else {
        panic!("not a Hello")
    };
    assert_eq!((back.agent_version.as_str(), back.models), ("0.2.0", status()));
    assert!(back.formats.is_empty() && back.wire_versions.is_empty());
    // New error codes become the nearest old one.
    let e = Message::Error(WireError::new(ErrorCode::Revoked, "removed"));
    let v1 = encode_frame(&e, WireVersion::V1).unwrap();
    let back = decode_frame(&v1, MAX_FRAME_LEN, WireVersion::V1).unwrap().unwrap().0;
    assert_eq!(back, Message::Error(WireError::new(ErrorCode::Unauthorized, "removed")));
    // A JSON-signed manifest cannot be verified by a version-1 agent.
    let json = Message::Desired(DesiredState {
        generation: 1,
        models: vec![SignedManifest {
            encoding: ManifestEncoding::CanonicalJson,
            body: manifest().signed_bytes(ManifestEncoding::CanonicalJson).unwrap(),
            key_id: [0; 8],
            signature: vec![0; 64],
        }],
    });
    assert!(matches!(encode_frame(&json, WireVersion::V1), Err(FrameError::Encode(_))));
}

#[test]
fn canonical_json_manifests_have_room_for_new_fields() {
    let body = manifest().signed_bytes(ManifestEncoding::CanonicalJson).unwrap();
    let text = std::str::from_utf8(&body).unwrap();
    assert!(text.starts_with(r#"{"_type":"tern-model-manifest","created_at":1700000000,"format":"onnx","#), "{text}");
    // A newer registry's manifest with a field this build does not know still decodes.
    let mut newer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    newer["golden_vectors"] = serde_json::json!([{ "input": [1, 2] }]);
    let newer = canonical_json(&newer).unwrap();
    assert_eq!(ModelManifest::from_signed_bytes(&newer, ManifestEncoding::CanonicalJson).unwrap(), manifest());
    // Another kind of signed document is not a manifest.
    let mut other: serde_json::Value = serde_json::from_slice(&body).unwrap();
    other["_type"] = "targets".into();
    let err = ModelManifest::from_signed_bytes(&canonical_json(&other).unwrap(), ManifestEncoding::CanonicalJson);
    assert!(matches!(err, Err(ManifestError::Malformed(_))), "{err:?}");
}

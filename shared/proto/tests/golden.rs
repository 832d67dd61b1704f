//! Wire version 1 stays byte for byte what the first agents and
//! coordinators (commit ae5a7d0) put on the wire: these frames were encoded
//! by that code. Each decodes to the expected current message, and the
//! current message encodes back to exactly these bytes when the connection
//! negotiated version 1. Version 2 is held to the bytes it was released with
//! the same way.

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

/// Version 2 as this release encodes it, frozen from now on: a change to any
/// of these bytes is a new wire version, not an edit to version 2.
const GOLDEN_V2: &[(&str, &str)] = &[
    ("EnrollRequest", "544e020023000000000707070707070707070707070707070703010203010663616d2d303105302e312e30"),
    (
        "EnrollResponse",
        "544e020036000000010663616d2d303102040501060808080808080808080808080808080808080808080808080808080808080808036c61620472706934",
    ),
    (
        "Hello",
        "544e02003a0000000205302e312e3002046972697303030003636e6e01050103626164020201020102020a74726163742d6e6e65660c6275726e2d6e646172726179",
    ),
    ("Welcome", "544e02000e000000030663616d2d3031fbe2cfaa0602"),
    (
        "Desired",
        "544e02007901000004050101aa027b225f74797065223a227465726e2d6d6f64656c2d6d616e6966657374222c22637265617465645f6174223a313730303030303030302c22666f726d6174223a226f6e6e78222c22696e70757473223a5b7b226474797065223a22663332222c226e616d65223a2258222c227368617065223a5b6e756c6c2c345d7d5d2c226e616d65223a2269726973222c226f757470757473223a5b7b226474797065223a22693634222c226e616d65223a226c6162656c222c227368617065223a5b6e756c6c5d7d5d2c22736861323536223a2263376335633164373063356465633434313661623631353861666430623232336566343063323962316463316639376564393432386239346434636164623163222c2273697a65223a313636392c2276657273696f6e223a337d01020304050607084009090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909",
    ),
    (
        "Status",
        "544e0200360000000502046972697303030003636e6e010501036261640501061d6d616e6966657374207369676e617475726520697320696e76616c6964",
    ),
    ("FetchArtifact", "544e02002200000006c7c5c1d70c5dec4416ab6158afd0b223ef40c29b1dc1f97ed9428b94d4cadb1c64"),
    ("ArtifactHeader", "544e02002400000007c7c5c1d70c5dec4416ab6158afd0b223ef40c29b1dc1f97ed9428b94d4cadb1c850d64"),
    ("Error", "544e02000a00000008080772656d6f766564"),
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
        selftest: None,
        update: None,
        alternative: None,
        baseline: None,
        capture: None,
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

/// The same messages with what version 2 adds filled in.
fn v2_expected(kind: &str) -> Message {
    match (kind, expected(kind)) {
        ("Hello", Message::Hello(h)) => Message::Hello(Hello {
            wire_versions: vec![2, 1],
            formats: vec![ModelFormat::Nnef, ModelFormat::Burn],
            backends: vec!["tract-nnef".into(), "burn-ndarray".into()],
            ..h
        }),
        ("Welcome", Message::Welcome(w)) => Message::Welcome(Welcome { wire_version: 2, ..w }),
        ("Desired", _) => Message::Desired(DesiredState {
            generation: 5,
            models: vec![SignedManifest {
                encoding: ManifestEncoding::CanonicalJson,
                body: manifest().signed_bytes(ManifestEncoding::CanonicalJson).unwrap(),
                key_id: [1, 2, 3, 4, 5, 6, 7, 8],
                signature: vec![9; 64],
            }],
        }),
        ("Status", Message::Status(st)) => Message::Status(StatusReport {
            generation: 5,
            refused: Some(Refusal { generation: 6, reason: "manifest signature is invalid".into() }),
            ..st
        }),
        ("Error", _) => Message::Error(WireError::new(ErrorCode::Revoked, "removed")),
        (_, m) => m,
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
fn version_2_frames_stay_as_released() {
    for (kind, hex) in GOLDEN_V2 {
        let bytes = hex::decode(hex).unwrap();
        let (msg, used) = decode_frame(&bytes, MAX_FRAME_LEN, WireVersion::V2).unwrap().unwrap();
        assert_eq!(used, bytes.len(), "{kind}");
        assert_eq!(msg, v2_expected(kind), "{kind}");
        assert_eq!(encode_frame(&msg, WireVersion::V2).unwrap(), bytes, "{kind} re-encoded differently");
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

fn history() -> Message {
    Message::History(UpdateHistory {
        events: vec![UpdateEvent {
            at_ms: 1_700_000_000_123,
            name: "iris".into(),
            version: 2,
            phase: "rolled back".into(),
            reason: Some("probation: 3 of 20 requests failed".into()),
        }],
    })
}

/// Version 3 frozen the same way: the `History` frame as released.
const GOLDEN_V3_HISTORY: &str = "544e03003e0000000901fbd095ffbc310469726973020b726f6c6c6564206261636b012270726f626174696f6e3a2033206f66203230207265717565737473206661696c6564";

#[test]
fn version_3_is_version_2_and_the_history_which_older_versions_refuse() {
    // Every version-2 message encodes the same in version 3, but for the
    // version in the header.
    for (kind, hex) in GOLDEN_V2 {
        let mut bytes = hex::decode(hex).unwrap();
        bytes[2] = 3;
        let (msg, _) = decode_frame(&bytes, MAX_FRAME_LEN, WireVersion::V3).unwrap().unwrap();
        assert_eq!(msg, v2_expected(kind), "{kind}");
        assert_eq!(encode_frame(&msg, WireVersion::V3).unwrap(), bytes, "{kind}");
    }
    let frame = encode_frame(&history(), WireVersion::V3).unwrap();
    assert_eq!(hex::encode(&frame), GOLDEN_V3_HISTORY);
    assert_eq!(decode_frame(&frame, MAX_FRAME_LEN, WireVersion::V3).unwrap().unwrap().0, history());
    // Neither sent nor taken on an older session.
    for v in [WireVersion::V2, WireVersion::V1] {
        assert!(encode_frame(&history(), v).is_err(), "{v}");
    }
    let mut as_v2 = frame.clone();
    as_v2[2] = 2;
    let e = decode_frame(&as_v2, MAX_FRAME_LEN, WireVersion::V2).unwrap_err();
    assert!(e.to_string().contains("History is not in wire v2"), "{e}");
}

fn signed_desired() -> Message {
    let Message::Desired(state) = v2_expected("Desired") else { panic!("a Desired") };
    Message::SignedDesired(tern_proto::SignedDesired {
        state,
        signature: vec![7; 64],
        tuf: Some(tern_proto::TufMetadata {
            roots: vec![b"{root}".to_vec()],
            root_intro: vec![9; 64],
            timestamp: b"{ts}".to_vec(),
            snapshot: b"{snap}".to_vec(),
            targets: b"{targets}".to_vec(),
        }),
    })
}

/// Version 4 frozen the same way: the `SignedDesired` frame as released.
const GOLDEN_V4_SIGNED_DESIRED: &str = "544e04001a0200000a050101aa027b225f74797065223a227465726e2d6d6f64656c2d6d616e6966657374222c22637265617465645f6174223a313730303030303030302c22666f726d6174223a226f6e6e78222c22696e70757473223a5b7b226474797065223a22663332222c226e616d65223a2258222c227368617065223a5b6e756c6c2c345d7d5d2c226e616d65223a2269726973222c226f757470757473223a5b7b226474797065223a22693634222c226e616d65223a226c6162656c222c227368617065223a5b6e756c6c5d7d5d2c22736861323536223a2263376335633164373063356465633434313661623631353861666430623232336566343063323962316463316639376564393432386239346434636164623163222c2273697a65223a313636392c2276657273696f6e223a337d0102030405060708400909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090940070707070707070707070707070707070707070707070707070707070707070707070707070707070707070707070707070707070707070707070707070707070101067b726f6f747d4009090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909090909047b74737d067b736e61707d097b746172676574737d";

#[test]
fn version_4_is_version_3_and_the_signed_desired_state_which_older_versions_refuse() {
    for (kind, hex) in GOLDEN_V2 {
        let mut bytes = hex::decode(hex).unwrap();
        bytes[2] = 4;
        let (msg, _) = decode_frame(&bytes, MAX_FRAME_LEN, WireVersion::V4).unwrap().unwrap();
        assert_eq!(msg, v2_expected(kind), "{kind}");
        assert_eq!(encode_frame(&msg, WireVersion::V4).unwrap(), bytes, "{kind}");
    }
    let mut h = encode_frame(&history(), WireVersion::V3).unwrap();
    h[2] = 4;
    assert_eq!(decode_frame(&h, MAX_FRAME_LEN, WireVersion::V4).unwrap().unwrap().0, history());
    let frame = encode_frame(&signed_desired(), WireVersion::V4).unwrap();
    assert_eq!(hex::encode(&frame), GOLDEN_V4_SIGNED_DESIRED);
    assert_eq!(decode_frame(&frame, MAX_FRAME_LEN, WireVersion::V4).unwrap().unwrap().0, signed_desired());
    for v in [WireVersion::V3, WireVersion::V2, WireVersion::V1] {
        assert!(encode_frame(&signed_desired(), v).is_err(), "{v}");
    }
    let mut as_v3 = frame.clone();
    as_v3[2] = 3;
    let e = decode_frame(&as_v3, MAX_FRAME_LEN, WireVersion::V3).unwrap_err();
    assert!(e.to_string().contains("SignedDesired is not in wire v3"), "{e}");
}

#[test]
fn version_5_frames_are_version_4_frames() {
    let mut frames: Vec<(String, Message, Vec<u8>)> = GOLDEN_V2
        .iter()
        .map(|(kind, hex)| {
            let mut bytes = hex::decode(hex).unwrap();
            bytes[2] = 4;
            (kind.to_string(), v2_expected(kind), bytes)
        })
        .collect();
    frames.push(("SignedDesired".into(), signed_desired(), hex::decode(GOLDEN_V4_SIGNED_DESIRED).unwrap()));
    for (kind, msg, v4) in frames {
        let mut v5 = v4.clone();
        v5[2] = 5;
        assert_eq!(encode_frame(&msg, WireVersion::V5).unwrap(), v5, "{kind}");
        assert_eq!(decode_frame(&v5, MAX_FRAME_LEN, WireVersion::V5).unwrap().unwrap().0, msg, "{kind}");
    }
}

//! The frame codec tested three ways, in every wire version: random
//! round-trips, random chunking of valid streams, and arbitrary bytes (which
//! must never panic).

use proptest::prelude::*;
use tern_proto::*;

fn digest() -> impl Strategy<Value = Sha256Digest> {
    any::<[u8; 32]>().prop_map(Sha256Digest)
}

fn device_id() -> impl Strategy<Value = DeviceId> {
    "[a-z0-9_-]{1,64}".prop_map(|s| DeviceId::new(s).unwrap())
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::F64),
        Just(DType::I64),
        Just(DType::U8),
        Just(DType::Bool),
        Just(DType::F16),
        Just(DType::BF16)
    ]
}

fn spec() -> impl Strategy<Value = TensorSpec> {
    ("[a-z_]{1,12}", dtype(), prop::collection::vec(prop::option::of(0u64..4096), 0..5))
        .prop_map(|(name, dtype, shape)| TensorSpec { name, dtype, shape })
}

fn manifest() -> impl Strategy<Value = ModelManifest> {
    (
        "[a-z][a-z0-9-]{0,20}",
        1u32..1000,
        digest(),
        any::<u64>(),
        prop::collection::vec(spec(), 0..3),
        prop::collection::vec(spec(), 0..3),
        any::<u64>(),
    )
        .prop_map(|(name, version, sha256, size, inputs, outputs, created_at)| ModelManifest {
            name,
            version,
            sha256,
            size,
            format: ModelFormat::Onnx,
            inputs,
            outputs,
            created_at,
            selftest: None,
            update: None,
            alternative: None,
            baseline: None,
            capture: None,
        })
}

fn signed() -> impl Strategy<Value = SignedManifest> {
    let encoding = prop_oneof![Just(ManifestEncoding::Postcard), Just(ManifestEncoding::CanonicalJson)];
    (encoding, prop::collection::vec(any::<u8>(), 0..256), any::<[u8; 8]>(), prop::collection::vec(any::<u8>(), 64))
        .prop_map(|(encoding, body, key_id, signature)| SignedManifest { encoding, body, key_id, signature })
}

fn format() -> impl Strategy<Value = ModelFormat> {
    prop_oneof![Just(ModelFormat::Onnx), Just(ModelFormat::Nnef), Just(ModelFormat::Burn)]
}

fn status() -> impl Strategy<Value = ModelStatus> {
    let state = prop_oneof![Just(ModelState::Downloading), Just(ModelState::Serving), Just(ModelState::Failed)];
    ("[a-z]{1,10}", any::<u32>(), state, prop::option::of(".{0,40}"))
        .prop_map(|(name, version, state, detail)| ModelStatus { name, version, state, detail })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<[u8; 16]>(), prop::collection::vec(any::<u8>(), 0..512), prop::option::of(device_id()), ".{0,16}")
            .prop_map(|(secret, csr_der, requested_id, agent_version)| Message::EnrollRequest(EnrollRequest {
                secret,
                csr_der,
                requested_id,
                agent_version
            })),
        (device_id(), prop::collection::vec(any::<u8>(), 0..512), any::<[u8; 32]>(), ".{0,8}", ".{0,8}").prop_map(
            |(device_id, cert_der, registry_key, group, profile)| {
                Message::EnrollResponse(EnrollResponse {
                    device_id,
                    ca_der: cert_der.clone(),
                    cert_der,
                    registry_key,
                    group,
                    profile,
                })
            }
        ),
        (
            ".{0,16}",
            prop::collection::vec(status(), 0..4),
            prop::collection::vec(any::<u16>(), 0..3),
            prop::collection::vec(format(), 0..3),
            prop::collection::vec("[a-z-]{1,12}", 0..3)
        )
            .prop_map(|(agent_version, models, wire_versions, formats, backends)| Message::Hello(Hello {
                agent_version,
                models,
                wire_versions,
                formats,
                backends
            })),
        (device_id(), any::<u64>(), any::<u16>()).prop_map(|(device_id, server_time, wire_version)| Message::Welcome(
            Welcome { device_id, server_time, wire_version }
        )),
        (any::<u64>(), prop::collection::vec(signed(), 0..4))
            .prop_map(|(generation, models)| Message::Desired(DesiredState { generation, models })),
        (prop::collection::vec(status(), 0..4), any::<u64>(), prop::option::of((any::<u64>(), ".{0,40}"))).prop_map(
            |(models, generation, refused)| Message::Status(StatusReport {
                models,
                generation,
                refused: refused.map(|(generation, reason)| Refusal { generation, reason })
            })
        ),
        (digest(), any::<u64>()).prop_map(|(sha256, offset)| Message::FetchArtifact(FetchArtifact { sha256, offset })),
        (digest(), any::<u64>(), any::<u64>())
            .prop_map(|(sha256, size, offset)| { Message::ArtifactHeader(ArtifactHeader { sha256, size, offset }) }),
        ".{0,80}".prop_map(|m| Message::Error(WireError::new(ErrorCode::NotFound, m))),
        (any::<u64>(), any::<u64>(), prop::collection::vec(record(), 0..4))
            .prop_map(|(stream, dropped, records)| Message::Telemetry(TelemetryBatch { stream, dropped, records })),
        (any::<u64>(), any::<u64>()).prop_map(|(stream, up_to)| Message::TelemetryAck(TelemetryAck { stream, up_to })),
        (any::<u32>(), prop::collection::vec(link_day(), 0..4))
            .prop_map(|(heartbeat_secs, days)| Message::Traffic(TrafficReport { heartbeat_secs, days })),
        proptest::option::of("[a-z0-9:/.]{0,40}").prop_map(|mqtt| Message::Route(TelemetryRoute { mqtt })),
    ]
}

fn link_day() -> impl Strategy<Value = LinkDay> {
    ("[a-z]{0,8}", any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(link, day, sent, received)| LinkDay {
        link,
        day,
        sent,
        received,
    })
}

fn record() -> impl Strategy<Value = TelemetryRecord> {
    let window = (
        ".{0,12}",
        any::<u32>(),
        any::<[u64; 5]>(),
        prop::option::of(any::<u64>()),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(model, version, [seq, millis, rows, requests, errors], p99_us, profile)| {
            TelemetryBody::Window(WindowSummary {
                model,
                version,
                seq,
                millis,
                rows,
                requests,
                errors,
                p99_us,
                profile,
            })
        });
    let alert = (".{0,12}", any::<u32>(), "[a-z_]{1,14}", ".{0,12}", any::<bool>(), -1e9f64..1e9, -1e9f64..1e9)
        .prop_map(|(model, version, rule, feature, raised, value, threshold)| {
            TelemetryBody::Alert(AlertChange { model, version, rule, feature, raised, value, threshold })
        });
    let started = (".{0,12}", any::<u32>())
        .prop_map(|(model, version)| TelemetryBody::Started(MonitorStarted { model, version }));
    let body = prop_oneof![window, alert, started];
    (any::<u64>(), any::<u64>(), body).prop_map(|(id, at_ms, body)| TelemetryRecord { id, at_ms, body })
}

proptest! {
    #[test]
    fn frame_roundtrip(msg in message()) {
        let bytes = encode_frame(&msg, WireVersion::CURRENT).unwrap();
        let (back, used) = decode_frame(&bytes, MAX_FRAME_LEN, WireVersion::CURRENT).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn frame_roundtrip_in_version_1(msg in message()) {
        // Version 1 cannot say everything: what comes back is what it can
        // say, and that is stable from then on.
        if let Ok(bytes) = encode_frame(&msg, WireVersion::V1) {
            let (back, used) = decode_frame(&bytes, MAX_FRAME_LEN, WireVersion::V1).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(encode_frame(&back, WireVersion::V1).unwrap(), bytes);
        } else {
            let json_signed = matches!(&msg, Message::Desired(d)
                if d.models.iter().any(|m| m.encoding == ManifestEncoding::CanonicalJson));
            let newer = msg.since() > WireVersion::V1;
            prop_assert!(json_signed || newer, "only JSON-signed manifests and newer messages have no version-1 form");
        }
    }

    #[test]
    fn manifest_roundtrip(m in manifest()) {
        for encoding in [ManifestEncoding::Postcard, ManifestEncoding::CanonicalJson] {
            if encoding == ManifestEncoding::Postcard && m.since() > WireVersion::V1 {
                // Version 1 (postcard) has no names for f16 and bf16.
                prop_assert!(m.signed_bytes(encoding).is_err());
                continue;
            }
            let bytes = m.signed_bytes(encoding).unwrap();
            prop_assert_eq!(ModelManifest::from_signed_bytes(&bytes, encoding).unwrap(), m.clone());
        }
        let canonical = m.signed_bytes(ManifestEncoding::CanonicalJson).unwrap();
        let reparsed: serde_json::Value = serde_json::from_slice(&canonical).unwrap();
        prop_assert_eq!(canonical_json(&reparsed).unwrap(), canonical, "canonical form is a fixed point");
    }

    #[test]
    fn stream_in_random_chunks(msgs in prop::collection::vec(message(), 1..6), cuts in prop::collection::vec(1usize..64, 1..40)) {
        let stream: Vec<u8> = msgs.iter().flat_map(|m| encode_frame(m, WireVersion::CURRENT).unwrap()).collect();
        let mut dec = FrameDecoder::new(MAX_FRAME_LEN, WireVersion::CURRENT);
        let mut got = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < stream.len() {
            // Never more than the decoder wants: a reader built so never
            // reads past a frame into the raw bytes that may follow it.
            let n = cuts[i % cuts.len()].min(stream.len() - pos).min(dec.want().max(1));
            dec.push(&stream[pos..pos + n]);
            pos += n;
            i += 1;
            while let Some(m) = dec.next_message().unwrap() {
                got.push(m);
            }
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        for v in WireVersion::SUPPORTED {
            let _ = decode_frame(&bytes, MAX_FRAME_LEN, *v);
            let mut dec = FrameDecoder::new(1024, *v);
            dec.push(&bytes);
            let _ = dec.next_message();
        }
    }

    #[test]
    fn valid_header_with_garbage_payload_is_an_error_not_a_panic(payload in prop::collection::vec(any::<u8>(), 0..512)) {
        for v in WireVersion::SUPPORTED {
            let mut bytes = vec![b'T', b'N'];
            bytes.extend_from_slice(&v.0.to_le_bytes());
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&payload);
            match decode_frame(&bytes, MAX_FRAME_LEN, *v) {
                Ok(Some((msg, used))) => {
                    prop_assert_eq!(used, bytes.len());
                    // Whatever decoded must re-encode to a frame that decodes the same.
                    let again = encode_frame(&msg, *v).unwrap();
                    prop_assert_eq!(decode_frame(&again, MAX_FRAME_LEN, *v).unwrap().unwrap().0, msg);
                }
                Ok(None) => prop_assert!(false, "complete frame reported as incomplete"),
                Err(_) => {}
            }
        }
    }

    #[test]
    fn mutated_frames_never_panic(msg in message(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = encode_frame(&msg, WireVersion::CURRENT).unwrap();
        for (idx, b) in flips {
            let i = idx.index(bytes.len());
            bytes[i] ^= b;
        }
        let _ = decode_frame(&bytes, MAX_FRAME_LEN, WireVersion::CURRENT);
    }
}

fn tensor() -> impl Strategy<Value = Tensor> {
    prop::collection::vec(0usize..5, 0..4).prop_flat_map(|shape| {
        let n: usize = shape.iter().product();
        let data = prop_oneof![
            prop::collection::vec(any::<f32>(), n).prop_map(TensorData::F32),
            prop::collection::vec(any::<f64>(), n).prop_map(TensorData::F64),
            prop::collection::vec(any::<i64>(), n).prop_map(TensorData::I64),
            prop::collection::vec(any::<i8>(), n).prop_map(TensorData::I8),
            prop::collection::vec(any::<u8>(), n).prop_map(TensorData::U8),
            prop::collection::vec(any::<u16>(), n).prop_map(TensorData::U16),
            prop::collection::vec(any::<bool>(), n).prop_map(TensorData::Bool),
            prop::collection::vec(any::<u16>(), n)
                .prop_map(|v| TensorData::F16(v.into_iter().map(f16::from_bits).collect())),
            prop::collection::vec(any::<u16>(), n)
                .prop_map(|v| TensorData::BF16(v.into_iter().map(bf16::from_bits).collect())),
        ];
        (Just(shape), data).prop_map(|(shape, data)| Tensor::new(shape, data).unwrap())
    })
}

/// Bitwise equality, so NaN payloads count as equal.
fn same_bits(a: &[Tensor], b: &[Tensor]) -> bool {
    encode_tensors(a).unwrap() == encode_tensors(b).unwrap() && a.len() == b.len()
}

proptest! {
    #[test]
    fn tensors_roundtrip(ts in prop::collection::vec(tensor(), 0..5)) {
        let bytes = encode_tensors(&ts).unwrap();
        let back = decode_tensors(&bytes).unwrap();
        prop_assert!(same_bits(&back, &ts));
        prop_assert_eq!(back.iter().map(|t| &t.shape).collect::<Vec<_>>(), ts.iter().map(|t| &t.shape).collect::<Vec<_>>());
    }

    #[test]
    fn tensor_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_tensors(&bytes);
        let mut with_header = b"TT\x01".to_vec();
        with_header.extend_from_slice(&bytes);
        let _ = decode_tensors(&with_header);
    }

    #[test]
    fn truncated_tensor_bodies_are_errors(ts in prop::collection::vec(tensor(), 1..4), cut in any::<prop::sample::Index>()) {
        let bytes = encode_tensors(&ts).unwrap();
        let cut = cut.index(bytes.len());
        prop_assert!(decode_tensors(&bytes[..cut]).is_err());
    }
}

#[test]
fn a_huge_claimed_tensor_is_refused_without_allocating() {
    // One f64 tensor claiming 2^32-1 x 2^32-1 elements in a 14-byte body.
    let mut b = b"TT\x01\x01\x02\x02".to_vec();
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    b.extend_from_slice(&u32::MAX.to_le_bytes());
    let err = decode_tensors(&b).unwrap_err();
    assert!(err.contains("truncated") || err.contains("too large"), "{err}");
    assert_eq!(decode_tensors(b"XX\x01\x00").unwrap_err(), "not a tensor body (expected magic \"TT\", got [58, 58])");
}

//! gRPC fuzzing over a real federation: random and mutated bodies sent to every RPC of every service, each with
//! the certificate that service accepts. No node may crash or hang, and none may answer INTERNAL or UNKNOWN.
//!
//! `FEDGATE_FUZZ_ITERS` (bodies per RPC, default 10) and `FEDGATE_FUZZ_SEED` (default fixed) widen a run.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use fedgate_gateway::ident::Peer;
use fedgate_proto::v1::{
    ApplyRequest, AuditRecord, CacheInvalidation, CatalogChange, DecideRequest, DownloadRequest,
    Envelope, FileObjectionRequest, ForwardRequest, GetApplicationRequest, GetEntryRequest,
    GetObjectionRequest, Hop, InvalidationNotice, JoinRequest, ListApplicationsRequest,
    ListDatasetsRequest, ListObjectionsRequest, OperatorAuditRequest, PublishEntryRequest,
    PushRequest, QueryAuditRequest, ReportRequest, RequestKind, ResolveObjectionRequest,
    Revocation, RevocationNotice, RevokeRequest, SearchCatalogRequest, ShareMode, SignedStatement,
    Stream, StreamItem, TakeBackRequest, UplinkStatusRequest, WithdrawEntryRequest, catalog_change,
    stream_item,
};
use fedgate_tests::raw::{RawChannel, frame};
use fedgate_tests::{code, key_at, query, standard};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tonic::Code;

/// Deadline of each fuzzed call.
const CALL: Duration = Duration::from_secs(3);

/// One RPC and valid messages to start mutating from.
struct Target {
    channel: RawChannel,
    path: &'static str,
    seeds: Vec<Vec<u8>>,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A body for `seed`: random bytes, or the seed mutated; framed, except now and then.
fn mutate(rng: &mut StdRng, seed: &[u8]) -> Bytes {
    let mut m = seed.to_vec();
    match rng.random_range(0..8) {
        0 => {
            m = vec![0; rng.random_range(0..64)];
            rng.fill_bytes(&mut m);
        }
        1 if !m.is_empty() => {
            let i = rng.random_range(0..m.len());
            m[i] ^= 1 << rng.random_range(0..8);
        }
        2 if !m.is_empty() => m.truncate(rng.random_range(0..m.len())),
        3 => {
            let at = rng.random_range(0..=m.len());
            let mut junk = vec![0; rng.random_range(1..16)];
            rng.fill_bytes(&mut junk);
            m.splice(at..at, junk);
        }
        4 => m = [seed, seed].concat(),
        5 if !m.is_empty() => {
            let i = rng.random_range(0..m.len());
            m[i] = 0xff;
        }
        6 => {
            // Unframed bytes: the framing itself is wrong.
            let mut raw = vec![0; rng.random_range(0..12)];
            rng.fill_bytes(&mut raw);
            return Bytes::from(raw);
        }
        _ => {}
    }
    frame(&m)
}

#[tokio::test]
async fn random_and_mutated_bodies_never_crash_hang_or_answer_internal() -> Result<()> {
    let net = standard().await?;
    let iters = env_u64("FEDGATE_FUZZ_ITERS", 10);
    let seed = env_u64("FEDGATE_FUZZ_SEED", 0x00f0_0d5e_ed00);
    let mut rng = StdRng::seed_from_u64(seed);

    let fuzhou = code("350100");
    let provider = net.provider_at(fuzhou)?;
    let consumer = net.consumer_at(code("350102"))?;
    let key = key_at(&net, "350100", 0)?;
    let agency = RawChannel::node(&net, "350100", &provider.cert)?;
    let child_cert = net.ca().issue(&Peer::Node(code("350102")), &[])?;
    let federation = RawChannel::node(&net, "350100", &child_cert)?;
    let own_cert = net.ca().issue(&Peer::Node(fuzhou), &[])?;
    let operator = RawChannel::node(&net, "350100", &own_cert)?;
    let public = RawChannel::open_data(&net)?;
    let province_cert = net.ca().issue(&Peer::Node(code("350000")), &[])?;
    let province_operator = RawChannel::node(&net, "350000", &province_cert)?;

    let share = query("350100:household", &key, &[]).encode_to_vec();
    let mut bulk = query("350100:household", "", &[]);
    bulk.mode = ShareMode::Bulk as i32;
    bulk.page_size = 50;
    let entry = provider.published[0].clone();
    let apply = ApplyRequest {
        resource_id: "350100:marriage".into(),
        purpose: "fuzz".into(),
        scenario: "fuzz".into(),
        fields: vec!["name".into()],
        mode: ShareMode::Query as i32,
        requested_expires_at: 0,
    };
    let audit = QueryAuditRequest {
        resource_id: "350100:household".into(),
        outcome: "OK".into(),
        page_size: 5,
        ..Default::default()
    };
    let child_key = net
        .node(code("350102"))?
        .audit()
        .map(|a| a.public_key().to_vec())
        .unwrap_or_default();
    let envelope = Envelope {
        request_id: "fuzz".into(),
        resource_id: "350100:household".into(),
        target_node: "350100".into(),
        consumer_uscc: consumer.uscc.to_string(),
        consumer_node: "350102".into(),
        route: vec![Hop {
            node_code: "350102".into(),
            seen_peer: Peer::Agency(consumer.uscc.clone()).to_uri(),
            action: "forwarded-up".into(),
            elapsed_us: 0,
        }],
        hops_left: 4,
        timeout_ms: 2_000,
        purpose: "fuzz".into(),
        mode: ShareMode::Query as i32,
        kind: RequestKind::Share as i32,
        ..Default::default()
    };
    let mut fuzz_entry = entry.clone();
    fuzz_entry.id = "350102:fuzz".into();
    fuzz_entry.node_code = "350102".into();
    fuzz_entry.version = 1;

    let a = |path, seeds: Vec<Vec<u8>>| Target {
        channel: agency.clone(),
        path,
        seeds,
    };
    let targets = vec![
        a(
            "/fedgate.v1.Agency/PublishEntry",
            vec![
                PublishEntryRequest {
                    entry: Some(entry.clone()),
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/WithdrawEntry",
            vec![
                WithdrawEntryRequest {
                    id: "350100:no-such-entry".into(),
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/GetEntry",
            vec![
                GetEntryRequest {
                    id: entry.id.clone(),
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/SearchCatalog",
            vec![
                SearchCatalogRequest {
                    text: "household registry".into(),
                    classification: vec!["civil-affairs".into()],
                    page_size: 3,
                    ..Default::default()
                }
                .encode_to_vec(),
            ],
        ),
        a("/fedgate.v1.Agency/Share", vec![share.clone()]),
        a("/fedgate.v1.Agency/QueryAudit", vec![audit.encode_to_vec()]),
        a("/fedgate.v1.Agency/Bulk", vec![bulk.encode_to_vec()]),
        a("/fedgate.v1.Agency/Apply", vec![apply.encode_to_vec()]),
        a(
            "/fedgate.v1.Agency/GetApplication",
            vec![
                GetApplicationRequest {
                    id: "350100-a-1".into(),
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/ListApplications",
            vec![ListApplicationsRequest::default().encode_to_vec()],
        ),
        a(
            "/fedgate.v1.Agency/Decide",
            vec![
                DecideRequest {
                    application_id: "350100-a-1".into(),
                    approve: true,
                    fields: vec!["name".into()],
                    reason: "fuzz".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/Revoke",
            vec![
                RevokeRequest {
                    grant_id: "350100-g-1".into(),
                    reason: "fuzz".into(),
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/FileObjection",
            vec![
                FileObjectionRequest {
                    resource_id: "350100:household".into(),
                    key: key.clone(),
                    description: "fuzz".into(),
                    evidence: String::new(),
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/GetObjection",
            vec![
                GetObjectionRequest {
                    id: "350100-o-1".into(),
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/ListObjections",
            vec![ListObjectionsRequest::default().encode_to_vec()],
        ),
        a(
            "/fedgate.v1.Agency/ResolveObjection",
            vec![
                ResolveObjectionRequest {
                    objection_id: "350100-o-1".into(),
                    corrected: false,
                    resolution: "fuzz".into(),
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/FileDemand",
            vec![
                fedgate_proto::v1::FileDemandRequest {
                    title: "fuzz".into(),
                    description: "fuzz".into(),
                    purpose: "fuzz".into(),
                    legal_basis: "fuzz".into(),
                    fields: vec!["name".into()],
                    share_type: 0,
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/GetDemand",
            vec![
                fedgate_proto::v1::GetDemandRequest {
                    id: "350000-d-1".into(),
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/ListDemands",
            vec![
                fedgate_proto::v1::ListDemandsRequest {
                    page_size: 5,
                    ..Default::default()
                }
                .encode_to_vec(),
            ],
        ),
        a(
            "/fedgate.v1.Agency/AnswerDemand",
            vec![
                fedgate_proto::v1::AnswerDemandRequest {
                    demand_id: "350000-d-1".into(),
                    resource_id: "350100:household".into(),
                    ..Default::default()
                }
                .encode_to_vec(),
            ],
        ),
        Target {
            channel: province_operator.clone(),
            path: "/fedgate.v1.Operator/AssignDemand",
            seeds: vec![
                fedgate_proto::v1::AssignDemandRequest {
                    demand_id: "350000-d-1".into(),
                    provider_uscc: provider.uscc.to_string(),
                    provider_node: "350100".into(),
                    note: "fuzz".into(),
                }
                .encode_to_vec(),
            ],
        },
        Target {
            channel: province_operator.clone(),
            path: "/fedgate.v1.Operator/ListDemands",
            seeds: vec![
                fedgate_proto::v1::OperatorListDemandsRequest {
                    page_size: 5,
                    ..Default::default()
                }
                .encode_to_vec(),
            ],
        },
        Target {
            channel: province_operator.clone(),
            path: "/fedgate.v1.Operator/GetDemand",
            seeds: vec![
                fedgate_proto::v1::GetDemandRequest {
                    id: "350000-d-1".into(),
                }
                .encode_to_vec(),
            ],
        },
        Target {
            channel: federation.clone(),
            path: "/fedgate.v1.Federation/Join",
            seeds: vec![
                JoinRequest {
                    node_code: "350102".into(),
                    software_version: "fuzz".into(),
                    audit_public_key: child_key,
                    key_endorsement: None,
                }
                .encode_to_vec(),
            ],
        },
        Target {
            channel: federation.clone(),
            path: "/fedgate.v1.Federation/Push",
            seeds: vec![
                PushRequest {
                    stream: Stream::Catalog as i32,
                    items: vec![StreamItem {
                        seq: 1,
                        body: Some(stream_item::Body::Catalog(CatalogChange {
                            change: Some(catalog_change::Change::Upsert(fuzz_entry)),
                        })),
                    }],
                }
                .encode_to_vec(),
                PushRequest {
                    stream: Stream::Audit as i32,
                    items: vec![StreamItem {
                        seq: 1,
                        body: Some(stream_item::Body::Audit(AuditRecord {
                            node_code: "350102".into(),
                            seq: 1,
                            ..Default::default()
                        })),
                    }],
                }
                .encode_to_vec(),
            ],
        },
        Target {
            channel: federation.clone(),
            path: "/fedgate.v1.Federation/TakeBack",
            seeds: vec![
                TakeBackRequest {
                    stream: Stream::Audit as i32,
                    after_seq: 1,
                    after_id: String::new(),
                    limit: 10,
                }
                .encode_to_vec(),
                TakeBackRequest {
                    stream: Stream::Catalog as i32,
                    after_seq: 0,
                    after_id: "350102:household".into(),
                    limit: 0,
                }
                .encode_to_vec(),
            ],
        },
        Target {
            channel: federation.clone(),
            path: "/fedgate.v1.Federation/Forward",
            seeds: vec![
                ForwardRequest {
                    envelope: Some(envelope),
                    request: share.clone(),
                }
                .encode_to_vec(),
            ],
        },
        Target {
            channel: federation.clone(),
            path: "/fedgate.v1.Federation/Revoke",
            seeds: vec![
                RevocationNotice {
                    revocation: Some(SignedStatement {
                        kind: "fedgate.v1.Revocation".into(),
                        body: Revocation {
                            grant_id: "350100-g-1".into(),
                            issuer_node: "350100".into(),
                            consumer_node: "350102".into(),
                            revoked_at: 1,
                            reason: "fuzz".into(),
                        }
                        .encode_to_vec(),
                        certificate: vec![0x30; 64],
                        scheme: "ecdsa-p256-sha256".into(),
                        signature: vec![7; 64],
                    }),
                    route: vec!["350102".into()],
                }
                .encode_to_vec(),
            ],
        },
        Target {
            channel: federation.clone(),
            path: "/fedgate.v1.Federation/Invalidate",
            seeds: vec![
                InvalidationNotice {
                    invalidation: Some(SignedStatement {
                        kind: "fedgate.v1.CacheInvalidation".into(),
                        body: CacheInvalidation {
                            resource_id: "350100:household".into(),
                            version: 2,
                            consumer_node: "350102".into(),
                            changed_at: 1,
                        }
                        .encode_to_vec(),
                        certificate: vec![0x30; 64],
                        scheme: "ecdsa-p256-sha256".into(),
                        signature: vec![7; 64],
                    }),
                    route: vec!["350102".into()],
                }
                .encode_to_vec(),
            ],
        },
        Target {
            channel: operator.clone(),
            path: "/fedgate.v1.Operator/Report",
            seeds: vec![ReportRequest::default().encode_to_vec()],
        },
        Target {
            channel: operator.clone(),
            path: "/fedgate.v1.Operator/UplinkStatus",
            seeds: vec![UplinkStatusRequest::default().encode_to_vec()],
        },
        Target {
            channel: operator.clone(),
            path: "/fedgate.v1.Operator/QueryAudit",
            seeds: vec![
                OperatorAuditRequest {
                    query: Some(audit.clone()),
                    agency: provider.uscc.to_string(),
                    node_code: "350100".into(),
                }
                .encode_to_vec(),
            ],
        },
        Target {
            channel: public.clone(),
            path: "/fedgate.v1.OpenData/ListDatasets",
            seeds: vec![
                ListDatasetsRequest {
                    text: "household".into(),
                }
                .encode_to_vec(),
            ],
        },
        Target {
            channel: public.clone(),
            path: "/fedgate.v1.OpenData/Download",
            seeds: vec![
                DownloadRequest {
                    resource_id: "350100:household".into(),
                    fields: vec!["name".into()],
                    page_token: String::new(),
                    page_size: 10,
                }
                .encode_to_vec(),
            ],
        },
    ];

    let started = Instant::now();
    let mut calls = 0u64;
    let mut codes = std::collections::BTreeMap::<String, u64>::new();
    for t in &targets {
        for i in 0..iters {
            let seed_msg = &t.seeds[(i as usize) % t.seeds.len()];
            let body = mutate(&mut rng, seed_msg);
            let shown: Vec<u8> = body.iter().take(48).copied().collect();
            let a = t.channel.call(t.path, body, CALL).await?;
            calls += 1;
            *codes.entry(format!("{:?}", a.code)).or_default() += 1;
            if matches!(a.code, Code::Internal | Code::Unknown) {
                bail!(
                    "{} answered {:?} ({}) to body {shown:02x?} (seed {seed}, iteration {i})",
                    t.path,
                    a.code,
                    a.message
                );
            }
        }
    }
    eprintln!(
        "{calls} fuzzed calls in {:?} (seed {seed}); codes: {codes:?}",
        started.elapsed()
    );

    // Every node still answers.
    for node in net.node_codes() {
        let c = net.consumer_at(node)?;
        net.client(&c.uscc)
            .await?
            .search_catalog(SearchCatalogRequest::default())
            .await?;
    }
    net.shutdown().await
}

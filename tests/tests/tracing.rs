//! Traces across hops: every node a request passes adds its server span to one trace, with child spans for
//! admission, cache lookup, forwarding, the provider call, masking and the audit commit, and attributes that
//! name identifiers, never data; an application and a revocation are each one trace hop by hop too. In-process
//! nodes share one exporter; each span names its node.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use fedgate_examples::registry::Resource;
use fedgate_gateway::telemetry::{LogFormat, log_layer};
use fedgate_tests::{code, eventually, key_at, query, standard};
use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt as _;

/// The spans and JSON log lines every test in this file records.
struct Captured {
    spans: InMemorySpanExporter,
    logs: Logs,
    _provider: SdkTracerProvider,
}

/// JSON log lines written by the node's own log layer.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("log buffer poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Logs {
    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// Installs, once per test process, the OpenTelemetry layer over an in-memory exporter and the JSON log layer.
fn captured() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        let spans = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let logs = Logs::default();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new(
                "warn,fedgate_gateway=info,fedgate_gateway::telemetry=debug",
            ))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("fedgate-tests")))
            .with(log_layer(LogFormat::Json, logs.clone(), false));
        if tracing::subscriber::set_global_default(subscriber).is_err() {
            panic!("a tracing subscriber was installed before the tracing tests' own");
        }
        Captured {
            spans,
            logs,
            _provider: provider,
        }
    })
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|KeyValue { key: k, .. }| k.as_str() == key)
        .map(|kv| &kv.value)
}

fn attr_str(span: &SpanData, key: &str) -> String {
    attr(span, key)
        .map(|v| v.as_str().into_owned())
        .unwrap_or_default()
}

/// The finished spans of trace `id`.
fn trace(id: TraceId) -> Vec<SpanData> {
    captured()
        .spans
        .get_finished_spans()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.span_context.trace_id() == id)
        .collect()
}

/// The node each span was recorded at: its own `fedgate.node`, else its nearest ancestor's.
fn node_of(span: &SpanData, by_id: &HashMap<SpanId, &SpanData>) -> Option<String> {
    let mut at = span;
    for _ in 0..64 {
        if let Some(n) = attr(at, "fedgate.node") {
            return Some(n.as_str().into_owned());
        }
        at = by_id.get(&at.parent_span_id)?;
    }
    None
}

fn server_nodes(spans: &[SpanData]) -> BTreeSet<String> {
    spans
        .iter()
        .filter(|s| s.span_kind == SpanKind::Server)
        .map(|s| attr_str(s, "fedgate.node"))
        .collect()
}

#[tokio::test]
async fn a_cross_city_share_is_one_trace_over_all_five_nodes_naming_no_data() -> Result<()> {
    captured();
    let net = standard().await?;
    let consumer = net.consumer_at(code("350102"))?.uscc.to_string();
    let key = key_at(&net, "350203", 0)?;
    let mut gulou = net.client(&net.consumer_at(code("350102"))?.uscc).await?;
    let resp = gulou
        .share(query("350203:household", &key, &["name", "gender"]))
        .await?
        .into_inner();
    let route: Vec<&str> = resp.route.iter().map(|h| h.node_code.as_str()).collect();
    assert_eq!(route, ["350102", "350100", "350000", "350200", "350203"]);

    // The trace the consumer's node started for this share: its root is the server span of the agency's call.
    let root = |spans: &[SpanData]| -> Option<SpanData> {
        spans
            .iter()
            .find(|s| {
                s.span_kind == SpanKind::Server
                    && s.parent_span_id == SpanId::INVALID
                    && attr_str(s, "fedgate.node") == "350102"
                    && attr_str(s, "rpc.method") == "Share"
                    && attr_str(s, "fedgate.resource") == "350203:household"
                    && attr_str(s, "fedgate.consumer") == consumer
            })
            .cloned()
    };
    let five: BTreeSet<String> = ["350000", "350100", "350102", "350200", "350203"]
        .map(String::from)
        .into();
    let mut spans = Vec::new();
    eventually(
        "the share's trace to hold a server span of each node",
        Duration::from_secs(10),
        || {
            let found = root(&captured().spans.get_finished_spans().unwrap_or_default())
                .map(|r| trace(r.span_context.trace_id()))
                .unwrap_or_default();
            let whole = server_nodes(&found) == five;
            spans = found;
            async move { Ok(whole) }
        },
    )
    .await?;
    let root = root(&spans).context("root span")?;
    let by_id: HashMap<SpanId, &SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();

    // One span per hop, each a child of the previous node's forwarding span.
    let servers: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_kind == SpanKind::Server)
        .collect();
    assert_eq!(servers.len(), 5, "one server span per node: {servers:#?}");
    for pair in route.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let server = servers
            .iter()
            .find(|s| attr_str(s, "fedgate.node") == to)
            .context("server span")?;
        let parent = by_id
            .get(&server.parent_span_id)
            .with_context(|| format!("the parent of node {to}'s span is in the trace"))?;
        assert_eq!(parent.name, "forward", "node {to}'s span follows a forward");
        assert_eq!(attr_str(parent, "fedgate.node"), from);
        assert_eq!(attr_str(parent, "fedgate.next"), to);
        assert_eq!(attr_str(server, "fedgate.resource"), "350203:household");
        assert_eq!(attr_str(server, "fedgate.consumer"), consumer);
        assert_eq!(attr_str(server, "fedgate.consumer_node"), "350102");
        assert!(attr_str(server, "fedgate.mode").contains("QUERY"));
        assert_eq!(attr_str(server, "fedgate.outcome"), "OK");
        assert_eq!(
            attr(server, "rpc.grpc.status_code")
                .map(Value::as_str)
                .as_deref(),
            Some("0")
        );
    }
    assert_eq!(attr_str(&root, "fedgate.outcome"), "OK");

    // Every span belongs to this one tree, and the expected steps appear at the expected nodes.
    let mut steps: BTreeSet<(String, String)> = BTreeSet::new();
    for s in &spans {
        if s.span_context.span_id() != root.span_context.span_id() {
            assert!(
                by_id.contains_key(&s.parent_span_id),
                "span {} has its parent in the trace",
                s.name
            );
        }
        let node = node_of(s, &by_id).with_context(|| format!("node of span {}", s.name))?;
        steps.insert((node, s.name.to_string()));
    }
    for (node, step) in [
        ("350102", "admission"),
        ("350102", "cache.lookup"),
        ("350102", "forward"),
        ("350102", "audit.commit"),
        ("350100", "forward"),
        ("350100", "audit.commit"),
        ("350000", "forward"),
        ("350000", "audit.commit"),
        ("350200", "forward"),
        ("350200", "audit.commit"),
        ("350203", "admission"),
        ("350203", "provider.call"),
        ("350203", "masking"),
        ("350203", "audit.commit"),
    ] {
        assert!(
            steps.contains(&(node.to_owned(), step.to_owned())),
            "a {step} span at node {node}; the trace has {steps:?}"
        );
    }
    let provider = spans
        .iter()
        .find(|s| s.name == "provider.call")
        .context("provider call span")?;
    assert_eq!(provider.span_kind, SpanKind::Client);
    assert_eq!(
        attr_str(provider, "fedgate.provider"),
        net.provider_at(code("350203"))?.uscc.to_string()
    );
    assert_eq!(attr_str(provider, "fedgate.outcome"), "OK");

    // No attribute carries the key asked for or a value answered, masked or not.
    let registry = net
        .provider_at(code("350203"))?
        .registry
        .clone()
        .context("registry")?;
    let fields = ["name".to_owned(), "gender".to_owned()];
    let record = registry
        .lookup(Resource::Household, &key, &fields)
        .context("the key's record")?;
    let mut secrets: Vec<String> = vec![key.clone(), key[key.len() - 8..].to_owned()];
    secrets.extend(
        record
            .values
            .values()
            .filter(|v| v.chars().count() > 1)
            .cloned(),
    );
    for r in &resp.records {
        secrets.extend(r.values.values().filter(|v| v.chars().count() > 1).cloned());
    }
    for s in &spans {
        for kv in &s.attributes {
            let v = kv.value.as_str();
            for secret in &secrets {
                assert!(
                    !v.contains(secret.as_str()),
                    "span {} attribute {} = {v:?} carries a data value",
                    s.name,
                    kv.key
                );
            }
        }
    }

    // An uplink batch is a trace too: the child's push and the parent's server span of it.
    eventually(
        "an uplink batch traced into the parent",
        Duration::from_secs(10),
        || {
            let all = captured().spans.get_finished_spans().unwrap_or_default();
            let found = all.iter().any(|b| {
                b.name == "uplink.batch"
                    && attr_str(b, "fedgate.node") == "350102"
                    && all.iter().any(|s| {
                        s.span_kind == SpanKind::Server
                            && s.parent_span_id == b.span_context.span_id()
                            && attr_str(s, "fedgate.node") == "350100"
                            && attr_str(s, "rpc.method") == "Push"
                    })
            });
            async move { Ok(found) }
        },
    )
    .await?;
    net.shutdown().await
}

/// The finished trace whose root is the server span of `method` called at `node`, once it holds a server span
/// of each of `nodes`.
async fn whole_trace(node: &str, method: &str, nodes: &[&str]) -> Result<Vec<SpanData>> {
    let want: BTreeSet<String> = nodes.iter().map(|n| (*n).to_owned()).collect();
    let root = |spans: &[SpanData]| -> Option<TraceId> {
        spans
            .iter()
            .find(|s| {
                s.span_kind == SpanKind::Server
                    && s.parent_span_id == SpanId::INVALID
                    && attr_str(s, "fedgate.node") == node
                    && attr_str(s, "rpc.method") == method
            })
            .map(|s| s.span_context.trace_id())
    };
    let mut spans = Vec::new();
    eventually(
        &format!("the trace of {method} at {node} to reach {nodes:?}"),
        Duration::from_secs(10),
        || {
            let found = root(&captured().spans.get_finished_spans().unwrap_or_default())
                .map(trace)
                .unwrap_or_default();
            let whole = server_nodes(&found) == want;
            spans = found;
            async move { Ok(whole) }
        },
    )
    .await?;
    Ok(spans)
}

/// Each hop's server span in `spans` follows a `forward` span of the node before it on `route`, and each of
/// `route`'s nodes committed its audit record in the trace.
fn hop_by_hop(spans: &[SpanData], route: &[&str], method: &str) -> Result<()> {
    let by_id: HashMap<SpanId, &SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    for pair in route.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let server = spans
            .iter()
            .find(|s| s.span_kind == SpanKind::Server && attr_str(s, "fedgate.node") == to)
            .with_context(|| format!("{method}: node {to}'s server span"))?;
        assert_eq!(attr_str(server, "rpc.method"), method);
        let parent = by_id
            .get(&server.parent_span_id)
            .with_context(|| format!("{method}: the parent of node {to}'s span"))?;
        assert_eq!(
            parent.name, "forward",
            "{method}: node {to}'s span follows a forward"
        );
        assert_eq!(attr_str(parent, "fedgate.node"), from);
        assert_eq!(attr_str(parent, "fedgate.next"), to);
        assert_eq!(attr_str(parent, "fedgate.outcome"), "OK");
    }
    for node in route {
        let committed = spans
            .iter()
            .any(|s| s.name == "audit.commit" && node_of(s, &by_id).as_deref() == Some(*node));
        assert!(committed, "{method}: an audit.commit span at node {node}");
    }
    Ok(())
}

#[tokio::test]
async fn an_application_and_the_revocation_of_its_grant_are_each_one_trace_over_their_route()
-> Result<()> {
    use fedgate_proto::v1::{ApplyRequest, DecideRequest, RevokeRequest, ShareMode};
    use prost::Message as _;
    captured();
    let net = standard().await?;
    let mut consumer = net.client(&net.consumer_at(code("350203"))?.uscc).await?;
    let mut provider = net.client(&net.provider_at(code("350102"))?.uscc).await?;
    let applied = consumer
        .apply(ApplyRequest {
            resource_id: "350102:marriage".into(),
            purpose: "social assistance eligibility check".into(),
            scenario: "minimum living allowance application".into(),
            fields: vec!["name".into()],
            mode: ShareMode::Query as i32,
            requested_expires_at: 0,
        })
        .await?
        .into_inner();
    let up = ["350203", "350200", "350000", "350100", "350102"];
    let spans = whole_trace("350203", "Apply", &up).await?;
    let root = spans
        .iter()
        .find(|s| s.parent_span_id == SpanId::INVALID)
        .context("the application's root span")?;
    assert_eq!(attr_str(root, "fedgate.resource"), "350102:marriage");
    assert_eq!(attr_str(root, "fedgate.outcome"), "OK");
    hop_by_hop(&spans, &up, "Forward")?;

    let decided = provider
        .decide(DecideRequest {
            application_id: applied.id,
            approve: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    let grant = decided.grant.context("the approval carries a grant")?;
    let grant = fedgate_proto::v1::Grant::decode(grant.grant.as_slice())?;
    let revoked = provider
        .revoke(RevokeRequest {
            grant_id: grant.id.clone(),
            reason: "purpose fulfilled".into(),
        })
        .await?
        .into_inner();
    let down = ["350102", "350100", "350000", "350200", "350203"];
    assert_eq!(revoked.notified_nodes, down);
    let spans = whole_trace("350102", "Revoke", &down).await?;
    hop_by_hop(&spans, &down, "Revoke")?;
    net.shutdown().await
}

#[tokio::test]
async fn a_trace_context_sent_by_an_agency_is_continued_and_its_id_is_in_the_json_logs()
-> Result<()> {
    captured();
    let net = standard().await?;
    let key = key_at(&net, "350102", 1)?;
    let trace_id = TraceId::from(rand::random::<u128>() | 1);
    let parent_span = SpanId::from(rand::random::<u64>() | 1);
    let mut req = tonic::Request::new(query("350102:household", &key, &["name"]));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_span}-01").parse()?,
    );
    let mut taijiang = net.client(&net.consumer_at(code("350103"))?.uscc).await?;
    let resp = taijiang.share(req).await?.into_inner();
    assert_eq!(resp.route.len(), 3);

    let three: BTreeSet<String> = ["350100", "350102", "350103"].map(String::from).into();
    eventually(
        "the agency's trace to reach all three nodes",
        Duration::from_secs(10),
        || {
            let whole = server_nodes(&trace(trace_id)) == three;
            async move { Ok(whole) }
        },
    )
    .await?;
    let spans = trace(trace_id);
    let first = spans
        .iter()
        .find(|s| s.span_kind == SpanKind::Server && attr_str(s, "fedgate.node") == "350103")
        .context("the consumer node's server span")?;
    assert_eq!(
        first.parent_span_id, parent_span,
        "the agency's span is the parent"
    );
    assert!(first.parent_span_is_remote);

    // The node's JSON log lines written inside the trace name it at top level.
    let lines = captured().logs.lines();
    let traced: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["trace_id"] == trace_id.to_string())
        .collect();
    if traced.is_empty() {
        bail!("no JSON log line carries trace_id {trace_id}: {lines:#?}");
    }
    assert!(
        traced
            .iter()
            .all(|l| l["level"].is_string() && l["fields"].is_object())
    );
    net.shutdown().await
}

/// An OTLP/gRPC trace receiver: what a collector is to a node.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0
            .lock()
            .map_err(|_| tonic::Status::internal("collector poisoned"))?
            .push(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// What the last run of `node` wrote to its standard error.
fn last_stderr(
    fed: &fedgate_tests::process::ProcessFederation,
    node: fedgate_tests::DivisionCode,
) -> Result<String> {
    let stderr = fed
        .log_files(node)
        .into_iter()
        .rev()
        .find(|p| p.extension().is_some_and(|e| e == "err"))
        .context("the node's standard error")?;
    Ok(std::fs::read_to_string(&stderr)?)
}

#[tokio::test]
async fn a_node_process_exports_over_otlp_as_its_service_and_flushes_on_sigterm() -> Result<()> {
    use fedgate_proto::v1::ShareType::{Conditional, Unconditional};
    use fedgate_tests::process::ProcessFederation;
    use fedgate_tests::{NodeSpec, registry};
    captured();
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let otlp = listener.local_addr()?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let specs = vec![
        NodeSpec::new("350102")?
            .consumer(1, "Gulou consumer")?
            .provider(2, "Gulou provider", registry(Unconditional, Conditional, 1))?,
    ];
    let gulou = code("350102");
    let mut fed = ProcessFederation::start(specs, &[]).await?;
    fed.terminate(gulou).await?;
    assert!(
        last_stderr(&fed, gulou)?.contains("traces not exported"),
        "without the OTLP variables a node says it exports nothing"
    );
    let endpoint = format!("http://{otlp}");
    fed.set_launch(
        gulou,
        &["--log-format", "json"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            // Nothing leaves before exit unless the exit flushes it.
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("RUST_LOG", "info,fedgate_gateway::telemetry=debug"),
        ],
    )?;
    fed.start_node(gulou).await?;

    let trace_id = TraceId::from(rand::random::<u128>() | 1);
    let mut req = tonic::Request::new(query("350102:household", &fed.key_at(gulou, 0)?, &["name"]));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{}-01", SpanId::from(7u64)).parse()?,
    );
    let mut client = fed.client(&fed.consumer_at(gulou)?.uscc).await?;
    client.share(req).await?;
    fed.terminate(gulou).await?;

    let exports = collector.0.lock().map(|e| e.clone()).unwrap_or_default();
    let share = exports
        .iter()
        .flat_map(|e| &e.resource_spans)
        .filter(|rs| {
            rs.resource.as_ref().is_some_and(|r| {
                r.attributes.iter().any(|kv| {
                    kv.key == "service.name"
                        && format!("{:?}", kv.value).contains("\"fedgate-350102\"")
                })
            })
        })
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .find(|s| s.trace_id == trace_id.to_bytes() && s.name == "fedgate.v1.Agency/Share");
    if share.is_none() {
        bail!(
            "the collector got no Share span of trace {trace_id} from service fedgate-350102: {exports:#?}"
        );
    }

    let text = last_stderr(&fed, gulou)?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l}")))
        .collect::<Result<_>>()?;
    assert!(
        lines.iter().any(|l| l["trace_id"] == trace_id.to_string()),
        "a JSON log line of the node names trace {trace_id}: {text}"
    );
    assert!(text.contains("traces exported over OTLP/gRPC"), "{text}");

    // A protocol that is not built in is refused at start, naming the variable, not sent to the wrong port.
    let refused = tokio::process::Command::new(fedgate_tests::process::fedgate_binary().await?)
        .arg("node")
        .arg("--config")
        .arg(fed.config_path(gulou)?)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .kill_on_drop(true)
        .output();
    let refused = tokio::time::timeout(Duration::from_secs(30), refused).await??;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(78), "{said}");
    assert!(
        said.contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"http/protobuf\""),
        "{said}"
    );
    server.abort();
    fed.shutdown().await
}

//! cim-contract: the NATS calls of the CIM's event store, one by one, against a real cluster.
//!
//! The CIM (TheCowboyAI/cim-infrastructure, async-nats 0.33) keeps its events in JetStream through
//! `NatsEventStore` (src/event_store/nats.rs) and `create_infrastructure_stream` (src/jetstream.rs).
//! This program makes the same calls with the same configuration, so what it sees (errors, limits,
//! latencies, consumer counts) is what the CIM will see. Comments name the upstream function each
//! piece stands for. Only the connection differs: the CIM calls `async_nats::connect(url)` with no
//! options; here it connects the way the cluster's client docs tell it to (user/password, the
//! cluster's CA, TLS required).
//!
//! Output: exactly one JSON line on stdout. Exit 0 when every check passed, 1 when one failed,
//! 2 on bad usage. Every network step has its own timeout and the whole run an overall deadline.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream};
use async_nats::{ConnectOptions, ServerAddr};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Limits of this program (not the CIM's): no call may hang.

/// One server's TCP/TLS connect, and the whole connect over the URL list.
const CONNECT_TIMEOUT_PER_SERVER: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// JetStream API requests (STREAM.INFO, CONSUMER.CREATE) and publish acks; async-nats' own default.
const API_TIMEOUT: Duration = Duration::from_secs(5);
/// One CIM read: consumer create + fetch (2 s expiry when the aggregate is empty) + acks.
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// One CIM append: a read, then the publishes.
const APPEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Setup appends retried when the CIM's read-before-append saw a replica behind its last append.
const STALE_READ_RETRIES: usize = 5;
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// The CIM's constants.

/// JetStreamConfig::default() in src/jetstream.rs.
const CIM_STREAM: &str = "INFRASTRUCTURE_EVENTS";
const CIM_SUBJECTS: &str = "infrastructure.>";
const CIM_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 60 * 60);
const CIM_MAX_BYTES: i64 = 10 * 1024 * 1024 * 1024;
const CIM_REPLICAS: usize = 1;
/// NatsEventStore.subject_prefix, and AggregateType::Compute's Display (src/subjects.rs).
const CIM_PREFIX: &str = "infrastructure";
const CIM_AGGREGATE_TYPE: &str = "compute";
/// read_events_from: `BATCH_SIZE` and the fetch expiry.
const CIM_FETCH_BATCH: usize = 10_000;
const CIM_FETCH_EXPIRES: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// The envelope: StoredEvent<E> in src/jetstream.rs, with E = InfrastructureEvent kept as JSON.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredEvent {
    event_id: Uuid,
    aggregate_id: Uuid,
    sequence: u64,
    /// chrono's DateTime<Utc> upstream, which serialises as RFC 3339.
    timestamp: String,
    correlation_id: Uuid,
    causation_id: Uuid,
    event_type: String,
    data: Value,
    metadata: Option<Value>,
}

/// What a CIM command hands to `append`: one InfrastructureEvent.
#[derive(Debug, Clone)]
struct DomainEvent {
    /// event_type_name(): "ResourceRegistered", ...
    type_name: &'static str,
    aggregate_id: Uuid,
    timestamp: String,
    correlation_id: Uuid,
    causation_id: Option<Uuid>,
    /// The serialised InfrastructureEvent: {"aggregate_type": .., "event": {"type": .., ...}}.
    json: Value,
}

fn now_rfc3339() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_default()
}

/// A ComputeResource event shaped like the CIM's serde output (src/events/infrastructure.rs:
/// tag "aggregate_type", content "event"; src/events/compute_resource.rs: tag "type", snake_case).
fn compute_event(
    aggregate_id: Uuid,
    correlation_id: Uuid,
    causation_id: Option<Uuid>,
    type_name: &'static str,
    fields: Value,
) -> DomainEvent {
    let timestamp = now_rfc3339();
    let mut event = json!({
        "type": snake_case(type_name),
        "event_version": 1,
        "event_id": Uuid::now_v7(),
        "aggregate_id": aggregate_id,
        "timestamp": timestamp,
        "correlation_id": correlation_id,
        "causation_id": causation_id,
    });
    if let (Some(target), Value::Object(extra)) = (event.as_object_mut(), fields) {
        target.extend(extra);
    }
    DomainEvent {
        type_name,
        aggregate_id,
        timestamp,
        correlation_id,
        causation_id,
        json: json!({"aggregate_type": "compute_resource", "event": event}),
    }
}

fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_lowercase());
    }
    out
}

/// A resource's life in three events, each caused by the one before (same correlation id).
fn lifecycle(aggregate_id: Uuid, count: usize) -> Vec<DomainEvent> {
    let correlation = Uuid::now_v7();
    let mut events: Vec<DomainEvent> = Vec::with_capacity(count);
    for n in 0..count {
        let cause = events.last().map(|e| e.json["event"]["event_id"].as_str().unwrap_or_default().to_string());
        let cause = cause.and_then(|id| Uuid::parse_str(&id).ok());
        let event = match n {
            0 => compute_event(
                aggregate_id,
                correlation,
                cause,
                "ResourceRegistered",
                json!({"hostname": format!("contract-{}", &aggregate_id.simple().to_string()[..8]), "resource_type": "physical_server"}),
            ),
            1 => compute_event(
                aggregate_id,
                correlation,
                cause,
                "StatusChanged",
                json!({"from_status": "provisioning", "to_status": "active"}),
            ),
            _ => compute_event(
                aggregate_id,
                correlation,
                cause,
                "MetadataUpdated",
                json!({"key": "contract-check", "value": format!("n{n}")}),
            ),
        };
        events.push(event);
    }
    events
}

// ---------------------------------------------------------------------------------------------
// Errors: the full chain, so a TLS or auth failure names itself.

fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let more = inner.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = inner.source();
    }
    text
}

#[derive(Debug)]
enum StoreError {
    /// InfrastructureError::ConcurrencyError upstream: the client-side version check.
    Concurrency(String),
    /// InfrastructureError::NatsConnection / Serialization upstream.
    Nats(String),
    Timeout(&'static str, Duration),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Concurrency(m) => write!(f, "concurrency: {m}"),
            StoreError::Nats(m) => write!(f, "{m}"),
            StoreError::Timeout(what, d) => write!(f, "{what} timed out after {} s", d.as_secs_f64()),
        }
    }
}

fn nats<E: std::error::Error + 'static>(error: E) -> StoreError {
    StoreError::Nats(chain(&error))
}

async fn bounded<T, F>(what: &'static str, limit: Duration, work: F) -> Result<T, StoreError>
where
    F: std::future::Future<Output = Result<T, StoreError>>,
{
    tokio::time::timeout(limit, work).await.unwrap_or(Err(StoreError::Timeout(what, limit)))
}

/// One CIM append with its caller's retry: the read before it goes through a new consumer, which
/// may sit on a replica that has not applied the previous append yet, and the CIM's own version
/// check then fails (seen on the lab). A CIM caller would try again; so does this, a few times,
/// counting each in `stale_reads`. The server itself refused nothing.
async fn append_retrying_stale(
    store: &EventStore,
    aggregate_id: Uuid,
    event: &DomainEvent,
    expected: u64,
    stale_reads: &std::sync::atomic::AtomicUsize,
) -> Result<AppendOutcome, StoreError> {
    let mut retries = 0;
    loop {
        match bounded("append", APPEND_TIMEOUT, store.append(aggregate_id, vec![event.clone()], Some(expected))).await {
            Err(StoreError::Concurrency(_)) if retries < STALE_READ_RETRIES => {
                retries += 1;
                stale_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connection, as the cluster's client bundle says (env NATS_URL, NATS_USER, NATS_PASSWORD, NATS_CA).

struct Settings {
    urls: Vec<ServerAddr>,
    url_text: String,
    user: Option<String>,
    password: Option<String>,
    ca: Option<PathBuf>,
    stream: String,
    end_on_no_messages: bool,
}

fn settings(end_on_no_messages: bool) -> Result<Settings, String> {
    let url_text =
        std::env::var("NATS_URL").map_err(|_| "NATS_URL is not set (comma-separated tls:// URLs)".to_string())?;
    let mut urls = Vec::new();
    for part in url_text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        urls.push(part.parse::<ServerAddr>().map_err(|e| format!("NATS_URL entry {part:?}: {}", chain(&e)))?);
    }
    if urls.is_empty() {
        return Err("NATS_URL holds no URL".into());
    }
    let ca = std::env::var_os("NATS_CA").filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(path) = &ca {
        if !path.is_file() {
            return Err(format!("NATS_CA {} is not a readable file", path.display()));
        }
    }
    Ok(Settings {
        urls,
        url_text,
        user: std::env::var("NATS_USER").ok().filter(|v| !v.is_empty()),
        password: std::env::var("NATS_PASSWORD").ok(),
        ca,
        stream: std::env::var("NATS_STREAM").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| CIM_STREAM.into()),
        end_on_no_messages,
    })
}

type Events = Arc<Mutex<Vec<String>>>;

async fn connect(settings: &Settings, events: Events) -> Result<async_nats::Client, StoreError> {
    let mut options = match (&settings.user, &settings.password) {
        (Some(user), password) => {
            ConnectOptions::with_user_and_password(user.clone(), password.clone().unwrap_or_default())
        }
        (None, _) => ConnectOptions::new(),
    };
    if let Some(ca) = &settings.ca {
        options = options.add_root_certificates(ca.clone());
    }
    let options = options
        .require_tls(true)
        .name("cim-contract")
        .connection_timeout(CONNECT_TIMEOUT_PER_SERVER)
        // Server-side errors after connect (permission violations, slow consumer) arrive as events.
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                if let Ok(mut list) = events.lock() {
                    if list.len() < 50 {
                        list.push(event.to_string());
                    }
                }
            }
        });
    let urls = settings.urls.clone();
    bounded("connect", CONNECT_TIMEOUT, async move { options.connect(urls).await.map_err(nats) })
        .await
        .map_err(|error| StoreError::Nats(explain_connect_error(&error.to_string())))
}

/// async-nats 0.33 reports a bad certificate as "IO error: invalid peer certificate": say TLS.
fn explain_connect_error(text: &str) -> String {
    let lower = text.to_lowercase();
    if lower.contains("authorization violation") || lower.contains("authentication") {
        format!("auth: {text} (check NATS_USER / NATS_PASSWORD)")
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        format!("TLS: {text} (check NATS_CA and that the URL's host is in the server certificate)")
    } else {
        text.to_string()
    }
}

fn server_json(client: &async_nats::Client) -> Value {
    let info = client.server_info();
    json!({
        "name": info.server_name,
        "id": info.server_id,
        "version": info.version,
        "host": info.host,
        "port": info.port,
        "tls_required": info.tls_required,
        "auth_required": info.auth_required,
        "connect_urls": info.connect_urls,
        "max_payload": info.max_payload,
    })
}

// ---------------------------------------------------------------------------------------------
// The event store: NatsEventStore (src/event_store/nats.rs).

#[derive(Clone)]
struct EventStore {
    context: jetstream::Context,
    stream: stream::Stream,
    /// `--end-on-no-messages`: the one deviation this program can make from the CIM (see
    /// read_events_from). Off by default: reads fail exactly where the CIM's fail.
    end_on_no_messages: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct ReadTiming {
    create_ms: f64,
    fetch_ms: f64,
    total_ms: f64,
}

#[derive(Debug)]
struct AppendOutcome {
    version: u64,
    read_ms: f64,
    publish_ms: f64,
    stream_sequences: Vec<u64>,
}

fn ms(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

impl EventStore {
    /// NatsEventStore::connect after `async_nats::connect`: `jetstream::new(client)`, then
    /// create_infrastructure_stream(JetStreamConfig::default()) (src/jetstream.rs), which is
    /// `get_or_create_stream`: in 0.33 a STREAM.INFO first, STREAM.CREATE only on "not found"; an
    /// existing stream is used whatever its config.
    async fn open(client: async_nats::Client, stream_name: &str, end_on_no_messages: bool) -> Result<Self, StoreError> {
        let mut context = jetstream::new(client);
        context.set_timeout(API_TIMEOUT);
        let config = stream::Config {
            name: stream_name.to_string(),
            subjects: vec![CIM_SUBJECTS.to_string()],
            max_age: CIM_MAX_AGE,
            max_bytes: CIM_MAX_BYTES,
            storage: stream::StorageType::File,
            num_replicas: CIM_REPLICAS,
            retention: stream::RetentionPolicy::Limits,
            ..Default::default()
        };
        let stream = bounded("get_or_create_stream", API_TIMEOUT * 2, async {
            context.get_or_create_stream(config).await.map_err(nats)
        })
        .await?;
        Ok(Self { context, stream, end_on_no_messages })
    }

    /// build_subject: infrastructure.compute.<aggregate_id>.<event_type lowercased>.
    fn subject(aggregate_id: Uuid, type_name: &str) -> String {
        format!("{CIM_PREFIX}.{CIM_AGGREGATE_TYPE}.{aggregate_id}.{}", type_name.to_lowercase())
    }

    /// aggregate_subject_filter: infrastructure.compute.<aggregate_id>.>.
    fn filter(aggregate_id: Uuid) -> String {
        format!("{CIM_PREFIX}.{CIM_AGGREGATE_TYPE}.{aggregate_id}.>")
    }

    /// EventStore::append: get_version (a whole read), the client-side version comparison, then
    /// one plain `jetstream.publish(subject, payload)` per event, awaiting each PubAck. No headers:
    /// no Nats-Expected-Last-Subject-Sequence, no Nats-Msg-Id.
    async fn append(
        &self,
        aggregate_id: Uuid,
        events: Vec<DomainEvent>,
        expected_version: Option<u64>,
    ) -> Result<AppendOutcome, StoreError> {
        let started = Instant::now();
        let (current, _) = self.get_version(aggregate_id).await?;
        let read_ms = ms(started);
        if let Some(expected) = expected_version {
            match current {
                Some(current) if current != expected => {
                    return Err(StoreError::Concurrency(format!(
                        "Expected version {expected}, but current version is {current}"
                    )))
                }
                None if expected != 0 => {
                    return Err(StoreError::Concurrency(format!(
                        "Expected version {expected}, but aggregate has no events"
                    )))
                }
                _ => {}
            }
        }
        let publishing = Instant::now();
        let mut next = current.map(|v| v + 1).unwrap_or(1);
        let mut stream_sequences = Vec::new();
        for event in events {
            let envelope = StoredEvent {
                // Upstream sets event_id to event.aggregate_id() (its comment says "Use event's
                // ID"); mirrored, so the envelope's event_id equals its aggregate_id.
                event_id: event.aggregate_id,
                aggregate_id,
                sequence: next,
                timestamp: event.timestamp.clone(),
                correlation_id: event.correlation_id,
                causation_id: event.causation_id.unwrap_or(event.aggregate_id),
                event_type: event.type_name.to_string(),
                data: event.json.clone(),
                metadata: None,
            };
            let payload = serde_json::to_vec(&envelope).map_err(nats)?;
            let ack = self
                .context
                .publish(Self::subject(aggregate_id, event.type_name), payload.into())
                .await
                .map_err(nats)?
                .await
                .map_err(nats)?;
            stream_sequences.push(ack.sequence);
            next += 1;
        }
        Ok(AppendOutcome { version: next - 1, read_ms, publish_ms: ms(publishing), stream_sequences })
    }

    /// read_events / read_events_from: a NEW ephemeral pull consumer filtered on the aggregate
    /// (default config: explicit ack, no inactive_threshold, never deleted), then
    /// `fetch().max_messages(10000).expires(2 s).messages()` in a loop; an error whose text says
    /// timeout / no messages ends the read; each message is acked; fewer than 10000 ends the loop.
    async fn read_events_from(
        &self,
        aggregate_id: Uuid,
        from_version: u64,
    ) -> Result<(Vec<StoredEvent>, ReadTiming), StoreError> {
        let started = Instant::now();
        let consumer = self
            .stream
            .create_consumer(pull::Config { filter_subject: Self::filter(aggregate_id), ..Default::default() })
            .await
            .map_err(nats)?;
        let create_ms = ms(started);
        let fetching = Instant::now();
        let mut events = Vec::new();
        loop {
            let mut messages =
                match consumer.fetch().max_messages(CIM_FETCH_BATCH).expires(CIM_FETCH_EXPIRES).messages().await {
                    Ok(batch) => batch,
                    Err(error) => {
                        let text = error.to_string().to_lowercase();
                        if text.contains("timeout") || text.contains("timed out") || text.contains("no messages") {
                            break;
                        }
                        return Err(nats(error));
                    }
                };
            let mut batch_count = 0;
            while let Some(message) = messages.next().await {
                // nats-server 2.15.1 ends a no_wait fetch that delivered messages with a
                // `404 No Messages` status (408 before); async-nats 0.33 yields that status as an
                // Err item, and upstream's `message.map_err(..)?` turns it into a failed read.
                // `--end-on-no-messages` takes it as the end of the batch instead (the minimal fix).
                let message = match message {
                    Ok(message) => message,
                    Err(error) if self.end_on_no_messages && is_no_messages(&error.to_string()) => break,
                    Err(error) => return Err(StoreError::Nats(error.to_string())),
                };
                let event: StoredEvent = serde_json::from_slice(&message.payload).map_err(nats)?;
                if event.sequence >= from_version {
                    events.push(event);
                }
                message.ack().await.map_err(|e| StoreError::Nats(e.to_string()))?;
                batch_count += 1;
            }
            if batch_count < CIM_FETCH_BATCH {
                break;
            }
        }
        events.sort_by_key(|e| e.sequence);
        Ok((events, ReadTiming { create_ms, fetch_ms: ms(fetching), total_ms: ms(started) }))
    }

    async fn read_events(&self, aggregate_id: Uuid) -> Result<(Vec<StoredEvent>, ReadTiming), StoreError> {
        bounded("read_events", READ_TIMEOUT, self.read_events_from(aggregate_id, 1)).await
    }

    /// get_version: a full read_events, then the highest envelope sequence.
    async fn get_version(&self, aggregate_id: Uuid) -> Result<(Option<u64>, ReadTiming), StoreError> {
        let (events, timing) = self.read_events(aggregate_id).await?;
        Ok((events.iter().map(|e| e.sequence).max(), timing))
    }

    /// STREAM.INFO (what get_or_create_stream asks too).
    async fn info(&self) -> Result<stream::Info, StoreError> {
        let name = self.stream.cached_info().config.name.clone();
        bounded("stream info", SAMPLE_TIMEOUT, async {
            let stream = self.context.get_stream(&name).await.map_err(nats)?;
            Ok(stream.cached_info().clone())
        })
        .await
    }
}

/// The status async-nats 0.33 reports for `404 No Messages` inside a batch.
fn is_no_messages(text: &str) -> bool {
    text.contains("404") && text.to_lowercase().contains("no messages")
}

fn stream_json(info: &stream::Info, asked_at: OffsetDateTime) -> Value {
    let c = &info.config;
    let mut differs = Vec::new();
    if c.subjects != [CIM_SUBJECTS] {
        differs.push(json!({"field": "subjects", "stream": c.subjects, "cim": [CIM_SUBJECTS]}));
    }
    if c.num_replicas != CIM_REPLICAS {
        differs.push(json!({"field": "num_replicas", "stream": c.num_replicas, "cim": CIM_REPLICAS}));
    }
    if c.max_age != CIM_MAX_AGE {
        differs.push(json!({"field": "max_age_s", "stream": c.max_age.as_secs(), "cim": CIM_MAX_AGE.as_secs()}));
    }
    if c.max_bytes != CIM_MAX_BYTES {
        differs.push(json!({"field": "max_bytes", "stream": c.max_bytes, "cim": CIM_MAX_BYTES}));
    }
    json!({
        "name": c.name,
        "subjects": c.subjects,
        "num_replicas": c.num_replicas,
        "storage": format!("{:?}", c.storage).to_lowercase(),
        "retention": format!("{:?}", c.retention).to_lowercase(),
        "discard": format!("{:?}", c.discard).to_lowercase(),
        "max_age_s": c.max_age.as_secs(),
        "max_bytes": c.max_bytes,
        "allow_direct": c.allow_direct,
        "deny_delete": c.deny_delete,
        "deny_purge": c.deny_purge,
        "consumer_inactive_threshold_s": c.consumer_limits.as_ref().map(|l| l.inactive_threshold.as_secs_f64()),
        "created": info.created.format(&Rfc3339).unwrap_or_default(),
        // get_or_create_stream gives no sign of which branch it took: a stream created within a
        // second before the call was made by it.
        "created_by_this_run": info.created >= asked_at - time::Duration::seconds(1),
        "differs_from_cim_config": differs,
        "cluster_leader": info.cluster.as_ref().and_then(|cl| cl.leader.clone()),
        "state": {
            "messages": info.state.messages,
            "bytes": info.state.bytes,
            "first_seq": info.state.first_sequence,
            "last_seq": info.state.last_sequence,
            "consumer_count": info.state.consumer_count,
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Report plumbing.

#[derive(Default)]
struct Report {
    steps: Vec<Value>,
    fields: serde_json::Map<String, Value>,
}

type Shared = Arc<Mutex<Report>>;

fn record(report: &Shared, step: &str, started: Instant, result: Result<Value, String>) -> bool {
    let ok = result.is_ok();
    let mut entry = json!({"step": step, "ok": ok, "ms": ms(started), "error": Value::Null});
    match result {
        Ok(Value::Object(detail)) => entry.as_object_mut().expect("object").extend(detail),
        Ok(Value::Null) => {}
        Ok(other) => {
            entry["detail"] = other;
        }
        Err(error) => entry["error"] = Value::String(error),
    }
    report.lock().expect("report").steps.push(entry);
    ok
}

fn set(report: &Shared, key: &str, value: Value) {
    report.lock().expect("report").fields.insert(key.to_string(), value);
}

fn render(report: &Shared, command: &str, ok: bool, events: &Events) -> Value {
    let report = report.lock().expect("report");
    let mut out = serde_json::Map::new();
    out.insert("ok".into(), Value::Bool(ok));
    out.insert("command".into(), Value::String(command.into()));
    out.insert("steps".into(), Value::Array(report.steps.clone()));
    for (k, v) in &report.fields {
        out.insert(k.clone(), v.clone());
    }
    let events = events.lock().map(|e| e.clone()).unwrap_or_default();
    out.insert("client_events".into(), json!(events));
    Value::Object(out)
}

/// Connect and open the store, recorded as the first two steps.
async fn open_store(report: &Shared, settings: &Settings, events: Events) -> Option<EventStore> {
    set(report, "url", json!(settings.url_text));
    set(report, "stream_name", json!(settings.stream));
    let started = Instant::now();
    let client = match connect(settings, events).await {
        Ok(client) => {
            set(report, "server", server_json(&client));
            record(report, "connect", started, Ok(Value::Null));
            client
        }
        Err(error) => {
            record(report, "connect", started, Err(error.to_string()));
            return None;
        }
    };
    let started = Instant::now();
    let asked_at = OffsetDateTime::now_utc();
    match EventStore::open(client, &settings.stream, settings.end_on_no_messages).await {
        Ok(store) => {
            set(report, "stream", stream_json(store.stream.cached_info(), asked_at));
            record(report, "get_or_create_stream", started, Ok(Value::Null));
            Some(store)
        }
        Err(error) => {
            record(report, "get_or_create_stream", started, Err(error.to_string()));
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// contract

async fn contract(report: Shared, settings: Settings, events: Events) -> bool {
    let Some(store) = open_store(&report, &settings, events).await else { return false };
    let aggregate_id = Uuid::now_v7();
    set(&report, "aggregate_id", json!(aggregate_id));
    set(&report, "filter_subject", json!(EventStore::filter(aggregate_id)));
    let sent = lifecycle(aggregate_id, 3);
    let mut ok = true;
    let stale_reads = std::sync::atomic::AtomicUsize::new(0);

    // Three commands, one event each, as a CIM service would append them: expected version 0, 1, 2.
    for (n, event) in sent.iter().enumerate() {
        let started = Instant::now();
        let subject = EventStore::subject(aggregate_id, event.type_name);
        let result = append_retrying_stale(&store, aggregate_id, event, n as u64, &stale_reads)
            .await
            .map_err(|e| e.to_string())
            .and_then(|outcome| {
                let detail = json!({
                    "subject": subject,
                    "version": outcome.version,
                    "read_before_append_ms": outcome.read_ms,
                    "publish_ms": outcome.publish_ms,
                    "stream_seq": outcome.stream_sequences,
                });
                if outcome.version == n as u64 + 1 {
                    Ok(detail)
                } else {
                    Err(format!("append returned version {}, expected {}", outcome.version, n + 1))
                }
            });
        ok &= record(&report, &format!("append_{}", n + 1), started, result);
        set(&report, "stale_version_reads", json!(stale_reads.load(std::sync::atomic::Ordering::Relaxed)));
        if !ok {
            break;
        }
    }

    if ok {
        let started = Instant::now();
        let result = match store.read_events(aggregate_id).await {
            Err(error) => Err(error.to_string()),
            Ok((read, timing)) => {
                set(&report, "events_read", json!(read.len()));
                check_read_back(aggregate_id, &sent, &read).map(|()| {
                    json!({"events": read.len(), "create_consumer_ms": timing.create_ms, "fetch_ms": timing.fetch_ms,
                           "sequences": read.iter().map(|e| e.sequence).collect::<Vec<_>>()})
                })
            }
        };
        ok &= record(&report, "read_events", started, result);

        let started = Instant::now();
        let result = match store.get_version(aggregate_id).await {
            Err(error) => Err(error.to_string()),
            Ok((version, _)) => {
                set(&report, "version", json!(version));
                if version == Some(3) {
                    Ok(json!({"version": version}))
                } else {
                    Err(format!("get_version returned {version:?}, expected Some(3)"))
                }
            }
        };
        ok &= record(&report, "get_version", started, result);
    }

    let started = Instant::now();
    let result = match store.info().await {
        Ok(info) => {
            set(&report, "stream_after", stream_json(&info, OffsetDateTime::UNIX_EPOCH));
            Ok(json!({"messages": info.state.messages, "consumer_count": info.state.consumer_count}))
        }
        Err(error) => Err(error.to_string()),
    };
    ok &= record(&report, "stream_info", started, result);
    ok
}

/// The three events come back in order, each exactly as sent.
fn check_read_back(aggregate_id: Uuid, sent: &[DomainEvent], read: &[StoredEvent]) -> Result<(), String> {
    if read.len() != sent.len() {
        return Err(format!("read {} events, appended {}", read.len(), sent.len()));
    }
    for (n, (want, got)) in sent.iter().zip(read).enumerate() {
        let place = format!("event {}", n + 1);
        if got.sequence != n as u64 + 1 {
            return Err(format!("{place}: sequence {} expected {}", got.sequence, n + 1));
        }
        if got.aggregate_id != aggregate_id || got.event_type != want.type_name {
            return Err(format!(
                "{place}: {} {} is not {} {}",
                got.aggregate_id, got.event_type, aggregate_id, want.type_name
            ));
        }
        if got.data != want.json || got.timestamp != want.timestamp || got.correlation_id != want.correlation_id {
            return Err(format!("{place}: payload differs from what was appended"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// read-load

struct LoadArgs {
    rate: f64,
    seconds: f64,
    aggregates: usize,
    events: usize,
}

#[derive(Debug)]
enum ReadResult {
    Served(ReadTiming, usize),
    Incomplete(String),
    Refused(String),
}

fn percentile(sorted: &[f64], q: f64) -> Value {
    if sorted.is_empty() {
        return Value::Null;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    json!(sorted[index.min(sorted.len() - 1)])
}

async fn read_load(report: Shared, settings: Settings, events: Events, args: LoadArgs) -> bool {
    let Some(store) = open_store(&report, &settings, events).await else { return false };
    set(&report, "rate", json!(args.rate));
    set(&report, "seconds", json!(args.seconds));
    set(&report, "aggregates", json!(args.aggregates));
    set(&report, "events_per_aggregate", json!(args.events));

    // 1. The aggregates, written the CIM way (read-before-append per event), concurrently. The
    // read before an append goes through a new consumer, which may sit on a replica that has not
    // applied the previous append yet: the CIM's own version check then fails. Its caller would
    // try again; so does this setup, and it counts them (stale_version_reads).
    let started = Instant::now();
    let ids: Vec<Uuid> = (0..args.aggregates).map(|_| Uuid::now_v7()).collect();
    let per_event = args.events;
    let stale_reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writes = futures::stream::iter(ids.clone())
        .map(|id| {
            let (store, stale_reads) = (store.clone(), stale_reads.clone());
            async move {
                for (n, event) in lifecycle(id, per_event).into_iter().enumerate() {
                    append_retrying_stale(&store, id, &event, n as u64, &stale_reads).await?;
                }
                Ok::<(), StoreError>(())
            }
        })
        .buffer_unordered(args.aggregates.clamp(1, 32))
        .collect::<Vec<_>>()
        .await;
    let write_errors: BTreeSet<String> =
        writes.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
    let written = writes.iter().filter(|r| r.is_ok()).count();
    set(&report, "stale_version_reads", json!(stale_reads.load(std::sync::atomic::Ordering::Relaxed)));
    let write_ok = written == args.aggregates;
    record(
        &report,
        "write_aggregates",
        started,
        if write_ok {
            Ok(json!({"aggregates": written, "appends": written * per_event}))
        } else {
            Err(format!(
                "{} of {} aggregates failed: {:?}",
                args.aggregates - written,
                args.aggregates,
                write_errors.iter().take(5).collect::<Vec<_>>()
            ))
        },
    );
    if !write_ok {
        return false;
    }

    // 2. The sampler: STREAM.INFO once a second, state.consumer_count.
    let samples: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sample_errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let load_start = Instant::now();
    let sampler = {
        let (store, samples, sample_errors) = (store.clone(), samples.clone(), sample_errors.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop_rx.changed() => break,
                }
                let at = (load_start.elapsed().as_secs_f64() * 10.0).round() / 10.0;
                match store.info().await {
                    Ok(info) => samples
                        .lock()
                        .expect("samples")
                        .push(json!({"t_s": at, "consumers": info.state.consumer_count})),
                    Err(error) => sample_errors.lock().expect("errors").push(error.to_string()),
                }
            }
        })
    };

    // 3. The reads: one launched per tick, each in its own task, so a slow read never delays the next.
    let total = (args.rate * args.seconds).round().max(1.0) as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let mut first_launch = None;
    for i in 0..total {
        tick.tick().await;
        first_launch.get_or_insert_with(Instant::now);
        let store = store.clone();
        let id = ids[i % ids.len()];
        let expected = args.events;
        tasks.spawn(async move {
            match store.read_events(id).await {
                Err(error) => ReadResult::Refused(error.to_string()),
                Ok((read, timing)) => {
                    let in_order =
                        read.iter().enumerate().all(|(n, e)| e.sequence == n as u64 + 1 && e.aggregate_id == id);
                    if read.len() == expected && in_order {
                        ReadResult::Served(timing, read.len())
                    } else {
                        ReadResult::Incomplete(format!(
                            "{} events (in order: {in_order}), expected {expected}",
                            read.len()
                        ))
                    }
                }
            }
        });
    }
    let launch_seconds = first_launch.map(|f| f.elapsed().as_secs_f64()).unwrap_or_default();
    let mut results = Vec::with_capacity(total);
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.unwrap_or_else(|e| ReadResult::Refused(format!("read task failed: {e}"))));
    }
    let drain_seconds = load_start.elapsed().as_secs_f64();
    // One sample after the last read too, then stop the sampler.
    if let Ok(info) = store.info().await {
        let at = (load_start.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        samples.lock().expect("samples").push(json!({"t_s": at, "consumers": info.state.consumer_count}));
    }
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(SAMPLE_TIMEOUT * 2, sampler).await;

    // 4. The figures.
    let mut latencies = Vec::new();
    let mut creates = Vec::new();
    let (mut served, mut min_events, mut max_events) = (0usize, usize::MAX, 0usize);
    let mut refused = Vec::new();
    let mut incomplete = Vec::new();
    for result in &results {
        match result {
            ReadResult::Served(timing, n) => {
                served += 1;
                latencies.push(timing.total_ms);
                creates.push(timing.create_ms);
                min_events = min_events.min(*n);
                max_events = max_events.max(*n);
            }
            ReadResult::Incomplete(why) => incomplete.push(why.clone()),
            ReadResult::Refused(why) => refused.push(why.clone()),
        }
    }
    latencies.sort_by(f64::total_cmp);
    creates.sort_by(f64::total_cmp);
    let distinct = |list: &[String]| {
        let mut seen = Vec::new();
        for item in list {
            if !seen.contains(item) && seen.len() < 5 {
                seen.push(item.clone());
            }
        }
        seen
    };
    let samples = samples.lock().expect("samples").clone();
    let peak = samples.iter().filter_map(|s| s["consumers"].as_u64()).max();
    let sample_errors = sample_errors.lock().expect("errors").clone();
    let ok = served == total && refused.is_empty() && incomplete.is_empty();
    set(&report, "attempted", json!(total));
    set(&report, "served", json!(served));
    set(&report, "refused", json!({"count": refused.len(), "errors": distinct(&refused)}));
    set(&report, "incomplete", json!({"count": incomplete.len(), "examples": distinct(&incomplete)}));
    set(&report, "peak_consumers", json!(peak));
    set(&report, "consumer_samples", json!(samples));
    set(&report, "sample_errors", json!({"count": sample_errors.len(), "errors": distinct(&sample_errors)}));
    set(
        &report,
        "achieved_rate",
        json!(if launch_seconds > 0.0 { ((total - 1) as f64 / launch_seconds * 100.0).round() / 100.0 } else { 0.0 }),
    );
    set(&report, "launch_seconds", json!((launch_seconds * 100.0).round() / 100.0));
    set(&report, "drain_seconds", json!((drain_seconds * 100.0).round() / 100.0));
    set(
        &report,
        "latency_ms",
        json!({"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99),
                                     "max": latencies.last()}),
    );
    set(&report, "create_consumer_ms", json!({"p50": percentile(&creates, 0.5), "p99": percentile(&creates, 0.99)}));
    set(
        &report,
        "events_per_read",
        json!({"expected": args.events,
        "min": if served > 0 { json!(min_events) } else { Value::Null }, "max": if served > 0 { json!(max_events) } else { Value::Null }}),
    );
    record(
        &report,
        "reads",
        load_start,
        if ok {
            Ok(Value::Null)
        } else {
            Err(format!("{served} of {total} reads served; {} refused, {} incomplete", refused.len(), incomplete.len()))
        },
    );
    ok
}

// ---------------------------------------------------------------------------------------------
// CLI

const USAGE: &str = "usage: cim-contract contract [--end-on-no-messages] [--deadline SECONDS]
       cim-contract read-load --rate R --seconds S [--aggregates N] [--events E]
                              [--end-on-no-messages] [--deadline SECONDS]
  --end-on-no-messages  take a `404 No Messages` status inside a fetch as the end of the batch
                        (without it, reads behave exactly as the CIM's, which fail on it)
environment: NATS_URL (comma-separated tls:// URLs), NATS_USER, NATS_PASSWORD, NATS_CA (CA file),
             NATS_STREAM (default INFRASTRUCTURE_EVENTS)";

enum Command {
    Contract,
    ReadLoad(LoadArgs),
}

struct Cli {
    command: Command,
    deadline: Duration,
    end_on_no_messages: bool,
}

fn parse(args: &[String]) -> Result<Cli, String> {
    let (name, rest) = args.split_first().ok_or("no subcommand")?;
    let mut flags = std::collections::HashMap::new();
    let mut end_on_no_messages = false;
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let key = flag.strip_prefix("--").ok_or_else(|| format!("unexpected argument {flag:?}"))?;
        if key == "end-on-no-messages" {
            end_on_no_messages = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
        let number: f64 = value.parse().map_err(|_| format!("--{key}: {value:?} is not a number"))?;
        if !number.is_finite() || number <= 0.0 {
            return Err(format!("--{key} must be positive"));
        }
        flags.insert(key.to_string(), number);
    }
    let allowed: &[&str] = match name.as_str() {
        "contract" => &["deadline"],
        "read-load" => &["rate", "seconds", "aggregates", "events", "deadline"],
        other => return Err(format!("unknown subcommand {other:?}")),
    };
    if let Some(unknown) = flags.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("{name} takes no --{unknown}"));
    }
    let (command, deadline) = match name.as_str() {
        "contract" => (Command::Contract, flags.get("deadline").copied().unwrap_or(60.0)),
        _ => {
            let rate = *flags.get("rate").ok_or("read-load needs --rate")?;
            let seconds = *flags.get("seconds").ok_or("read-load needs --seconds")?;
            let load = LoadArgs {
                rate,
                seconds,
                aggregates: flags.get("aggregates").map(|v| *v as usize).unwrap_or(20).max(1),
                events: flags.get("events").map(|v| *v as usize).unwrap_or(3).max(1),
            };
            (Command::ReadLoad(load), flags.get("deadline").copied().unwrap_or(seconds + 120.0))
        }
    };
    Ok(Cli { command, deadline: Duration::from_secs_f64(deadline), end_on_no_messages })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        std::process::exit(0);
    }
    let Cli { command, deadline, end_on_no_messages } = match parse(&args) {
        Ok(parsed) => parsed,
        Err(error) => {
            eprintln!("cim-contract: {error}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let name = match command {
        Command::Contract => "contract",
        Command::ReadLoad(_) => "read-load",
    };
    let report: Shared = Arc::default();
    let events: Events = Arc::default();
    set(&report, "end_on_no_messages", json!(end_on_no_messages));
    let settings = match settings(end_on_no_messages) {
        Ok(settings) => settings,
        Err(error) => {
            record(&report, "settings", Instant::now(), Err(error));
            println!("{}", render(&report, name, false, &events));
            std::process::exit(1);
        }
    };
    let work = {
        let (report, events) = (report.clone(), events.clone());
        async move {
            match command {
                Command::Contract => contract(report, settings, events).await,
                Command::ReadLoad(load) => read_load(report, settings, events, load).await,
            }
        }
    };
    let ok = match tokio::time::timeout(deadline, work).await {
        Ok(ok) => ok,
        Err(_) => {
            set(&report, "error", json!(format!("overall deadline of {} s exceeded", deadline.as_secs_f64())));
            false
        }
    };
    println!("{}", render(&report, name, ok, &events));
    // Exit at once: no waiting for in-flight tasks or a reconnecting client.
    std::process::exit(if ok { 0 } else { 1 });
}

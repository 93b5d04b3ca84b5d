//! The job file: the declarative pipeline that `sjob run` executes and that a StatefulJob
//! carries in its spec. See `config/samples/` for examples and README.md for the reference.

use crate::savepoint::metadata::Compression;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSpec {
    /// The job's name, shown by `sjob list` and in metrics.
    pub name: String,
    /// Default parallelism of every operator that does not set its own.
    #[serde(default = "one")]
    pub parallelism: u32,
    /// Number of key groups; fixed once keyed state exists. Default: Flink's rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallelism: Option<u32>,
    /// Periodic checkpoints, for crash recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoints: Option<CheckpointSpec>,
    /// How savepoints and checkpoints compress their state files' blocks: `lz4` (each block
    /// that shrinks by at least an eighth is stored compressed) or `none`.
    #[serde(
        default = "default_compression",
        skip_serializing_if = "is_default_compression"
    )]
    #[schemars(extend("default" = "lz4"))]
    pub state_compression: Compression,
    /// How sources make watermarks: how often, when an input counts as idle, and how far
    /// one source subtask may run ahead of the slowest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermarks: Option<WatermarkSpec>,
    /// The pipeline: a source first, a sink last.
    pub operators: Vec<OperatorSpec>,
}

fn one() -> u32 {
    1
}

fn default_compression() -> Compression {
    Compression::default()
}

fn is_default_compression(c: &Compression) -> bool {
    *c == Compression::default()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckpointSpec {
    /// How often to take a checkpoint, e.g. `10s`.
    pub interval: String,
    /// Where checkpoints go: `<dir>/<jobid>/chk-<n>/`.
    pub dir: String,
    /// How many completed checkpoints to keep.
    #[serde(default = "three")]
    pub retained: u32,
}

fn three() -> u32 {
    3
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WatermarkSpec {
    /// How often a source subtask sends its watermark downstream, e.g. `200ms` (default
    /// `20ms`). Sources also send one at once when they reach a hold's bound or the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// A source subtask, or a Kafka partition, that has had no records for this long is idle:
    /// it does not hold the watermark back until it has records again. None: never idle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// Watermark alignment: a source subtask whose watermark is more than this ahead of the
    /// slowest (non-idle) source subtask's stops reading until that one catches up, so window
    /// state cannot grow without limit when inputs run at different speeds. None: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_drift: Option<String>,
}

/// The watermark settings of a job, parsed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WatermarkConfig {
    pub interval: Duration,
    pub idle_timeout: Option<Duration>,
    /// In milliseconds of event time.
    pub max_drift: Option<i64>,
}

impl Default for WatermarkConfig {
    fn default() -> Self {
        WatermarkConfig {
            interval: Duration::from_millis(20),
            idle_timeout: None,
            max_drift: None,
        }
    }
}

impl WatermarkSpec {
    /// The settings, or every problem with them (one per field).
    pub fn parse(&self) -> Result<WatermarkConfig, Vec<String>> {
        let mut problems = Vec::new();
        let mut field = |name: &str, text: &Option<String>| match text {
            None => None,
            Some(t) => match parse_duration(name, t) {
                Ok(d) if d.is_zero() => {
                    problems.push(format!("{name}: must be more than zero"));
                    None
                }
                Ok(d) => Some(d),
                Err(e) => {
                    problems.push(e);
                    None
                }
            },
        };
        let interval = field("watermarks.interval", &self.interval);
        let idle_timeout = field("watermarks.idleTimeout", &self.idle_timeout);
        let max_drift = field("watermarks.maxDrift", &self.max_drift);
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(WatermarkConfig {
            interval: interval.unwrap_or(WatermarkConfig::default().interval),
            idle_timeout,
            max_drift: max_drift.map(|d| d.as_millis().min(i64::MAX as u128) as i64),
        })
    }
}

/// Parses a duration such as `500ms`, `10s`, `5m`.
pub fn parse_duration(field: &str, text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("{field}: '{text}' is not a duration ({e}); write e.g. 500ms, 10s, 5m")
    })
}

macro_rules! operator_specs {
    ($( $(#[$vmeta:meta])* $variant:ident ( $name:ident, $kind:literal ) { $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)? } )*) => {
        $(
            $(#[$vmeta])*
            #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
            #[serde(rename_all = "camelCase", deny_unknown_fields)]
            pub struct $name {
                /// Stable identity of the operator's state across job versions.
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub uid: Option<String>,
                /// Shown by `sjob list`, the REST API and metrics; the kind when absent.
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub name: Option<String>,
                /// This operator's parallelism; the job's default when absent.
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub parallelism: Option<u32>,
                $( $(#[$fmeta])* pub $field: $ty, )*
            }
        )*

        /// One operator of the pipeline, selected by `kind`.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind", rename_all = "camelCase")]
        pub enum OperatorSpec {
            $( $variant($name), )*
        }

        impl OperatorSpec {
            pub fn uid(&self) -> Option<&str> {
                match self { $( OperatorSpec::$variant(s) => s.uid.as_deref(), )* }
            }
            pub fn name(&self) -> Option<&str> {
                match self { $( OperatorSpec::$variant(s) => s.name.as_deref(), )* }
            }
            pub fn parallelism(&self) -> Option<u32> {
                match self { $( OperatorSpec::$variant(s) => s.parallelism, )* }
            }

            /// Every operator kind, as written in job files.
            pub const KINDS: &'static [&'static str] = &[$( $kind ),*];

            /// Deserializes one operator of a known kind, with the path of a bad field.
            fn parse_kind(kind: &str, fields: serde_yaml::Value) -> Result<OperatorSpec, String> {
                match kind {
                    $( $kind => serde_path_to_error::deserialize::<_, $name>(fields)
                        .map(OperatorSpec::$variant)
                        .map_err(|e| {
                            let path = e.path().to_string();
                            if path == "." { e.inner().to_string() } else { format!("{path}: {}", e.inner()) }
                        }), )*
                    other => Err(format!(
                        "unknown operator kind '{other}'; expected one of: {}",
                        [$( $kind ),*].join(", ")
                    )),
                }
            }
        }

        /// One object schema with every kind's fields, `kind` an enum: a structural schema, as
        /// Kubernetes requires of CRDs (a union of per-kind schemas is not).
        impl schemars::JsonSchema for OperatorSpec {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                "OperatorSpec".into()
            }

            fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
                let mut props = serde_json::Map::new();
                props.insert("kind".into(), serde_json::json!({
                    "type": "string",
                    "description": "The operator's kind; the other fields that apply depend on it.",
                    "enum": OperatorSpec::KINDS,
                }));
                $( { let sub = generator.subschema_for::<$name>(); merge_properties(generator, sub, &mut props); } )*
                schemars::json_schema!({
                    "type": "object",
                    "description": "One operator of the pipeline.",
                    "required": ["kind"],
                    "properties": props,
                })
            }
        }
    };
}

operator_specs! {
    /// Deterministic keyed records: record `i` (0, 1, 2, …) has `seq = i`, `key = i mod keys`
    /// (or `"<keyPrefix><i mod keys>"`), `value = i mod 1000`, `ts = i * timestampStepMs`.
    /// Records are dealt to `splits` splits (`i mod splits`); each split's position is state.
    Generator(GeneratorSpec, "generator") {
        /// Number of distinct keys.
        #[serde(default = "default_keys")]
        keys: u64,
        /// Total records; unbounded when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<u64>,
        /// Records per second over all subtasks; unlimited when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate: Option<f64>,
        /// Number of splits the records are dealt to (each split's position is state).
        #[serde(default = "default_splits")]
        splits: u32,
        /// Event-time step between consecutive records, in milliseconds.
        #[serde(default = "default_ts_step")]
        timestamp_step_ms: i64,
        /// Makes keys strings: `<keyPrefix><i mod keys>`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_prefix: Option<String>,
        /// Adds a `payload` string field of this many bytes (the index in hex, padded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload_bytes: Option<usize>,
    }
    /// Newline-delimited JSON objects (or text lines as `{"line": …}`) from a file or from
    /// every file of a directory; each file's byte offset is state.
    FileSource(FileSourceSpec, "fileSource") {
        /// A file, or a directory whose files are all read.
        path: String,
        /// `json` (one object per line) or `text` (each line as `{"line": …}`).
        #[serde(default)]
        format: FileFormat,
    }
    /// Records of Kafka topics (read committed). Each partition's next offset is state under
    /// the uid; a restored job resumes there, partitions are spread over the subtasks.
    KafkaSource(KafkaSourceSpec, "kafkaSource") {
        /// `host:port[,host:port…]` of the brokers.
        bootstrap_servers: String,
        /// The topics to read.
        #[serde(default)]
        topics: Vec<String>,
        /// Also read every topic whose whole name matches this regular expression.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic_pattern: Option<String>,
        /// Where a partition without restored state starts: `earliest`, `latest`,
        /// `committed` (the group's offsets, else earliest), or a time (RFC 3339 or epoch
        /// milliseconds: the first record at or after it).
        #[serde(default = "default_start_from")]
        start_from: String,
        /// The consumer group: for `startFrom: committed` and `commitOffsets`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_id: Option<String>,
        /// Commit the offsets of each completed checkpoint to the group (for monitoring; a
        /// restore always uses the snapshot's offsets).
        #[serde(default)]
        commit_offsets: bool,
        /// `json` (a JSON object per record, into fields) or `raw` (the value as a string in
        /// `valueField`).
        #[serde(default)]
        format: KafkaFormat,
        /// The field that holds a raw value.
        #[serde(default = "default_value_field")]
        value_field: String,
        /// Puts the record's key (as a string) into this field.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_field: Option<String>,
        /// Puts the record's timestamp (epoch milliseconds) into this field; it is also the
        /// record's event time for watermarks.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timestamp_field: Option<String>,
        /// Watermarks trail the largest timestamp of each partition by this much.
        #[serde(default = "default_out_of_orderness")]
        max_out_of_orderness: String,
        /// How often to look for new partitions and topics.
        #[serde(default = "default_discovery_interval")]
        discovery_interval: String,
        /// A value that does not parse: `fail` the job, or `skip` it (counted in /metrics).
        #[serde(default)]
        on_parse_error: ParseErrorPolicy,
        /// Further librdkafka consumer settings, e.g. `security.protocol`.
        #[serde(default)]
        properties: std::collections::BTreeMap<String, String>,
    }
    /// Sets fields from CEL expressions over the record's fields; drops fields.
    Map(MapSpec, "map") {
        /// Fields to set, each from a CEL expression.
        #[serde(default)]
        set: Vec<FieldExpr>,
        /// Fields to remove.
        #[serde(default)]
        drop: Vec<String>,
    }
    /// Keeps records for which the CEL expression is true.
    Filter(FilterSpec, "filter") {
        /// CEL expression over the record's fields; records for which it is false are dropped.
        expr: String,
    }
    /// Partitions the stream by a field; the operators after it keep state per key.
    KeyBy(KeyBySpec, "keyBy") {
        /// The field whose value is the key.
        field: String,
    }
    /// Counts records per key; emits `{key, count}` on every record.
    Count(CountSpec, "count") {}
    /// Sums a field per key; emits `{key, sum}`.
    Sum(AggSpec, "sum") {
        /// The field to sum.
        field: String,
        /// `int` or `float`.
        #[serde(rename = "type", default = "default_num_type")]
        ty: NumType,
    }
    /// Minimum of a field per key; emits `{key, min}`.
    Min(MinSpec, "min") {
        /// The field whose minimum is kept.
        field: String,
        /// `int`, `float` or `string` (lexicographic).
        #[serde(rename = "type", default = "default_num_type")]
        ty: NumType,
    }
    /// Maximum of a field per key; emits `{key, max}`.
    Max(MaxSpec, "max") {
        /// The field whose maximum is kept.
        field: String,
        /// `int`, `float` or `string` (lexicographic).
        #[serde(rename = "type", default = "default_num_type")]
        ty: NumType,
    }
    /// A per-key accumulator with declared fields, updated by CEL expressions that see the
    /// record's fields and `acc` (the accumulator before this record); emits `{key, …fields}`.
    Reduce(ReduceSpec, "reduce") {
        /// The accumulator's fields (its state schema), each updated by a CEL expression.
        fields: Vec<ReduceField>,
    }
    /// Event-time windows per key over `timeField`: tumbling (`size`), sliding (`size` and
    /// `slide`) or session windows (`gap`). Emits `{key, windowStart, windowEnd, …aggregates}`
    /// when the watermark reaches the window's end - 1.
    Window(WindowSpec, "window") {
        /// Window length, e.g. `1s`, `5m` (tumbling and sliding windows).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<String>,
        /// Slide of sliding windows; tumbling windows when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        slide: Option<String>,
        /// Session windows: a key's session closes after this long without its records.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        gap: Option<String>,
        /// The record field with the event time, in milliseconds.
        #[serde(default = "default_time_field")]
        time_field: String,
        /// One aggregate, emitted under its own name (`count`, `sum`, `min`, `max`, `avg`);
        /// or use `aggregates`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        aggregate: Option<WindowAggregate>,
        /// The field `aggregate` reads (not used by `count`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        field: Option<String>,
        /// Several aggregates, each emitted (and kept in state) under its name.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        aggregates: Vec<NamedAggregate>,
        /// A reduce per window: accumulator fields (state schema), each updated by a CEL
        /// expression that sees the record's fields and `acc`; emitted under their names
        /// (with the aggregates, if any). Not for session windows (sessions merge).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        reduce: Vec<ReduceField>,
        /// How long after a window fired a late record still updates it (firing it again).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        allowed_lateness: Option<String>,
        /// Records later than the allowed lateness: `drop` them (counted), or `emit` them
        /// downstream as they are with `late: true`.
        #[serde(default, skip_serializing_if = "LateRecords::is_drop")]
        late_records: LateRecords,
        /// Sends records later than the allowed lateness to this sink instead (Flink's side
        /// output for late data): a `fileSink`, `kafkaSink`, `stdoutSink` or `discardSink` with
        /// its fields, run in the window's subtasks. A sink that keeps state needs a `uid`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        late_sink: Option<LateSink>,
    }
    /// Emits the first record of each key and drops the rest.
    Dedupe(DedupeSpec, "dedupe") {}
    /// Writes JSON lines under `path`, exactly once: a part file becomes visible only when
    /// the checkpoint or savepoint that covers it completes (or the input ends).
    FileSink(FileSinkSpec, "fileSink") {
        /// Directory of the committed part files (`.pending/` under it holds the others).
        path: String,
    }
    /// Writes records to a Kafka topic. `exactly-once`: a transaction per subtask and
    /// checkpoint, committed when the checkpoint or savepoint completes (read-committed
    /// consumers see each record once); `at-least-once`: flushed at each checkpoint; `none`.
    KafkaSink(KafkaSinkSpec, "kafkaSink") {
        /// `host:port[,host:port…]` of the brokers.
        bootstrap_servers: String,
        /// The topic written to (unless `topicField` names one per record).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
        /// The field whose value is the record's topic.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic_field: Option<String>,
        /// The field whose value is the record's key (Kafka partitions by it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        key_field: Option<String>,
        /// `json` (the record as a JSON object) or `raw` (the string in `valueField`).
        #[serde(default)]
        format: KafkaFormat,
        /// The field written as a raw value.
        #[serde(default = "default_value_field")]
        value_field: String,
        /// `exactly-once`, `at-least-once` or `none`.
        #[serde(default)]
        delivery_guarantee: DeliveryGuarantee,
        /// Transactional ids start with this; default `sjob-<job name>-<uid>`. Two jobs
        /// writing with exactly-once must not share it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transactional_id_prefix: Option<String>,
        /// The broker aborts a transaction open longer than this; it must exceed the
        /// checkpoint interval (and is capped by the broker's `transaction.max.timeout.ms`).
        #[serde(default = "default_transaction_timeout")]
        transaction_timeout: String,
        /// Further librdkafka producer settings.
        #[serde(default)]
        properties: std::collections::BTreeMap<String, String>,
    }
    /// Prints JSON lines to standard output as records arrive (at least once).
    StdoutSink(StdoutSinkSpec, "stdoutSink") {}
    /// Drops every record.
    DiscardSink(DiscardSinkSpec, "discardSink") {}
}

/// Adds a struct schema's properties to `into`, resolving a `$ref` through the generator.
fn merge_properties(
    generator: &mut schemars::SchemaGenerator,
    schema: schemars::Schema,
    into: &mut serde_json::Map<String, serde_json::Value>,
) {
    let mut value = schema.to_value();
    if let Some(name) = value
        .get("$ref")
        .and_then(|r| r.as_str())
        .and_then(|r| r.rsplit('/').next())
        .map(str::to_owned)
        && let Some(def) = generator.definitions().get(&name)
    {
        value = def.clone();
    }
    if let Some(props) = value.get("properties").and_then(|p| p.as_object()) {
        for (k, v) in props {
            // No `default`: the API server would apply a kind's default to every operator,
            // whatever its kind (and the kind's parser refuses fields it does not take). The
            // job parser applies each kind's defaults.
            let mut v = v.clone();
            if let Some(o) = v.as_object_mut() {
                o.remove("default");
            }
            into.entry(k.clone()).or_insert(v);
        }
    }
}

fn default_keys() -> u64 {
    1000
}
fn default_splits() -> u32 {
    16
}
fn default_ts_step() -> i64 {
    1
}
fn default_time_field() -> String {
    "ts".into()
}
fn default_num_type() -> NumType {
    NumType::Int
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    #[default]
    Json,
    Text,
}

fn default_start_from() -> String {
    "earliest".into()
}
fn default_value_field() -> String {
    "value".into()
}
fn default_out_of_orderness() -> String {
    "0s".into()
}
fn default_discovery_interval() -> String {
    "30s".into()
}
fn default_transaction_timeout() -> String {
    "15m".into()
}

/// How Kafka record values map to fields.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum KafkaFormat {
    /// A JSON object: its members are the record's fields.
    #[default]
    Json,
    /// The value as a string (invalid UTF-8 replaced) in one field.
    Raw,
}

/// What a source does with a value that does not parse.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ParseErrorPolicy {
    /// The job fails, naming the topic, partition and offset.
    #[default]
    Fail,
    /// The record is dropped and counted.
    Skip,
}

/// What a Kafka sink promises.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryGuarantee {
    /// Transactions committed with checkpoints: each record once for read-committed readers.
    ExactlyOnce,
    /// Flushed at every checkpoint: nothing lost, repeats after a failure.
    #[default]
    AtLeastOnce,
    /// Nothing waited for: records buffered at a failure may be lost.
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NumType {
    Int,
    Float,
    /// For `min` and `max` only: lexicographic order.
    String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WindowAggregate {
    Count,
    Sum,
    /// The smallest of the field's values (null values left out).
    Min,
    /// The largest of the field's values (null values left out).
    Max,
    /// The mean of the field's numbers (null values left out), as a float.
    Avg,
}

/// One of a window's aggregates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedAggregate {
    /// The output field, and its name in the window state.
    pub name: String,
    /// What it computes over the window's records.
    pub aggregate: WindowAggregate,
    /// The field aggregated (not used by `count`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// What a window does with records later than its allowed lateness.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum LateRecords {
    #[default]
    Drop,
    Emit,
}

impl LateRecords {
    fn is_drop(&self) -> bool {
        *self == LateRecords::Drop
    }
}

/// The sink of a window's late records: one of the sink kinds, with that kind's fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum LateSink {
    FileSink(FileSinkSpec),
    KafkaSink(KafkaSinkSpec),
    StdoutSink(StdoutSinkSpec),
    DiscardSink(DiscardSinkSpec),
}

impl LateSink {
    const KINDS: &'static [&'static str] = &["fileSink", "kafkaSink", "stdoutSink", "discardSink"];

    /// The sink as an operator of the graph.
    pub fn to_operator(&self) -> OperatorSpec {
        match self {
            LateSink::FileSink(s) => OperatorSpec::FileSink(s.clone()),
            LateSink::KafkaSink(s) => OperatorSpec::KafkaSink(s.clone()),
            LateSink::StdoutSink(s) => OperatorSpec::StdoutSink(s.clone()),
            LateSink::DiscardSink(s) => OperatorSpec::DiscardSink(s.clone()),
        }
    }
}

/// Like `OperatorSpec`'s: one object with every sink kind's fields (a structural schema).
impl schemars::JsonSchema for LateSink {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "LateSink".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let mut props = serde_json::Map::new();
        props.insert(
            "kind".into(),
            serde_json::json!({
                "type": "string",
                "description": "The sink's kind; the other fields that apply depend on it.",
                "enum": LateSink::KINDS,
            }),
        );
        let subs = [
            generator.subschema_for::<FileSinkSpec>(),
            generator.subschema_for::<KafkaSinkSpec>(),
            generator.subschema_for::<StdoutSinkSpec>(),
            generator.subschema_for::<DiscardSinkSpec>(),
        ];
        for sub in subs {
            merge_properties(generator, sub, &mut props);
        }
        schemars::json_schema!({
            "type": "object",
            "description": "The sink of a window's late records.",
            "required": ["kind"],
            "properties": props,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldExpr {
    /// The field to set.
    pub field: String,
    /// CEL expression giving its value.
    pub expr: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReduceField {
    /// The accumulator field's name.
    pub name: String,
    /// Its type; `any` accepts every value.
    #[serde(rename = "type")]
    pub ty: crate::savepoint::schema::FieldType,
    /// The value before the first record; also how existing state gains a new field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_scalar")]
    pub default: Option<serde_json::Value>,
    /// CEL expression for the new value; sees the record's fields and `acc`.
    pub expr: String,
}

/// A JSON scalar of any type, in a form Kubernetes accepts in a structural schema.
fn any_scalar(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "A scalar (string, number or bool) matching the field's type.",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

impl JobSpec {
    /// Parses a job file; errors carry the line, column and path of the fault.
    pub fn from_yaml(text: &str) -> Result<JobSpec, String> {
        let err = match serde_yaml::from_str(text) {
            Ok(spec) => return Ok(spec),
            Err(e) => e,
        };
        let at = err
            .location()
            .map(|l| format!("line {}, column {}: ", l.line(), l.column()))
            .unwrap_or_default();
        // Inside an operator serde loses the field's path; find it by parsing that operator
        // alone.
        if let Some(detail) = Self::operator_detail(text) {
            return Err(format!("{at}{detail}"));
        }
        Err(format!("{at}{err}"))
    }

    fn operator_detail(text: &str) -> Option<String> {
        let doc: serde_yaml::Value = serde_yaml::from_str(text).ok()?;
        let ops = doc.get("operators")?.as_sequence()?;
        for (i, op) in ops.iter().enumerate() {
            let mut map = op.as_mapping()?.clone();
            let Some(kind) = map.remove("kind") else {
                return Some(format!("operators[{i}]: missing field `kind`"));
            };
            let Some(kind) = kind.as_str() else {
                return Some(format!("operators[{i}].kind: must be a string"));
            };
            if let Err(e) = OperatorSpec::parse_kind(kind, serde_yaml::Value::Mapping(map)) {
                return Some(format!("operators[{i}] ({kind}): {e}"));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_compression_defaults_to_what_the_schema_says() {
        let schema = schemars::schema_for!(JobSpec);
        let said = &schema.as_value()["properties"]["stateCompression"]["default"];
        assert_eq!(said, &serde_json::to_value(Compression::default()).unwrap());
        let spec = JobSpec::from_yaml("name: x\noperators: []\n").unwrap();
        assert_eq!(spec.state_compression, Compression::Lz4);
        let err = JobSpec::from_yaml("name: x\nstateCompression: zstd\noperators: []\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("zstd") && err.contains("lz4"), "{err}");
    }

    #[test]
    fn parses_a_pipeline() {
        let spec = JobSpec::from_yaml(
            r#"
name: clicks
parallelism: 2
operators:
  - kind: generator
    uid: source
    keys: 10
    count: 100
  - kind: keyBy
    field: key
  - kind: count
    uid: counter
  - kind: fileSink
    uid: out
    path: /tmp/out
"#,
        )
        .unwrap();
        assert_eq!(spec.operators.len(), 4);
        assert_eq!(spec.operators[2].uid(), Some("counter"));
    }

    #[test]
    fn errors_name_line_and_field() {
        let err = JobSpec::from_yaml("name: x\noperators:\n  - kind: generator\n    keyz: 3\n")
            .unwrap_err();
        assert!(err.contains("keyz"), "{err}");
        assert!(err.contains("line"), "{err}");
        let err = JobSpec::from_yaml("name: x\noperators:\n  - kind: teleport\n").unwrap_err();
        assert!(err.contains("unknown operator kind 'teleport'"), "{err}");
        assert!(err.contains("operators[0]"), "{err}");
        let err = JobSpec::from_yaml(
            "name: x\noperators:\n  - kind: generator\n    uid: s\n    keys: many\n",
        )
        .unwrap_err();
        assert!(
            err.contains("line 3") && err.contains("operators[0] (generator): keys: invalid type"),
            "{err}"
        );
        let err = JobSpec::from_yaml("name: [x\n").unwrap_err();
        assert!(err.contains("line 1"), "{err}");
    }
}

//! Prometheus metrics of a running engine, read from the job at scrape time.

use super::{JobHandle, JobState};
use prometheus::core::Collector;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_owned());
    l.set_value(value.to_owned());
    l
}

fn family(name: &str, help: &str, ty: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(ty);
    f.set_metric(metrics);
    f
}

fn counter(labels: Vec<LabelPair>, v: f64) -> Metric {
    let mut c = Counter::default();
    c.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_counter(c);
    m
}

fn gauge(labels: Vec<LabelPair>, v: f64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(v);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

struct JobCollector<'a> {
    job: &'a JobHandle,
}

impl Collector for JobCollector<'_> {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        Vec::new()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let job = self.job;
        let jl = || {
            vec![
                label("job_id", job.id()),
                label("job_name", &job.graph().name),
            ]
        };
        let with = |extra: Vec<LabelPair>| {
            let mut l = jl();
            l.extend(extra);
            l
        };
        let vertices = job.vertices();
        let per_op = |f: fn(&super::VertexStats) -> u64| {
            vertices
                .iter()
                .map(|v| {
                    counter(
                        with(vec![label("operator", &v.name), label("uid", &v.uid)]),
                        f(v) as f64,
                    )
                })
                .collect()
        };
        let now_ms = super::coordinator::now_ms() as f64;
        let op_labels =
            |v: &super::VertexStats| vec![label("operator", &v.name), label("uid", &v.uid)];
        let finite = |w: Option<i64>| w.filter(|w| *w != i64::MAX && *w != i64::MIN);
        let watermarks: Vec<Metric> = vertices
            .iter()
            .filter_map(|v| {
                finite(v.watermark).map(|w| gauge(with(op_labels(v)), w as f64 / 1000.0))
            })
            .collect();
        let watermark_lags: Vec<Metric> = vertices
            .iter()
            .filter_map(|v| {
                finite(v.watermark)
                    .map(|w| gauge(with(op_labels(v)), ((now_ms - w as f64) / 1000.0).max(0.0)))
            })
            .collect();
        let late: Vec<Metric> = vertices
            .iter()
            .map(|v| counter(with(op_labels(v)), v.late_records_dropped as f64))
            .collect();
        let mut usage = Vec::new();
        for v in &vertices {
            for (subtask, inputs) in v.input_usage.iter().enumerate() {
                for (input, u) in inputs.iter().enumerate() {
                    let mut l = op_labels(v);
                    l.push(label("subtask", &subtask.to_string()));
                    l.push(label("input", &input.to_string()));
                    usage.push(gauge(with(l), *u));
                }
            }
        }
        let sources = job.sources();
        let per_source = |flag: fn(&super::SourceSubtaskView) -> bool| {
            sources
                .subtasks
                .iter()
                .map(|s| {
                    gauge(
                        with(vec![label("subtask", &s.subtask.to_string())]),
                        f64::from(u8::from(flag(s))),
                    )
                })
                .collect()
        };
        let stats = job.snapshot_stats();
        let state = job.state();
        let states = [
            JobState::Created,
            JobState::Running,
            JobState::Finished,
            JobState::Canceled,
            JobState::Failed,
        ];
        let mut out = vec![
            family(
                "sjob_job_state",
                "1 for the job's current state, 0 for the others.",
                MetricType::GAUGE,
                states
                    .iter()
                    .map(|s| {
                        gauge(
                            with(vec![label("state", s.as_flink())]),
                            f64::from(u8::from(*s == state)),
                        )
                    })
                    .collect(),
            ),
            family(
                "sjob_operator_records_in_total",
                "Records an operator has received.",
                MetricType::COUNTER,
                per_op(|v| v.records_in),
            ),
            family(
                "sjob_operator_records_out_total",
                "Records an operator has emitted.",
                MetricType::COUNTER,
                per_op(|v| v.records_out),
            ),
            family(
                "sjob_source_skipped_records_total",
                "Records the source dropped because they did not parse (onParseError: skip).",
                MetricType::COUNTER,
                vec![counter(jl(), sources.skipped as f64)],
            ),
            family(
                "sjob_source_problems",
                "Source subtasks that cannot read now and retry (e.g. brokers unreachable).",
                MetricType::GAUGE,
                vec![gauge(jl(), sources.problems.len() as f64)],
            ),
            family(
                "sjob_operator_watermark_seconds",
                "Event time the operator has reached (epoch seconds): the smallest watermark of its subtasks' inputs.",
                MetricType::GAUGE,
                watermarks,
            ),
            family(
                "sjob_operator_watermark_lag_seconds",
                "How far the operator's watermark is behind the wall clock.",
                MetricType::GAUGE,
                watermark_lags,
            ),
            family(
                "sjob_operator_late_records_dropped_total",
                "Records dropped because the watermark had passed their window (Flink's numLateRecordsDropped).",
                MetricType::COUNTER,
                late,
            ),
            family(
                "sjob_operator_input_buffer_usage",
                "How full an input channel of a subtask is (0 to 1), per upstream subtask; near 1 means backpressure from here on.",
                MetricType::GAUGE,
                usage,
            ),
            family(
                "sjob_source_watermark_seconds",
                "A source subtask's watermark (epoch seconds).",
                MetricType::GAUGE,
                sources
                    .subtasks
                    .iter()
                    .filter_map(|s| {
                        finite(s.watermark).map(|w| {
                            gauge(
                                with(vec![label("subtask", &s.subtask.to_string())]),
                                w as f64 / 1000.0,
                            )
                        })
                    })
                    .collect(),
            ),
            family(
                "sjob_source_idle",
                "1 while a source subtask has had no records for watermarks.idleTimeout.",
                MetricType::GAUGE,
                per_source(|s| s.idle),
            ),
            family(
                "sjob_source_pending_records",
                "Records a source subtask has yet to read from its splits (Kafka: to the brokers' last stable offsets; Flink's pendingRecords).",
                MetricType::GAUGE,
                sources
                    .subtasks
                    .iter()
                    .filter_map(|s| {
                        s.pending_records.map(|n| {
                            gauge(
                                with(vec![label("subtask", &s.subtask.to_string())]),
                                n as f64,
                            )
                        })
                    })
                    .collect(),
            ),
            family(
                "sjob_source_alignment_paused",
                "1 while a source subtask waits because its watermark is more than watermarks.maxDrift ahead of the slowest.",
                MetricType::GAUGE,
                per_source(|s| s.paused_for_alignment),
            ),
            family(
                "sjob_snapshots_completed_total",
                "Checkpoints and savepoints completed.",
                MetricType::COUNTER,
                vec![counter(jl(), stats.completed as f64)],
            ),
            family(
                "sjob_snapshots_failed_total",
                "Checkpoints and savepoints that failed or were refused.",
                MetricType::COUNTER,
                vec![counter(jl(), stats.failed as f64)],
            ),
            family(
                "sjob_snapshots_in_progress",
                "Snapshots being taken now.",
                MetricType::GAUGE,
                vec![gauge(jl(), stats.in_progress as f64)],
            ),
            family(
                "sjob_job_restored",
                "1 if the job was restored from a snapshot.",
                MetricType::GAUGE,
                vec![gauge(
                    jl(),
                    f64::from(u8::from(job.restored_from().is_some())),
                )],
            ),
        ];
        for (kind, snap) in [
            ("checkpoint", &stats.latest_checkpoint),
            ("savepoint", &stats.latest_savepoint),
        ] {
            if let Some(s) = snap {
                let l = || with(vec![label("kind", kind)]);
                out.push(family(
                    &format!("sjob_last_{kind}_size_bytes"),
                    &format!("Size of the latest completed {kind}."),
                    MetricType::GAUGE,
                    vec![gauge(l(), s.size as f64)],
                ));
                out.push(family(
                    &format!("sjob_last_{kind}_duration_seconds"),
                    &format!("Duration of the latest completed {kind}."),
                    MetricType::GAUGE,
                    vec![gauge(l(), s.duration_ms as f64 / 1000.0)],
                ));
                out.push(family(
                    &format!("sjob_last_{kind}_timestamp_seconds"),
                    &format!("Completion time of the latest {kind}."),
                    MetricType::GAUGE,
                    vec![gauge(l(), s.timestamp_ms as f64 / 1000.0)],
                ));
            }
        }
        // A family without samples (e.g. input buffers of a job of one stage) is left out:
        // the text format cannot carry it.
        out.retain(|f| !f.get_metric().is_empty());
        out
    }
}

/// The Prometheus text exposition of a job's metrics.
pub fn render(job: &JobHandle) -> Result<String, String> {
    let families = JobCollector { job }.collect();
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut buf)
        .map_err(|e| e.to_string())?;
    String::from_utf8(buf).map_err(|e| e.to_string())
}

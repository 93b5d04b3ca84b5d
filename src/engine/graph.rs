//! From a job file to a validated job graph: operators with uids, parallelism, declared state,
//! and the stages (chains of operators between repartitioning edges) that run as tasks.

use super::expr::Expr;
use super::spec::{self, JobSpec, NumType, OperatorSpec, WindowAggregate};
use crate::savepoint::keygroups::{Distribution, MAX_MAX_PARALLELISM, default_max_parallelism};
use crate::savepoint::metadata::{Compression, KeyedStateKind, KeyedStateMeta, OperatorStateMeta};
use crate::savepoint::restore::OperatorDecl;
use crate::savepoint::schema::{FieldSchema, FieldType, StateSchema};

/// Every problem found in a job file, one per line.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphError(pub Vec<String>);

impl std::fmt::Display for GraphError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid job:")?;
        for p in &self.0 {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for GraphError {}

#[derive(Clone, Debug)]
pub struct Node {
    pub index: usize,
    pub uid: String,
    pub name: String,
    pub kind: &'static str,
    pub parallelism: u32,
    pub spec: OperatorSpec,
    pub keyed_states: Vec<KeyedStateMeta>,
    pub operator_states: Vec<OperatorStateMeta>,
    /// A window's late-record sink: the index of that window. It runs in the window's
    /// subtasks and gets only what the window sends aside.
    pub side_of: Option<usize>,
}

impl Node {
    pub fn is_stateful(&self) -> bool {
        !self.keyed_states.is_empty() || !self.operator_states.is_empty()
    }
    pub fn is_source(&self) -> bool {
        matches!(
            self.spec,
            OperatorSpec::Generator(_) | OperatorSpec::FileSource(_) | OperatorSpec::KafkaSource(_)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partitioning {
    /// By key group of the key set by the preceding keyBy.
    Hash,
    /// Round robin, where the parallelism changes without a keyBy.
    Rebalance,
}

/// Operators chained into one task per subtask.
#[derive(Clone, Debug)]
pub struct Stage {
    pub nodes: Vec<usize>,
    pub parallelism: u32,
    /// How records reach this stage from the previous one (none for the source stage).
    pub input: Option<Partitioning>,
}

#[derive(Clone, Debug)]
pub struct JobGraph {
    pub name: String,
    pub watermarks: spec::WatermarkConfig,
    pub max_parallelism: u32,
    pub max_parallelism_explicit: bool,
    pub state_compression: Compression,
    pub nodes: Vec<Node>,
    pub stages: Vec<Stage>,
}

fn kind_name(s: &OperatorSpec) -> &'static str {
    match s {
        OperatorSpec::Generator(_) => "generator",
        OperatorSpec::FileSource(_) => "fileSource",
        OperatorSpec::KafkaSource(_) => "kafkaSource",
        OperatorSpec::KafkaSink(_) => "kafkaSink",
        OperatorSpec::Map(_) => "map",
        OperatorSpec::Filter(_) => "filter",
        OperatorSpec::KeyBy(_) => "keyBy",
        OperatorSpec::Count(_) => "count",
        OperatorSpec::Sum(_) => "sum",
        OperatorSpec::Min(_) => "min",
        OperatorSpec::Max(_) => "max",
        OperatorSpec::Reduce(_) => "reduce",
        OperatorSpec::Window(_) => "window",
        OperatorSpec::Dedupe(_) => "dedupe",
        OperatorSpec::FileSink(_) => "fileSink",
        OperatorSpec::StdoutSink(_) => "stdoutSink",
        OperatorSpec::DiscardSink(_) => "discardSink",
    }
}

fn num_type(t: NumType) -> FieldType {
    match t {
        NumType::Int => FieldType::Int,
        NumType::Float => FieldType::Float,
        NumType::String => FieldType::String,
    }
}

fn keyed_value(name: &str, schema: StateSchema) -> Vec<KeyedStateMeta> {
    vec![KeyedStateMeta {
        name: name.to_owned(),
        kind: KeyedStateKind::Value,
        schema,
    }]
}

fn split_list(name: &str, fields: &[(&str, FieldType)]) -> Vec<OperatorStateMeta> {
    list_state(name, Distribution::Split, fields)
}

fn list_state(
    name: &str,
    distribution: Distribution,
    fields: &[(&str, FieldType)],
) -> Vec<OperatorStateMeta> {
    vec![OperatorStateMeta {
        name: name.to_owned(),
        distribution,
        schema: StateSchema {
            fields: fields
                .iter()
                .map(|(n, t)| FieldSchema {
                    name: (*n).to_owned(),
                    ty: *t,
                    default: None,
                })
                .collect(),
        },
    }]
}

/// The state an operator of this kind keeps: (keyed, operator).
fn declared_state(spec: &OperatorSpec) -> (Vec<KeyedStateMeta>, Vec<OperatorStateMeta>) {
    match spec {
        OperatorSpec::Generator(_) => (
            vec![],
            split_list(
                "splits",
                &[("split", FieldType::Int), ("next", FieldType::Int)],
            ),
        ),
        OperatorSpec::FileSource(_) => (
            vec![],
            split_list(
                "files",
                &[("file", FieldType::String), ("offset", FieldType::Int)],
            ),
        ),
        OperatorSpec::KafkaSource(_) => (
            vec![],
            list_state(
                "partitions",
                Distribution::Union,
                &[
                    ("topic", FieldType::String),
                    ("partition", FieldType::Int),
                    ("next", FieldType::Int),
                ],
            ),
        ),
        OperatorSpec::KafkaSink(_) => (
            vec![],
            split_list(
                "transactions",
                &[
                    ("transactionalId", FieldType::String),
                    ("checkpoint", FieldType::Int),
                ],
            ),
        ),
        OperatorSpec::FileSink(_) => (
            vec![],
            split_list(
                "pending",
                &[("file", FieldType::String), ("checkpoint", FieldType::Int)],
            ),
        ),
        OperatorSpec::Count(_) => (
            keyed_value("count", StateSchema::single("count", FieldType::Int)),
            vec![],
        ),
        OperatorSpec::Sum(s) => (
            keyed_value("sum", StateSchema::single("sum", num_type(s.ty))),
            vec![],
        ),
        OperatorSpec::Min(s) => (
            keyed_value("min", StateSchema::single("min", num_type(s.ty))),
            vec![],
        ),
        OperatorSpec::Max(s) => (
            keyed_value("max", StateSchema::single("max", num_type(s.ty))),
            vec![],
        ),
        OperatorSpec::Reduce(r) => (
            keyed_value(
                "acc",
                StateSchema {
                    fields: r
                        .fields
                        .iter()
                        .map(|f| FieldSchema {
                            name: f.name.clone(),
                            ty: f.ty,
                            default: f.default.clone(),
                        })
                        .collect(),
                },
            ),
            vec![],
        ),
        OperatorSpec::Window(w) => (
            vec![KeyedStateMeta {
                name: "windows".into(),
                kind: KeyedStateKind::Map,
                schema: super::window::window_schema(w),
            }],
            vec![],
        ),
        OperatorSpec::Dedupe(_) => (
            keyed_value("seen", StateSchema::single("seen", FieldType::Bool)),
            vec![],
        ),
        OperatorSpec::Map(_)
        | OperatorSpec::Filter(_)
        | OperatorSpec::KeyBy(_)
        | OperatorSpec::StdoutSink(_)
        | OperatorSpec::DiscardSink(_) => (vec![], vec![]),
    }
}

/// The operator's uid, checked: well formed, unique, set where there is state. Without one
/// it gets `generated`; `place` is how a later duplicate refers to it.
fn check_uid(
    op: &OperatorSpec,
    label: &str,
    stateful: bool,
    (generated, place): (String, String),
    seen: &mut Vec<(String, String)>,
    problems: &mut Vec<String>,
) -> String {
    match op.uid() {
        Some(u) if u.is_empty() || u.contains(['/', ' ']) => {
            problems.push(format!(
                "{label}: uid '{u}' must be non-empty without '/' or spaces"
            ));
            u.to_owned()
        }
        Some(u) => {
            if let Some((_, other)) = seen.iter().find(|(s, _)| s == u) {
                problems.push(format!("{label}: uid '{u}' is already used by {other}"));
            }
            seen.push((u.to_owned(), place));
            u.to_owned()
        }
        None if stateful => {
            problems.push(format!(
                "{label} keeps state but has no uid: set a uid so its state can be restored after changes"
            ));
            generated
        }
        None => generated,
    }
}

fn is_keyed(spec: &OperatorSpec) -> bool {
    matches!(
        spec,
        OperatorSpec::Count(_)
            | OperatorSpec::Sum(_)
            | OperatorSpec::Min(_)
            | OperatorSpec::Max(_)
            | OperatorSpec::Reduce(_)
            | OperatorSpec::Window(_)
            | OperatorSpec::Dedupe(_)
    )
}

fn is_sink(spec: &OperatorSpec) -> bool {
    matches!(
        spec,
        OperatorSpec::FileSink(_)
            | OperatorSpec::KafkaSink(_)
            | OperatorSpec::StdoutSink(_)
            | OperatorSpec::DiscardSink(_)
    )
}

/// Field names a window emits or keeps itself.
const RESERVED: [&str; 6] = [
    "key",
    "windowStart",
    "windowEnd",
    "late",
    "sessionEnd",
    "fired",
];

fn check_window(w: &spec::WindowSpec, what: &str, problems: &mut Vec<String>) {
    let mut duration = |field: &str, text: &Option<String>| {
        if let Some(t) = text {
            match spec::parse_duration(field, t) {
                Ok(d) if d.as_millis() == 0 => {
                    problems.push(format!("{what}: {field}: must be at least 1ms"))
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("{what}: {e}")),
            }
        }
    };
    duration("size", &w.size);
    duration("slide", &w.slide);
    duration("gap", &w.gap);
    duration("allowedLateness", &w.allowed_lateness);
    match (&w.size, &w.gap) {
        (Some(_), Some(_)) => problems.push(format!(
            "{what}: size and gap: a window is either fixed (size, slide) or a session (gap), not both"
        )),
        (None, None) => problems.push(format!(
            "{what}: size or gap: set size (tumbling, or sliding with slide) or gap (session windows)"
        )),
        (None, Some(_)) if w.slide.is_some() => problems.push(format!(
            "{what}: slide: session windows (gap) do not slide"
        )),
        _ => {}
    }
    match (w.aggregate, w.aggregates.is_empty()) {
        (Some(_), false) => {
            problems.push(format!("{what}: aggregate and aggregates: use one of them"))
        }
        (None, true) if w.reduce.is_empty() => problems.push(format!(
            "{what}: aggregates: a window needs at least one aggregate (or aggregate: count) or a reduce"
        )),
        _ => {}
    }
    if !w.reduce.is_empty() && w.gap.is_some() {
        problems.push(format!(
            "{what}: reduce: session windows merge, and a reduce cannot be merged; use aggregates"
        ));
    }
    for (i, f) in w.reduce.iter().enumerate() {
        if let Err(e) = Expr::compile(&f.expr) {
            problems.push(format!("{what}: reduce[{i}].expr: {e}"));
        }
        if let Some(d) = &f.default {
            let v = crate::savepoint::value::Value::from_json(d);
            if !f.ty.admits(&v) {
                problems.push(format!(
                    "{what}: reduce[{i}].default: {d} is not a {}",
                    f.ty
                ));
            }
        }
    }
    if w.aggregate.is_none() && w.field.is_some() {
        problems.push(format!(
            "{what}: field: goes with aggregate; in aggregates, each entry names its own field"
        ));
    }
    let mut seen: Vec<&str> = Vec::new();
    let names = super::window::aggregates_of(w);
    for (i, f) in w.reduce.iter().enumerate() {
        let name = f.name.as_str();
        if RESERVED.contains(&name)
            || name.is_empty()
            || name.contains('.')
            || names.iter().any(|(n, _, _)| n == name)
            || w.reduce[..i].iter().any(|g| g.name == name)
        {
            problems.push(format!(
                "{what}: reduce[{i}] ('{name}'): the name is empty, has a '.', is reserved (key, windowStart, windowEnd, late, sessionEnd, fired) or is used twice"
            ));
        }
    }
    for (i, (name, a, field)) in names.iter().enumerate() {
        let at = if w.aggregate.is_some() {
            "aggregate".to_owned()
        } else {
            format!("aggregates[{i}] ('{name}')")
        };
        if *a != WindowAggregate::Count && field.is_none() {
            problems.push(format!("{what}: {at}: {a:?} needs a field"));
        }
        if RESERVED.contains(&name.as_str()) || name.is_empty() || name.contains('.') {
            problems.push(format!(
                "{what}: {at}: '{name}' cannot name an aggregate (empty, with '.', or one of key, windowStart, windowEnd, late, sessionEnd, fired)"
            ));
        }
        if seen.contains(&name.as_str()) {
            problems.push(format!("{what}: {at}: '{name}' is named twice"));
        }
        seen.push(name);
    }
}

fn check_expressions(spec: &OperatorSpec, what: &str, problems: &mut Vec<String>) {
    let check = |problems: &mut Vec<String>, field: &str, src: &str| {
        if let Err(e) = Expr::compile(src) {
            problems.push(format!("{what}: {field}: {e}"));
        }
    };
    match spec {
        OperatorSpec::Map(m) => {
            for (i, f) in m.set.iter().enumerate() {
                check(problems, &format!("set[{i}].expr"), &f.expr);
            }
        }
        OperatorSpec::Filter(f) => check(problems, "expr", &f.expr),
        OperatorSpec::Reduce(r) => {
            for (i, f) in r.fields.iter().enumerate() {
                check(problems, &format!("fields[{i}].expr"), &f.expr);
                if let Some(d) = &f.default {
                    let v = crate::savepoint::value::Value::from_json(d);
                    if !f.ty.admits(&v) {
                        problems.push(format!(
                            "{what}: fields[{i}].default: {d} is not a {}",
                            f.ty
                        ));
                    }
                }
            }
            if r.fields.is_empty() {
                problems.push(format!("{what}: fields: a reduce needs at least one field"));
            }
        }
        OperatorSpec::Window(w) => check_window(w, what, problems),
        OperatorSpec::Sum(s) if s.ty == NumType::String => {
            problems.push(format!("{what}: type: a sum is int or float, not string"));
        }
        OperatorSpec::Generator(g) => {
            if g.keys == 0 {
                problems.push(format!("{what}: keys must be at least 1"));
            }
            if g.splits == 0 {
                problems.push(format!("{what}: splits must be at least 1"));
            }
            if let Some(r) = g.rate
                && (r.is_nan() || r <= 0.0)
            {
                problems.push(format!(
                    "{what}: rate must be a positive number of records per second"
                ));
            }
        }
        _ => {}
    }
}

impl JobGraph {
    /// Validates a job file and builds its graph. `parallelism` overrides the job's default.
    pub fn build(spec: &JobSpec, parallelism: Option<u32>) -> Result<JobGraph, GraphError> {
        let mut problems = Vec::new();
        let default_p = parallelism.unwrap_or(spec.parallelism);
        if default_p == 0 {
            problems.push("parallelism must be at least 1".to_owned());
        }
        if spec.operators.is_empty() {
            problems.push("operators: a job needs at least a source and a sink".to_owned());
        }
        let mut nodes = Vec::new();
        let mut seen_uids: Vec<(String, String)> = Vec::new();
        let mut late_sinks = Vec::new();
        let mut keyed_since_keyby = false;
        for (i, op) in spec.operators.iter().enumerate() {
            let kind = kind_name(op);
            let label = match (op.uid(), op.name()) {
                (Some(u), _) => format!("operators[{i}] ({kind} '{u}')"),
                (None, Some(n)) => format!("operators[{i}] ({kind} named '{n}')"),
                _ => format!("operators[{i}] ({kind})"),
            };
            let p = op.parallelism().unwrap_or(default_p);
            if p == 0 {
                problems.push(format!("{label}: parallelism must be at least 1"));
            }
            let (keyed_states, operator_states) = declared_state(op);
            let stateful = !keyed_states.is_empty() || !operator_states.is_empty();
            let uid = check_uid(
                op,
                &label,
                stateful,
                (format!("_{kind}-{i}"), format!("operators[{i}]")),
                &mut seen_uids,
                &mut problems,
            );
            let source = matches!(
                op,
                OperatorSpec::Generator(_)
                    | OperatorSpec::FileSource(_)
                    | OperatorSpec::KafkaSource(_)
            );
            if source && i != 0 {
                problems.push(format!("{label}: a source must be the first operator"));
            }
            if i == 0 && !source {
                problems.push(format!(
                    "{label}: the first operator must be a source (generator, fileSource or kafkaSource)"
                ));
            }
            if is_sink(op) && i + 1 != spec.operators.len() {
                problems.push(format!("{label}: a sink must be the last operator"));
            }
            if i + 1 == spec.operators.len() && !is_sink(op) {
                problems.push(format!("{label}: the last operator must be a sink (fileSink, kafkaSink, stdoutSink or discardSink)"));
            }
            match op {
                OperatorSpec::KeyBy(_) => keyed_since_keyby = true,
                o if is_keyed(o) => {
                    if !keyed_since_keyby {
                        problems.push(format!(
                            "{label}: keeps state per key and needs a keyBy before it"
                        ));
                    }
                    keyed_since_keyby = false;
                }
                _ => {}
            }
            check_expressions(op, &label, &mut problems);
            super::kafka::check(op, spec, &label, &mut problems);
            if let OperatorSpec::Window(w) = op
                && let Some(sink) = &w.late_sink
            {
                if w.late_records == spec::LateRecords::Emit {
                    problems.push(format!(
                        "{label}: lateRecords: emit and lateSink both say where late records go; keep one"
                    ));
                }
                late_sinks.push((i, label.clone(), sink.to_operator()));
            }
            nodes.push(Node {
                index: i,
                uid,
                name: op
                    .name()
                    .map(str::to_owned)
                    .unwrap_or_else(|| kind.to_owned()),
                kind,
                parallelism: p.max(1),
                spec: op.clone(),
                keyed_states,
                operator_states,
                side_of: None,
            });
        }
        // Late-record sinks come after the pipeline's operators, each in its window's stage.
        for (window, window_label, op) in late_sinks {
            let kind = kind_name(&op);
            let index = nodes.len();
            let label = format!("{window_label}.lateSink ({kind})");
            let p = nodes[window].parallelism;
            if let Some(own) = op.parallelism()
                && own != p
            {
                problems.push(format!(
                    "{label}: parallelism {own}: a late-record sink runs in its window's {p} subtasks; remove it"
                ));
            }
            let (keyed_states, operator_states) = declared_state(&op);
            let stateful = !operator_states.is_empty();
            let uid = check_uid(
                &op,
                &label,
                stateful,
                (
                    format!("_{kind}-late-{window}"),
                    format!("operators[{window}].lateSink"),
                ),
                &mut seen_uids,
                &mut problems,
            );
            super::kafka::check(&op, spec, &label, &mut problems);
            nodes.push(Node {
                index,
                uid,
                name: op
                    .name()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{kind} (late records)")),
                kind,
                parallelism: p,
                spec: op,
                keyed_states,
                operator_states,
                side_of: Some(window),
            });
        }
        let max_p_nodes = nodes.iter().map(|n| n.parallelism).max().unwrap_or(1);
        let (max_parallelism, explicit) = match spec.max_parallelism {
            Some(m) => {
                if m == 0 || m > MAX_MAX_PARALLELISM {
                    problems.push(format!(
                        "maxParallelism must be between 1 and {MAX_MAX_PARALLELISM}"
                    ));
                }
                (m.max(1), true)
            }
            None => (default_max_parallelism(max_p_nodes), false),
        };
        for n in &nodes {
            if !n.keyed_states.is_empty() && n.parallelism > max_parallelism {
                problems.push(format!(
                    "operators[{}] ({} '{}'): parallelism {} exceeds maxParallelism {max_parallelism}",
                    n.index, n.kind, n.uid, n.parallelism
                ));
            }
        }
        if let Some(c) = &spec.checkpoints
            && let Err(e) = spec::parse_duration("checkpoints.interval", &c.interval)
        {
            problems.push(e);
        }
        let watermarks = match spec.watermarks.as_ref().map(spec::WatermarkSpec::parse) {
            None => spec::WatermarkConfig::default(),
            Some(Ok(w)) => w,
            Some(Err(p)) => {
                problems.extend(p);
                spec::WatermarkConfig::default()
            }
        };
        if !problems.is_empty() {
            return Err(GraphError(problems));
        }
        let stages = Self::stages(&nodes);
        Ok(JobGraph {
            name: spec.name.clone(),
            watermarks,
            max_parallelism,
            max_parallelism_explicit: explicit,
            state_compression: spec.state_compression,
            nodes,
            stages,
        })
    }

    fn stages(nodes: &[Node]) -> Vec<Stage> {
        let mut stages: Vec<Stage> = Vec::new();
        let mut pending_hash = false;
        for n in nodes.iter().filter(|n| n.side_of.is_none()) {
            let boundary = match stages.last() {
                None => Some(None),
                Some(_) if pending_hash => Some(Some(Partitioning::Hash)),
                Some(last) if last.parallelism != n.parallelism => {
                    Some(Some(Partitioning::Rebalance))
                }
                Some(_) => None,
            };
            match boundary {
                Some(input) => stages.push(Stage {
                    nodes: vec![n.index],
                    parallelism: n.parallelism,
                    input,
                }),
                None => {
                    if let Some(last) = stages.last_mut() {
                        last.nodes.push(n.index);
                    }
                }
            }
            pending_hash = matches!(n.spec, OperatorSpec::KeyBy(_));
        }
        for n in nodes {
            if let Some(window) = n.side_of
                && let Some(stage) = stages.iter_mut().find(|s| s.nodes.contains(&window))
            {
                stage.nodes.push(n.index);
            }
        }
        stages
    }

    /// The operator whose output `node` reads: the one before it, or its window.
    pub fn input_of(&self, node: &Node) -> Option<&Node> {
        match node.side_of {
            Some(window) => self.nodes.get(window),
            None => node.index.checked_sub(1).and_then(|i| self.nodes.get(i)),
        }
    }

    /// The stateful operators as restore planning sees them.
    pub fn operator_decls(&self) -> Vec<OperatorDecl> {
        self.nodes
            .iter()
            .filter(|n| n.is_stateful())
            .map(|n| OperatorDecl {
                uid: n.uid.clone(),
                parallelism: n.parallelism,
                max_parallelism: self
                    .max_parallelism_explicit
                    .then_some(self.max_parallelism),
                keyed_states: n.keyed_states.clone(),
                operator_states: n.operator_states.clone(),
            })
            .collect()
    }

    /// Adopts the max parallelism that restored keyed state fixes, when the job left it unset.
    pub fn adopt_max_parallelism(&mut self, saved: u32) {
        if !self.max_parallelism_explicit {
            self.max_parallelism = saved;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(yaml: &str) -> Result<JobGraph, GraphError> {
        JobGraph::build(&JobSpec::from_yaml(yaml).unwrap(), None)
    }

    #[test]
    fn chains_between_repartitions() {
        let g = build(
            "name: j\nparallelism: 2\noperators:\n- {kind: generator, uid: s, parallelism: 1}\n- {kind: filter, expr: 'value > 1'}\n- {kind: map, set: [{field: x, expr: '1'}], parallelism: 2}\n- {kind: keyBy, field: key}\n- {kind: count, uid: c}\n- {kind: discardSink}\n",
        )
        .unwrap();
        let shape: Vec<(Vec<usize>, u32, Option<Partitioning>)> = g
            .stages
            .iter()
            .map(|s| (s.nodes.clone(), s.parallelism, s.input))
            .collect();
        assert_eq!(
            shape,
            vec![
                (vec![0], 1, None),
                (vec![1, 2, 3], 2, Some(Partitioning::Rebalance)),
                (vec![4, 5], 2, Some(Partitioning::Hash)),
            ]
        );
        assert_eq!(g.max_parallelism, 128);
    }

    #[test]
    fn a_late_sink_runs_in_its_windows_stage_and_is_checked_like_an_operator() {
        let job = |window: &str| {
            format!(
                "name: j\nparallelism: 2\noperators:\n- {{kind: generator, uid: s, parallelism: 1}}\n- {{kind: keyBy, field: key}}\n- {{kind: window, uid: w, size: 1s, aggregate: count, {window}}}\n- {{kind: fileSink, uid: out, path: /tmp/o}}\n"
            )
        };
        let g = build(&job("lateSink: {kind: fileSink, uid: late, path: /tmp/l}")).unwrap();
        let late = &g.nodes[4];
        assert_eq!(
            (late.uid.as_str(), late.kind, late.side_of, late.parallelism),
            ("late", "fileSink", Some(2), 2)
        );
        assert!(late.is_stateful());
        // The window's stage carries it; the pipeline's flow does not include it.
        assert_eq!(
            g.stages.last().map(|s| s.nodes.clone()),
            Some(vec![2, 3, 4])
        );
        assert_eq!(g.input_of(late).map(|n| n.uid.as_str()), Some("w"));
        assert_eq!(g.input_of(&g.nodes[3]).map(|n| n.uid.as_str()), Some("w"));
        assert!(g.input_of(&g.nodes[0]).is_none());

        let err = build(&job(
            "lateRecords: emit, lateSink: {kind: fileSink, path: /tmp/l, parallelism: 3}",
        ))
        .unwrap_err()
        .to_string();
        for want in [
            "operators[2] (window 'w'): lateRecords: emit and lateSink both say where late records go",
            "operators[2] (window 'w').lateSink (fileSink): parallelism 3: a late-record sink runs in its window's 2 subtasks",
            "operators[2] (window 'w').lateSink (fileSink) keeps state but has no uid",
        ] {
            assert!(err.contains(want), "{want}\n{err}");
        }
        let err = build(&job("lateSink: {kind: fileSink, uid: out, path: /tmp/l}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("operators[2] (window 'w').lateSink (fileSink): uid 'out' is already used by operators[3]"),
            "{err}"
        );
        let err = JobSpec::from_yaml(&job("lateSink: {kind: count}")).unwrap_err();
        assert!(
            err.contains("operators[2] (window): lateSink.kind: unknown variant `count`, expected one of `fileSink`"),
            "{err}"
        );
    }

    #[test]
    fn stateful_operator_without_uid_is_named() {
        let err = build(
            "name: j\noperators:\n- {kind: generator, uid: s}\n- {kind: keyBy, field: key}\n- {kind: count, name: clicks-per-user}\n- {kind: discardSink}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("operators[2] (count named 'clicks-per-user') keeps state but has no uid"),
            "{err}"
        );
    }

    #[test]
    fn structural_problems_are_all_listed() {
        let err = build(
            "name: j\noperators:\n- {kind: count, uid: c}\n- {kind: filter, expr: 'value >'}\n- {kind: generator, uid: c}\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("first operator must be a source"), "{text}");
        assert!(text.contains("needs a keyBy before it"), "{text}");
        assert!(text.contains("invalid expression 'value >'"), "{text}");
        assert!(
            text.contains("uid 'c' is already used by operators[0]"),
            "{text}"
        );
        assert!(text.contains("last operator must be a sink"), "{text}");
    }
}

//! The field reference of the custom resources (README's `## Reference`), generated from the
//! CRDs' schemas, so the documentation says what the API server validates: every field with its
//! type, default and description. `sjob crd --reference` prints it; e2e/manifests.rs fails when
//! README.md holds another text.

use super::crd::{Savepoint, StatefulJob};
use crate::engine::spec;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde_json::Value;

/// The line before the generated text in README.md.
pub const START_MARKER: &str = "<!-- reference:start -->";
/// The line after it.
pub const END_MARKER: &str = "<!-- reference:end -->";

/// The pattern of duration fields (`10s`, `5m`, `1h30m`) in the CRDs.
const DURATION_PATTERN: &str = "^([0-9]+(ms|s|m|h))+$";

/// Fields documented as a whole (Kubernetes types, a copy of the spec, the operators, which
/// have their own table): their type as shown, and no rows for what is inside.
const OPAQUE: &[(&str, &str)] = &[
    (
        "spec.resources",
        "[ResourceRequirements](https://kubernetes.io/docs/concepts/configuration/manage-resources-containers/) (`requests`, `limits`)",
    ),
    (
        "spec.job.operators",
        "[]object (see [Operators](#operators-specjoboperators))",
    ),
    (
        "status.conditions",
        "[]Condition (`type`, `status`, `reason`, `message`, `lastTransitionTime`, `observedGeneration`)",
    ),
    ("status.lastStableSpec", "object (a StatefulJob `spec`)"),
];

struct Row {
    field: String,
    ty: String,
    default: String,
    description: String,
}

/// The operator kinds with their schemas, in the order of `OperatorSpec::KINDS`.
pub fn operator_kind_schemas() -> Vec<(&'static str, Value)> {
    fn schema<T: JsonSchema>() -> Value {
        schemars::schema_for!(T).to_value()
    }
    vec![
        ("generator", schema::<spec::GeneratorSpec>()),
        ("fileSource", schema::<spec::FileSourceSpec>()),
        ("kafkaSource", schema::<spec::KafkaSourceSpec>()),
        ("map", schema::<spec::MapSpec>()),
        ("filter", schema::<spec::FilterSpec>()),
        ("keyBy", schema::<spec::KeyBySpec>()),
        ("count", schema::<spec::CountSpec>()),
        ("sum", schema::<spec::AggSpec>()),
        ("min", schema::<spec::MinSpec>()),
        ("max", schema::<spec::MaxSpec>()),
        ("reduce", schema::<spec::ReduceSpec>()),
        ("window", schema::<spec::WindowSpec>()),
        ("dedupe", schema::<spec::DedupeSpec>()),
        ("fileSink", schema::<spec::FileSinkSpec>()),
        ("kafkaSink", schema::<spec::KafkaSinkSpec>()),
        ("stdoutSink", schema::<spec::StdoutSinkSpec>()),
        ("discardSink", schema::<spec::DiscardSinkSpec>()),
    ]
}

/// The Markdown between the markers (without them), ending with a newline.
pub fn reference_markdown() -> String {
    let sj = serde_json::to_value(StatefulJob::crd()).expect("StatefulJob CRD as JSON");
    let sp = serde_json::to_value(Savepoint::crd()).expect("Savepoint CRD as JSON");
    let mut out = String::new();
    out.push_str(
        "Generated from the CRDs by `sjob crd --reference` (the doc comments of \
         `src/operator/crd.rs` and `src/engine/spec.rs`). Durations are written like `500ms`, \
         `10s`, `5m`, `1h30m`.\n",
    );
    resource_section(&mut out, &sj);
    operators_section(&mut out, &sj);
    resource_section(&mut out, &sp);
    out
}

/// README.md with the text between the markers replaced by the generated reference; `None`
/// when the markers are missing.
pub fn replace_in_readme(readme: &str) -> Option<String> {
    let start = readme.find(START_MARKER)? + START_MARKER.len();
    let end = start + readme[start..].find(END_MARKER)?;
    Some(format!(
        "{}\n{}{}",
        &readme[..start],
        reference_markdown(),
        &readme[end..]
    ))
}

/// The text between the markers in README.md, as `reference_markdown` would return it.
pub fn section_in_readme(readme: &str) -> Option<&str> {
    let start = readme.find(START_MARKER)? + START_MARKER.len();
    let end = start + readme[start..].find(END_MARKER)?;
    Some(
        readme[start..end]
            .strip_prefix('\n')
            .unwrap_or(&readme[start..end]),
    )
}

fn version(crd: &Value) -> &Value {
    &crd["spec"]["versions"][0]
}

fn resource_section(out: &mut String, crd: &Value) {
    let names = &crd["spec"]["names"];
    let kind = names["kind"].as_str().unwrap_or_default();
    let group = crd["spec"]["group"].as_str().unwrap_or_default();
    let ver = version(crd)["name"].as_str().unwrap_or_default();
    let schema = &version(crd)["schema"]["openAPIV3Schema"];
    let short: Vec<String> = names["shortNames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|s| format!("`{s}`"))
        .collect();
    out.push_str(&format!("\n### {kind}\n\n"));
    out.push_str(&format!(
        "`apiVersion: {group}/{ver}`, `kind: {kind}`, namespaced{}. {}\n\n",
        if short.is_empty() {
            String::new()
        } else {
            format!(", short name {}", short.join(", "))
        },
        one_line(
            schema["properties"]["spec"]["description"]
                .as_str()
                .unwrap_or("")
        )
    ));
    let mut rows = Vec::new();
    for part in ["spec", "status"] {
        if let Some(s) = schema["properties"].get(part) {
            walk_children(part, s, &mut rows);
        }
    }
    table(
        out,
        &["field", "type", "default", "description"],
        rows_cells(rows),
    );
    if let Some(cols) = version(crd)["additionalPrinterColumns"].as_array() {
        let cols: Vec<String> = cols
            .iter()
            .filter_map(|c| {
                Some(format!(
                    "{} (`{}`)",
                    c["name"].as_str()?,
                    c["jsonPath"].as_str()?
                ))
            })
            .collect();
        out.push_str(&format!("\n`kubectl get` columns: {}.\n", cols.join(", ")));
    }
}

fn rows_cells(rows: Vec<Row>) -> Vec<Vec<String>> {
    rows.into_iter()
        .map(|r| vec![format!("`{}`", r.field), r.ty, r.default, r.description])
        .collect()
}

fn operators_section(out: &mut String, crd: &Value) {
    let item = &version(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["job"]
        ["properties"]["operators"]["items"];
    let merged = &item["properties"];
    let kinds: Vec<String> = merged["kind"]["enum"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|k| format!("`{k}`"))
        .collect();
    out.push_str("\n#### Operators (`spec.job.operators[]`)\n\n");
    out.push_str(&format!(
        "Each item has a `kind` (required: {}) and the fields of that kind.\n\n",
        kinds.join(", ")
    ));
    let mut cells = vec![vec![
        "every kind".to_owned(),
        String::new(),
        String::new(),
        String::new(),
        "Fields that every operator takes.".to_owned(),
    ]];
    for common in ["uid", "name", "parallelism"] {
        cells.push(vec![
            String::new(),
            format!("`{common}`"),
            type_text(&merged[common]),
            if common == "uid" {
                "required when the operator keeps state".to_owned()
            } else {
                "—".to_owned()
            },
            one_line(merged[common]["description"].as_str().unwrap_or("")),
        ]);
    }
    for (kind, schema) in operator_kind_schemas() {
        cells.push(vec![
            format!("`{kind}`"),
            String::new(),
            String::new(),
            String::new(),
            one_line(schema["description"].as_str().unwrap_or("")),
        ]);
        let required = required_of(&schema);
        let Some(props) = schema["properties"].as_object() else {
            continue;
        };
        for (name, own) in props {
            if matches!(name.as_str(), "uid" | "name" | "parallelism") {
                continue;
            }
            let structural = &merged[name];
            let default = if required.iter().any(|r| r == name) {
                "**required**".to_owned()
            } else {
                own.get("default")
                    .map(default_text)
                    .unwrap_or_else(|| "—".into())
            };
            let description = own
                .get("description")
                .or_else(|| structural.get("description"))
                .and_then(Value::as_str)
                .map(one_line)
                .unwrap_or_default();
            cells.push(vec![
                String::new(),
                format!("`{name}`"),
                type_text(structural),
                default,
                description,
            ]);
            let mut rows = Vec::new();
            walk_children(name, structural, &mut rows);
            for r in rows {
                cells.push(vec![
                    String::new(),
                    format!("`{}`", r.field),
                    r.ty,
                    r.default,
                    r.description,
                ]);
            }
        }
    }
    table(
        out,
        &["kind", "field", "type", "default", "description"],
        cells,
    );
}

/// Rows for the fields under `schema` (an object, or an array of objects), depth first.
fn walk_children(path: &str, schema: &Value, rows: &mut Vec<Row>) {
    if OPAQUE.iter().any(|(p, _)| *p == path) {
        return;
    }
    let (node, prefix) = match schema.get("items") {
        Some(items) if items.get("properties").is_some() => (items, format!("{path}[]")),
        _ => (schema, path.to_owned()),
    };
    let Some(props) = node["properties"].as_object() else {
        return;
    };
    let required = required_of(node);
    for (name, child) in props {
        let field = format!("{prefix}.{name}");
        let opaque = OPAQUE.iter().find(|(p, _)| *p == field).map(|(_, t)| *t);
        let default = if required.iter().any(|r| r == name) {
            "**required**".to_owned()
        } else {
            child
                .get("default")
                .map(default_text)
                .unwrap_or_else(|| "—".into())
        };
        rows.push(Row {
            ty: opaque
                .map(str::to_owned)
                .unwrap_or_else(|| type_text(child)),
            default,
            description: one_line(child["description"].as_str().unwrap_or("")),
            field: field.clone(),
        });
        walk_children(&field, child, rows);
    }
}

fn required_of(schema: &Value) -> Vec<String> {
    schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(f) if f.fract() == 0.0 => format!("{}", f as i64),
        Some(f) => f.to_string(),
        None => v.to_string(),
    }
}

fn type_text(s: &Value) -> String {
    if let Some(values) = s["enum"].as_array() {
        let values: Vec<String> = values
            .iter()
            .filter(|v| !v.is_null())
            .map(|v| {
                format!(
                    "`{}`",
                    v.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string())
                )
            })
            .collect();
        return values.join(" \\| ");
    }
    if s.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        return "integer or string".into();
    }
    match s["type"].as_str() {
        Some("string") => match s["pattern"].as_str() {
            Some(DURATION_PATTERN) => "duration".into(),
            Some(p) => format!("string matching `{p}`"),
            None => "string".into(),
        },
        Some(t @ ("integer" | "number")) => match (s.get("minimum"), s.get("maximum")) {
            (Some(lo), Some(hi)) => format!("{t}, {}–{}", number(lo), number(hi)),
            (Some(lo), None) => format!("{t} ≥ {}", number(lo)),
            (None, Some(hi)) => format!("{t} ≤ {}", number(hi)),
            (None, None) => t.to_owned(),
        },
        Some("boolean") => "boolean".into(),
        Some("array") => format!("[]{}", type_text(&s["items"])),
        Some("object") => match s.get("additionalProperties") {
            Some(extra) if extra.is_object() => format!("map of {}", type_text(extra)),
            _ => "object".into(),
        },
        // Untyped: x-kubernetes-preserve-unknown-fields.
        _ => "any".into(),
    }
}

fn default_text(v: &Value) -> String {
    match v {
        Value::Object(_) => "(see its fields)".into(),
        Value::String(s) => format!("`{s}`"),
        other => format!("`{other}`"),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

fn table(out: &mut String, header: &[&str], cells: Vec<Vec<String>>) {
    out.push_str(&format!("| {} |\n", header.join(" | ")));
    out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for row in cells {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
}

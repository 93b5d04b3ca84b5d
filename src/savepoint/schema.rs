//! State schemas and their evolution.
//!
//! Every piece of state a pipeline keeps is a row with a declared schema (field names, types,
//! defaults). A savepoint records the schema it was written with; on restore the new job's
//! schema is resolved against it: compatible as is, compatible after migration (rows are
//! rewritten while loading), or incompatible (refused, naming the field).
//!
//! Compatible changes: a field added with a default, a field removed, a field reordered,
//! `int` widened to `float`, any type relaxed to `any`. Everything else is incompatible.

use super::value::{Row, Value};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    Bool,
    Int,
    Float,
    String,
    Any,
}

impl FieldType {
    /// Whether `v` may be stored in a field of this type (null is allowed everywhere).
    pub fn admits(&self, v: &Value) -> bool {
        matches!(
            (self, v),
            (_, Value::Null)
                | (FieldType::Any, _)
                | (FieldType::Bool, Value::Bool(_))
                | (FieldType::Int, Value::Int(_))
                | (FieldType::Float, Value::Float(_) | Value::Int(_))
                | (FieldType::String, Value::Str(_))
        )
    }

    /// Coerces a value into this type where that loses nothing (int into float).
    pub fn coerce(&self, v: Value) -> Value {
        match (self, v) {
            (FieldType::Float, Value::Int(i)) => Value::Float(i as f64),
            (_, v) => v,
        }
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            FieldType::Bool => "bool",
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::String => "string",
            FieldType::Any => "any",
        };
        f.write_str(s)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldSchema {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub struct StateSchema {
    pub fields: Vec<FieldSchema>,
}

impl StateSchema {
    pub fn single(name: &str, ty: FieldType) -> StateSchema {
        StateSchema {
            fields: vec![FieldSchema {
                name: name.to_owned(),
                ty,
                default: None,
            }],
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }
}

/// How to build a row of the new schema from a row of the old one.
#[derive(Clone, Debug, PartialEq)]
enum FieldSource {
    Old { index: usize, ty: FieldType },
    Default(Value),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Migration {
    plan: Vec<FieldSource>,
}

impl Migration {
    pub fn apply(&self, old: &[Value]) -> Row {
        self.plan
            .iter()
            .map(|src| match src {
                FieldSource::Old { index, ty } => {
                    ty.coerce(old.get(*index).cloned().unwrap_or(Value::Null))
                }
                FieldSource::Default(v) => v.clone(),
            })
            .collect()
    }
}

/// One reason a saved schema cannot be read with the new one.
#[derive(Clone, Debug, PartialEq)]
pub struct SchemaProblem {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for SchemaProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field '{}': {}", self.field, self.reason)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Compatibility {
    AsIs,
    AfterMigration(Migration),
    Incompatible(Vec<SchemaProblem>),
}

fn widens(old: FieldType, new: FieldType) -> bool {
    old == new || new == FieldType::Any || (old == FieldType::Int && new == FieldType::Float)
}

/// Resolves the schema a state was saved with against the schema the new job declares.
pub fn resolve(old: &StateSchema, new: &StateSchema) -> Compatibility {
    let mut plan = Vec::with_capacity(new.fields.len());
    let mut problems = Vec::new();
    for nf in &new.fields {
        match old.index_of(&nf.name) {
            Some(index) => {
                let of = &old.fields[index];
                if widens(of.ty, nf.ty) {
                    plan.push(FieldSource::Old { index, ty: nf.ty });
                } else {
                    problems.push(SchemaProblem {
                        field: nf.name.clone(),
                        reason: format!(
                            "type changed from {} to {}, which cannot be converted (only int -> float and any type -> any are)",
                            of.ty, nf.ty
                        ),
                    });
                }
            }
            None => match &nf.default {
                Some(d) => plan.push(FieldSource::Default(nf.ty.coerce(Value::from_json(d)))),
                None => problems.push(SchemaProblem {
                    field: nf.name.clone(),
                    reason: "added without a default, so existing state has no value for it"
                        .to_owned(),
                }),
            },
        }
    }
    if !problems.is_empty() {
        return Compatibility::Incompatible(problems);
    }
    let identity = plan.len() == old.fields.len()
        && plan.iter().enumerate().all(|(i, src)| {
            matches!(src, FieldSource::Old { index, ty } if *index == i && *ty == old.fields[i].ty)
        });
    if identity {
        Compatibility::AsIs
    } else {
        Compatibility::AfterMigration(Migration { plan })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &[(&str, FieldType, Option<serde_json::Value>)]) -> StateSchema {
        StateSchema {
            fields: fields
                .iter()
                .map(|(n, t, d)| FieldSchema {
                    name: (*n).into(),
                    ty: *t,
                    default: d.clone(),
                })
                .collect(),
        }
    }

    #[test]
    fn same_schema_is_compatible_as_is() {
        let s = schema(&[
            ("count", FieldType::Int, None),
            ("last", FieldType::String, None),
        ]);
        assert_eq!(resolve(&s, &s), Compatibility::AsIs);
    }

    #[test]
    fn added_with_default_removed_and_widened_migrate() {
        let old = schema(&[
            ("count", FieldType::Int, None),
            ("gone", FieldType::String, None),
            ("total", FieldType::Int, None),
        ]);
        let new = schema(&[
            ("total", FieldType::Float, None),
            ("count", FieldType::Int, None),
            ("region", FieldType::String, Some(serde_json::json!("eu"))),
        ]);
        let Compatibility::AfterMigration(m) = resolve(&old, &new) else {
            panic!("expected a migration");
        };
        let row = m.apply(&[Value::Int(3), Value::from("x"), Value::Int(10)]);
        assert_eq!(
            &*row,
            &[Value::Float(10.0), Value::Int(3), Value::from("eu")]
        );
    }

    #[test]
    fn narrowing_and_added_without_default_are_refused_naming_fields() {
        let old = schema(&[("total", FieldType::Float, None)]);
        let new = schema(&[("total", FieldType::Int, None), ("n", FieldType::Int, None)]);
        let Compatibility::Incompatible(p) = resolve(&old, &new) else {
            panic!("expected incompatible");
        };
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].field, "total");
        assert!(p[0].reason.contains("float to int"), "{}", p[0].reason);
        assert_eq!(p[1].field, "n");
        assert!(p[1].reason.contains("without a default"));
    }
}

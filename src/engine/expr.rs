//! CEL expressions over records, for map, filter and reduce.
//!
//! An expression sees each record field as a variable of the same name, the whole record as
//! `record`, and in `reduce` the accumulator as `acc` (a map of its fields).

use crate::savepoint::value::{Record, Value};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

fn env() -> Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| Arc::new(cel::Env::stdlib())).clone()
}

pub struct Expr {
    source: String,
    program: cel::Program,
}

impl std::fmt::Debug for Expr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Expr({})", self.source)
    }
}

fn to_cel(v: &Value) -> cel::Value {
    match v {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Int(i) => cel::Value::Int(*i),
        Value::Float(f) => cel::Value::Float(*f),
        Value::Str(s) => cel::Value::String(Arc::new(s.to_string())),
    }
}

fn from_cel(v: cel::Value) -> Result<Value, String> {
    Ok(match v {
        cel::Value::Null => Value::Null,
        cel::Value::Bool(b) => Value::Bool(b),
        cel::Value::Int(i) => Value::Int(i),
        cel::Value::UInt(u) => {
            Value::Int(i64::try_from(u).map_err(|_| format!("{u} is too large"))?)
        }
        cel::Value::Float(f) => Value::Float(f),
        cel::Value::String(s) => Value::from(s.as_str()),
        other => {
            return Err(format!(
                "the result is a {:?}; expressions must produce null, bool, int, float or string",
                other.type_of()
            ));
        }
    })
}

fn fields_map<'a>(fields: impl Iterator<Item = (&'a str, &'a Value)>) -> cel::Value {
    let map: HashMap<cel::objects::Key, cel::Value> = fields
        .map(|(n, v)| (cel::objects::Key::String(Arc::new(n.to_owned())), to_cel(v)))
        .collect();
    cel::Value::Map(cel::objects::Map { map: Arc::new(map) })
}

impl Expr {
    pub fn compile(source: &str) -> Result<Expr, String> {
        let program = env()
            .compile(source)
            .map_err(|e| format!("invalid expression '{source}': {e}"))?;
        Ok(Expr {
            source: source.to_owned(),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates against a record and, for reduce, the accumulator's named fields.
    pub fn eval(&self, rec: &Record, acc: Option<&[(&str, &Value)]>) -> Result<Value, String> {
        let mut ctx = cel::Context::with_env(env());
        for (n, v) in &rec.fields {
            ctx.add_variable_from_value(n.as_str(), to_cel(v));
        }
        ctx.add_variable_from_value(
            "record",
            fields_map(rec.fields.iter().map(|(n, v)| (n.as_str(), v))),
        );
        if let Some(acc) = acc {
            ctx.add_variable_from_value("acc", fields_map(acc.iter().copied()));
        }
        let out = self
            .program
            .execute(&ctx)
            .map_err(|e| format!("evaluating '{}': {e}", self.source))?;
        from_cel(out).map_err(|e| format!("evaluating '{}': {e}", self.source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::savepoint::value::intern;

    #[test]
    fn evaluates_over_fields_record_and_acc() {
        let rec = Record {
            fields: smallvec::smallvec![
                (intern("value"), Value::Int(4)),
                (intern("name"), Value::from("ab")),
            ],
            key: None,
        };
        assert_eq!(
            Expr::compile("value * 2").unwrap().eval(&rec, None),
            Ok(Value::Int(8))
        );
        assert_eq!(
            Expr::compile("record.name + 'c'").unwrap().eval(&rec, None),
            Ok(Value::from("abc"))
        );
        let total = Value::Float(1.5);
        assert_eq!(
            Expr::compile("acc.total + double(value)")
                .unwrap()
                .eval(&rec, Some(&[("total", &total)])),
            Ok(Value::Float(5.5))
        );
        assert!(Expr::compile("value +").is_err());
        let err = Expr::compile("missing + 1")
            .unwrap()
            .eval(&rec, None)
            .unwrap_err();
        assert!(err.contains("missing"), "{err}");
    }
}

//! The operators between source and sink: stateless transforms, keyed aggregations,
//! windows and dedupe. Each runs inside a task's chain and sees whole batches.

use super::expr::Expr;
use super::graph::Node;
use super::spec::{NumType, OperatorSpec};
use super::state::KeyedState;
use crate::savepoint::keygroups::KeyGroupRange;
use crate::savepoint::schema::FieldType;
use crate::savepoint::statefile::{StateEntry, SubtaskSnapshot};
use crate::savepoint::staterow::StateRow;
use crate::savepoint::value::{Fields, Key, Name, Record, Row, Value, intern};

/// One operator instance (one subtask) inside a task.
pub trait Operator: Send {
    /// Consumes `input`, appending what it emits to `out`.
    fn process(&mut self, input: Vec<Record>, out: &mut Vec<Record>) -> Result<(), String>;
    /// Event time has reached `watermark` on every input.
    fn on_watermark(&mut self, _watermark: i64, _out: &mut Vec<Record>) -> Result<(), String> {
        Ok(())
    }
    /// The synchronous part of a snapshot: cheap, shared views of the state.
    fn snapshot(&mut self, _snapshot_id: u64) -> Result<SubtaskSnapshot, String> {
        Ok(SubtaskSnapshot {
            keyed: None,
            operator_lists: Vec::new(),
        })
    }
    /// A snapshot that included this operator's state is complete.
    fn notify_complete(&mut self, _snapshot_id: u64) -> Result<(), String> {
        Ok(())
    }
    /// The input ended; no more records will come.
    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), String> {
        Ok(())
    }
    /// The cut-over marker of a blue-green switch has arrived from every input: a sink in
    /// shadow mode starts writing.
    fn on_cut_over(&mut self) {}
    /// Records dropped so far because they came after the watermark had passed their window.
    fn late_records_dropped(&self) -> u64 {
        0
    }
    /// Records sent aside since the last call (a window's late records, for its late sink).
    fn take_side_output(&mut self) -> Vec<Record> {
        Vec::new()
    }
    /// The keyed state to restore into, for keyed operators.
    fn keyed_state(&mut self) -> Option<&mut KeyedState> {
        None
    }
    /// Restored operator list state, one list per declared state.
    fn restore_lists(&mut self, _lists: Vec<Vec<Row>>) -> Result<(), String> {
        Ok(())
    }
    /// Called once restored state is in place.
    fn restored(&mut self) {}
}

fn keyed_snapshot(state: &mut KeyedState) -> SubtaskSnapshot {
    SubtaskSnapshot {
        keyed: Some(state.snapshot()),
        operator_lists: Vec::new(),
    }
}

const NO_KEY: &str = "a record without a key reached a keyed operator";

pub(crate) fn key_of(rec: &Record) -> Result<&Key, String> {
    rec.key.as_ref().ok_or_else(|| NO_KEY.to_owned())
}

static KEY: std::sync::LazyLock<Name> = std::sync::LazyLock::new(|| intern("key"));

/// Builds the operator for a non-source, non-sink node.
pub fn build(
    node: &Node,
    range: KeyGroupRange,
    max_parallelism: u32,
) -> Result<Box<dyn Operator>, String> {
    let keyed = |n: usize| KeyedState::new(range, max_parallelism, n);
    Ok(match &node.spec {
        OperatorSpec::Map(m) => Box::new(MapOp {
            set: m
                .set
                .iter()
                .map(|f| Ok((intern(&f.field), Expr::compile(&f.expr)?)))
                .collect::<Result<_, String>>()?,
            drop: m.drop.iter().map(|d| intern(d)).collect(),
        }),
        OperatorSpec::Filter(f) => Box::new(FilterOp {
            expr: Expr::compile(&f.expr)?,
        }),
        OperatorSpec::KeyBy(k) => Box::new(KeyByOp {
            field: intern(&k.field),
        }),
        OperatorSpec::Count(_) => {
            Box::new(AggOp::new(AggKind::Count, None, FieldType::Int, keyed(1)))
        }
        OperatorSpec::Sum(s) => Box::new(AggOp::new(
            AggKind::Sum,
            Some(&s.field),
            num(s.ty),
            keyed(1),
        )),
        OperatorSpec::Min(s) => Box::new(AggOp::new(
            AggKind::Min,
            Some(&s.field),
            num(s.ty),
            keyed(1),
        )),
        OperatorSpec::Max(s) => Box::new(AggOp::new(
            AggKind::Max,
            Some(&s.field),
            num(s.ty),
            keyed(1),
        )),
        OperatorSpec::Reduce(r) => Box::new(ReduceOp {
            uid: node.uid.clone(),
            fields: r
                .fields
                .iter()
                .map(|f| {
                    Ok(ReduceField {
                        name: intern(&f.name),
                        ty: f.ty,
                        default: f
                            .default
                            .as_ref()
                            .map(|d| f.ty.coerce(Value::from_json(d)))
                            .unwrap_or(Value::Null),
                        expr: Expr::compile(&f.expr)?,
                    })
                })
                .collect::<Result<_, String>>()?,
            state: keyed(1),
        }),
        OperatorSpec::Window(w) => Box::new(super::window::WindowOp::new(&node.uid, w, keyed(1))?),
        OperatorSpec::Dedupe(_) => Box::new(DedupeOp { state: keyed(1) }),
        other => return Err(format!("{other:?} is not a transform")),
    })
}

fn num(t: NumType) -> FieldType {
    match t {
        NumType::Int => FieldType::Int,
        NumType::Float => FieldType::Float,
        NumType::String => FieldType::String,
    }
}

struct MapOp {
    set: Vec<(Name, Expr)>,
    drop: Vec<Name>,
}

/// Passes a batch changed in place on: the batch itself when `out` is empty (no copy of the
/// records), else appended.
fn hand_over(mut input: Vec<Record>, out: &mut Vec<Record>) {
    if out.is_empty() {
        *out = input;
    } else {
        out.append(&mut input);
    }
}

impl Operator for MapOp {
    fn process(&mut self, mut input: Vec<Record>, out: &mut Vec<Record>) -> Result<(), String> {
        for rec in &mut input {
            let mut values = Vec::with_capacity(self.set.len());
            for (_, e) in &self.set {
                values.push(e.eval(rec, None)?);
            }
            for ((name, _), v) in self.set.iter().zip(values) {
                rec.set(*name, v);
            }
            if !self.drop.is_empty() {
                rec.fields.retain(|(n, _)| !self.drop.contains(n));
            }
        }
        hand_over(input, out);
        Ok(())
    }
}

struct FilterOp {
    expr: Expr,
}

impl Operator for FilterOp {
    fn process(&mut self, input: Vec<Record>, out: &mut Vec<Record>) -> Result<(), String> {
        out.reserve(input.len());
        for rec in input {
            match self.expr.eval(&rec, None)? {
                Value::Bool(true) => out.push(rec),
                Value::Bool(false) | Value::Null => {}
                other => {
                    return Err(format!(
                        "filter '{}' produced {} ({other}), not a bool",
                        self.expr.source(),
                        other.type_name()
                    ));
                }
            }
        }
        Ok(())
    }
}

struct KeyByOp {
    field: Name,
}

impl Operator for KeyByOp {
    fn process(&mut self, mut input: Vec<Record>, out: &mut Vec<Record>) -> Result<(), String> {
        for rec in &mut input {
            rec.key = Some(Key::new(
                rec.get(self.field).cloned().unwrap_or(Value::Null),
            ));
        }
        hand_over(input, out);
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum AggKind {
    Count,
    Sum,
    Min,
    Max,
}

struct AggOp {
    kind: AggKind,
    field: Option<Name>,
    out_field: Name,
    ty: FieldType,
    state: KeyedState,
}

impl AggOp {
    fn new(kind: AggKind, field: Option<&str>, ty: FieldType, state: KeyedState) -> AggOp {
        let out = match kind {
            AggKind::Count => "count",
            AggKind::Sum => "sum",
            AggKind::Min => "min",
            AggKind::Max => "max",
        };
        AggOp {
            kind,
            field: field.map(intern),
            out_field: intern(out),
            ty,
            state,
        }
    }
}

/// Adds two numbers: int + int stays int (float on overflow), anything with a float is float.
pub(crate) fn add(a: &Value, b: &Value) -> Result<Value, String> {
    Ok(match (a, b) {
        (Value::Int(x), Value::Int(y)) => match x.checked_add(*y) {
            Some(s) => Value::Int(s),
            None => Value::Float(*x as f64 + *y as f64),
        },
        (Value::Null, v) | (v, Value::Null) => v.clone(),
        _ => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => Value::Float(x + y),
            _ => {
                return Err(format!(
                    "cannot add {} and {}",
                    a.type_name(),
                    b.type_name()
                ));
            }
        },
    })
}

/// A window's `min`: `current` becomes `v` when `v` is smaller or `current` is null; a null
/// `v` (a record without the field, a session without values) changes nothing.
#[inline]
pub(crate) fn keep_min(current: &mut Value, v: &Value) {
    keep_extreme(current, v, std::cmp::Ordering::Less)
}

/// A window's `max`, as `keep_min`.
#[inline]
pub(crate) fn keep_max(current: &mut Value, v: &Value) {
    keep_extreme(current, v, std::cmp::Ordering::Greater)
}

#[inline]
fn keep_extreme(current: &mut Value, v: &Value, wanted: std::cmp::Ordering) {
    // Integers, the common case, in place: no clone, and no drop of the value replaced.
    if let (Value::Int(c), Value::Int(x)) = (&mut *current, v) {
        if x.cmp(c) == wanted {
            *c = *x;
        }
        return;
    }
    keep_extreme_of_any(current, v, wanted)
}

#[inline(never)]
fn keep_extreme_of_any(current: &mut Value, v: &Value, wanted: std::cmp::Ordering) {
    if matches!(v, Value::Null) {
        return;
    }
    if matches!(current, Value::Null) || compare_num(v, current) == wanted {
        *current = v.clone();
    }
}

fn pick(kind: AggKind, current: &Value, v: &Value) -> Value {
    let take_new = match (current, kind) {
        (Value::Null, _) => true,
        (c, AggKind::Min) => compare_num(v, c) == std::cmp::Ordering::Less,
        (c, _) => compare_num(v, c) == std::cmp::Ordering::Greater,
    };
    if take_new { v.clone() } else { current.clone() }
}

fn compare_num(a: &Value, b: &Value) -> std::cmp::Ordering {
    if let (Value::Int(x), Value::Int(y)) = (a, b) {
        // Exact, where the float comparison below would round above 2^53.
        return x.cmp(y);
    }
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        _ => a.cmp(b),
    }
}

/// How many records ahead a keyed operator asks for its state's memory: the shard's header
/// twice this far, its slots this far (see `KeyedState::prefetch`).
const PREFETCH_AHEAD: usize = 8;

/// Before record `i` of a batch is looked up in state 0: asks for the memory of the lookups
/// `PREFETCH_AHEAD` and twice that records later. Without it each lookup waits on two or
/// three cache misses in turn, and how many of them overlap with the work around them
/// depends on how the compiler happened to lay the loop out (keyed count: 9.3 against
/// 11 M records/s between two builds of the same loop).
/// `key_at(j)` is the key of the `j`th record (or window) of the batch, if there is one.
#[inline]
pub(crate) fn prefetch_state_ahead<'a>(
    state: &KeyedState,
    i: usize,
    key_at: impl Fn(usize) -> Option<&'a Key>,
) {
    for (ahead, step) in [(2 * PREFETCH_AHEAD, 0), (PREFETCH_AHEAD, 1)] {
        if let Some(key) = key_at(i + ahead) {
            state.prefetch(0, key, step);
        }
    }
}

/// The key of record `i` of a batch, for `prefetch_state_ahead`.
#[inline]
pub(crate) fn key_in(batch: &[Record], i: usize) -> Option<&Key> {
    batch.get(i).and_then(|r| r.key.as_ref())
}

impl Operator for AggOp {
    fn process(&mut self, mut input: Vec<Record>, out: &mut Vec<Record>) -> Result<(), String> {
        for i in 0..input.len() {
            prefetch_state_ahead(&self.state, i, |j| key_in(&input, j));
            let rec = &mut input[i];
            let key = rec.key.take().ok_or_else(|| NO_KEY.to_owned())?;
            let kg = self.state.group_of_key(&key)?;
            let input_value = match self.field {
                None => Value::Int(1),
                Some(f) => {
                    let v = rec.get(f).cloned().unwrap_or(Value::Null);
                    if !self.ty.admits(&v) {
                        return Err(format!(
                            "field '{f}' is {} ({v}) but the {} is declared {}",
                            v.type_name(),
                            self.out_field,
                            self.ty
                        ));
                    }
                    self.ty.coerce(v)
                }
            };
            let table = self.state.table_mut(0, kg);
            let result = match table.get_mut_hashed(key.hash, &key.value) {
                Some(StateEntry::Value(row)) => {
                    let current = &row[0];
                    let next = match self.kind {
                        AggKind::Count | AggKind::Sum => add(current, &input_value)?,
                        // A record without the field leaves min and max as they are.
                        _ if matches!(input_value, Value::Null) => current.clone(),
                        kind => pick(kind, current, &input_value),
                    };
                    row.make_mut()[0] = self.ty.coerce(next.clone());
                    next
                }
                _ => {
                    table.insert_hashed(
                        key.hash,
                        key.value.clone(),
                        StateEntry::Value(StateRow::from([input_value.clone()])),
                    );
                    input_value
                }
            };
            // The input record becomes the output, in place: key and result.
            rec.fields.clear();
            rec.fields.push((*KEY, key.value));
            rec.fields.push((self.out_field, result));
        }
        hand_over(input, out);
        Ok(())
    }
    fn snapshot(&mut self, _id: u64) -> Result<SubtaskSnapshot, String> {
        Ok(keyed_snapshot(&mut self.state))
    }
    fn keyed_state(&mut self) -> Option<&mut KeyedState> {
        Some(&mut self.state)
    }
}

struct ReduceField {
    name: Name,
    ty: FieldType,
    default: Value,
    expr: Expr,
}

struct ReduceOp {
    uid: String,
    fields: Vec<ReduceField>,
    state: KeyedState,
}

impl Operator for ReduceOp {
    fn process(&mut self, input: Vec<Record>, out: &mut Vec<Record>) -> Result<(), String> {
        out.reserve(input.len());
        for rec in input {
            let key = key_of(&rec)?.clone();
            let kg = self.state.group_of_key(&key)?;
            let current: StateRow = match self.state.table(0, kg).get_hashed(key.hash, &key.value) {
                Some(StateEntry::Value(row)) => row.clone(),
                _ => StateRow::from(
                    self.fields
                        .iter()
                        .map(|f| f.default.clone())
                        .collect::<Vec<_>>(),
                ),
            };
            let acc: Vec<(&str, &Value)> = self
                .fields
                .iter()
                .zip(current.iter())
                .map(|(f, v)| (f.name.as_str(), v))
                .collect();
            let mut next = Vec::with_capacity(self.fields.len());
            for f in &self.fields {
                let v = f
                    .expr
                    .eval(&rec, Some(&acc))
                    .map_err(|e| format!("reduce '{}' field '{}': {e}", self.uid, f.name))?;
                if !f.ty.admits(&v) {
                    return Err(format!(
                        "reduce '{}' field '{}': '{}' produced {} ({v}), but the field is declared {}",
                        self.uid,
                        f.name,
                        f.expr.source(),
                        v.type_name(),
                        f.ty
                    ));
                }
                next.push(f.ty.coerce(v));
            }
            let mut fields = Fields::with_capacity(next.len() + 1);
            fields.push((*KEY, key.value.clone()));
            fields.extend(self.fields.iter().map(|f| f.name).zip(next.iter().cloned()));
            self.state.table_mut(0, kg).insert_hashed(
                key.hash,
                key.value,
                StateEntry::Value(StateRow::from(next)),
            );
            out.push(Record { fields, key: None });
        }
        Ok(())
    }
    fn snapshot(&mut self, _id: u64) -> Result<SubtaskSnapshot, String> {
        Ok(keyed_snapshot(&mut self.state))
    }
    fn keyed_state(&mut self) -> Option<&mut KeyedState> {
        Some(&mut self.state)
    }
}

struct DedupeOp {
    state: KeyedState,
}

impl Operator for DedupeOp {
    fn process(&mut self, input: Vec<Record>, out: &mut Vec<Record>) -> Result<(), String> {
        out.reserve(input.len());
        for mut rec in input {
            let key = key_of(&rec)?;
            let kg = self.state.group_of_key(key)?;
            let table = self.state.table_mut(0, kg);
            if table.get_hashed(key.hash, &key.value).is_none() {
                table.insert_hashed(
                    key.hash,
                    key.value.clone(),
                    StateEntry::Value(StateRow::from([Value::Bool(true)])),
                );
                rec.key = None;
                out.push(rec);
            }
        }
        Ok(())
    }
    fn snapshot(&mut self, _id: u64) -> Result<SubtaskSnapshot, String> {
        Ok(keyed_snapshot(&mut self.state))
    }
    fn keyed_state(&mut self) -> Option<&mut KeyedState> {
        Some(&mut self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed_min() -> AggOp {
        let state = KeyedState::new(KeyGroupRange { start: 0, end: 127 }, 128, 1);
        AggOp::new(AggKind::Min, Some("price"), FieldType::Int, state)
    }

    fn rec(price: Option<i64>) -> Record {
        let mut r = Record::default();
        if let Some(p) = price {
            r.set(intern("price"), Value::Int(p));
        }
        r.key = Some(Key::new(Value::from("a")));
        r
    }

    #[test]
    fn a_keyed_min_keeps_its_value_over_a_record_without_the_field() {
        let mut op = keyed_min();
        let mut out = Vec::new();
        op.process(vec![rec(Some(7)), rec(None), rec(Some(9))], &mut out)
            .unwrap();
        let mins: Vec<Option<&Value>> = out.iter().map(|r| r.get(intern("min"))).collect();
        assert_eq!(
            mins,
            [
                Some(&Value::Int(7)),
                Some(&Value::Int(7)),
                Some(&Value::Int(7))
            ]
        );
    }
}

//! Event-time windows per key: tumbling, sliding and session windows, several aggregates and a
//! reduce per window, and allowed lateness.
//!
//! State: one map per key, window start -> row. The row holds each aggregate's accumulator
//! (an average keeps a sum and a count), then the reduce's accumulator fields, then for session
//! windows the session's end, then with allowed lateness whether the window has fired. The row's layout is the declared state
//! schema (`graph::window_schema`), so adding an aggregate is a schema change the restore
//! rules decide on like any other.
//!
//! Firing: a window `[start, end)` fires when the watermark reaches `end - 1`. Without allowed
//! lateness its state goes then; with it, the state stays until the watermark reaches
//! `end - 1 + lateness`, and each record arriving in between updates the window and fires it
//! again. Later records are dropped (counted), or emitted marked `late: true` with
//! `lateRecords: emit`.

use super::expr::Expr;
use super::operators::{Operator, add, keep_max, keep_min, key_in, key_of, prefetch_state_ahead};
use super::spec::{LateRecords, WindowAggregate, WindowSpec};
use super::state::KeyedState;
use super::timers::Timers;
use crate::savepoint::schema::{FieldSchema, FieldType, StateSchema};
use crate::savepoint::statefile::{MapEntries, StateEntry, SubtaskSnapshot};
use crate::savepoint::value::{Fields, Key, Name, Record, Row, Value, intern};
use std::sync::Arc;

/// A window due at a watermark: (key group, key with its hash, window start).
type Due = (u32, Key, i64);

/// One aggregate as a window computes it.
#[derive(Clone, Debug)]
struct Agg {
    out: Name,
    function: WindowAggregate,
    field: Option<Name>,
    /// Its first column in the row (an average has two: sum, count).
    column: usize,
}

/// How a new window's row is made from its first record when the row holds aggregates of one
/// field (or counts only): what folding that record into the empty row gives, without the fold.
#[derive(Clone, Debug)]
struct FirstRow {
    /// The field the aggregates read.
    field: Option<Name>,
    columns: Vec<FirstColumn>,
}

#[derive(Clone, Copy, Debug)]
enum FirstColumn {
    /// A count: 1.
    One,
    /// A sum, min, max or an average's sum: the field's value (null when absent).
    Value,
    /// An average's count: 1 if the field has a value, else 0.
    CountOfValue,
}

impl FirstRow {
    /// For fixed windows with aggregates only, of at most one field; None otherwise.
    fn of(aggs: &[Agg]) -> Option<FirstRow> {
        let mut field = None;
        let mut columns = Vec::new();
        for a in aggs {
            if a.function == WindowAggregate::Count {
                columns.push(FirstColumn::One);
                continue;
            }
            match (a.field, field) {
                (Some(f), None) => field = Some(f),
                (Some(f), Some(g)) if f == g => {}
                // Another field, or none (the job file's check refuses that).
                _ => return None,
            }
            columns.push(FirstColumn::Value);
            if a.function == WindowAggregate::Avg {
                columns.push(FirstColumn::CountOfValue);
            }
        }
        Some(FirstRow { field, columns })
    }

    fn row(&self, rec: &Record) -> Row {
        let v = self.field.and_then(|f| rec.get(f)).unwrap_or(&Value::Null);
        let counted = Value::Int(i64::from(!matches!(v, Value::Null)));
        self.columns
            .iter()
            .map(|c| match c {
                FirstColumn::One => Value::Int(1),
                FirstColumn::Value => v.clone(),
                FirstColumn::CountOfValue => counted.clone(),
            })
            .collect()
    }
}

/// One accumulator field of a windowed reduce.
struct Reduced {
    name: Name,
    ty: FieldType,
    expr: Expr,
    column: usize,
}

#[derive(Clone, Copy, Debug)]
enum Assigner {
    /// Tumbling when `slide == size`.
    Fixed {
        size: i64,
        slide: i64,
    },
    Session {
        gap: i64,
    },
}

/// A window's aggregates as declared: (output name, function, field).
pub fn aggregates_of(w: &WindowSpec) -> Vec<(String, WindowAggregate, Option<String>)> {
    match w.aggregate {
        Some(a) => vec![(default_name(a).to_owned(), a, w.field.clone())],
        None => w
            .aggregates
            .iter()
            .map(|a| (a.name.clone(), a.aggregate, a.field.clone()))
            .collect(),
    }
}

/// The output name of the single `aggregate` form.
pub fn default_name(a: WindowAggregate) -> &'static str {
    match a {
        WindowAggregate::Count => "count",
        WindowAggregate::Sum => "sum",
        WindowAggregate::Min => "min",
        WindowAggregate::Max => "max",
        WindowAggregate::Avg => "avg",
    }
}

/// The schema of the `windows` map state.
pub fn window_schema(w: &WindowSpec) -> StateSchema {
    let field = |name: String, ty: FieldType, default: serde_json::Value| FieldSchema {
        name,
        ty,
        default: Some(default),
    };
    let mut fields = Vec::new();
    for (name, a, _) in aggregates_of(w) {
        match a {
            WindowAggregate::Count => fields.push(field(name, FieldType::Int, 0.into())),
            WindowAggregate::Avg => {
                fields.push(field(
                    format!("{name}.sum"),
                    FieldType::Any,
                    serde_json::Value::Null,
                ));
                fields.push(field(format!("{name}.count"), FieldType::Int, 0.into()));
            }
            _ => fields.push(field(name, FieldType::Any, serde_json::Value::Null)),
        }
    }
    for f in &w.reduce {
        fields.push(FieldSchema {
            name: f.name.clone(),
            ty: f.ty,
            default: f.default.clone(),
        });
    }
    if w.gap.is_some() {
        // No default: a window without an end cannot become a session.
        fields.push(FieldSchema {
            name: "sessionEnd".into(),
            ty: FieldType::Int,
            default: None,
        });
    }
    if w.allowed_lateness.is_some() {
        fields.push(field("fired".into(), FieldType::Bool, false.into()));
    }
    StateSchema { fields }
}

/// `slot += v`, as `add` does it; integers without building a new value.
fn add_in_place(slot: &mut Value, v: &Value) -> Result<(), String> {
    if let (Value::Int(a), Value::Int(b)) = (&mut *slot, v)
        && let Some(sum) = a.checked_add(*b)
    {
        *a = sum;
        return Ok(());
    }
    *slot = add(slot, v)?;
    Ok(())
}

/// Where records later than the allowed lateness go.
#[derive(Clone, Copy, PartialEq)]
enum LateOutcome {
    Drop,
    /// Downstream, marked `late: true`.
    Emit,
    /// To the window's late sink.
    Aside,
}

pub(crate) struct WindowOp {
    assigner: Assigner,
    time_field: Name,
    aggs: Vec<Agg>,
    reduce: Vec<Reduced>,
    uid: String,
    /// The row of a new window.
    empty: Row,
    /// With aggregates only (no reduce, fixed windows, no allowed lateness): how a new
    /// window's row is made from its first record.
    first: Option<FirstRow>,
    end_column: Option<usize>,
    fired_column: Option<usize>,
    lateness: i64,
    late_records: LateOutcome,
    /// Late records for the late sink, until the task takes them.
    side: Vec<Record>,
    state: KeyedState,
    /// (due, key group, key, window start): the window fires, or with allowed lateness once
    /// fired, goes, when the watermark reaches `due`. Rebuilt from state on restore.
    /// Entries are not removed when a window changes (a session merged or extended): a
    /// timer whose due no longer matches its window's is stale and skipped when it comes.
    timers: Timers<Due>,
    watermark: i64,
    late: u64,
    names: OutNames,
}

struct OutNames {
    key: Name,
    start: Name,
    end: Name,
    late: Name,
}

fn millis(field: &str, text: &str) -> Result<i64, String> {
    let d = super::spec::parse_duration(field, text)?;
    let ms = d.as_millis().min(i64::MAX as u128) as i64;
    if ms <= 0 {
        return Err(format!("{field}: must be at least 1ms"));
    }
    Ok(ms)
}

impl WindowOp {
    pub fn new(uid: &str, w: &WindowSpec, state: KeyedState) -> Result<WindowOp, String> {
        let assigner = match (&w.size, &w.gap) {
            (Some(size), None) => {
                let size = millis("size", size)?;
                let slide = match &w.slide {
                    Some(s) => millis("slide", s)?,
                    None => size,
                };
                Assigner::Fixed { size, slide }
            }
            (None, Some(gap)) => Assigner::Session {
                gap: millis("gap", gap)?,
            },
            _ => return Err("a window has either size (and slide) or gap".into()),
        };
        let mut aggs = Vec::new();
        let mut column = 0;
        for (name, function, field) in aggregates_of(w) {
            aggs.push(Agg {
                out: intern(&name),
                function,
                field: field.as_deref().map(intern),
                column,
            });
            column += if function == WindowAggregate::Avg {
                2
            } else {
                1
            };
        }
        let mut reduce = Vec::new();
        for f in &w.reduce {
            reduce.push(Reduced {
                name: intern(&f.name),
                ty: f.ty,
                expr: Expr::compile(&f.expr)?,
                column,
            });
            column += 1;
        }
        // A new window: each field's default (the end of a session is set when it opens).
        let empty: Row = window_schema(w)
            .fields
            .iter()
            .map(|f| match &f.default {
                Some(d) => f.ty.coerce(Value::from_json(d)),
                None => Value::Null,
            })
            .collect();
        let first = (reduce.is_empty() && w.gap.is_none() && w.allowed_lateness.is_none())
            .then(|| FirstRow::of(&aggs))
            .flatten();
        let end_column = w.gap.as_ref().map(|_| column);
        let fired_column = w
            .allowed_lateness
            .as_ref()
            .map(|_| column + usize::from(end_column.is_some()));
        Ok(WindowOp {
            assigner,
            time_field: intern(&w.time_field),
            aggs,
            reduce,
            uid: uid.to_owned(),
            empty,
            first,
            end_column,
            fired_column,
            lateness: match &w.allowed_lateness {
                Some(l) => millis("allowedLateness", l)?,
                None => 0,
            },
            late_records: match (&w.late_sink, w.late_records) {
                (Some(_), _) => LateOutcome::Aside,
                (None, LateRecords::Emit) => LateOutcome::Emit,
                (None, LateRecords::Drop) => LateOutcome::Drop,
            },
            side: Vec::new(),
            state,
            timers: Timers::default(),
            watermark: i64::MIN,
            late: 0,
            names: OutNames {
                key: intern("key"),
                start: intern("windowStart"),
                end: intern("windowEnd"),
                late: intern("late"),
            },
        })
    }

    fn timestamp(&self, rec: &Record) -> Result<i64, String> {
        match rec.get(self.time_field) {
            Some(Value::Int(t)) => Ok(*t),
            Some(Value::Float(t)) => Ok(*t as i64),
            other => Err(format!(
                "window: the time field '{}' is {}, not a number of milliseconds",
                self.time_field,
                other.map(Value::type_name).unwrap_or("missing")
            )),
        }
    }

    /// Folds `rec` into `row`'s accumulators: the aggregates', then the reduce's (each
    /// expression sees the accumulator as it was before this record).
    fn accumulate(
        aggs: &[Agg],
        reduce: &[Reduced],
        uid: &str,
        row: &mut [Value],
        rec: &Record,
    ) -> Result<(), String> {
        Self::aggregate(aggs, row, rec)?;
        if reduce.is_empty() {
            return Ok(());
        }
        let before: Vec<Value> = reduce.iter().map(|f| row[f.column].clone()).collect();
        let acc: Vec<(&str, &Value)> = reduce
            .iter()
            .zip(&before)
            .map(|(f, v)| (f.name.as_str(), v))
            .collect();
        for f in reduce {
            let v = f
                .expr
                .eval(rec, Some(&acc))
                .map_err(|e| format!("window '{uid}' reduce field '{}': {e}", f.name))?;
            if !f.ty.admits(&v) {
                return Err(format!(
                    "window '{uid}' reduce field '{}': '{}' produced {} ({v}), but the field is declared {}",
                    f.name,
                    f.expr.source(),
                    v.type_name(),
                    f.ty
                ));
            }
            row[f.column] = f.ty.coerce(v);
        }
        Ok(())
    }

    fn aggregate(aggs: &[Agg], row: &mut [Value], rec: &Record) -> Result<(), String> {
        // Aggregates of one field usually come together (count, sum, min, max, avg of the
        // value): the field is looked up once for a run of them.
        let mut looked_up: Option<(Name, &Value)> = None;
        for a in aggs {
            let v = match (a.field, looked_up) {
                (None, _) => &Value::Null,
                (Some(f), Some((g, v))) if f == g => v,
                (Some(f), _) => {
                    let v = rec.get(f).unwrap_or(&Value::Null);
                    looked_up = Some((f, v));
                    v
                }
            };
            let c = a.column;
            match a.function {
                WindowAggregate::Count => add_in_place(&mut row[c], &Value::Int(1))?,
                WindowAggregate::Sum => add_in_place(&mut row[c], v)?,
                WindowAggregate::Min => keep_min(&mut row[c], v),
                WindowAggregate::Max => keep_max(&mut row[c], v),
                WindowAggregate::Avg => {
                    if !matches!(v, Value::Null) {
                        add_in_place(&mut row[c], v)?;
                        add_in_place(&mut row[c + 1], &Value::Int(1))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Folds the accumulators of `from` into `into` (merging sessions).
    fn merge(aggs: &[Agg], into: &mut [Value], from: &[Value]) -> Result<(), String> {
        for a in aggs {
            let c = a.column;
            match a.function {
                WindowAggregate::Count | WindowAggregate::Sum => into[c] = add(&into[c], &from[c])?,
                WindowAggregate::Min => keep_min(&mut into[c], &from[c]),
                WindowAggregate::Max => keep_max(&mut into[c], &from[c]),
                WindowAggregate::Avg => {
                    into[c] = add(&into[c], &from[c])?;
                    into[c + 1] = add(&into[c + 1], &from[c + 1])?;
                }
            }
        }
        Ok(())
    }

    fn result(&self, key: &Value, start: i64, end: i64, row: &[Value]) -> Record {
        // Pushed, not set: the names are distinct (the job file's check).
        let mut fields = Fields::with_capacity(3 + self.aggs.len() + self.reduce.len());
        fields.push((self.names.key, key.clone()));
        fields.push((self.names.start, Value::Int(start)));
        fields.push((self.names.end, Value::Int(end)));
        for a in &self.aggs {
            let v = match a.function {
                WindowAggregate::Avg => match (row[a.column].as_f64(), &row[a.column + 1]) {
                    (Some(sum), Value::Int(n)) if *n > 0 => Value::Float(sum / *n as f64),
                    _ => Value::Null,
                },
                _ => row[a.column].clone(),
            };
            fields.push((a.out, v));
        }
        for f in &self.reduce {
            fields.push((f.name, row[f.column].clone()));
        }
        Record { fields, key: None }
    }

    fn end_of(&self, start: i64, row: &[Value]) -> i64 {
        match (self.assigner, self.end_column) {
            (Assigner::Session { .. }, Some(c)) => match row.get(c) {
                Some(Value::Int(e)) => *e,
                _ => start,
            },
            (Assigner::Fixed { size, .. }, _) | (Assigner::Session { gap: size }, None) => {
                start + size
            }
        }
    }

    fn fired(&self, row: &[Value]) -> bool {
        self.fired_column
            .is_some_and(|c| matches!(row.get(c), Some(Value::Bool(true))))
    }

    /// When the window's timer is due: at its end, or once fired at the end of its lateness.
    fn due(&self, end: i64, fired: bool) -> i64 {
        if fired {
            (end - 1).saturating_add(self.lateness)
        } else {
            end - 1
        }
    }

    fn is_late(&self, end: i64) -> bool {
        (end - 1).saturating_add(self.lateness) <= self.watermark
    }

    /// Adds `rec` to the fixed window `[start, end)`; false when that window is past its
    /// lateness.
    fn add_fixed(
        &mut self,
        kg: u32,
        key: &Key,
        start: i64,
        end: i64,
        rec: &Record,
        out: &mut Vec<Record>,
    ) -> Result<bool, String> {
        if self.is_late(end) {
            return Ok(false);
        }
        let table = self.state.table_mut(0, kg);
        let StateEntry::Map(windows) =
            table.get_or_insert_with_hashed(key.hash, &key.value, || {
                StateEntry::Map(MapEntries::with_capacity(1))
            })
        else {
            return Err("window: state of another kind under this key".into());
        };
        let mut created = false;
        let row = windows.entry(Value::Int(start)).or_insert_with(|| {
            created = true;
            match &self.first {
                Some(first) => first.row(rec),
                // A row of its own at once (one allocation), not the shared empty one that
                // `make_mut` would copy next.
                None => self.empty.iter().cloned().collect(),
            }
        });
        let row = Arc::make_mut(row);
        if !(created && self.first.is_some()) {
            Self::accumulate(&self.aggs, &self.reduce, &self.uid, row, rec)?;
        }
        // Past its end (within the lateness): it fires now, and is kept as fired.
        let refire = end - 1 <= self.watermark;
        if let (true, Some(c)) = (refire, self.fired_column) {
            row[c] = Value::Bool(true);
        }
        let result = refire.then(|| row.to_vec());
        if created {
            self.add_timer(self.due(end, refire), kg, key.clone(), start);
        }
        if let Some(row) = result {
            // A late record within the allowed lateness: the window fires again, updated.
            out.push(self.result(&key.value, start, end, &row));
        }
        Ok(true)
    }

    /// Adds `rec` at `ts` to its key's sessions, merging those it bridges; false when the
    /// merged session is past its lateness.
    fn add_session(
        &mut self,
        kg: u32,
        key: &Key,
        ts: i64,
        gap: i64,
        rec: &Record,
        out: &mut Vec<Record>,
    ) -> Result<bool, String> {
        let end_column = self
            .end_column
            .ok_or("window: session without an end column")?;
        let mut start = ts;
        let mut end = ts.saturating_add(gap);
        // The sessions this record's [ts, ts + gap) touches: sessions do not overlap, so
        // walking back from the last one starting by `end` finds them all.
        let mut merged: Vec<(i64, Row)> = Vec::new();
        if let Some(StateEntry::Map(windows)) =
            self.state.table(0, kg).get_hashed(key.hash, &key.value)
        {
            let after = match windows.find_index(&Value::Int(end)) {
                Ok(i) => i + 1,
                Err(i) => i,
            };
            for (s, row) in (0..after).rev().filter_map(|i| windows.get_indexed(i)) {
                let Value::Int(s) = s else { continue };
                let e = self.end_of(*s, row);
                if e < start {
                    break;
                }
                merged.push((*s, row.clone()));
                start = start.min(*s);
                end = end.max(e);
            }
        }
        if self.is_late(end) {
            return Ok(false);
        }
        let mut row: Vec<Value> = self.empty.to_vec();
        // The merged sessions' timers go stale; the same session unchanged keeps its own.
        let mut unchanged = false;
        for (s, old) in &merged {
            Self::merge(&self.aggs, &mut row, old)?;
            unchanged |= *s == start && self.end_of(*s, old) == end;
        }
        Self::accumulate(&self.aggs, &self.reduce, &self.uid, &mut row, rec)?;
        row[end_column] = Value::Int(end);
        let refire = end - 1 <= self.watermark;
        if let Some(c) = self.fired_column {
            // A session that reaches past the watermark again fires again when it ends.
            row[c] = Value::Bool(refire);
        }
        let was_fired = merged
            .iter()
            .find(|(s, _)| *s == start)
            .is_some_and(|(_, old)| self.fired(old));
        let table = self.state.table_mut(0, kg);
        let StateEntry::Map(windows) =
            table.get_or_insert_with_hashed(key.hash, &key.value, || {
                StateEntry::Map(MapEntries::with_capacity(1))
            })
        else {
            return Err("window: state of another kind under this key".into());
        };
        for (s, _) in &merged {
            windows.remove(&Value::Int(*s));
        }
        windows.insert(Value::Int(start), Row::from(row.clone()));
        // Registered once per (due, window): a second timer at the same due would fire it twice.
        if !(unchanged && was_fired == refire) {
            self.add_timer(self.due(end, refire), kg, key.clone(), start);
        }
        if refire {
            out.push(self.result(&key.value, start, end, &row));
        }
        Ok(true)
    }

    fn add_timer(&mut self, due: i64, kg: u32, key: Key, start: i64) {
        self.timers.add(due, (kg, key, start));
    }

    fn fire(&mut self, up_to: i64, out: &mut Vec<Record>) {
        // The state is held apart while windows fire, so that each window is looked up once
        // with the operator's other fields at hand.
        let mut state = self.state.take();
        // Sized up front, for every bucket of timers this watermark reaches: it can fire
        // thousands of windows, and a vector grown step by step copies its records each time.
        out.reserve(self.timers.len_up_to(up_to));
        // Bucket by bucket; a window fired with allowed lateness registers a timer that can be
        // due already, taken in a later round.
        while let Some(due) = self.timers.take_next_due(up_to) {
            for (i, (at, (kg, key, start))) in due.iter().enumerate() {
                // Each window is looked up (a timer keeps its key's hash): its state's memory
                // is asked for a few windows ahead, as a batch's records do.
                prefetch_state_ahead(&state, i, |j| due.get(j).map(|(_, (_, k, _))| k));
                self.fire_one(&mut state, *at, *kg, key, *start, out);
            }
        }
        self.state = state;
    }

    /// Fires (or with allowed lateness, keeps as fired or drops) one window whose timer is
    /// due, unless the timer is stale.
    fn fire_one(
        &mut self,
        state: &mut KeyedState,
        due: i64,
        kg: u32,
        key: &Key,
        start: i64,
        out: &mut Vec<Record>,
    ) {
        let table = state.table_mut(0, kg);
        table.edit_or_remove_hashed(key.hash, &key.value, |entry| {
            let StateEntry::Map(windows) = entry else {
                return false;
            };
            let Some(row) = windows.get_mut(&Value::Int(start)) else {
                return false;
            };
            let end = self.end_of(start, row);
            let fired = self.fired(row);
            if self.due(end, fired) != due {
                return false;
            }
            if !fired {
                out.push(self.result(&key.value, start, end, row));
            }
            let keep = !fired && self.lateness > 0 && !self.is_late(end);
            if keep {
                if let Some(c) = self.fired_column {
                    Arc::make_mut(row)[c] = Value::Bool(true);
                }
                self.add_timer(self.due(end, true), kg, key.clone(), start);
                return false;
            }
            windows.remove(&Value::Int(start));
            // The key goes with its last window.
            windows.is_empty()
        });
    }
}

impl Operator for WindowOp {
    fn process(&mut self, mut input: Vec<Record>, out: &mut Vec<Record>) -> Result<(), String> {
        // By reference: a record is moved out only when it goes on (late), not copied out of
        // the batch for each one.
        for i in 0..input.len() {
            prefetch_state_ahead(&self.state, i, |j| key_in(&input, j));
            let rec = &mut input[i];
            // The key is borrowed: cloned only for a new key's state or a new window's timer.
            let key = key_of(rec)?;
            let kg = self.state.group_of_key(key)?;
            let ts = self.timestamp(rec)?;
            let taken = match self.assigner {
                Assigner::Fixed { size, slide } => {
                    let mut taken = false;
                    let mut start = ts - ts.rem_euclid(slide);
                    while start > ts - size {
                        taken |= self.add_fixed(kg, key, start, start + size, rec, out)?;
                        start -= slide;
                    }
                    taken
                }
                Assigner::Session { gap } => self.add_session(kg, key, ts, gap, rec, out)?,
            };
            if !taken {
                match self.late_records {
                    LateOutcome::Drop => self.late += 1,
                    LateOutcome::Emit => {
                        self.late += 1;
                        let mut rec = std::mem::take(rec);
                        rec.set(self.names.late, Value::Bool(true));
                        out.push(rec);
                    }
                    // As Flink's side output for late data: not counted as dropped.
                    LateOutcome::Aside => self.side.push(std::mem::take(rec)),
                }
            }
        }
        Ok(())
    }

    fn on_watermark(&mut self, watermark: i64, out: &mut Vec<Record>) -> Result<(), String> {
        if watermark > self.watermark {
            self.watermark = watermark;
            self.fire(watermark, out);
        }
        Ok(())
    }

    fn late_records_dropped(&self) -> u64 {
        self.late
    }

    fn take_side_output(&mut self) -> Vec<Record> {
        std::mem::take(&mut self.side)
    }

    fn snapshot(&mut self, _id: u64) -> Result<SubtaskSnapshot, String> {
        Ok(SubtaskSnapshot {
            keyed: Some(self.state.snapshot()),
            operator_lists: Vec::new(),
        })
    }

    fn keyed_state(&mut self) -> Option<&mut KeyedState> {
        Some(&mut self.state)
    }

    fn restored(&mut self) {
        let mut timers = Timers::default();
        for (kg, key, entry) in self.state.iter(0) {
            if let StateEntry::Map(windows) = entry {
                for (start, row) in windows.iter() {
                    if let Value::Int(s) = start {
                        let end = self.end_of(*s, row);
                        let due = self.due(end, self.fired(row));
                        timers.add(due, (kg, Key::new(key.clone()), *s));
                    }
                }
            }
        }
        self.timers = timers;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::spec::OperatorSpec;
    use crate::savepoint::keygroups::KeyGroupRange;

    fn window(yaml: &str) -> WindowOp {
        let spec: OperatorSpec = serde_yaml::from_str(yaml).unwrap();
        let OperatorSpec::Window(w) = spec else {
            panic!("not a window")
        };
        let state = KeyedState::new(KeyGroupRange { start: 0, end: 127 }, 128, 1);
        WindowOp::new("w", &w, state).unwrap()
    }

    fn rec(key: &str, ts: i64, value: i64) -> Record {
        let mut r = Record::default();
        r.set(intern("ts"), Value::Int(ts));
        r.set(intern("value"), Value::Int(value));
        r.key = Some(Key::new(Value::from(key)));
        r
    }

    fn run(w: &mut WindowOp, records: Vec<Record>, watermark: i64) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        w.process(records, &mut out).unwrap();
        w.on_watermark(watermark, &mut out).unwrap();
        out.iter()
            .map(|r| {
                let mut buf = Vec::new();
                r.write_json(&mut buf).unwrap();
                serde_json::from_slice(&buf).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_new_windows_row_is_its_first_record_folded_into_the_empty_row() {
        let w = window(
            "{kind: window, uid: w, size: 10ms, aggregates: [{name: n, aggregate: count}, {name: total, aggregate: sum, field: value}, {name: low, aggregate: min, field: value}, {name: n2, aggregate: count}, {name: high, aggregate: max, field: value}, {name: mean, aggregate: avg, field: value}]}",
        );
        let first = w.first.clone().expect("aggregates of one field");
        let values = [
            Some(Value::Int(5)),
            Some(Value::Float(2.5)),
            Some(Value::from("x")),
            Some(Value::Null),
            None,
        ];
        for v in values {
            let mut r = Record::default();
            r.set(intern("ts"), Value::Int(1));
            if let Some(v) = &v {
                r.set(intern("value"), v.clone());
            }
            r.set(intern("other"), Value::Int(9));
            let mut folded = w.empty.to_vec();
            WindowOp::accumulate(&w.aggs, &w.reduce, &w.uid, &mut folded, &r).unwrap();
            assert_eq!(first.row(&r).to_vec(), folded, "{v:?}");
        }
        // Sessions, allowed lateness, reduces and aggregates of two fields fold every record.
        for yaml in [
            "{kind: window, uid: w, size: 10ms, aggregates: [{name: a, aggregate: sum, field: value}, {name: b, aggregate: max, field: other}]}",
            "{kind: window, uid: w, gap: 10ms, aggregate: count}",
            "{kind: window, uid: w, size: 10ms, allowedLateness: 5ms, aggregate: count}",
            "{kind: window, uid: w, size: 10ms, aggregate: count, reduce: [{name: last, type: int, default: -1, expr: value}]}",
        ] {
            assert!(window(yaml).first.is_none(), "{yaml}");
        }
    }

    #[test]
    fn several_aggregates_fire_when_the_watermark_reaches_the_end() {
        let mut w = window(
            "{kind: window, uid: w, size: 10ms, aggregates: [{name: n, aggregate: count}, {name: total, aggregate: sum, field: value}, {name: low, aggregate: min, field: value}, {name: high, aggregate: max, field: value}, {name: mean, aggregate: avg, field: value}]}",
        );
        let out = run(
            &mut w,
            vec![rec("a", 1, 4), rec("a", 5, 8), rec("a", 12, 1)],
            8,
        );
        assert!(out.is_empty(), "fired early: {out:?}");
        let out = run(&mut w, vec![], 9);
        assert_eq!(
            out,
            vec![
                serde_json::json!({"key": "a", "windowStart": 0, "windowEnd": 10, "n": 2, "total": 12, "low": 4, "high": 8, "mean": 6.0})
            ]
        );
        // A record for the fired window is late: dropped and counted.
        let out = run(&mut w, vec![rec("a", 3, 100)], 9);
        assert!(out.is_empty());
        assert_eq!(w.late_records_dropped(), 1);
    }

    #[test]
    fn min_and_max_skip_records_without_the_field_and_compare_large_ints_exactly() {
        let mut w = window(
            "{kind: window, uid: w, size: 10ms, aggregates: [{name: n, aggregate: count}, {name: low, aggregate: min, field: value}, {name: high, aggregate: max, field: value}]}",
        );
        let mut bare = Record::default();
        bare.set(intern("ts"), Value::Int(2));
        bare.key = Some(Key::new(Value::from("a")));
        // 2^53 + 1 and 2^53 are the same f64.
        let big = (1i64 << 53) + 1;
        let out = run(
            &mut w,
            vec![rec("a", 1, big), rec("a", 3, big - 1), bare],
            9,
        );
        assert_eq!(
            out,
            vec![
                serde_json::json!({"key": "a", "windowStart": 0, "windowEnd": 10, "n": 3, "low": big - 1, "high": big})
            ]
        );
    }

    #[test]
    fn a_reduce_per_window_sees_the_accumulator_and_the_record() {
        let mut w = window(
            "{kind: window, uid: w, size: 10ms, aggregate: count, reduce: [{name: spread, type: int, default: 0, expr: 'acc.spread + value * value'}, {name: last, type: int, default: -1, expr: value}]}",
        );
        let mut out = run(
            &mut w,
            vec![rec("a", 1, 2), rec("a", 2, 3), rec("b", 3, 7)],
            9,
        );
        out.sort_by_key(|v| v["key"].as_str().map(str::to_owned));
        assert_eq!(
            out,
            vec![
                serde_json::json!({"key": "a", "windowStart": 0, "windowEnd": 10, "count": 2, "spread": 13, "last": 3}),
                serde_json::json!({"key": "b", "windowStart": 0, "windowEnd": 10, "count": 1, "spread": 49, "last": 7}),
            ]
        );
    }

    #[test]
    fn allowed_lateness_updates_and_refires_then_drops_or_emits_later_records() {
        let mut w = window(
            "{kind: window, uid: w, size: 10ms, aggregate: count, allowedLateness: 5ms, lateRecords: emit}",
        );
        let out = run(&mut w, vec![rec("a", 1, 0)], 9);
        assert_eq!(out[0]["count"], 1);
        // Within the lateness: the window fires again, updated.
        let out = run(&mut w, vec![rec("a", 2, 0)], 10);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["count"], 2);
        // The lateness is over at 9 + 5: the state goes, later records come out marked.
        let out = run(&mut w, vec![], 14);
        assert!(out.is_empty());
        let out = run(&mut w, vec![rec("a", 3, 0)], 14);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0]["late"], true);
        assert_eq!(w.late_records_dropped(), 1);
        assert_eq!(w.state.len(), 0, "window state left after its lateness");
    }

    #[test]
    fn records_past_the_lateness_go_aside_for_the_late_sink_uncounted() {
        let mut w = window(
            "{kind: window, uid: w, size: 10ms, aggregate: count, lateSink: {kind: discardSink}}",
        );
        let out = run(&mut w, vec![rec("a", 1, 0)], 9);
        assert_eq!(out.len(), 1);
        let out = run(&mut w, vec![rec("a", 2, 0), rec("b", 12, 0)], 9);
        assert!(out.is_empty(), "{out:?}");
        let aside = w.take_side_output();
        assert_eq!(aside.len(), 1);
        assert_eq!(aside[0].key, Some(Key::new(Value::from("a"))));
        let json = aside[0].to_json();
        assert_eq!(json["ts"], 2);
        assert!(json.get("late").is_none(), "{json}");
        assert!(w.take_side_output().is_empty(), "taken twice");
        assert_eq!(w.late_records_dropped(), 0);
    }

    #[test]
    fn sessions_merge_when_a_record_bridges_them() {
        let mut w = window(
            "{kind: window, uid: w, gap: 10ms, aggregates: [{name: n, aggregate: count}, {name: total, aggregate: sum, field: value}]}",
        );
        // Two sessions of key a ([0, 10) and [15, 25)), one of b ([3, 13)).
        let out = run(
            &mut w,
            vec![rec("a", 0, 1), rec("a", 15, 2), rec("b", 3, 5)],
            5,
        );
        assert!(out.is_empty());
        // 8 opens [8, 18), which touches both: one session [0, 25).
        let out = run(&mut w, vec![rec("a", 8, 4)], 20);
        assert_eq!(
            out,
            vec![
                serde_json::json!({"key": "b", "windowStart": 3, "windowEnd": 13, "n": 1, "total": 5})
            ]
        );
        let out = run(&mut w, vec![], 24);
        assert_eq!(
            out,
            vec![
                serde_json::json!({"key": "a", "windowStart": 0, "windowEnd": 25, "n": 3, "total": 7})
            ]
        );
        assert_eq!(w.state.len(), 0);
    }

    #[test]
    fn timers_are_rebuilt_from_state_after_a_restore() {
        let mut w =
            window("{kind: window, uid: w, gap: 10ms, aggregate: count, allowedLateness: 100ms}");
        run(&mut w, vec![rec("a", 0, 1)], i64::MIN + 1);
        w.timers.clear();
        w.restored();
        let out = run(&mut w, vec![], 9);
        assert_eq!(out[0]["count"], 1);
        // Fired and kept for its lateness; a restore does not fire it again.
        w.timers.clear();
        w.restored();
        let out = run(&mut w, vec![], 50);
        assert!(out.is_empty(), "fired twice: {out:?}");
    }
}

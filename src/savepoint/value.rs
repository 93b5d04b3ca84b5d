//! The values that records carry and that state files hold.
//!
//! `Value` is deliberately small: null, bool, 64-bit int, 64-bit float and string. It has a
//! total order and a hash (floats by bit pattern) so it can be a key, a map-state key and a
//! sort key alike. Field names are interned as `&'static str`: there are few distinct names
//! (they come from job files and input schemas) and records are cloned across threads on the
//! hot path, where reference counting would bounce cache lines between cores.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

/// One value of a record field, a key, or a state field.
#[derive(Clone, Debug)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Arc<str>),
}

impl Value {
    fn rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) => 2,
            Value::Float(_) => 3,
            Value::Str(_) => 4,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
        }
    }

    /// Converts JSON into a value; arrays and objects are kept as their JSON text.
    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Int(i),
                None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Str(Arc::from(s.as_str())),
            other => Value::Str(Arc::from(other.to_string().as_str())),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Str(s) => serde_json::Value::String(s.to_string()),
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(Arc::from(v))
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            (Value::Str(a), Value::Str(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Value::Null => state.write_u8(0),
            Value::Bool(b) => state.write_u8(if *b { 2 } else { 1 }),
            Value::Int(i) => state.write_i64(*i),
            Value::Float(f) => state.write_u64(f.to_bits()),
            Value::Str(s) => s.hash(state),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => write!(f, "null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Str(s) => write!(f, "{s}"),
        }
    }
}

/// An interned field name.
pub type Name = &'static str;

/// Interns a field name: the same text always yields the same `&'static str`.
pub fn intern(name: &str) -> Name {
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    thread_local! {
        static LOCAL: std::cell::RefCell<HashSet<&'static str>> = std::cell::RefCell::new(HashSet::new());
    }
    if let Some(found) = LOCAL.with(|l| l.borrow().get(name).copied()) {
        return found;
    }
    let names = NAMES.get_or_init(|| Mutex::new(HashSet::new()));
    let mut guard = match names.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    let found = match guard.get(name) {
        Some(found) => *found,
        None => {
            let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
            guard.insert(leaked);
            leaked
        }
    };
    LOCAL.with(|l| l.borrow_mut().insert(found));
    found
}

/// Fields held inside a record without a heap allocation of their own: records this small
/// (the generator's five, an aggregate's two) cost no allocation and free per record.
const INLINE_FIELDS: usize = 5;

/// A record's fields, in order.
pub type Fields = smallvec::SmallVec<[(Name, Value); INLINE_FIELDS]>;

/// A record: named fields in order, and the key a keyBy gave it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Record {
    pub fields: Fields,
    pub key: Option<Value>,
}

impl Record {
    pub fn with_capacity(n: usize) -> Record {
        Record {
            fields: Fields::with_capacity(n),
            key: None,
        }
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Sets a field, replacing an existing one of the same name.
    pub fn set(&mut self, name: Name, value: Value) {
        match self.fields.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.fields.push((name, value)),
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut map = serde_json::Map::with_capacity(self.fields.len());
        for (n, v) in &self.fields {
            map.insert((*n).to_owned(), v.to_json());
        }
        serde_json::Value::Object(map)
    }

    pub fn from_json_object(obj: &serde_json::Map<String, serde_json::Value>) -> Record {
        Record {
            fields: obj
                .iter()
                .map(|(k, v)| (intern(k), Value::from_json(v)))
                .collect(),
            key: None,
        }
    }
}

/// A row of state: one value per field of the state's schema, in schema order. Shared, so
/// that copying a key group for copy-on-write snapshots copies pointers, not rows; a row
/// being updated while a snapshot still reads it is copied alone (`Arc::make_mut`).
pub type Row = Arc<[Value]>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_returns_the_same_pointer() {
        let a = intern("amount");
        let b = intern(&String::from("amount"));
        assert!(std::ptr::eq(a, b));
    }

    #[test]
    fn values_order_by_kind_then_value() {
        let mut v = vec![
            Value::from("b"),
            Value::Int(3),
            Value::Null,
            Value::Float(-1.5),
            Value::Int(-2),
            Value::Bool(true),
        ];
        v.sort();
        assert_eq!(
            v,
            vec![
                Value::Null,
                Value::Bool(true),
                Value::Int(-2),
                Value::Int(3),
                Value::Float(-1.5),
                Value::from("b")
            ]
        );
    }
}

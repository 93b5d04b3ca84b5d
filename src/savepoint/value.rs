//! The values that records carry and that state files hold.
//!
//! `Value` is deliberately small: null, bool, 64-bit int, 64-bit float and string. It has a
//! total order and a hash (floats by bit pattern) so it can be a key, a map-state key and a
//! sort key alike. Field names are interned (`Name`, one pointer): there are few distinct names
//! (they come from job files and input schemas) and records are cloned across threads on the
//! hot path, where reference counting would bounce cache lines between cores.

use arcstr::ArcStr;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};

/// One value of a record field, a key, or a state field.
///
/// The tag is a whole word (`repr(u64)`), the payload the next: with a byte tag a `Bool` sits
/// at offset 1, and every move of a value copies bytes 1..8 as two overlapping 4-byte stores
/// that a later 4-byte load cannot be forwarded from. `perf` put about half of the keyed
/// count's own time on such stalls; the size (16 bytes) and the niche the enums around use
/// stay the same (see the size tests).
#[derive(Clone, Debug)]
#[repr(u64)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(ArcStr),
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
            serde_json::Value::String(s) => Value::Str(ArcStr::from(s.as_str())),
            other => Value::Str(ArcStr::from(other.to_string())),
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
        Value::Str(ArcStr::from(v))
    }
}

impl PartialEq for Value {
    /// As `cmp`, with integers and strings, the keys of most state, compared where a state
    /// lookup probes rather than through a call.
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Str(a), Value::Str(b)) => a == b,
            _ => self.cmp(other) == Ordering::Equal,
        }
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

/// An interned field name: one thin pointer, equal to another exactly when it is the same
/// name (only `intern` makes one, and it makes each text once), so finding a field compares
/// pointers, not text.
#[derive(Clone, Copy)]
pub struct Name(&'static &'static str);

impl Name {
    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}
impl Eq for Name {}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        *self.0 == other
    }
}
impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == *other
    }
}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(*self.0, f)
    }
}

/// Interns a field name: the same text always yields the same `Name`.
pub fn intern(name: &str) -> Name {
    static NAMES: OnceLock<Mutex<HashMap<&'static str, Name>>> = OnceLock::new();
    thread_local! {
        static LOCAL: std::cell::RefCell<HashMap<&'static str, Name>> = std::cell::RefCell::new(HashMap::new());
    }
    if let Some(found) = LOCAL.with(|l| l.borrow().get(name).copied()) {
        return found;
    }
    let names = NAMES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut guard = match names.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    let found = match guard.get(name) {
        Some(found) => *found,
        None => {
            let text: &'static str = Box::leak(name.to_owned().into_boxed_str());
            let made = Name(Box::leak(Box::new(text)));
            guard.insert(text, made);
            made
        }
    };
    LOCAL.with(|l| l.borrow_mut().insert(found.0, found));
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
    pub key: Option<Key>,
}

/// A record's key with its `key_hash`, computed once by the keyBy: the partitioner takes the
/// key group from it and the keyed state finds the entry by it, neither hashing again.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub value: Value,
    pub hash: u64,
}

impl Key {
    pub fn new(value: Value) -> Key {
        let hash = super::keygroups::key_hash(&value);
        Key { value, hash }
    }
}

impl Record {
    pub fn with_capacity(n: usize) -> Record {
        Record {
            fields: Fields::with_capacity(n),
            key: None,
        }
    }

    pub fn get(&self, name: Name) -> Option<&Value> {
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
            map.insert(n.to_string(), v.to_json());
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
        assert!(std::ptr::eq(a.as_str(), b.as_str()));
        assert_eq!(a, b);
        assert_ne!(a, intern("amounts"));
        assert_eq!(a, "amount");
        // Equal names are the same name, so a record finds a field by any interning of it.
        let rec = Record {
            fields: [(a, Value::Int(1))].into_iter().collect(),
            key: None,
        };
        assert_eq!(rec.get(intern("amount")), Some(&Value::Int(1)));
        assert_eq!(rec.get(intern("other")), None);
    }

    #[test]
    fn a_value_and_a_field_are_small() {
        // What a record moves per field: a name pointer and a 16-byte value.
        assert_eq!(std::mem::size_of::<Value>(), 16);
        assert_eq!(std::mem::size_of::<(Name, Value)>(), 24);
        // Five fields inline, and the key with its hash.
        assert_eq!(std::mem::size_of::<Record>(), 152);
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

/// JSON straight to and from records, without a `serde_json::Value` in between (the Kafka
/// connectors' per-record path). Fields keep the record's order; a repeated name keeps its
/// last value, as `serde_json::Map` does; nested arrays and objects become their JSON text,
/// as `Value::from_json` makes them.
mod json {
    use super::{Fields, Name, Record, Value, intern};
    use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::fmt;

    struct JsonValue<'a>(&'a Value);

    impl Serialize for JsonValue<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self.0 {
                Value::Null => s.serialize_unit(),
                Value::Bool(b) => s.serialize_bool(*b),
                Value::Int(i) => s.serialize_i64(*i),
                Value::Float(f) if f.is_finite() => s.serialize_f64(*f),
                Value::Float(_) => s.serialize_unit(),
                Value::Str(v) => s.serialize_str(v),
            }
        }
    }

    pub(super) struct JsonRecord<'a>(pub &'a Record);

    impl Serialize for JsonRecord<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut m = s.serialize_map(Some(self.0.fields.len()))?;
            for (n, v) in &self.0.fields {
                m.serialize_entry(n.as_str(), &JsonValue(v))?;
            }
            m.end()
        }
    }

    struct FieldName(Name);

    impl<'de> Deserialize<'de> for FieldName {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = FieldName;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a field name")
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<FieldName, E> {
                    Ok(FieldName(intern(s)))
                }
            }
            d.deserialize_str(V)
        }
    }

    struct FieldValue(Value);

    impl<'de> Deserialize<'de> for FieldValue {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(ValueVisitor)
        }
    }

    struct ValueVisitor;

    impl<'de> Visitor<'de> for ValueVisitor {
        type Value = FieldValue;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_unit<E: de::Error>(self) -> Result<FieldValue, E> {
            Ok(FieldValue(Value::Null))
        }
        fn visit_none<E: de::Error>(self) -> Result<FieldValue, E> {
            Ok(FieldValue(Value::Null))
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<FieldValue, D::Error> {
            FieldValue::deserialize(d)
        }
        fn visit_bool<E: de::Error>(self, b: bool) -> Result<FieldValue, E> {
            Ok(FieldValue(Value::Bool(b)))
        }
        fn visit_i64<E: de::Error>(self, i: i64) -> Result<FieldValue, E> {
            Ok(FieldValue(Value::Int(i)))
        }
        fn visit_u64<E: de::Error>(self, u: u64) -> Result<FieldValue, E> {
            Ok(FieldValue(match i64::try_from(u) {
                Ok(i) => Value::Int(i),
                Err(_) => Value::Float(u as f64),
            }))
        }
        fn visit_f64<E: de::Error>(self, f: f64) -> Result<FieldValue, E> {
            Ok(FieldValue(Value::Float(f)))
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<FieldValue, E> {
            Ok(FieldValue(Value::from(s)))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<FieldValue, A::Error> {
            let v = serde_json::Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
            Ok(FieldValue(Value::from_json(&v)))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<FieldValue, A::Error> {
            let v = serde_json::Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
            Ok(FieldValue(Value::from_json(&v)))
        }
    }

    pub(super) struct RecordSeed;

    impl<'de> DeserializeSeed<'de> for RecordSeed {
        type Value = Record;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Record, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for RecordSeed {
        type Value = Record;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record, A::Error> {
            let mut rec = Record {
                fields: Fields::new(),
                key: None,
            };
            while let Some(FieldName(n)) = map.next_key()? {
                let FieldValue(v) = map.next_value()?;
                rec.set(n, v);
            }
            Ok(rec)
        }
    }
}

impl Record {
    /// Appends the record as a JSON object (fields in record order).
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        serde_json::to_writer(out, &json::JsonRecord(self))
    }

    /// A record from a JSON object's text.
    pub fn from_json_slice(bytes: &[u8]) -> Result<Record, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let rec = serde::de::DeserializeSeed::deserialize(json::RecordSeed, &mut de)?;
        de.end()?;
        Ok(rec)
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn json_round_trips_like_serde_json_values() {
        let text = br#"{"b": 2, "a": "x\"y", "f": 1.5, "n": null, "t": true, "big": 18446744073709551615, "arr": [1, {"k": 2}], "obj": {"z": 1}, "b": 3}"#;
        let direct = Record::from_json_slice(text).unwrap();
        let via: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(text).unwrap();
        let expected = Record::from_json_object(&via);
        for (n, v) in &expected.fields {
            assert_eq!(direct.get(*n), Some(v), "{n}");
        }
        assert_eq!(direct.fields.len(), expected.fields.len());
        assert_eq!(
            direct.get(intern("b")),
            Some(&Value::Int(3)),
            "the last of a repeated name"
        );
        let mut out = Vec::new();
        direct.write_json(&mut out).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, direct.to_json());
        for bad in [&b"not json"[..], b"[1, 2]", b"5", b"{\"a\": 1} trailing"] {
            assert!(
                Record::from_json_slice(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}

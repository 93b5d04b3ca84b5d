//! The row of a value state as a table holds it. Most keyed value states have one field (a
//! count, a sum, a latest value): that field is held in the table's own slot, with no row
//! allocation of its own, which saves its 32 bytes and a pointer hop on every lookup, copy and
//! write. Rows of more fields are a `ThinVec` (one pointer; its length in its heap block), so a
//! row is 16 bytes either way. Either way it reads as a slice, and a state file holds the same
//! bytes for both. A write during a snapshot copies the entry it changes (see `GroupTable`),
//! so a row needs no sharing of its own.

use super::value::{Row, Value};
use std::ops::Deref;
use thin_vec::ThinVec;

#[derive(Clone, Debug)]
pub enum StateRow {
    One(Value),
    Many(ThinVec<Value>),
}

impl StateRow {
    /// The fields, to change in place: a shared row still read by a snapshot is copied first.
    pub fn make_mut(&mut self) -> &mut [Value] {
        match self {
            StateRow::One(v) => std::slice::from_mut(v),
            StateRow::Many(row) => row.as_mut_slice(),
        }
    }

    /// The row's own allocation, if it has one (to prefetch before reading it).
    pub(crate) fn heap(&self) -> Option<*const Value> {
        match self {
            StateRow::One(_) => None,
            StateRow::Many(row) => Some(row.as_ptr()),
        }
    }
}

impl Deref for StateRow {
    type Target = [Value];

    fn deref(&self) -> &[Value] {
        match self {
            StateRow::One(v) => std::slice::from_ref(v),
            StateRow::Many(row) => row,
        }
    }
}

impl PartialEq for StateRow {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl From<Vec<Value>> for StateRow {
    fn from(mut fields: Vec<Value>) -> Self {
        match fields.pop() {
            Some(v) if fields.is_empty() => StateRow::One(v),
            Some(v) => {
                fields.push(v);
                StateRow::Many(ThinVec::from(fields))
            }
            None => StateRow::Many(ThinVec::new()),
        }
    }
}

impl From<Row> for StateRow {
    fn from(row: Row) -> Self {
        match &*row {
            [one] => StateRow::One(one.clone()),
            _ => StateRow::Many(row.iter().cloned().collect()),
        }
    }
}

impl<const N: usize> From<[Value; N]> for StateRow {
    fn from(fields: [Value; N]) -> Self {
        Vec::from(fields).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_field_is_held_inline_and_reads_like_a_row() {
        let mut one = StateRow::from([Value::Int(7)]);
        assert!(matches!(one, StateRow::One(_)));
        assert_eq!(&*one, &[Value::Int(7)]);
        one.make_mut()[0] = Value::Int(8);
        assert_eq!(one, StateRow::from(Row::from([Value::Int(8)])));

        let two = StateRow::from(vec![Value::Int(1), Value::from("a")]);
        let mut copy = two.clone();
        copy.make_mut()[1] = Value::from("b");
        // The copy was made before the write: the original still reads its own row.
        assert_eq!(&*two, &[Value::Int(1), Value::from("a")]);
        assert_eq!(&*copy, &[Value::Int(1), Value::from("b")]);
        assert!(StateRow::from(Vec::new()).is_empty());
    }

    #[test]
    fn a_state_entry_is_16_bytes_and_a_table_slot_32() {
        // A row of several fields, a list and a map are one pointer each; the value's own tag
        // leaves room for the enums' tags.
        assert_eq!(std::mem::size_of::<StateRow>(), 16);
        assert_eq!(
            std::mem::size_of::<crate::savepoint::statefile::StateEntry>(),
            16
        );
        assert_eq!(
            std::mem::size_of::<(Value, crate::savepoint::statefile::StateEntry)>(),
            32
        );
    }
}

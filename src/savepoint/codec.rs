//! The binary encoding of values and rows inside state files.
//!
//! Values: one tag byte, then the payload. `0` null, `1` false, `2` true, `3` int (8 bytes
//! little endian), `4` float (8 bytes little endian IEEE 754), `5` string (varint length,
//! UTF-8 bytes). Lengths and counts are unsigned LEB128 varints.

use super::staterow::StateRow;
use super::value::{Row, Value};

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const INT: u8 = 3;
const FLOAT: u8 = 4;
const STR: u8 = 5;

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(NULL),
        Value::Bool(false) => out.push(FALSE),
        Value::Bool(true) => out.push(TRUE),
        Value::Int(i) => {
            out.push(INT);
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Float(f) => {
            out.push(FLOAT);
            out.extend_from_slice(&f.to_le_bytes());
        }
        Value::Str(s) => {
            out.push(STR);
            put_varint(out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
    }
}

pub fn put_row(out: &mut Vec<u8>, row: &[Value]) {
    put_varint(out, row.len() as u64);
    for v in row {
        put_value(out, v);
    }
}

/// Why bytes could not be decoded; the caller adds which file and block.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("unexpected end of data at byte {0}")]
    Eof(usize),
    #[error("unknown value tag {tag} at byte {at}")]
    BadTag { tag: u8, at: usize },
    #[error("invalid UTF-8 in a string at byte {0}")]
    Utf8(usize),
    #[error("varint too long at byte {0}")]
    Varint(usize),
}

/// A cursor over encoded bytes.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// The bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Eof(self.pos))?;
        if end > self.buf.len() {
            return Err(DecodeError::Eof(self.pos));
        }
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let start = self.pos;
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or(DecodeError::Eof(self.pos))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Varint(start))
    }

    fn eight(&mut self) -> Result<[u8; 8], DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(a)
    }

    pub fn value(&mut self) -> Result<Value, DecodeError> {
        let at = self.pos;
        let tag = *self.take(1)?.first().ok_or(DecodeError::Eof(at))?;
        Ok(match tag {
            NULL => Value::Null,
            FALSE => Value::Bool(false),
            TRUE => Value::Bool(true),
            INT => Value::Int(i64::from_le_bytes(self.eight()?)),
            FLOAT => Value::Float(f64::from_le_bytes(self.eight()?)),
            STR => {
                let len = self.varint()? as usize;
                let start = self.pos;
                let bytes = self.take(len)?;
                let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::Utf8(start))?;
                Value::from(s)
            }
            tag => return Err(DecodeError::BadTag { tag, at }),
        })
    }

    pub fn row(&mut self) -> Result<Row, DecodeError> {
        let n = self.varint()? as usize;
        // Guard the allocation against a corrupt count: every value takes at least a byte.
        if n > self.buf.len() - self.pos.min(self.buf.len()) {
            return Err(DecodeError::Eof(self.pos));
        }
        let mut row = Vec::with_capacity(n);
        for _ in 0..n {
            row.push(self.value()?);
        }
        Ok(Row::from(row))
    }

    /// A row as a value state holds it: one field inline, with no row allocation.
    pub fn state_row(&mut self) -> Result<StateRow, DecodeError> {
        let start = self.pos;
        if self.varint()? == 1 {
            return Ok(StateRow::One(self.value()?));
        }
        self.pos = start;
        let n = self.varint()? as usize;
        // Guard the allocation against a corrupt count: every value takes at least a byte.
        if n > self.buf.len() - self.pos.min(self.buf.len()) {
            return Err(DecodeError::Eof(self.pos));
        }
        let mut row = thin_vec::ThinVec::with_capacity(n);
        for _ in 0..n {
            row.push(self.value()?);
        }
        Ok(StateRow::Many(row))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let row: Vec<Value> = vec![
            Value::Null,
            Value::Bool(true),
            Value::Bool(false),
            Value::Int(-42),
            Value::Int(i64::MAX),
            Value::Float(2.5),
            Value::from("héllo"),
        ];
        let mut buf = Vec::new();
        put_row(&mut buf, &row);
        put_varint(&mut buf, 300);
        let mut r = Reader::new(&buf);
        assert_eq!(&*r.row().unwrap(), &row[..]);
        assert_eq!(r.varint().unwrap(), 300);
        assert!(r.is_empty());
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut buf = Vec::new();
        put_row(&mut buf, &[Value::from("abcdef"), Value::Int(7)]);
        for cut in 0..buf.len() {
            assert!(Reader::new(&buf[..cut]).row().is_err(), "cut at {cut}");
        }
        assert_eq!(
            Reader::new(&[9]).value(),
            Err(DecodeError::BadTag { tag: 9, at: 0 })
        );
    }
}

//! State files: `operators/<uid>-<subtask>-<uuid>` inside a snapshot.
//!
//! Layout: `SJST`, u16 LE format version, then one block per key group of the subtask's range
//! (in order), then one block of operator list state. `_metadata` records each block's
//! offset, length and CRC-32C, and the file's size and CRC-32C, so a reader fetches only the
//! key groups it owns and checks each one. A key-group block holds, for each keyed state in
//! metadata order, a varint entry count and the entries: key value, then a row (value state),
//! a varint count and rows (list state), or a varint count and key/row pairs (map state).
//! The operator-state block holds, for each list state in metadata order, a count and rows.

use super::codec::{DecodeError, Reader, put_row, put_value, put_varint};
use super::keygroups::KeyGroupRange;
use super::metadata::{
    Block, FORMAT_VERSION, KeyGroupsIndex, KeyedStateKind, KeyedStateMeta, STATE_FILE_MAGIC,
    SubtaskState,
};
use super::store::{Store, StoreError};
use super::value::{Row, Value};

/// One key's map state, sorted by map key. A flat vector: a key holds few entries (a window
/// operator's, one or two windows), where a B-tree allocates a node for eleven.
pub type MapEntries = litemap::LiteMap<Value, Row>;

/// The state one key holds in one keyed state.
#[derive(Clone, Debug, PartialEq)]
pub enum StateEntry {
    Value(Row),
    List(Vec<Row>),
    Map(MapEntries),
}

pub use super::grouptable::GroupTable;

/// `SJST` and the u16 format version.
const HEADER_LEN: u64 = 6;

/// The most bytes of a state file fetched at once when restoring.
const READ_CHUNK: u64 = 64 << 20;

/// What a subtask hands to the writer: shared, immutable views of its state.
pub struct SubtaskSnapshot {
    pub keyed: Option<KeyedSnapshot>,
    /// One list per operator state, in metadata order.
    pub operator_lists: Vec<Vec<Row>>,
}

pub struct KeyedSnapshot {
    pub range: KeyGroupRange,
    /// `tables[state][i]` is key group `range.start + i` of that state.
    pub tables: Vec<Vec<GroupTable>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("state file {path} is missing")]
    Missing { path: String },
    #[error(
        "state file {path} is truncated: _metadata records {expected} bytes, the file has {found}"
    )]
    Truncated {
        path: String,
        expected: u64,
        found: u64,
    },
    #[error("state file {path} is corrupt: checksum mismatch in {block}")]
    Checksum { path: String, block: String },
    #[error("state file {path} is corrupt: {block}: {source}")]
    Decode {
        path: String,
        block: String,
        #[source]
        source: DecodeError,
    },
    #[error("state file {path} is corrupt: {reason}")]
    Invalid { path: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn encode_entry(out: &mut Vec<u8>, entry: &StateEntry) {
    match entry {
        StateEntry::Value(row) => put_row(out, row),
        StateEntry::List(rows) => {
            put_varint(out, rows.len() as u64);
            for r in rows {
                put_row(out, r);
            }
        }
        StateEntry::Map(map) => {
            put_varint(out, map.len() as u64);
            for (k, r) in map {
                put_value(out, k);
                put_row(out, r);
            }
        }
    }
}

fn decode_entry(r: &mut Reader<'_>, kind: KeyedStateKind) -> Result<StateEntry, DecodeError> {
    Ok(match kind {
        KeyedStateKind::Value => StateEntry::Value(r.row()?),
        KeyedStateKind::List => {
            let n = r.varint()?;
            let mut rows = Vec::new();
            for _ in 0..n {
                rows.push(r.row()?);
            }
            StateEntry::List(rows)
        }
        KeyedStateKind::Map => {
            let n = r.varint()?;
            let mut map = MapEntries::new();
            for _ in 0..n {
                let k = r.value()?;
                map.insert(k, r.row()?);
            }
            StateEntry::Map(map)
        }
    })
}

/// Writes one subtask's state file and returns its entry for `_metadata`.
pub fn write(
    dir: &Store,
    rel: &str,
    index: u32,
    snap: &SubtaskSnapshot,
) -> Result<SubtaskState, StateFileError> {
    let mut w = dir.writer(rel);
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(STATE_FILE_MAGIC);
    header.extend_from_slice(&(FORMAT_VERSION as u16).to_le_bytes());
    w.write(&header)?;
    let mut entries = 0u64;
    let mut buf = Vec::with_capacity(1 << 20);
    let key_groups = match &snap.keyed {
        None => None,
        Some(keyed) => {
            let mut blocks = Vec::with_capacity(keyed.range.len() as usize);
            for i in 0..keyed.range.len() as usize {
                buf.clear();
                for table in &keyed.tables {
                    let group = &table[i];
                    put_varint(&mut buf, group.len() as u64);
                    entries += group.len() as u64;
                    for (key, entry) in group.iter() {
                        put_value(&mut buf, key);
                        encode_entry(&mut buf, entry);
                    }
                }
                blocks.push(Block {
                    offset: w.position(),
                    len: buf.len() as u64,
                    crc32c: crc32c::crc32c(&buf),
                });
                w.write(&buf)?;
            }
            Some(KeyGroupsIndex {
                range: keyed.range,
                blocks,
            })
        }
    };
    let operator_state = if snap.operator_lists.is_empty() {
        None
    } else {
        buf.clear();
        for list in &snap.operator_lists {
            put_varint(&mut buf, list.len() as u64);
            for row in list {
                put_row(&mut buf, row);
            }
        }
        let block = Block {
            offset: w.position(),
            len: buf.len() as u64,
            crc32c: crc32c::crc32c(&buf),
        };
        w.write(&buf)?;
        Some(block)
    };
    let (size, crc32c) = w.finish()?;
    Ok(SubtaskState {
        index,
        file: rel.to_owned(),
        size,
        crc32c,
        key_groups,
        operator_state,
        keyed_entries: entries,
    })
}

fn check_size(dir: &Store, st: &SubtaskState) -> Result<String, StateFileError> {
    let path = format!("{}/{}", dir.location(), st.file);
    match dir.size(&st.file)? {
        None => Err(StateFileError::Missing { path }),
        Some(found) if found > st.size => Err(StateFileError::Invalid {
            path,
            reason: format!(
                "it has {found} bytes, {} more than _metadata records",
                found - st.size
            ),
        }),
        Some(found) if found < st.size => Err(StateFileError::Truncated {
            path,
            expected: st.size,
            found,
        }),
        Some(_) => Ok(path),
    }
}

fn verified<'a>(
    path: &str,
    bytes: &'a [u8],
    base: u64,
    block: &Block,
    what: &str,
) -> Result<&'a [u8], StateFileError> {
    let start = (block.offset - base) as usize;
    let slice = bytes
        .get(start..start + block.len as usize)
        .ok_or_else(|| StateFileError::Invalid {
            path: path.to_owned(),
            reason: format!("{what} lies outside the file"),
        })?;
    if crc32c::crc32c(slice) != block.crc32c {
        return Err(StateFileError::Checksum {
            path: path.to_owned(),
            block: what.to_owned(),
        });
    }
    Ok(slice)
}

/// Reads the key groups of `wanted` that this file holds, calling `sink(state, kg, key, entry)`
/// for every entry. `states` are the keyed states as the file's `_metadata` declares them.
pub fn read_key_groups(
    dir: &Store,
    st: &SubtaskState,
    states: &[KeyedStateMeta],
    wanted: KeyGroupRange,
    mut sink: impl FnMut(usize, u32, Value, StateEntry),
) -> Result<(), StateFileError> {
    let Some(index) = &st.key_groups else {
        return Ok(());
    };
    let overlap = index.range.intersect(&wanted);
    if overlap.is_empty() {
        return Ok(());
    }
    let path = check_size(dir, st)?;
    let first = (overlap.start - index.range.start) as usize;
    let last = (overlap.end - index.range.start) as usize;
    let (Some(_), Some(b1)) = (index.blocks.get(first), index.blocks.get(last)) else {
        return Err(StateFileError::Invalid {
            path,
            reason: "_metadata lists fewer key-group blocks than its range".into(),
        });
    };
    if b1.offset + b1.len > st.size {
        return Err(StateFileError::Invalid {
            path,
            reason: "a key-group block lies beyond the end of the file".into(),
        });
    }
    // Fetch contiguous blocks in chunks of at most READ_CHUNK bytes, so a large state is
    // never held twice (raw and decoded) in full.
    let blocks = &index.blocks[first..=last];
    let mut i = 0;
    while i < blocks.len() {
        let start = blocks[i].offset;
        let mut j = i;
        while j + 1 < blocks.len() && blocks[j + 1].offset + blocks[j + 1].len - start <= READ_CHUNK
        {
            j += 1;
        }
        let end = blocks[j].offset + blocks[j].len;
        let bytes = dir.get_range(&st.file, start..end)?;
        for (n, block) in blocks[i..=j].iter().enumerate() {
            let kg = overlap.start + (i + n) as u32;
            let what = format!("key group {kg}");
            let slice = verified(&path, &bytes, start, block, &what)?;
            decode_key_group_block(slice, states, |s, key, entry| sink(s, kg, key, entry))
                .map_err(|source| StateFileError::Decode {
                    path: path.clone(),
                    block: what.clone(),
                    source,
                })?;
        }
        i = j + 1;
    }
    Ok(())
}

/// Reads the operator list states of one subtask file: one list per declared state.
pub fn read_operator_lists(
    dir: &Store,
    st: &SubtaskState,
    count: usize,
) -> Result<Vec<Vec<Row>>, StateFileError> {
    let Some(block) = &st.operator_state else {
        return Ok(vec![Vec::new(); count]);
    };
    let path = check_size(dir, st)?;
    if block.offset + block.len > st.size {
        return Err(StateFileError::Invalid {
            path,
            reason: "the operator-state block lies beyond the end of the file".into(),
        });
    }
    let bytes = dir.get_range(&st.file, block.offset..block.offset + block.len)?;
    let what = "operator state";
    let slice = verified(&path, &bytes, block.offset, block, what)?;
    decode_operator_block(slice, count).map_err(|source| StateFileError::Decode {
        path: path.clone(),
        block: what.to_owned(),
        source,
    })
}

/// Decodes one key group's block (checksum already verified): for each keyed state in
/// `states`' order, its entries, each handed to `sink(state_index, key, entry)`.
pub fn decode_key_group_block(
    block: &[u8],
    states: &[KeyedStateMeta],
    mut sink: impl FnMut(usize, Value, StateEntry),
) -> Result<(), DecodeError> {
    let mut r = Reader::new(block);
    for (s, meta) in states.iter().enumerate() {
        let n = r.varint()?;
        for _ in 0..n {
            let key = r.value()?;
            let entry = decode_entry(&mut r, meta.kind)?;
            sink(s, key, entry);
        }
    }
    Ok(())
}

/// Decodes the operator-state block (checksum already verified): `count` lists of rows.
pub fn decode_operator_block(block: &[u8], count: usize) -> Result<Vec<Vec<Row>>, DecodeError> {
    let mut r = Reader::new(block);
    let mut lists = Vec::with_capacity(count.min(block.len()));
    for _ in 0..count {
        let n = r.varint()?;
        let mut rows = Vec::new();
        for _ in 0..n {
            rows.push(r.row()?);
        }
        lists.push(rows);
    }
    Ok(lists)
}

/// Checks that a state file exists with the size `_metadata` records, without reading it.
pub fn verify_size(dir: &Store, st: &SubtaskState) -> Result<(), StateFileError> {
    check_size(dir, st).map(|_| ())
}

/// Checks the header: the magic bytes and a format version this build reads.
fn check_header(path: &str, header: &[u8]) -> Result<(), StateFileError> {
    if header.len() < HEADER_LEN as usize || &header[..4] != STATE_FILE_MAGIC {
        return Err(StateFileError::Invalid {
            path: path.to_owned(),
            reason: "it does not start with the state file header".into(),
        });
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if u32::from(version) != FORMAT_VERSION {
        return Err(StateFileError::Invalid {
            path: path.to_owned(),
            reason: format!(
                "it has state file format version {version}; this sjob reads version {FORMAT_VERSION}"
            ),
        });
    }
    Ok(())
}

/// What a restore checks before it loads anything: the size `_metadata` records, the header,
/// and that the blocks `_metadata` lists cover the rest of the file exactly. With every
/// block's checksum verified as it is read, every byte a restore uses is checked: the same
/// damage that `verify` finds by the whole file's checksum, without reading whole files.
pub fn verify_layout(dir: &Store, st: &SubtaskState) -> Result<(), StateFileError> {
    let path = check_size(dir, st)?;
    let header = dir.get_range(&st.file, 0..HEADER_LEN.min(st.size))?;
    check_header(&path, &header)?;
    let mut blocks: Vec<&Block> = st
        .key_groups
        .iter()
        .flat_map(|k| k.blocks.iter())
        .chain(st.operator_state.iter())
        .collect();
    blocks.sort_by_key(|b| b.offset);
    let mut end = HEADER_LEN;
    for b in blocks {
        if b.offset != end {
            return Err(StateFileError::Invalid {
                path,
                reason: format!(
                    "_metadata's blocks do not cover the file: a block starts at byte {} where {end} was expected",
                    b.offset
                ),
            });
        }
        end = b.offset.saturating_add(b.len);
    }
    if end != st.size {
        return Err(StateFileError::Invalid {
            path,
            reason: format!(
                "_metadata's blocks end at byte {end}, the file at {}",
                st.size
            ),
        });
    }
    Ok(())
}

/// Verifies a whole state file against `_metadata`: size, header, file checksum.
pub fn verify(dir: &Store, st: &SubtaskState) -> Result<(), StateFileError> {
    let path = check_size(dir, st)?;
    let bytes = dir.get(&st.file)?;
    check_header(&path, &bytes)?;
    if crc32c::crc32c(&bytes) != st.crc32c {
        return Err(StateFileError::Checksum {
            path,
            block: "the file".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::savepoint::schema::{FieldType, StateSchema};

    #[test]
    fn write_then_read_a_sub_range_and_detect_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().display().to_string()).unwrap();
        let range = KeyGroupRange { start: 10, end: 13 };
        let mut groups = Vec::new();
        for kg in range.iter() {
            let mut t = GroupTable::default();
            t.insert(
                Value::Int(i64::from(kg)),
                StateEntry::Value(vec![Value::Int(i64::from(kg) * 2)].into()),
            );
            groups.push(t);
        }
        let snap = SubtaskSnapshot {
            keyed: Some(KeyedSnapshot {
                range,
                tables: vec![groups],
            }),
            operator_lists: vec![vec![vec![Value::from("split-0"), Value::Int(7)].into()]],
        };
        let st = write(&store, "operators/c-0-x", 0, &snap).unwrap();
        let metas = vec![KeyedStateMeta {
            name: "count".into(),
            kind: KeyedStateKind::Value,
            schema: StateSchema::single("count", FieldType::Int),
        }];
        let mut seen = Vec::new();
        read_key_groups(
            &store,
            &st,
            &metas,
            KeyGroupRange { start: 12, end: 20 },
            |s, kg, k, e| seen.push((s, kg, k, e)),
        )
        .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].1, 12);
        assert_eq!(seen[1].3, StateEntry::Value(vec![Value::Int(26)].into()));
        let lists = read_operator_lists(&store, &st, 1).unwrap();
        assert_eq!(lists[0][0][1], Value::Int(7));
        verify(&store, &st).unwrap();

        // Flip a byte inside key group 11: reading it names the file and the group.
        let file = dir.path().join("operators/c-0-x");
        let mut bytes = std::fs::read(&file).unwrap();
        let off = st.key_groups.as_ref().unwrap().blocks[1].offset as usize + 3;
        bytes[off] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        let err = read_key_groups(&store, &st, &metas, range, |_, _, _, _| {}).unwrap_err();
        assert!(
            err.to_string()
                .contains("c-0-x is corrupt: checksum mismatch in key group 11"),
            "{err}"
        );

        // Truncate it: named, with both sizes.
        std::fs::write(&file, &bytes[..bytes.len() - 5]).unwrap();
        let err = read_key_groups(&store, &st, &metas, range, |_, _, _, _| {}).unwrap_err();
        assert!(err.to_string().contains("c-0-x is truncated"), "{err}");
    }
}

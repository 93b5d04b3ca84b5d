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
    Block, Compression, FORMAT_VERSION, KeyGroupsIndex, KeyedStateKind, KeyedStateMeta,
    OLDEST_FORMAT_VERSION, STATE_FILE_MAGIC, SubtaskState,
};
use super::prefetch::{prefetch_inner, prefetch_outer};
use super::staterow::StateRow;
use super::store::{Store, StoreError, StoreWriter};
use super::value::{Key, Row, Value};

/// One key's map state, sorted by map key. A flat vector: a key holds few entries (a window
/// operator's, one or two windows), where a B-tree allocates a node for eleven.
pub type MapEntries = litemap::LiteMap<Value, Row, super::mapstore::ThinStore<Value, Row>>;

/// The state one key holds in one keyed state.
#[derive(Clone, Debug, PartialEq)]
pub enum StateEntry {
    /// A value state's row: one field held inline.
    Value(StateRow),
    List(thin_vec::ThinVec<Row>),
    Map(MapEntries),
}

pub use super::grouptable::GroupTable;

/// `SJST` and the u16 format version.
const HEADER_LEN: u64 = 6;

/// Blocks shorter than this are stored as they are: too small to gain from compression.
const MIN_COMPRESSED_BLOCK: usize = 64;

/// The most bytes of a state file fetched at once when restoring, from the local file system
/// and from an object store (where each fetch is a request with its own latency). A block
/// larger than this is fetched whole.
const READ_CHUNK_LOCAL: u64 = 4 << 20;
const READ_CHUNK_REMOTE: u64 = 64 << 20;

/// What a subtask hands to the writer: shared, immutable views of its state.
#[derive(Clone)]
pub struct SubtaskSnapshot {
    pub keyed: Option<KeyedSnapshot>,
    /// One list per operator state, in metadata order.
    pub operator_lists: Vec<Vec<Row>>,
}

#[derive(Clone)]
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
    #[error("cannot compress a block of state file {path}: {reason}")]
    Compress { path: String, reason: String },
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
        KeyedStateKind::Value => StateEntry::Value(r.state_row()?),
        KeyedStateKind::List => {
            let n = r.varint()?;
            let mut rows = thin_vec::ThinVec::new();
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

/// How many entries ahead of the encoder their memory is asked for (see `prefetch`).
const PREFETCH_AHEAD: usize = 8;

/// Stores `raw` (one encoded block) at the writer's position, compressed into `scratch` when
/// `compression` asks for it and that saves at least an eighth of the bytes. `raw_crc` is
/// `raw`'s CRC-32C when the caller has it (an encoding thread computes it beside the writer):
/// each stored byte is checksummed once, for its block and, combined, for the file.
fn put_block(
    w: &mut StoreWriter,
    raw: &[u8],
    raw_crc: Option<u32>,
    compression: Compression,
    scratch: &mut Vec<u8>,
) -> Result<Block, StateFileError> {
    let mut stored = raw;
    let mut stored_crc = raw_crc;
    let mut raw_len = None;
    if compression == Compression::Lz4 && raw.len() >= MIN_COMPRESSED_BLOCK {
        let max = lz4_flex::block::get_maximum_output_size(raw.len());
        if scratch.len() < max {
            scratch.resize(max, 0);
        }
        let n =
            lz4_flex::block::compress_into(raw, scratch).map_err(|e| StateFileError::Compress {
                path: w.location(),
                reason: e.to_string(),
            })?;
        if n < raw.len() - raw.len() / 8 {
            stored = &scratch[..n];
            stored_crc = None;
            raw_len = Some(raw.len() as u64);
        }
    }
    let crc = stored_crc.unwrap_or_else(|| crc32c::crc32c(stored));
    let block = Block {
        offset: w.position(),
        len: stored.len() as u64,
        crc32c: crc,
        raw_len,
    };
    w.write_checksummed(stored, crc)?;
    Ok(block)
}

/// How many threads write one state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterThreads {
    /// The caller's alone: while the job runs, other writers and the tasks need the cores.
    One,
    /// The caller compresses and writes while a second thread encodes the next key group: for
    /// a stop-with-savepoint, when the tasks have nothing left to do and the job waits.
    Two,
}

/// Scratch space for `encode_key_group`, kept from one call to the next (a fresh one per key
/// group costs fresh pages, which this machine's kernel zeroes first). It is empty between
/// calls, so it can outlive the tables it lists.
type Listed = Vec<(&'static Value, &'static StateEntry)>;

/// An empty list of entries with `v`'s room, for references of another lifetime (the standard
/// library collects a vector into one of the same layout in place).
fn recycle<'a, 'b>(mut v: Vec<(&'a Value, &'a StateEntry)>) -> Vec<(&'b Value, &'b StateEntry)> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the list is empty"))
        .collect()
}

/// Encodes key group `i` of `keyed` (every state's entries) into `buf` and lets go of it if
/// the live tables still share it: once written, the old versions of its entries that they have
/// replaced since the snapshot are freed by their next write there, not kept until the whole
/// file is written. A view no live table shares any more (the job has ended, as after a
/// stop-with-savepoint) is kept, so that freeing the state is not on the savepoint's path.
/// Returns how many entries the key group holds.
fn encode_key_group(
    keyed: &mut KeyedSnapshot,
    i: usize,
    buf: &mut Vec<u8>,
    spare: &mut Listed,
) -> u64 {
    buf.clear();
    let mut entries = 0;
    for table in &mut keyed.tables {
        let group = &table[i];
        put_varint(buf, group.len() as u64);
        entries += group.len() as u64;
        let mut listed = recycle(std::mem::take(spare));
        listed.extend(group.iter());
        for (n, (key, entry)) in listed.iter().enumerate() {
            if let Some((k, e)) = listed.get(n + 2 * PREFETCH_AHEAD) {
                prefetch_outer(k, e);
            }
            if let Some((_, e)) = listed.get(n + PREFETCH_AHEAD) {
                prefetch_inner(e);
            }
            put_value(buf, key);
            encode_entry(buf, entry);
        }
        *spare = recycle(listed);
        if table[i].is_shared() {
            table[i] = GroupTable::default();
        }
    }
    entries
}

/// Writes every key group's block in order on the caller's thread while a second one
/// encodes the next: the file is byte for byte what one thread writes. Returns the blocks
/// and the number of entries.
fn write_key_groups_on_two_threads(
    w: &mut StoreWriter,
    keyed: &mut KeyedSnapshot,
    compression: Compression,
) -> Result<(Vec<Block>, u64), StateFileError> {
    let groups = keyed.range.len() as usize;
    std::thread::scope(|scope| {
        // A full buffer and, when it is stored as it is, its checksum.
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, Option<u32>)>(1);
        let (empty_tx, empty_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        for _ in 0..2 {
            let _ = empty_tx.send(Vec::with_capacity(1 << 20));
        }
        let encoder = scope.spawn(move || {
            let mut entries = 0;
            let mut spare = Listed::new();
            for i in 0..groups {
                // Either channel closed: the writer stopped on an error.
                let Ok(mut buf) = empty_rx.recv() else { break };
                entries += encode_key_group(keyed, i, &mut buf, &mut spare);
                let crc = (compression == Compression::None).then(|| crc32c::crc32c(&buf));
                if full_tx.send((buf, crc)).is_err() {
                    break;
                }
            }
            entries
        });
        let mut blocks = Vec::with_capacity(groups);
        let mut scratch = Vec::new();
        let mut failed = None;
        for (buf, crc) in full_rx.iter() {
            match put_block(w, &buf, crc, compression, &mut scratch) {
                Ok(block) => blocks.push(block),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            let _ = empty_tx.send(buf);
        }
        drop(full_rx);
        drop(empty_tx);
        let entries = match encoder.join() {
            Ok(n) => n,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        match failed {
            Some(e) => Err(e),
            None => Ok((blocks, entries)),
        }
    })
}

/// Writes one subtask's state file and returns its entry for `_metadata`. The snapshot's key
/// groups still shared with live tables are let go of as they are written.
pub fn write(
    dir: &Store,
    rel: &str,
    index: u32,
    snap: &mut SubtaskSnapshot,
    compression: Compression,
    threads: WriterThreads,
) -> Result<SubtaskState, StateFileError> {
    let mut w = dir.writer(rel);
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(STATE_FILE_MAGIC);
    header.extend_from_slice(&(FORMAT_VERSION as u16).to_le_bytes());
    w.write(&header)?;
    let mut entries = 0u64;
    let mut buf = Vec::with_capacity(1 << 20);
    let mut scratch = Vec::new();
    let key_groups = match &mut snap.keyed {
        None => None,
        Some(keyed) => {
            let blocks = match threads {
                WriterThreads::Two => {
                    let (blocks, n) = write_key_groups_on_two_threads(&mut w, keyed, compression)?;
                    entries = n;
                    blocks
                }
                WriterThreads::One => {
                    let mut blocks = Vec::with_capacity(keyed.range.len() as usize);
                    let mut spare = Listed::new();
                    for i in 0..keyed.range.len() as usize {
                        entries += encode_key_group(keyed, i, &mut buf, &mut spare);
                        blocks.push(put_block(&mut w, &buf, None, compression, &mut scratch)?);
                    }
                    blocks
                }
            };
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
        Some(put_block(&mut w, &buf, None, compression, &mut scratch)?)
    };
    let compressed = key_groups
        .iter()
        .flat_map(|k| k.blocks.iter())
        .chain(operator_state.iter())
        .any(|b| b.raw_len.is_some());
    let (size, crc32c) = w.finish()?;
    Ok(SubtaskState {
        index,
        file: rel.to_owned(),
        size,
        crc32c,
        key_groups,
        operator_state,
        keyed_entries: entries,
        compression: compressed.then_some(compression),
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

/// The stored bytes of `block`, checked against its checksum, then decompressed into
/// `scratch` if the block is stored compressed.
fn verified<'a>(
    path: &str,
    st: &SubtaskState,
    bytes: &'a [u8],
    base: u64,
    block: &Block,
    what: &str,
    scratch: &'a mut Vec<u8>,
) -> Result<&'a [u8], StateFileError> {
    let invalid = |reason: String| StateFileError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let start = (block.offset - base) as usize;
    let slice = bytes
        .get(start..start + block.len as usize)
        .ok_or_else(|| invalid(format!("{what} lies outside the file")))?;
    if crc32c::crc32c(slice) != block.crc32c {
        return Err(StateFileError::Checksum {
            path: path.to_owned(),
            block: what.to_owned(),
        });
    }
    let Some(raw_len) = block.raw_len else {
        return Ok(slice);
    };
    match st.compression {
        Some(Compression::Lz4) => {}
        Some(Compression::None) | None => {
            return Err(invalid(format!(
                "_metadata records {what} as compressed but names no compression for the file"
            )));
        }
    }
    // LZ4 expands at most 255-fold: a larger recorded length is damage, not a reason to
    // allocate it.
    if raw_len > block.len.saturating_mul(255) {
        return Err(invalid(format!(
            "_metadata records {raw_len} bytes for {what} once decompressed, more than its {} stored bytes can hold",
            block.len
        )));
    }
    // Grown, never cleared: the decompression overwrites the bytes it reports, and zeroing a
    // block's megabyte first is work for nothing.
    let raw_len = raw_len as usize;
    if scratch.len() < raw_len {
        scratch.resize(raw_len, 0);
    }
    match lz4_flex::block::decompress_into(slice, &mut scratch[..raw_len]) {
        Ok(n) if n == raw_len => Ok(&scratch[..raw_len]),
        Ok(n) => Err(invalid(format!(
            "{what} decompresses to {n} bytes, _metadata records {raw_len}"
        ))),
        Err(e) => Err(invalid(format!("{what} does not decompress: {e}"))),
    }
}

/// One key group's entries as a state file holds them: for each keyed state, in `_metadata`
/// order, its (key, entry) pairs. Each key comes with its `key_hash`, taken by the decoding
/// thread while the key's bytes are at hand: the inserting thread would otherwise read every
/// key again from memory the other core wrote (half of its time in a restore of 400,000 keys).
pub type KeyGroupEntries = Vec<Vec<(Key, StateEntry)>>;

/// How many decoded key groups a restore's reading thread may be ahead of the inserts.
const DECODED_AHEAD: usize = 4;

/// Reads the key groups of `wanted` that this file holds, calling `sink(kg, entries)` for each
/// (the entries of every keyed state, so a table can be sized before it is filled). `states`
/// are the keyed states as the file's `_metadata` declares them.
///
/// Fetching, checking, decompressing and decoding run on `decoders` threads of their own
/// (at least one), each over a contiguous share of the key groups, ahead of `sink` on the
/// caller's: a subtask's restore uses more cores than one. Key groups reach `sink` in the
/// order they are decoded, which with several decoders is not the file's.
pub fn read_key_groups(
    dir: &Store,
    st: &SubtaskState,
    states: &[KeyedStateMeta],
    wanted: KeyGroupRange,
    decoders: usize,
    mut sink: impl FnMut(u32, KeyGroupEntries),
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
    let blocks = &index.blocks[first..=last];
    let share = blocks.len().div_ceil(decoders.clamp(1, blocks.len()));
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel(DECODED_AHEAD);
        let path = &path;
        for (n, part) in blocks.chunks(share).enumerate() {
            let tx = tx.clone();
            let first_kg = overlap.start + (n * share) as u32;
            scope.spawn(move || {
                let decoded = |kg, entries| tx.send(Ok((kg, entries))).is_ok();
                if let Err(e) = decode_blocks(dir, st, states, path, first_kg, part, decoded) {
                    let _ = tx.send(Err(e));
                }
            });
        }
        drop(tx);
        // An error ends this loop, which drops the receiver, which stops the reading threads.
        for decoded in rx {
            let (kg, entries) = decoded?;
            sink(kg, entries);
        }
        Ok(())
    })
}

/// Fetches, checks and decodes `blocks` (key groups `first_kg`, `first_kg + 1`, …), handing
/// each key group to `decoded` until it returns false.
fn decode_blocks(
    dir: &Store,
    st: &SubtaskState,
    states: &[KeyedStateMeta],
    path: &str,
    first_kg: u32,
    blocks: &[Block],
    mut decoded: impl FnMut(u32, KeyGroupEntries) -> bool,
) -> Result<(), StateFileError> {
    // Fetch contiguous blocks in chunks of at most `chunk` bytes, so a large state is never
    // held twice (raw and decoded) in full: a local file's through one reused buffer, an
    // object store's as the fetched bytes themselves (no copy).
    let local = dir.is_local();
    let chunk = if local {
        READ_CHUNK_LOCAL
    } else {
        READ_CHUNK_REMOTE
    };
    let mut buffer = Vec::new();
    let mut scratch = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let start = blocks[i].offset;
        let mut j = i;
        while j + 1 < blocks.len() && blocks[j + 1].offset + blocks[j + 1].len - start <= chunk {
            j += 1;
        }
        let end = blocks[j].offset + blocks[j].len;
        let fetched;
        let bytes: &[u8] = if local {
            dir.read_range_into(&st.file, start..end, &mut buffer)?;
            &buffer
        } else {
            fetched = dir.get_range(&st.file, start..end)?;
            &fetched
        };
        for (n, block) in blocks[i..=j].iter().enumerate() {
            let kg = first_kg + (i + n) as u32;
            let what = format!("key group {kg}");
            let slice = verified(path, st, bytes, start, block, &what, &mut scratch)?;
            let entries = decode_key_group_entries(slice, states).map_err(|source| {
                StateFileError::Decode {
                    path: path.to_owned(),
                    block: what,
                    source,
                }
            })?;
            if !decoded(kg, entries) {
                return Ok(());
            }
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
    let mut scratch = Vec::new();
    let slice = verified(&path, st, &bytes, block.offset, block, what, &mut scratch)?;
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
    for (s, entries) in decode_key_group_entries(block, states)?
        .into_iter()
        .enumerate()
    {
        for (key, entry) in entries {
            sink(s, key.value, entry);
        }
    }
    Ok(())
}

/// Decodes one key group's block (checksum already verified): for each keyed state in
/// `states`' order, its entries.
fn decode_key_group_entries(
    block: &[u8],
    states: &[KeyedStateMeta],
) -> Result<KeyGroupEntries, DecodeError> {
    let mut r = Reader::new(block);
    let mut all = Vec::with_capacity(states.len());
    for meta in states {
        let n = r.varint()?;
        // Each entry takes at least two bytes: a damaged count cannot make this allocate
        // more than the block's size.
        let mut entries = Vec::with_capacity((n as usize).min(r.remaining() / 2));
        for _ in 0..n {
            let key = Key::new(r.value()?);
            entries.push((key, decode_entry(&mut r, meta.kind)?));
        }
        all.push(entries);
    }
    Ok(all)
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
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&u32::from(version)) {
        return Err(StateFileError::Invalid {
            path: path.to_owned(),
            reason: format!(
                "it has state file format version {version}; this sjob reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
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
        let st = write_one(&store, "operators/c-0-x", &snap, Compression::Lz4);
        // Blocks this small are stored as they are.
        assert_eq!(st.compression, None);
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
            1,
            |kg, entries| {
                for (s, list) in entries.into_iter().enumerate() {
                    seen.extend(list.into_iter().map(|(k, e)| (s, kg, k.value, e)));
                }
            },
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
        let err = read_key_groups(&store, &st, &metas, range, 1, |_, _| {}).unwrap_err();
        assert!(
            err.to_string()
                .contains("c-0-x is corrupt: checksum mismatch in key group 11"),
            "{err}"
        );

        // Truncate it: named, with both sizes.
        std::fs::write(&file, &bytes[..bytes.len() - 5]).unwrap();
        let err = read_key_groups(&store, &st, &metas, range, 1, |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("c-0-x is truncated"), "{err}");
    }

    #[test]
    fn a_written_key_group_lets_go_of_the_old_versions_before_the_rest_is_written() {
        let range = KeyGroupRange { start: 0, end: 1 };
        let key = Value::from("k");
        let two_fields =
            |n: i64, s: &Value| StateEntry::Value(vec![Value::Int(n), s.clone()].into());
        // A string of each key group's old row, to see when that row is freed.
        let marks = [Value::from("old-0"), Value::from("old-1")];
        let holders = |m: &Value| match m {
            Value::Str(s) => arcstr::ArcStr::strong_count(s).unwrap(),
            other => panic!("{other:?}"),
        };
        let mut live = vec![GroupTable::default(), GroupTable::default()];
        for (t, m) in live.iter_mut().zip(&marks) {
            t.insert(key.clone(), two_fields(1, m));
        }
        let mut keyed = KeyedSnapshot {
            range,
            tables: vec![live.iter_mut().map(GroupTable::snapshot).collect()],
        };
        // Each key group's row is replaced while the snapshot still reads the old one.
        for t in &mut live {
            match t.get_mut(&key) {
                Some(StateEntry::Value(row)) => row.make_mut()[0] = Value::Int(2),
                other => panic!("{other:?}"),
            }
        }
        // Held here, by the old row (the snapshot's) and by the new one.
        assert_eq!(marks.iter().map(holders).collect::<Vec<_>>(), [3, 3]);
        let (mut buf, mut spare) = (Vec::new(), Listed::new());
        assert_eq!(encode_key_group(&mut keyed, 0, &mut buf, &mut spare), 1);
        // The next write to key group 0 frees its old row; key group 1, not yet written,
        // still holds its own.
        let fresh = Value::from("new");
        for t in &mut live {
            t.insert(key.clone(), two_fields(3, &fresh));
        }
        assert_eq!(holders(&marks[0]), 1, "key group 0's old row is freed");
        assert_eq!(
            holders(&marks[1]),
            2,
            "key group 1's is still the snapshot's"
        );
        assert!(keyed.tables[0][0].is_empty());
        // A view no live table shares any more (the job ended) is kept after it is written:
        // freeing it is left to whoever drops the snapshot, off the savepoint's path.
        drop(live);
        assert_eq!(encode_key_group(&mut keyed, 1, &mut buf, &mut spare), 1);
        assert_eq!(keyed.tables[0][1].len(), 1);
        assert_eq!(holders(&marks[1]), 2);
    }

    #[test]
    fn two_writer_threads_write_the_same_file_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().display().to_string()).unwrap();
        let range = KeyGroupRange { start: 0, end: 9 };
        let snap = compressible_snapshot(range);
        for compression in [Compression::Lz4, Compression::None] {
            let one = write(
                &store,
                "operators/a-0-x",
                0,
                &mut snap.clone(),
                compression,
                WriterThreads::One,
            );
            let two = write(
                &store,
                "operators/b-0-x",
                0,
                &mut snap.clone(),
                compression,
                WriterThreads::Two,
            );
            let (one, two) = (one.unwrap(), two.unwrap());
            assert_eq!(two.keyed_entries, 2_000);
            assert_eq!(
                (one.size, one.crc32c, one.keyed_entries, &one.key_groups),
                (two.size, two.crc32c, two.keyed_entries, &two.key_groups)
            );
            let bytes = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
            assert!(bytes("operators/a-0-x") == bytes("operators/b-0-x"));
            // The file's checksum, combined from its blocks', is the one of its bytes.
            assert_eq!(two.crc32c, crc32c::crc32c(&bytes("operators/b-0-x")));
            assert_eq!(read_all(&store, &two, range).unwrap().len(), 2_000);
        }
    }

    /// Subtask 0's file written by one thread, as a running job's savepoint writes it.
    fn write_one(store: &Store, rel: &str, snap: &SubtaskSnapshot, c: Compression) -> SubtaskState {
        write(store, rel, 0, &mut snap.clone(), c, WriterThreads::One).unwrap()
    }

    fn compressible_snapshot(range: KeyGroupRange) -> SubtaskSnapshot {
        let mut groups = Vec::new();
        for kg in range.iter() {
            let mut t = GroupTable::default();
            for i in 0..200 {
                let payload = format!("{i:08x}{}", ".".repeat(100));
                t.insert(
                    Value::Int(i64::from(kg) * 1000 + i),
                    StateEntry::Value(vec![Value::from(payload.as_str())].into()),
                );
            }
            groups.push(t);
        }
        SubtaskSnapshot {
            keyed: Some(KeyedSnapshot {
                range,
                tables: vec![groups],
            }),
            // Too short to compress: stored as it is beside compressed blocks.
            operator_lists: vec![vec![vec![Value::Int(1)].into()]],
        }
    }

    fn string_state() -> Vec<KeyedStateMeta> {
        vec![KeyedStateMeta {
            name: "latest".into(),
            kind: KeyedStateKind::Value,
            schema: StateSchema::single("payload", FieldType::String),
        }]
    }

    fn read_all(
        store: &Store,
        st: &SubtaskState,
        range: KeyGroupRange,
    ) -> Result<Vec<(u32, Value, StateEntry)>, StateFileError> {
        read_all_by(store, st, range, 1)
    }

    fn read_all_by(
        store: &Store,
        st: &SubtaskState,
        range: KeyGroupRange,
        decoders: usize,
    ) -> Result<Vec<(u32, Value, StateEntry)>, StateFileError> {
        let mut seen = Vec::new();
        read_key_groups(
            store,
            st,
            &string_state(),
            range,
            decoders,
            |kg, entries| seen.extend(entries.into_iter().flatten().map(|(k, e)| (kg, k.value, e))),
        )?;
        Ok(seen)
    }

    #[test]
    fn a_file_of_many_read_chunks_and_a_block_larger_than_one_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().display().to_string()).unwrap();
        // Key groups of 1, 6 (more than a read chunk), 0.5, 3 and 2 MB: reads of several
        // blocks, of one block larger than the chunk, and shorter reads after longer ones
        // into the same buffer; over 8 MB written, so the writer hands ranges to the disk
        // while it writes.
        let range = KeyGroupRange { start: 0, end: 4 };
        let kb_per_group = [1024, 6 * 1024, 512, 3 * 1024, 2 * 1024];
        let mut groups = Vec::new();
        let mut want = Vec::new();
        for (kg, kb) in range.iter().zip(kb_per_group) {
            let mut t = GroupTable::default();
            for i in 0..kb / 4 {
                let key = Value::Int(i64::from(kg) * 1_000_000 + i);
                let payload = format!("{kg}-{i}-{}", "x".repeat(4000));
                let entry = StateEntry::Value(vec![Value::from(payload.as_str())].into());
                t.insert(key.clone(), entry.clone());
                want.push((kg, key, entry));
            }
            groups.push(t);
        }
        let snap = SubtaskSnapshot {
            keyed: Some(KeyedSnapshot {
                range,
                tables: vec![groups],
            }),
            operator_lists: vec![vec![vec![Value::Int(1)].into()]],
        };
        let st = write_one(&store, "operators/big-0-x", &snap, Compression::None);
        assert!(st.size > 12 << 20, "{} bytes", st.size);
        let sorted = |mut v: Vec<(u32, Value, StateEntry)>| {
            v.sort_by(|a, b| (a.0, &a.1).partial_cmp(&(b.0, &b.1)).unwrap());
            v
        };
        let want = sorted(want);
        for decoders in [1, 2] {
            let got = read_all_by(&store, &st, range, decoders).unwrap();
            assert_eq!(sorted(got), want, "{decoders} decoders");
        }
        // A range starting past the first chunk.
        let part = KeyGroupRange { start: 2, end: 4 };
        let got = sorted(read_all(&store, &st, part).unwrap());
        let part_want: Vec<_> = want.iter().filter(|e| e.0 >= 2).cloned().collect();
        assert_eq!(got, part_want);
    }

    #[test]
    fn several_decoders_read_every_key_group_once_and_name_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().display().to_string()).unwrap();
        let range = KeyGroupRange { start: 3, end: 9 };
        let st = write_one(
            &store,
            "operators/c-0-x",
            &compressible_snapshot(range),
            Compression::Lz4,
        );
        let want = read_all(&store, &st, range).unwrap();
        assert_eq!(want.len(), 7 * 200);
        let by_group = |mut v: Vec<(u32, Value, StateEntry)>| {
            // Each key group's entries stay in their order; the groups come as decoded.
            v.sort_by_key(|(kg, _, _)| *kg);
            v
        };
        for decoders in [2, 3, 7, 64] {
            let got = read_all_by(&store, &st, range, decoders).unwrap();
            assert_eq!(by_group(got), want, "{decoders} decoders");
        }
        // Part of the range: the decoders split what is wanted, not the file.
        let part = KeyGroupRange { start: 5, end: 6 };
        let got = read_all_by(&store, &st, part, 2).unwrap();
        assert_eq!(by_group(got), read_all(&store, &st, part).unwrap());
        assert_eq!(read_all(&store, &st, part).unwrap().len(), 2 * 200);

        // Damage in the last decoder's share is reported, whichever decoder finishes first.
        let file = dir.path().join("operators/c-0-x");
        let mut bytes = std::fs::read(&file).unwrap();
        let off = st.key_groups.as_ref().unwrap().blocks[5].offset as usize + 3;
        bytes[off] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        for decoders in [1, 2, 3] {
            let err = read_all_by(&store, &st, range, decoders).unwrap_err();
            assert!(
                err.to_string()
                    .contains("c-0-x is corrupt: checksum mismatch in key group 8"),
                "{decoders} decoders: {err}"
            );
        }
    }

    #[test]
    fn compressed_blocks_read_back_the_same_entries_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().display().to_string()).unwrap();
        let range = KeyGroupRange { start: 0, end: 3 };
        let snap = compressible_snapshot(range);
        let plain = write_one(&store, "operators/p-0-x", &snap, Compression::None);
        let packed = write_one(&store, "operators/c-0-x", &snap, Compression::Lz4);
        assert_eq!(plain.compression, None);
        assert_eq!(packed.compression, Some(Compression::Lz4));
        let blocks = &packed.key_groups.as_ref().unwrap().blocks;
        assert!(blocks.iter().all(|b| b.raw_len.is_some()), "{blocks:?}");
        assert_eq!(packed.operator_state.unwrap().raw_len, None);
        assert!(
            packed.size * 3 < plain.size,
            "{} vs {}",
            packed.size,
            plain.size
        );
        assert_eq!(packed.raw_bytes(), plain.size);
        let want = read_all(&store, &plain, range).unwrap();
        assert_eq!(want.len(), 4 * 200);
        assert_eq!(read_all(&store, &packed, range).unwrap(), want);
        assert_eq!(
            read_operator_lists(&store, &packed, 1).unwrap(),
            read_operator_lists(&store, &plain, 1).unwrap()
        );
        verify_layout(&store, &packed).unwrap();
        verify(&store, &packed).unwrap();

        // A recorded length the stored bytes cannot hold is refused before allocating it.
        let mut lying = packed.clone();
        lying.key_groups.as_mut().unwrap().blocks[1].raw_len = Some(u64::MAX);
        let err = read_all(&store, &lying, range).unwrap_err().to_string();
        assert!(
            err.contains("c-0-x is corrupt") && err.contains("key group 1"),
            "{err}"
        );
        // A wrong one is named too.
        let mut short = packed.clone();
        short.key_groups.as_mut().unwrap().blocks[2].raw_len = Some(100);
        let err = read_all(&store, &short, range).unwrap_err().to_string();
        assert!(err.contains("key group 2"), "{err}");
        // A compressed block in a file that names no compression.
        let mut unnamed = packed.clone();
        unnamed.compression = None;
        let err = read_all(&store, &unnamed, range).unwrap_err().to_string();
        assert!(err.contains("names no compression"), "{err}");

        // Damage inside a compressed block is caught by its checksum, before decompressing.
        let file = dir.path().join("operators/c-0-x");
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[blocks[2].offset as usize + 5] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        let err = read_all(&store, &packed, range).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch in key group 2"), "{err}");
    }

    #[test]
    fn a_version_1_state_file_still_reads() {
        // Version 1 is version 2 without compressed blocks: the same file with the old
        // header version and no compression recorded.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().display().to_string()).unwrap();
        let range = KeyGroupRange { start: 5, end: 6 };
        let snap = compressible_snapshot(range);
        let mut st = write_one(&store, "operators/o-0-x", &snap, Compression::None);
        let file = dir.path().join("operators/o-0-x");
        let mut bytes = std::fs::read(&file).unwrap();
        assert_eq!(&bytes[4..6], &2u16.to_le_bytes());
        bytes[4..6].copy_from_slice(&1u16.to_le_bytes());
        std::fs::write(&file, &bytes).unwrap();
        st.crc32c = crc32c::crc32c(&bytes);
        verify_layout(&store, &st).unwrap();
        verify(&store, &st).unwrap();
        assert_eq!(read_all(&store, &st, range).unwrap().len(), 2 * 200);

        // A version from the future is refused, naming the file and the versions read.
        bytes[4..6].copy_from_slice(&9u16.to_le_bytes());
        std::fs::write(&file, &bytes).unwrap();
        let err = verify_layout(&store, &st).unwrap_err().to_string();
        assert!(
            err.contains("o-0-x") && err.contains("format version 9") && err.contains("1 to 2"),
            "{err}"
        );
    }
}

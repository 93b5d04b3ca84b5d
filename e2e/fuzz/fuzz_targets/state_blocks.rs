//! The blocks of a state file (behind their checksums, whatever the bytes): a key group's
//! block for value, list and map states, and the operator-state block.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sjob::savepoint::metadata::{KeyedStateKind, KeyedStateMeta};
use sjob::savepoint::statefile::{decode_key_group_block, decode_operator_block};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, block)) = data.split_first() else {
        return;
    };
    let kinds = [
        KeyedStateKind::Value,
        KeyedStateKind::List,
        KeyedStateKind::Map,
    ];
    let states: Vec<KeyedStateMeta> = (0..1 + (selector % 3) as usize)
        .map(|i| KeyedStateMeta {
            name: format!("s{i}"),
            kind: kinds[(selector as usize / 3 + i) % 3],
            schema: Default::default(),
        })
        .collect();
    let _ = decode_key_group_block(block, &states, |_, _, _| {});
    let _ = decode_operator_block(block, 1 + (selector % 4) as usize);
});

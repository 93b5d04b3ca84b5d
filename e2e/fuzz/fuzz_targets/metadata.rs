//! A snapshot's `_metadata`, as read from storage: decoded as it is (checksum trailer and
//! all), and with a valid trailer added so the fuzzer reaches the JSON and the restore
//! planning behind it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sjob::engine::graph::JobGraph;
use sjob::engine::spec::JobSpec;
use sjob::savepoint::metadata::SnapshotMetadata;
use sjob::savepoint::restore;

const JOB: &str = "name: t\nparallelism: 2\noperators:\n  - {kind: generator, uid: src}\n  - {kind: keyBy, field: key}\n  - {kind: count, uid: counter}\n  - {kind: discardSink}\n";

fuzz_target!(|data: &[u8]| {
    let _ = SnapshotMetadata::decode(data, "fuzz/_metadata");
    let mut framed = data.to_vec();
    if framed.last() != Some(&b'\n') {
        framed.push(b'\n');
    }
    let crc = crc32c::crc32c(&framed);
    framed.extend_from_slice(format!("#crc32c:{crc:08x}\n").as_bytes());
    if let Ok(meta) = SnapshotMetadata::decode(&framed, "fuzz/_metadata") {
        let Ok(spec) = JobSpec::from_yaml(JOB) else {
            return;
        };
        let Ok(graph) = JobGraph::build(&spec, None) else {
            return;
        };
        let _ = restore::plan("fuzz", &meta, &graph.operator_decls(), false);
        let _ = restore::plan("fuzz", &meta, &graph.operator_decls(), true);
    }
});

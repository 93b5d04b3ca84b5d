//! A StatefulJob's spec as the operator reads it from the API server (JSON), then what the
//! operator derives from it: the job graph, the spec hash and the engine's job file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sjob::engine::graph::JobGraph;
use sjob::operator::crd::StatefulJobSpec;
use sjob::operator::resources::{EngineSettings, engine_job};

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = serde_json::from_slice::<StatefulJobSpec>(data) {
        let _ = JobGraph::build(&spec.job, spec.parallelism);
        let _ = sjob::operator::planner::spec_hash(&spec);
        let _ = engine_job(&spec, &EngineSettings::default());
    }
});

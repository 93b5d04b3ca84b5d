//! The job file (`sjob run JOB.yaml`): YAML parsing, then building the job graph from it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sjob::engine::graph::JobGraph;
use sjob::engine::spec::JobSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = JobSpec::from_yaml(text) {
        let _ = JobGraph::build(&spec, None);
        let _ = JobGraph::build(&spec, Some(3));
    }
});

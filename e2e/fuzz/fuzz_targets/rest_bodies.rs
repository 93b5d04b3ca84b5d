//! What a REST client sends the engine: the bodies of savepoint, stop, hold and release
//! requests, and the savepoint target they name checked against the engine's savepoint roots.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sjob::engine::access::SavepointRoots;
use sjob::engine::rest::{TriggerKind, parse_hold, parse_release, parse_trigger};

fuzz_target!(|data: &[u8]| {
    let roots = SavepointRoots::new(&["/var/lib/sjob/savepoints".to_owned()]).ok();
    for kind in [TriggerKind::Savepoint, TriggerKind::Stop] {
        if let Ok(req) = parse_trigger(kind, data)
            && let (Some(target), Some(roots)) = (req.target, &roots)
        {
            let _ = roots.check(&target);
        }
    }
    let _ = parse_hold(data);
    let _ = parse_release(data);
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(roots) = &roots
    {
        let _ = roots.check(text);
    }
});

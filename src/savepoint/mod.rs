//! The snapshot format shared by the engine, the operator and the offline tools: values and
//! their encoding, key groups, state schemas, state files, `_metadata`, storage, and the
//! mapping of saved state onto a job graph. It knows nothing of Kubernetes or of how the
//! engine runs. README.md ("Savepoint format") describes the layout it reads and writes.

pub mod codec;
pub mod grouptable;
pub mod keygroups;
pub mod mapstore;
pub mod metadata;
pub mod paths;
mod prefetch;
pub mod restore;
pub mod schema;
pub mod statefile;
pub mod staterow;
pub mod store;
pub mod tools;
pub mod value;

//! sjob: a stream engine whose savepoints survive job changes, and (in later modules) the
//! Kubernetes operator that upgrades jobs through them.

pub mod engine;
pub mod local;
pub mod operator;
pub mod savepoint;

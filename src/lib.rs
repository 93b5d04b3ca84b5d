//! sjob: a stream engine whose savepoints survive job changes, and (in later modules) the
//! Kubernetes operator that upgrades jobs through them.

pub mod allocator;
pub mod engine;
pub mod local;
pub mod operator;
pub mod savepoint;

/// Makes ring the process's TLS crypto provider (as kube's): the HTTP clients (the engine
/// REST client, S3) are built without one of their own. Call before building a
/// `reqwest::Client`; calling again does nothing.
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

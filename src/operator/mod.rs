//! The Kubernetes operator side. For now: the client that drives engines over REST.

pub mod crd;
pub mod engine_client;
pub mod planner;

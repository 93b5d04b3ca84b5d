//! The Kubernetes operator: CRDs, the pure upgrade planner, the controller that runs it, and the
//! client that drives engines over REST.

pub mod controller;
pub mod crd;
pub mod engine_client;
pub mod lease;
pub mod metrics;
pub mod planner;
pub mod reference;
pub mod resources;
pub mod runner;

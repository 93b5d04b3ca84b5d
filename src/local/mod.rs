//! The local control plane: what `sjob local` and the end-to-end tests run the operator against.

pub mod apiserver;
pub mod azure_server;
pub mod cluster;
pub mod control_plane;
pub mod kafka_server;
pub mod kubelet;
pub mod real;
pub mod s3_server;
mod server_process;
pub mod sink_check;

pub mod expr;
pub mod graph;
pub mod spec;

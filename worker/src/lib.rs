//! `drover-worker` library: the worker's task handlers and their building blocks (SPEC §6).

pub mod circuit;
pub mod exec;
pub mod http;

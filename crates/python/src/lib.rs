//! tidewire-py: the PyO3 bindings (`tidewire._native`).
//!
//! Empty until the Python issue lands: the Rust core never depends on PyO3, and this crate
//! will hold every `#[pyclass]`.
#![forbid(unsafe_code)]

//! Shared helpers for the qcowx benches.

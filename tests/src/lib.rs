//! Helpers shared by the workspace-level interoperability tests.

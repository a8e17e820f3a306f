//! NBD server for qcowx images (not yet implemented; see the NBD issue).

//! nexus-storage: everything durable in Nexus.
//!
//! This crate will own the btrfs pool, images, per-VM drives and snapshots
//! (the storage issue). It starts with the two pieces every later part
//! stands on: the names Nexus accepts for things that become paths, and
//! the SQLite catalog with its forward-only, versioned migrations.
//!
//! # Layout
//!
//! - `names`: validation of VM, image and snapshot names.
//! - `catalog`: opening the catalog (WAL, foreign keys) and migrating it.

pub mod catalog;
pub mod names;

pub use catalog::{Catalog, CatalogError};
pub use names::{NameError, validate_name};

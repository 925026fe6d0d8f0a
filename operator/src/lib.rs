//! The Sluice operator: `SegmentIntegration` resources provision the ingest service, its webhook
//! URL and credentials, and the destination schema.
//!
//! The reconcile is split into named steps: `crd` (the resource and its validation), `build`
//! (desired objects, pure), `destination` (the warehouse, through the ingest library), `status`
//! (conditions, pure), `controller` (the loop that applies them) and `metrics` (what it
//! serves on `/healthz` and `/metrics`). `leader` keeps a second replica idle until the first
//! stops; `rbac` lists the rights all of this needs.

pub mod build;
pub mod controller;
pub mod crd;
pub mod destination;
pub mod leader;
pub mod metrics;
pub mod rbac;
pub mod status;

pub use crd::{SegmentIntegration, SegmentIntegrationSpec, SegmentIntegrationStatus};

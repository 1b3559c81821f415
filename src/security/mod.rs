//! The privilege boundary (README "Security and privileges"; the contract is SECURITY.md).
//!
//! - `api`: pg_queue's SQL functions read and write tables no other role may touch, so
//!   they run as the extension owner, as SECURITY DEFINER functions would, yet check the
//!   privileges of the role that really called them.
//! - `sandbox`: code of other roles (handlers, schedules' enqueues) runs as its owner in a
//!   security-restricted operation that leaves nothing behind in the worker's session.

pub mod api;
pub mod sandbox;

pub use api::init;

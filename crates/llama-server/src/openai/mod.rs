//! OpenAI wire types: what clients send and receive, field for field.
//! Requests keep numbers wide (`i64`, `f64`) and loosely typed fields as JSON
//! values so that validation, not serde, words the error for out-of-range or
//! oddly shaped input.

pub mod chat;
pub mod common;
pub mod completions;
pub mod models;

pub use common::{unix_now, StreamOptions, UsageInfo};

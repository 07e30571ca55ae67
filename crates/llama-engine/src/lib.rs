//! The engine: continuous batching of generation requests over one model.
//!
//! The server talks to it only through [`EngineHandle::submit`], which returns a
//! [`Generation`] stream of [`StreamEvent`]s. The engine runs on its own OS
//! thread: each step it drains new requests and cancellations, asks the
//! [`scheduler`] for a plan, runs one batched forward through a
//! [`runner::ModelRunner`], samples, detokenizes, checks stop conditions and
//! sends events.

pub mod chat_template;
pub mod detokenizer;
pub mod engine;
pub mod handle;
pub mod request;
pub mod runner;
pub mod sampling;
pub mod scheduler;
pub mod sentencepiece;
pub mod stop;
pub mod tokenizer;

pub use engine::{
    parse_draws_on_device, parse_on_off, parse_overlap, start_engine, start_with_runner,
    EngineConfig, EngineStartError,
};
pub use handle::{EngineHandle, Generation, StatsSnapshot};
pub use request::{
    EngineError, FinishReason, GenerateRequest, SampledLogprobs, SamplingParams, StopConditions,
    StreamEvent, SubmitError, TokenLogprob, Usage,
};

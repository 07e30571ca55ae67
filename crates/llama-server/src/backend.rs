//! The engine as the HTTP layer sees it. A trait so that handlers can be
//! exercised with a scripted engine (overload, mid-stream failures, slow
//! queues) without a model; [`EngineHandle`] is the production implementation.

use std::pin::Pin;

use futures::Stream;
use llama_engine::{
    EngineError, EngineHandle, GenerateRequest, StatsSnapshot, StreamEvent, SubmitError,
};

/// The events of one request. Dropping it cancels the request.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, EngineError>> + Send>>;

pub trait Backend: Send + Sync + 'static {
    /// Never blocks; a full queue is [`SubmitError::Overloaded`].
    fn submit(&self, request: GenerateRequest) -> Result<EventStream, SubmitError>;
    fn is_alive(&self) -> bool;
    fn is_accepting(&self) -> bool;
    /// Start draining: refuse new requests, let queued and running ones finish.
    fn stop_accepting(&self);
    /// End the engine; unfinished requests fail with [`EngineError::Shutdown`].
    fn shutdown(&self);
    fn stats(&self) -> StatsSnapshot;
    /// Context length in tokens (prompt + completion).
    fn max_context(&self) -> usize;
}

impl Backend for EngineHandle {
    fn submit(&self, request: GenerateRequest) -> Result<EventStream, SubmitError> {
        EngineHandle::submit(self, request).map(|generation| Box::pin(generation) as EventStream)
    }

    fn is_alive(&self) -> bool {
        EngineHandle::is_alive(self)
    }

    fn is_accepting(&self) -> bool {
        EngineHandle::is_accepting(self)
    }

    fn stop_accepting(&self) {
        EngineHandle::stop_accepting(self)
    }

    fn shutdown(&self) {
        EngineHandle::shutdown(self)
    }

    fn stats(&self) -> StatsSnapshot {
        EngineHandle::stats(self)
    }

    fn max_context(&self) -> usize {
        EngineHandle::max_context(self)
    }
}

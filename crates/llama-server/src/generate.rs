//! The path both endpoints share after validation: submit each prompt to the
//! engine and merge their events into one stream of choices, numbered
//! `prompt_index * n + choice`. Streaming formats that stream; non-streaming
//! responses fold it with [`collect`].

use std::pin::Pin;
use std::time::Instant;

use futures::{Stream, StreamExt};
use llama_engine::{EngineError, FinishReason, GenerateRequest, SampledLogprobs, StreamEvent};

use crate::error::ApiError;
use crate::state::AppState;
use crate::validation::GenerationParams;

#[derive(Debug, Clone, PartialEq)]
pub enum ChoiceEvent {
    /// The scored prompt of a choice (echo with logprobs), before its tokens.
    PromptLogprobs {
        index: usize,
        logprobs: Vec<Option<SampledLogprobs>>,
    },
    Token {
        index: usize,
        text: String,
        logprobs: Option<SampledLogprobs>,
    },
    Done {
        index: usize,
        finish_reason: FinishReason,
        completion_tokens: usize,
        /// Set on one choice per engine request: how long it queued.
        queue_time: Option<std::time::Duration>,
        /// The prompt tokens its engine request found in the prefix cache, on
        /// one choice per engine request (0 on the others), so that a sum
        /// over choices counts each prompt once.
        cached_tokens: usize,
    },
}

pub type ChoiceStream = Pin<Box<dyn Stream<Item = Result<ChoiceEvent, EngineError>> + Send>>;

pub struct Submitted {
    pub events: ChoiceStream,
    /// Summed over prompts: what `usage.prompt_tokens` reports.
    pub prompt_tokens: usize,
    pub num_choices: usize,
}

/// One prompt, tokenized, with its completion budget.
pub struct PromptJob {
    pub ids: Vec<u32>,
    pub max_tokens: usize,
}

/// Queues every prompt or none: if one is refused, dropping the streams of the
/// others cancels them.
pub fn submit(
    state: &AppState,
    prompts: Vec<PromptJob>,
    params: &GenerationParams,
    request_id: &str,
) -> Result<Submitted, ApiError> {
    let n = params.n;
    let submitted_at = Instant::now();
    let deadline = state.options.request_timeout.map(|t| submitted_at + t);
    let mut streams = Vec::with_capacity(prompts.len());
    let mut prompt_tokens = 0;
    let num_prompts = prompts.len();
    for (p, job) in prompts.into_iter().enumerate() {
        prompt_tokens += job.ids.len();
        let mut stop = params.stop.clone();
        stop.max_tokens = job.max_tokens;
        let request = GenerateRequest {
            request_id: if num_prompts == 1 {
                request_id.to_string()
            } else {
                format!("{request_id}/{p}")
            },
            prompt: job.ids,
            sampling: params.sampling.clone(),
            stop,
            n,
            logprobs: params.logprobs,
            prompt_logprobs: params.prompt_logprobs,
            deadline,
        };
        let events = state.backend.submit(request)?;
        let offset = p * n;
        streams.push(events.map(move |event| event.map(|e| renumber(e, offset))));
    }
    Ok(Submitted {
        events: crate::metrics::instrument(
            Box::pin(futures::stream::select_all(streams)),
            submitted_at,
        ),
        prompt_tokens,
        num_choices: num_prompts * n,
    })
}

fn renumber(event: StreamEvent, offset: usize) -> ChoiceEvent {
    match event {
        StreamEvent::PromptLogprobs { index, logprobs } => ChoiceEvent::PromptLogprobs {
            index: offset + index,
            logprobs,
        },
        StreamEvent::Token {
            index,
            text,
            logprobs,
            ..
        } => ChoiceEvent::Token {
            index: offset + index,
            text,
            logprobs,
        },
        StreamEvent::Done {
            index,
            finish_reason,
            usage,
        } => ChoiceEvent::Done {
            index: offset + index,
            finish_reason,
            completion_tokens: usage.completion_tokens,
            queue_time: (index == 0).then_some(usage.queue_time),
            cached_tokens: if index == 0 { usage.cached_tokens } else { 0 },
        },
    }
}

/// A finished choice of a non-streaming response.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CollectedChoice {
    pub text: String,
    pub logprobs: Vec<SampledLogprobs>,
    /// Character offset (in `text`) where each token's text begins.
    pub text_offsets: Vec<usize>,
    pub finish_reason: Option<FinishReason>,
    pub completion_tokens: usize,
    /// See [`ChoiceEvent::Done`]: summed over choices, the cached prompt tokens.
    pub cached_tokens: usize,
    /// The scored prompt, when the request asked for it.
    pub prompt_logprobs: Option<Vec<Option<SampledLogprobs>>>,
}

/// Folds the event stream into whole choices: the same events a stream sends.
pub async fn collect(
    mut events: ChoiceStream,
    num_choices: usize,
) -> Result<Vec<CollectedChoice>, ApiError> {
    let mut choices = vec![CollectedChoice::default(); num_choices];
    let mut char_lens = vec![0usize; num_choices];
    while let Some(event) = events.next().await {
        match event? {
            ChoiceEvent::PromptLogprobs { index, logprobs } => {
                let choice = choices.get_mut(index).ok_or_else(|| {
                    ApiError::internal(format!("engine sent choice {index} of {num_choices}"))
                })?;
                choice.prompt_logprobs = Some(logprobs);
            }
            ChoiceEvent::Token {
                index,
                text,
                logprobs,
            } => {
                let choice = choices.get_mut(index).ok_or_else(|| {
                    ApiError::internal(format!("engine sent choice {index} of {num_choices}"))
                })?;
                if let Some(lp) = logprobs {
                    choice.logprobs.push(lp);
                    choice.text_offsets.push(char_lens[index]);
                }
                char_lens[index] += text.chars().count();
                choice.text.push_str(&text);
            }
            ChoiceEvent::Done {
                index,
                finish_reason,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                let choice = choices.get_mut(index).ok_or_else(|| {
                    ApiError::internal(format!("engine sent choice {index} of {num_choices}"))
                })?;
                choice.finish_reason = Some(finish_reason);
                choice.completion_tokens = completion_tokens;
                choice.cached_tokens = cached_tokens;
            }
        }
    }
    if choices.iter().any(|c| c.finish_reason.is_none()) {
        return Err(ApiError::internal(
            "the engine ended a request before every choice finished",
        ));
    }
    Ok(choices)
}

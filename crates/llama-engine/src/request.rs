//! The types that cross the server → engine seam. No HTTP, no JSON here.

use std::time::Instant;

/// How to pick each next token. Defaults are plain greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Drop tokens whose probability is below `min_p` × the top token's (0 = off).
    pub min_p: f32,
    /// Same seed + same request = same output, whatever else is in the batch.
    pub seed: Option<u64>,
    /// Multiplicative penalty on logits of tokens already in prompt or output (1 = off), as in vLLM/HF.
    pub repetition_penalty: f32,
    /// OpenAI presence penalty: subtracted once from logits of tokens already generated.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted per occurrence in the generated tokens.
    pub frequency_penalty: f32,
    /// Added to the logits of these token ids before sampling.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }
}

/// When a choice ends.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StopConditions {
    /// Maximum completion tokens of each choice. 0 runs the prompt only
    /// (to score it) and ends every choice with `Length` and no token.
    pub max_tokens: usize,
    /// Stop strings, matched on the detokenized text; never part of the output.
    pub stop_strings: Vec<String>,
    /// Extra token ids that end the choice (finish_reason `stop`), besides EOS.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past EOS (benchmarks).
    pub ignore_eos: bool,
}

/// One generation request: a tokenized prompt and how to continue it.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// For logs and traces only.
    pub request_id: String,
    /// Token ids exactly as the model sees them (BOS included when wanted).
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    /// Number of choices; they share one prefill.
    pub n: usize,
    /// `Some(k)`: return each chosen token's logprob and the top `k` alternatives (k ≤ 20).
    pub logprobs: Option<usize>,
    /// `Some(k)`: also score the prompt, each token given the ones before it,
    /// with the top `k` alternatives (OpenAI's `echo` with `logprobs`; vLLM's
    /// `prompt_logprobs`). Sent as [`StreamEvent::PromptLogprobs`].
    pub prompt_logprobs: Option<usize>,
    /// The request fails with [`EngineError::Timeout`] if still unfinished then.
    pub deadline: Option<Instant>,
}

impl GenerateRequest {
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            request_id: String::new(),
            prompt,
            sampling: SamplingParams::default(),
            stop: StopConditions {
                max_tokens,
                ..Default::default()
            },
            n: 1,
            logprobs: None,
            prompt_logprobs: None,
            deadline: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached, or the model's context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache
    /// (OpenAI's `prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
    /// From submission until the request's first step (queueing, for metrics).
    pub queue_time: std::time::Duration,
}

/// A token's log-probability and its text (lossy for byte-fallback pieces).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    /// The token's own text, e.g. " world" or "<0xE2>" decoded as far as it can be alone.
    pub token: String,
    /// The token's raw bytes (byte-fallback tokens give their single byte).
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SampledLogprobs {
    pub chosen: TokenLogprob,
    /// Most likely alternatives, best first (may include the chosen token).
    pub top: Vec<TokenLogprob>,
}

/// What a [`crate::Generation`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The prompt's tokens scored by the model, one entry per prompt token
    /// (the first has none: nothing comes before it), for a request with
    /// `prompt_logprobs`. Sent once per choice, before its first `Token`.
    PromptLogprobs {
        index: usize,
        logprobs: Vec<Option<SampledLogprobs>>,
    },
    /// A generated token of choice `index`. `text` is the text this token
    /// releases: possibly empty (an incomplete UTF-8 character, or text held
    /// back because it may start a stop string), possibly more than the token
    /// itself (text released from earlier tokens). The concatenation of all
    /// `text` of a choice is exactly its final answer.
    Token {
        index: usize,
        id: u32,
        text: String,
        logprobs: Option<SampledLogprobs>,
    },
    /// Choice `index` has finished. Its last text came in a `Token` before this.
    Done {
        index: usize,
        finish_reason: FinishReason,
        usage: Usage,
    },
}

/// Why a request could not be queued. The server maps these to HTTP statuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The waiting queue is full (HTTP 429).
    #[error("the server is overloaded: {waiting} requests are already waiting")]
    Overloaded { waiting: usize },
    /// The request can never run (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The prompt plus `max_tokens` does not fit the model (HTTP 400, `context_length_exceeded`).
    #[error("this model's maximum context length is {max_context} tokens, but you requested {requested} tokens ({prompt} in the prompt, {max_tokens} for the completion)")]
    ContextLength {
        max_context: usize,
        requested: usize,
        prompt: usize,
        max_tokens: usize,
    },
    /// Draining or stopped (HTTP 503).
    #[error("the engine is not accepting requests: {0}")]
    Unavailable(String),
}

/// A failure after the request was accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("the model failed while running this request: {0}")]
    Model(String),
    #[error("the request did not finish before its deadline")]
    Timeout,
    #[error("the engine stopped before this request finished")]
    Shutdown,
}

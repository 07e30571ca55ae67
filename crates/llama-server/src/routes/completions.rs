//! `POST /v1/completions`.

use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use llama_engine::SampledLogprobs;
use serde_json::Value;

use crate::codec::Codec;
use crate::error::ApiError;
use crate::generate::{self, ChoiceEvent, PromptJob};
use crate::json::ApiJson;
use crate::openai::common::new_id;
use crate::openai::completions::{
    Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, TopLogprobs,
};
use crate::openai::{unix_now, UsageInfo};
use crate::request_id::RequestId;
use crate::routes::codec_error;
use crate::sse::{self, ChunkFormatter};
use crate::state::AppState;
use crate::validation::{check_model, resolve_max_tokens, validate_sampling, SamplingFields};

/// One prompt as the client gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Encoded with the tokenizer's special tokens (BOS).
    Text(String),
    /// Used exactly as given, as vLLM does.
    Ids(Vec<u32>),
}

pub async fn completions(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    check_model(req.model.as_deref(), &state.model_names)?;
    let echo = req.echo.unwrap_or(false);
    let inputs = parse_prompt(&req.prompt, state.options.limits.max_prompts)?;
    // The text goes between each prompt and the suffix (Code Llama's infilling).
    let suffix = req.suffix.clone().filter(|s| !s.is_empty());
    if suffix.is_some() && echo {
        return Err(ApiError::param(
            "echo",
            "`echo` and `suffix` cannot be used together",
        ));
    }
    if suffix.is_some() && inputs.iter().any(|i| matches!(i, PromptInput::Ids(_))) {
        return Err(ApiError::param(
            "suffix",
            "`suffix` needs text prompts, not token ids",
        ));
    }
    let logprobs = match req.logprobs {
        Some(k) if k < 0 => {
            return Err(ApiError::param("logprobs", "`logprobs` must be at least 0"))
        }
        Some(k) => Some(k as usize),
        None => None,
    };
    let fields = SamplingFields {
        temperature: req.temperature,
        top_p: req.top_p,
        n: req.n,
        max_tokens: req.max_tokens.map(|m| (m, "max_tokens")),
        // The prompt alone, scored (OpenAI's legacy API and vLLM allow it).
        max_tokens_may_be_zero: echo,
        stop: req.stop.as_ref(),
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        logit_bias: req.logit_bias.as_ref(),
        top_k: req.top_k,
        min_p: req.min_p,
        repetition_penalty: req.repetition_penalty,
        ignore_eos: req.ignore_eos,
        stop_token_ids: req.stop_token_ids.as_deref(),
        logprobs,
    };
    let vocab_size = state.codec.vocab_size();
    let mut params = validate_sampling(
        &fields,
        &state.options.generation_defaults,
        &state.options.limits,
        vocab_size,
    )
    .map_err(|e| rename_param(e, "top_logprobs", "logprobs"))?;
    if let Some(best_of) = req.best_of {
        if best_of < params.n as i64 {
            return Err(ApiError::param("best_of", "`best_of` must be at least `n`"));
        }
        if best_of > params.n as i64 {
            return Err(ApiError::unsupported(
                "best_of",
                "server-side best-of sampling is not implemented",
            ));
        }
    }

    // Echo with logprobs scores the prompt too, as OpenAI's legacy API did
    // (what lm-evaluation-harness uses to compute log-likelihoods).
    params.prompt_logprobs = logprobs.filter(|_| echo);
    let (prompts, infill_end, echoes) = state
        .blocking(move |codec| {
            // The prompt as sent; token-id prompts are echoed decoded.
            let texts: Option<Vec<Option<String>>> = echo.then(|| {
                inputs
                    .iter()
                    .map(|input| match input {
                        PromptInput::Text(text) => Some(text.clone()),
                        PromptInput::Ids(_) => None,
                    })
                    .collect()
            });
            let (prompts, end) = encode_prompts(codec, inputs, suffix.as_deref())?;
            let echoes = texts.map(|texts| {
                texts
                    .into_iter()
                    .zip(&prompts)
                    .map(|(text, ids)| Echo::new(codec, text, ids))
                    .collect::<Vec<_>>()
            });
            Ok((prompts, end, echoes))
        })
        .await?;
    params.stop.stop_token_ids.extend(infill_end);
    let max_context = state.backend.max_context();
    let default_max = Some(state.options.completions_default_max_tokens);
    let mut jobs = Vec::with_capacity(prompts.len());
    for ids in prompts {
        if ids.is_empty() {
            return Err(ApiError::param("prompt", "the prompt is empty"));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(ApiError::param(
                "prompt",
                format!("token id {bad} is not below the vocabulary size {vocab_size}"),
            ));
        }
        let max_tokens = resolve_max_tokens(
            params.max_tokens,
            default_max,
            ids.len(),
            max_context,
            "prompt",
        )?;
        jobs.push(PromptJob { ids, max_tokens });
    }
    let submitted = generate::submit(&state, jobs, &params, &request_id)?;

    let id = new_id("cmpl");
    let created = unix_now();
    if req.stream.unwrap_or(false) {
        let formatter = CompletionFormatter {
            id,
            created,
            model: state.model.id.clone(),
            fingerprint: state.system_fingerprint.clone(),
            include_usage: req
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            prompt_tokens: submitted.prompt_tokens,
            completion_tokens: 0,
            cached_tokens: 0,
            logprobs: logprobs.is_some(),
            char_offsets: vec![0; submitted.num_choices],
            echoed: vec![false; submitted.num_choices],
            echoes,
            n: params.n,
        };
        return Ok(sse::stream_response(
            submitted.events,
            formatter,
            state.options.keep_alive,
        ));
    }

    let choices = generate::collect(submitted.events, submitted.num_choices).await?;
    let completion_tokens = choices.iter().map(|c| c.completion_tokens).sum();
    let cached_tokens = choices.iter().map(|c| c.cached_tokens).sum();
    let response = Completion {
        id,
        object: "text_completion".into(),
        created,
        model: state.model.id.clone(),
        system_fingerprint: state.system_fingerprint.clone(),
        choices: choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| {
                let echo = echoes.as_ref().map(|e| &e[index / params.n]);
                let shift = echo.map_or(0, |e| e.text.chars().count());
                CompletionChoice {
                    index,
                    logprobs: logprobs.map(|_| {
                        let mut all = match (echo, &c.prompt_logprobs) {
                            (Some(echo), Some(scores)) => echo.logprobs(scores),
                            _ => CompletionLogprobs::default(),
                        };
                        for (lp, &offset) in c.logprobs.iter().zip(&c.text_offsets) {
                            all.extend(completion_logprob(lp, shift + offset));
                        }
                        all
                    }),
                    text: match echo {
                        Some(echo) => format!("{}{}", echo.text, c.text),
                        None => c.text,
                    },
                    finish_reason: c.finish_reason.map(|f| f.as_str().to_string()),
                }
            })
            .collect(),
        usage: Some(UsageInfo::new(
            submitted.prompt_tokens,
            completion_tokens,
            cached_tokens,
        )),
    };
    Ok(Json(response).into_response())
}

/// The prompts' ids, and with a suffix the token that ends an infill.
fn encode_prompts(
    codec: &dyn Codec,
    inputs: Vec<PromptInput>,
    suffix: Option<&str>,
) -> Result<(Vec<Vec<u32>>, Option<u32>), ApiError> {
    let mut end = None;
    let mut prompts = Vec::with_capacity(inputs.len());
    for input in inputs {
        prompts.push(match (input, suffix) {
            (PromptInput::Ids(ids), _) => ids,
            (PromptInput::Text(text), None) => codec
                .encode(&text, true)
                .map_err(|e| codec_error(e, "prompt"))?,
            (PromptInput::Text(text), Some(suffix)) => {
                let infill = codec
                    .infill_prompt(&text, suffix)
                    .map_err(|e| codec_error(e, "suffix"))?
                    .ok_or_else(|| {
                        ApiError::unsupported(
                            "suffix",
                            "this model has no fill-in-the-middle tokens (Code Llama's \
                             \u{2581}<PRE>, \u{2581}<SUF>, \u{2581}<MID>, \u{2581}<EOT>), so it cannot \
                             complete between a prompt and a suffix",
                        )
                    })?;
                end = Some(infill.end_token);
                infill.ids
            }
        });
    }
    Ok((prompts, end))
}

fn rename_param(err: ApiError, from: &str, to: &str) -> ApiError {
    match err {
        ApiError::InvalidRequest {
            message,
            param,
            code,
        } if param.as_deref() == Some(from) => ApiError::InvalidRequest {
            message: message.replace(from, to),
            param: Some(to.to_string()),
            code,
        },
        other => other,
    }
}

/// A string, an array of strings, an array of token ids, or an array of arrays of ids.
pub fn parse_prompt(prompt: &Value, max_prompts: usize) -> Result<Vec<PromptInput>, ApiError> {
    let shape_error = || {
        ApiError::param(
            "prompt",
            "`prompt` must be a string, an array of strings, an array of token ids or an array of arrays of token ids",
        )
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| {
                        ApiError::param("prompt", format!("`{v}` is not a valid token id"))
                    })
            })
            .collect()
    };
    let inputs = match prompt {
        Value::String(s) => vec![PromptInput::Text(s.clone())],
        Value::Array(items) if items.is_empty() => {
            return Err(ApiError::param(
                "prompt",
                "`prompt` must not be an empty array",
            ));
        }
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(|s| PromptInput::Text(s.to_string()))
                        .ok_or_else(shape_error)
                })
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![PromptInput::Ids(ids(items)?)],
            Value::Array(_) => items
                .iter()
                .map(|v| match v {
                    Value::Array(inner) if !inner.is_empty() => Ok(PromptInput::Ids(ids(inner)?)),
                    Value::Array(_) => Err(ApiError::param(
                        "prompt",
                        "a token-id prompt must not be empty",
                    )),
                    _ => Err(shape_error()),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(shape_error()),
        },
        _ => return Err(shape_error()),
    };
    if inputs.len() > max_prompts {
        return Err(ApiError::param(
            "prompt",
            format!(
                "at most {max_prompts} prompts per request, got {}",
                inputs.len()
            ),
        ));
    }
    Ok(inputs)
}

fn completion_logprob(lp: &SampledLogprobs, offset: usize) -> CompletionLogprobs {
    let top = TopLogprobs::new(lp.top.iter().map(|t| (t.token.clone(), t.logprob)));
    CompletionLogprobs {
        tokens: vec![lp.chosen.token.clone()],
        token_logprobs: vec![Some(lp.chosen.logprob)],
        top_logprobs: vec![Some(top)],
        text_offset: vec![offset],
    }
}

/// The prompt text an `echo` request gets back before each choice's text,
/// with what its logprobs need.
#[derive(Debug, Clone)]
struct Echo {
    /// The prompt as sent, or decoded when it was sent as token ids.
    text: String,
    /// The first prompt token's text: it has no logprob, only a place.
    first_token: String,
    /// Where each prompt token's text begins in the decoded prompt.
    offsets: Vec<usize>,
}

impl Echo {
    fn new(codec: &dyn Codec, text: Option<String>, ids: &[u32]) -> Self {
        let (decoded, offsets) = codec.decode_with_offsets(ids);
        Self {
            text: text.unwrap_or(decoded),
            first_token: ids
                .first()
                .map(|&id| codec.token_text(id))
                .unwrap_or_default(),
            offsets,
        }
    }

    /// The prompt's entries of a choice's logprobs: the first token with
    /// `null`s, as OpenAI sends it, then each scored token.
    fn logprobs(&self, scores: &[Option<SampledLogprobs>]) -> CompletionLogprobs {
        let mut all = CompletionLogprobs::default();
        for (i, score) in scores.iter().enumerate() {
            let offset = self.offsets.get(i).copied().unwrap_or(0);
            match score {
                Some(lp) => all.extend(completion_logprob(lp, offset)),
                None => all.extend(CompletionLogprobs {
                    tokens: vec![self.first_token.clone()],
                    token_logprobs: vec![None],
                    top_logprobs: vec![None],
                    text_offset: vec![offset],
                }),
            }
        }
        all
    }
}

struct CompletionFormatter {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    include_usage: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    logprobs: bool,
    char_offsets: Vec<usize>,
    /// Per prompt, with `echo`: sent first in each of its choices.
    echoes: Option<Vec<Echo>>,
    echoed: Vec<bool>,
    n: usize,
}

impl CompletionFormatter {
    /// The prompt to echo before choice `index`'s first text, once.
    fn take_echo(&mut self, index: usize) -> Option<Echo> {
        let echo = self.echoes.as_ref()?.get(index / self.n.max(1))?.clone();
        let echoed = self.echoed.get_mut(index)?;
        if std::mem::replace(echoed, true) {
            return None;
        }
        Some(echo)
    }

    fn choice_event(&mut self, event: ChoiceEvent) -> Vec<Event> {
        match event {
            // Sent with the echo, which it always precedes.
            ChoiceEvent::PromptLogprobs { .. } => Vec::new(),
            ChoiceEvent::Token {
                index,
                text,
                logprobs,
            } => {
                let logprobs = logprobs.filter(|_| self.logprobs);
                if text.is_empty() && logprobs.is_none() {
                    return Vec::new();
                }
                let offset = self.char_offsets.get(index).copied().unwrap_or(0);
                if let Some(o) = self.char_offsets.get_mut(index) {
                    *o += text.chars().count();
                }
                vec![sse::data(&self.chunk(
                    vec![CompletionChoice {
                        index,
                        text,
                        logprobs: logprobs.map(|lp| completion_logprob(&lp, offset)),
                        finish_reason: None,
                    }],
                    None,
                ))]
            }
            ChoiceEvent::Done {
                index,
                finish_reason,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                self.completion_tokens += completion_tokens;
                self.cached_tokens += cached_tokens;
                vec![sse::data(&self.chunk(
                    vec![CompletionChoice {
                        index,
                        text: String::new(),
                        logprobs: None,
                        finish_reason: Some(finish_reason.as_str().into()),
                    }],
                    None,
                ))]
            }
        }
    }

    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<UsageInfo>) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.fingerprint.clone(),
            choices,
            usage,
        }
    }
}

impl ChunkFormatter for CompletionFormatter {
    fn start(&mut self) -> Vec<Event> {
        Vec::new()
    }

    fn event(&mut self, event: ChoiceEvent) -> Vec<Event> {
        let mut events = Vec::new();
        let index = match &event {
            ChoiceEvent::PromptLogprobs { index, .. }
            | ChoiceEvent::Token { index, .. }
            | ChoiceEvent::Done { index, .. } => *index,
        };
        if let Some(echo) = self.take_echo(index) {
            let logprobs = match &event {
                ChoiceEvent::PromptLogprobs { logprobs, .. } if self.logprobs => {
                    Some(echo.logprobs(logprobs))
                }
                _ => None,
            };
            if let Some(o) = self.char_offsets.get_mut(index) {
                *o = echo.text.chars().count();
            }
            events.push(sse::data(&self.chunk(
                vec![CompletionChoice {
                    index,
                    text: echo.text,
                    logprobs,
                    finish_reason: None,
                }],
                None,
            )));
        }
        events.extend(self.choice_event(event));
        events
    }

    fn finish(&mut self) -> Vec<Event> {
        if !self.include_usage {
            return Vec::new();
        }
        let usage = UsageInfo::new(
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
        );
        vec![sse::data(&self.chunk(Vec::new(), Some(usage)))]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompt_shapes() {
        assert_eq!(
            parse_prompt(&json!("hi"), 8).unwrap(),
            vec![PromptInput::Text("hi".into())]
        );
        assert_eq!(
            parse_prompt(&json!(["a", "b"]), 8).unwrap(),
            vec![PromptInput::Text("a".into()), PromptInput::Text("b".into())]
        );
        assert_eq!(
            parse_prompt(&json!([1, 2, 3]), 8).unwrap(),
            vec![PromptInput::Ids(vec![1, 2, 3])]
        );
        assert_eq!(
            parse_prompt(&json!([[1], [2, 3]]), 8).unwrap(),
            vec![PromptInput::Ids(vec![1]), PromptInput::Ids(vec![2, 3])]
        );
        for bad in [
            json!([]),
            json!(5),
            json!(["a", 1]),
            json!([1, -2]),
            json!([[1], []]),
            json!([1.5]),
            json!(null),
        ] {
            let err = parse_prompt(&bad, 8).unwrap_err();
            assert_eq!(err.body().error.param.as_deref(), Some("prompt"), "{bad}");
        }
        assert!(parse_prompt(&json!(vec!["a"; 9]), 8).is_err());
    }
}

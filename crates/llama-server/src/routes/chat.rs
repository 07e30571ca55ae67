//! `POST /v1/chat/completions`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use llama_engine::SampledLogprobs;
use serde_json::Value;

use crate::codec::{ChatRole, ChatTurn};
use crate::error::ApiError;
use crate::generate::{self, ChoiceEvent, PromptJob};
use crate::json::ApiJson;
use crate::openai::chat::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
    ChatDelta, ChatLogprobs, ChatMessageIn, ChatMessageOut, ChatTokenLogprob, ChatTopLogprob,
    MessageContent,
};
use crate::openai::common::new_id;
use crate::openai::{unix_now, UsageInfo};
use crate::request_id::RequestId;
use crate::routes::codec_error;
use crate::sse::{self, ChunkFormatter};
use crate::state::AppState;
use crate::validation::{check_model, resolve_max_tokens, validate_sampling, SamplingFields};

pub async fn chat_completions(
    State(state): State<AppState>,
    RequestId(request_id): RequestId,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    check_model(req.model.as_deref(), &state.model_names)?;
    refuse_unsupported(&req)?;
    let turns = to_turns(&req.messages)?;

    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (_, Some(k)) if k < 0 => {
            return Err(ApiError::param(
                "top_logprobs",
                "`top_logprobs` must be at least 0",
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, Some(k)) if k > 0 => {
            return Err(ApiError::param(
                "top_logprobs",
                "`top_logprobs` requires `logprobs: true`",
            ));
        }
        (false, _) => None,
    };
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(m), _) => Some((m, "max_completion_tokens")),
        (None, Some(m)) => Some((m, "max_tokens")),
        (None, None) => None,
    };
    let fields = SamplingFields {
        temperature: req.temperature,
        top_p: req.top_p,
        n: req.n,
        max_tokens,
        max_tokens_may_be_zero: false,
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
    let params = validate_sampling(
        &fields,
        &state.options.generation_defaults,
        &state.options.limits,
        state.codec.vocab_size(),
    )?;

    let system = state.options.default_system_prompt.clone();
    let prompt = state
        .blocking(move |codec| {
            codec
                .render_chat(&turns, system.as_deref())
                .map_err(|e| codec_error(e, "messages"))
        })
        .await?;
    let max_tokens = resolve_max_tokens(
        params.max_tokens,
        None,
        prompt.len(),
        state.backend.max_context(),
        "messages",
    )?;
    let submitted = generate::submit(
        &state,
        vec![PromptJob {
            ids: prompt,
            max_tokens,
        }],
        &params,
        &request_id,
    )?;

    let id = new_id("chatcmpl");
    let created = unix_now();
    if req.stream.unwrap_or(false) {
        let formatter = ChatFormatter {
            id,
            created,
            model: state.model.id.clone(),
            fingerprint: state.system_fingerprint.clone(),
            num_choices: submitted.num_choices,
            include_usage: req
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            prompt_tokens: submitted.prompt_tokens,
            completion_tokens: 0,
            cached_tokens: 0,
            logprobs: logprobs.is_some(),
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
    let response = ChatCompletion {
        id,
        object: "chat.completion".into(),
        created,
        model: state.model.id.clone(),
        system_fingerprint: state.system_fingerprint.clone(),
        choices: choices
            .into_iter()
            .enumerate()
            .map(|(index, c)| ChatChoice {
                index,
                message: ChatMessageOut {
                    role: "assistant".into(),
                    content: c.text,
                    refusal: None,
                },
                logprobs: logprobs.map(|_| ChatLogprobs {
                    content: c.logprobs.iter().map(chat_logprob).collect(),
                    refusal: None,
                }),
                finish_reason: c.finish_reason.map(|f| f.as_str().to_string()),
            })
            .collect(),
        usage: UsageInfo::new(submitted.prompt_tokens, completion_tokens, cached_tokens),
    };
    Ok(Json(response).into_response())
}

fn is_set(value: &Option<Value>) -> bool {
    !matches!(value, None | Some(Value::Null))
}

fn is_empty_array(value: &Option<Value>) -> bool {
    matches!(value, Some(Value::Array(a)) if a.is_empty())
}

/// OpenAI parameters that would change the answer's meaning if ignored.
fn refuse_unsupported(req: &ChatCompletionRequest) -> Result<(), ApiError> {
    let no_tools = "this server does not implement tool or function calling";
    if is_set(&req.tools) && !is_empty_array(&req.tools) {
        return Err(ApiError::unsupported("tools", no_tools));
    }
    if is_set(&req.tool_choice)
        && !matches!(req.tool_choice.as_ref(), Some(Value::String(s)) if s == "none" || s == "auto")
    {
        return Err(ApiError::unsupported("tool_choice", no_tools));
    }
    if is_set(&req.functions) && !is_empty_array(&req.functions) {
        return Err(ApiError::unsupported("functions", no_tools));
    }
    if is_set(&req.function_call)
        && !matches!(req.function_call.as_ref(), Some(Value::String(s)) if s == "none" || s == "auto")
    {
        return Err(ApiError::unsupported("function_call", no_tools));
    }
    if is_set(&req.response_format) {
        let kind = req
            .response_format
            .as_ref()
            .and_then(|v| v.get("type"))
            .and_then(Value::as_str);
        if kind != Some("text") {
            return Err(ApiError::unsupported(
                "response_format",
                "only `{\"type\": \"text\"}` is supported (no JSON mode or structured outputs)",
            ));
        }
    }
    if is_set(&req.audio) {
        return Err(ApiError::unsupported(
            "audio",
            "this model produces text only",
        ));
    }
    if is_set(&req.modalities) {
        let text_only = matches!(req.modalities.as_ref(), Some(Value::Array(m)) if m.iter().all(|v| v == "text"));
        if !text_only {
            return Err(ApiError::unsupported(
                "modalities",
                "this model produces text only",
            ));
        }
    }
    if is_set(&req.prediction) {
        return Err(ApiError::unsupported(
            "prediction",
            "predicted outputs are not implemented",
        ));
    }
    if is_set(&req.web_search_options) {
        return Err(ApiError::unsupported(
            "web_search_options",
            "this server has no web search",
        ));
    }
    if is_set(&req.reasoning_effort) {
        return Err(ApiError::unsupported(
            "reasoning_effort",
            "this model is not a reasoning model",
        ));
    }
    Ok(())
}

/// OpenAI messages → template turns; the template itself checks role order.
pub fn to_turns(messages: &[ChatMessageIn]) -> Result<Vec<ChatTurn>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::param(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                // OpenAI's newer name for the system role.
                "system" | "developer" => ChatRole::System,
                "user" => ChatRole::User,
                "assistant" => ChatRole::Assistant,
                "tool" | "function" => {
                    return Err(ApiError::unsupported(
                        &format!("messages[{i}].role"),
                        "this server does not implement tool or function calling",
                    ))
                }
                other => {
                    return Err(ApiError::param(
                        &format!("messages[{i}].role"),
                        format!("unknown role `{other}`: expected `system`, `user` or `assistant`"),
                    ))
                }
            };
            if is_set(&m.tool_calls) && !is_empty_array(&m.tool_calls) || is_set(&m.function_call) {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].tool_calls"),
                    "this server does not implement tool or function calling",
                ));
            }
            let content = match &m.content {
                None => {
                    return Err(ApiError::param(
                        &format!("messages[{i}].content"),
                        format!("messages[{i}] has no `content`"),
                    ))
                }
                Some(MessageContent::Text(text)) => text.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut texts = Vec::with_capacity(parts.len());
                    for (j, part) in parts.iter().enumerate() {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(text)) => texts.push(text.as_str()),
                            ("text", None) => {
                                return Err(ApiError::param(
                                    &format!("messages[{i}].content[{j}].text"),
                                    "a text content part needs a `text` string",
                                ))
                            }
                            (other, _) => {
                                return Err(ApiError::unsupported(
                                    &format!("messages[{i}].content[{j}].type"),
                                    &format!("content parts of type `{other}` are not supported; this model reads text only"),
                                ))
                            }
                        }
                    }
                    texts.join("\n")
                }
            };
            Ok(ChatTurn { role, content })
        })
        .collect()
}

pub fn chat_logprob(lp: &SampledLogprobs) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: lp.chosen.token.clone(),
        logprob: lp.chosen.logprob,
        bytes: lp.chosen.bytes.clone(),
        top_logprobs: lp
            .top
            .iter()
            .map(|t| ChatTopLogprob {
                token: t.token.clone(),
                logprob: t.logprob,
                bytes: t.bytes.clone(),
            })
            .collect(),
    }
}

struct ChatFormatter {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
    num_choices: usize,
    include_usage: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    logprobs: bool,
}

impl ChatFormatter {
    fn chunk(
        &self,
        choices: Vec<ChatChunkChoice>,
        usage: Option<UsageInfo>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: self.fingerprint.clone(),
            choices,
            usage,
        }
    }
}

impl ChunkFormatter for ChatFormatter {
    fn start(&mut self) -> Vec<axum::response::sse::Event> {
        (0..self.num_choices)
            .map(|index| {
                sse::data(&self.chunk(
                    vec![ChatChunkChoice {
                        index,
                        delta: ChatDelta {
                            role: Some("assistant".into()),
                            content: Some(String::new()),
                            refusal: Some(None),
                        },
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                ))
            })
            .collect()
    }

    fn event(&mut self, event: ChoiceEvent) -> Vec<axum::response::sse::Event> {
        match event {
            // Chat never asks for the prompt's scores.
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
                vec![sse::data(&self.chunk(
                    vec![ChatChunkChoice {
                        index,
                        delta: ChatDelta {
                            role: None,
                            content: Some(text),
                            refusal: None,
                        },
                        logprobs: logprobs.map(|lp| ChatLogprobs {
                            content: vec![chat_logprob(&lp)],
                            refusal: None,
                        }),
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
                    vec![ChatChunkChoice {
                        index,
                        delta: ChatDelta::default(),
                        logprobs: None,
                        finish_reason: Some(finish_reason.as_str().into()),
                    }],
                    None,
                ))]
            }
        }
    }

    fn finish(&mut self) -> Vec<axum::response::sse::Event> {
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
    use crate::openai::chat::ContentPart;

    fn msg(role: &str, content: MessageContent) -> ChatMessageIn {
        ChatMessageIn {
            role: role.into(),
            content: Some(content),
            ..Default::default()
        }
    }

    #[test]
    fn messages_become_turns() {
        let turns = to_turns(&[
            msg("developer", MessageContent::Text("be brief".into())),
            msg(
                "user",
                MessageContent::Parts(vec![
                    ContentPart {
                        kind: "text".into(),
                        text: Some("a".into()),
                    },
                    ContentPart {
                        kind: "text".into(),
                        text: Some("b".into()),
                    },
                ]),
            ),
        ])
        .unwrap();
        assert_eq!(turns[0].role, ChatRole::System);
        assert_eq!(turns[1].content, "a\nb");

        let err = to_turns(&[msg(
            "user",
            MessageContent::Parts(vec![ContentPart {
                kind: "image_url".into(),
                text: None,
            }]),
        )])
        .unwrap_err();
        assert_eq!(
            err.body().error.param.as_deref(),
            Some("messages[0].content[0].type")
        );
        let err = to_turns(&[msg("tool", MessageContent::Text("x".into()))]).unwrap_err();
        assert_eq!(err.body().error.param.as_deref(), Some("messages[0].role"));
        assert!(to_turns(&[]).is_err());
    }

    #[test]
    fn unsupported_parameters_are_named() {
        let base = || ChatCompletionRequest::default();
        let cases: Vec<(ChatCompletionRequest, &str)> = vec![
            (
                ChatCompletionRequest {
                    tools: Some(serde_json::json!([{"type": "function"}])),
                    ..base()
                },
                "tools",
            ),
            (
                ChatCompletionRequest {
                    tool_choice: Some(serde_json::json!("required")),
                    ..base()
                },
                "tool_choice",
            ),
            (
                ChatCompletionRequest {
                    response_format: Some(serde_json::json!({"type": "json_object"})),
                    ..base()
                },
                "response_format",
            ),
            (
                ChatCompletionRequest {
                    modalities: Some(serde_json::json!(["text", "audio"])),
                    ..base()
                },
                "modalities",
            ),
        ];
        for (req, param) in cases {
            let err = refuse_unsupported(&req).unwrap_err();
            assert_eq!(err.body().error.param.as_deref(), Some(param));
        }
        let fine = ChatCompletionRequest {
            tools: Some(serde_json::json!([])),
            tool_choice: Some(serde_json::json!("none")),
            response_format: Some(serde_json::json!({"type": "text"})),
            modalities: Some(serde_json::json!(["text"])),
            ..base()
        };
        assert!(refuse_unsupported(&fine).is_ok());
    }
}

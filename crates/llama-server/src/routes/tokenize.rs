//! `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`, shaped
//! like vLLM's: with them a client (lm-evaluation-harness's remote tokenizer)
//! counts and templates tokens exactly as the server does, with no download.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::json::ApiJson;
use crate::openai::chat::ChatMessageIn;
use crate::routes::chat::to_turns;
use crate::routes::codec_error;
use crate::state::AppState;
use crate::validation::check_model;

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    /// Plain text, encoded as `/v1/completions` would.
    #[serde(default)]
    pub prompt: Option<String>,
    /// A conversation, rendered as `/v1/chat/completions` would.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessageIn>>,
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    #[serde(default)]
    pub return_token_strs: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

pub async fn tokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    check_model(req.model.as_deref(), &state.model_names)?;
    let with_strs = req.return_token_strs.unwrap_or(false);
    let system = state.options.default_system_prompt.clone();
    let (tokens, token_strs) = match (req.prompt, req.messages) {
        (Some(prompt), None) => {
            let add_special = req.add_special_tokens.unwrap_or(true);
            state
                .blocking(move |codec| {
                    let ids = codec
                        .encode(&prompt, add_special)
                        .map_err(|e| codec_error(e, "prompt"))?;
                    let strs = with_strs.then(|| {
                        ids.iter()
                            .map(|&id| codec.token_str(id).unwrap_or_default())
                            .collect()
                    });
                    Ok((ids, strs))
                })
                .await?
        }
        (None, Some(messages)) => {
            let turns = to_turns(&messages)?;
            state
                .blocking(move |codec| {
                    let ids = codec
                        .render_chat(&turns, system.as_deref())
                        .map_err(|e| codec_error(e, "messages"))?;
                    let strs = with_strs.then(|| {
                        ids.iter()
                            .map(|&id| codec.token_str(id).unwrap_or_default())
                            .collect()
                    });
                    Ok((ids, strs))
                })
                .await?
        }
        _ => {
            return Err(ApiError::invalid(
                "give exactly one of `prompt` or `messages`",
                None,
            ))
        }
    };
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.backend.max_context(),
        tokens,
        token_strs,
    }))
}

pub async fn detokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    check_model(req.model.as_deref(), &state.model_names)?;
    let vocab_size = state.codec.vocab_size();
    if let Some(&bad) = req.tokens.iter().find(|&&id| id as usize >= vocab_size) {
        return Err(ApiError::param(
            "tokens",
            format!("token id {bad} is not below the vocabulary size {vocab_size}"),
        ));
    }
    let tokens = req.tokens;
    let prompt = state
        .blocking(move |codec| {
            codec
                .decode(&tokens, false)
                .map_err(|e| codec_error(e, "tokens"))
        })
        .await?;
    Ok(Json(DetokenizeResponse { prompt }))
}

/// vLLM's `/tokenizer_info`: the tokenizer's config as transformers names it.
/// lm-evaluation-harness probes it (it needs `eos_token`) before it uses
/// `/tokenize` and `/detokenize` as its tokenizer.
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenizerInfoResponse {
    pub tokenizer_class: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
    pub add_bos_token: bool,
    pub add_eos_token: bool,
    pub model_max_length: usize,
    pub chat_template: String,
    pub clean_up_tokenization_spaces: bool,
}

pub async fn tokenizer_info(State(state): State<AppState>) -> Json<TokenizerInfoResponse> {
    let info = state.codec.tokenizer_info();
    Json(TokenizerInfoResponse {
        tokenizer_class: "LlamaTokenizerFast".into(),
        bos_token: info.bos_token,
        eos_token: info.eos_token,
        unk_token: info.unk_token,
        pad_token: info.pad_token,
        add_bos_token: info.add_bos_token,
        add_eos_token: false,
        model_max_length: state.backend.max_context(),
        chat_template: info.chat_template,
        clean_up_tokenization_spaces: false,
    })
}

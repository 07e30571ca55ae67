//! Request fields → engine parameters, with a clear 400 for anything out of
//! range. Shared by chat and completions; each names its own fields.

use std::collections::HashMap;

use llama_engine::{SamplingParams, StopConditions};
use serde_json::Value;

use crate::error::{context_length_exceeded, ApiError};
use crate::generation_defaults::GenerationDefaults;

/// Request-shape limits, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    pub max_n: usize,
    pub max_logprobs: usize,
    /// OpenAI allows 4 stop sequences; vLLM any number. 16 keeps stop matching cheap.
    pub max_stop: usize,
    /// Prompts in one `/v1/completions` request.
    pub max_prompts: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_n: 16,
            max_logprobs: 20,
            max_stop: 16,
            max_prompts: 64,
        }
    }
}

/// The sampling-related fields of a request, borrowed from either endpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct SamplingFields<'a> {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    /// The value and the name the client used (`max_tokens` or `max_completion_tokens`).
    pub max_tokens: Option<(i64, &'static str)>,
    /// 0 is allowed: the prompt alone is run, to be scored (completions' `echo`).
    pub max_tokens_may_be_zero: bool,
    pub stop: Option<&'a Value>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<&'a HashMap<String, f64>>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub stop_token_ids: Option<&'a [i64]>,
    /// Already resolved by the endpoint: `Some(k)` = return logprobs with `k` alternatives.
    pub logprobs: Option<usize>,
}

/// Validated parameters; `max_tokens` is settled once the prompt length is known.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub logprobs: Option<usize>,
    /// Score the prompt too, with this many alternatives (echo with logprobs).
    pub prompt_logprobs: Option<usize>,
}

fn finite(value: f64, param: &str) -> Result<f64, ApiError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(ApiError::param(
            param,
            format!("`{param}` must be a finite number"),
        ))
    }
}

fn in_range(value: f64, param: &str, lo: f64, hi: f64) -> Result<f32, ApiError> {
    let v = finite(value, param)?;
    if v < lo || v > hi {
        return Err(ApiError::param(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(v as f32)
}

pub fn validate_sampling(
    fields: &SamplingFields<'_>,
    defaults: &GenerationDefaults,
    limits: &ApiLimits,
    vocab_size: usize,
) -> Result<GenerationParams, ApiError> {
    let temperature = match fields.temperature {
        Some(t) => in_range(t, "temperature", 0.0, 2.0)?,
        // OpenAI's default is 1; a model's own generation config knows better.
        None => defaults.temperature.unwrap_or(1.0),
    };
    let top_p = match fields.top_p {
        Some(p) => {
            let p = finite(p, "top_p")?;
            if p <= 0.0 || p > 1.0 {
                return Err(ApiError::param(
                    "top_p",
                    format!("`top_p` must be in (0, 1], got {p}"),
                ));
            }
            p as f32
        }
        None => defaults.top_p.unwrap_or(1.0),
    };
    let top_k = match fields.top_k {
        // vLLM spells "off" as -1; 0 means the same here.
        Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::param(
                "top_k",
                format!("`top_k` must be -1 (off) or at least 1, got {k}"),
            ))
        }
        None => defaults.top_k.unwrap_or(0),
    };
    let min_p = match fields.min_p {
        Some(p) => in_range(p, "min_p", 0.0, 1.0)?,
        None => defaults.min_p.unwrap_or(0.0),
    };
    let repetition_penalty = match fields.repetition_penalty {
        Some(r) => {
            let r = finite(r, "repetition_penalty")?;
            if r <= 0.0 {
                return Err(ApiError::param(
                    "repetition_penalty",
                    format!("`repetition_penalty` must be greater than 0, got {r}"),
                ));
            }
            r as f32
        }
        None => defaults.repetition_penalty.unwrap_or(1.0),
    };
    let presence_penalty = match fields.presence_penalty {
        Some(p) => in_range(p, "presence_penalty", -2.0, 2.0)?,
        None => 0.0,
    };
    let frequency_penalty = match fields.frequency_penalty {
        Some(p) => in_range(p, "frequency_penalty", -2.0, 2.0)?,
        None => 0.0,
    };
    let n = match fields.n {
        None => 1,
        Some(n) if n >= 1 && n as u64 <= limits.max_n as u64 => n as usize,
        Some(n) => {
            return Err(ApiError::param(
                "n",
                format!("`n` must be between 1 and {}, got {n}", limits.max_n),
            ));
        }
    };
    let max_tokens = match fields.max_tokens {
        None => None,
        Some((m, param)) if m < i64::from(!fields.max_tokens_may_be_zero) => {
            let least = i64::from(!fields.max_tokens_may_be_zero);
            return Err(ApiError::param(
                param,
                format!("`{param}` must be at least {least}, got {m}"),
            ));
        }
        Some((m, _)) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
    };
    let logit_bias = match fields.logit_bias {
        None => Vec::new(),
        Some(map) => {
            let mut bias = Vec::with_capacity(map.len());
            for (key, &value) in map {
                let id = key
                    .trim()
                    .parse::<u32>()
                    .ok()
                    .filter(|&id| (id as usize) < vocab_size)
                    .ok_or_else(|| {
                        ApiError::param(
                            "logit_bias",
                            format!("`logit_bias` key `{key}` is not a token id below the vocabulary size {vocab_size}"),
                        )
                    })?;
                let value = in_range(value, "logit_bias", -100.0, 100.0)?;
                bias.push((id, value));
            }
            // HashMap order is random; a stable order keeps runs reproducible.
            bias.sort_by_key(|&(id, _)| id);
            bias
        }
    };
    let stop_token_ids = match fields.stop_token_ids {
        None => Vec::new(),
        Some(ids) => {
            ids.iter()
                .map(|&id| {
                    u32::try_from(id)
                        .ok()
                        .filter(|&id| (id as usize) < vocab_size)
                        .ok_or_else(|| {
                            ApiError::param(
                        "stop_token_ids",
                        format!("stop token id {id} is not below the vocabulary size {vocab_size}"),
                    )
                        })
                })
                .collect::<Result<_, _>>()?
        }
    };
    if let Some(k) = fields.logprobs {
        if k > limits.max_logprobs {
            return Err(ApiError::param(
                "top_logprobs",
                format!(
                    "at most {} alternatives per token can be returned, got {k}",
                    limits.max_logprobs
                ),
            ));
        }
    }
    Ok(GenerationParams {
        sampling: SamplingParams {
            temperature,
            top_p,
            top_k,
            min_p,
            // Negative seeds are valid JSON integers; the bits are as good a seed as any.
            seed: fields.seed.map(|s| s as u64),
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
        },
        stop: StopConditions {
            max_tokens: 0,
            stop_strings: parse_stop(fields.stop, limits.max_stop)?,
            stop_token_ids,
            ignore_eos: fields.ignore_eos.unwrap_or(false),
        },
        max_tokens,
        n,
        logprobs: fields.logprobs,
        prompt_logprobs: None,
    })
}

/// `stop`: a string or an array of strings.
fn parse_stop(stop: Option<&Value>, max_stop: usize) -> Result<Vec<String>, ApiError> {
    let strings: Vec<String> = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(ApiError::param(
                    "stop",
                    "`stop` must be a string or an array of strings",
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::param(
                "stop",
                "`stop` must be a string or an array of strings",
            ))
        }
    };
    if strings.len() > max_stop {
        return Err(ApiError::param(
            "stop",
            format!(
                "at most {max_stop} stop sequences are allowed, got {}",
                strings.len()
            ),
        ));
    }
    if strings.iter().any(String::is_empty) {
        return Err(ApiError::param("stop", "stop sequences must not be empty"));
    }
    Ok(strings)
}

/// The completion budget: as asked, or (like vLLM) whatever the context leaves.
pub fn resolve_max_tokens(
    requested: Option<usize>,
    default: Option<usize>,
    prompt_len: usize,
    max_context: usize,
    prompt_param: &str,
) -> Result<usize, ApiError> {
    match requested {
        Some(m) => {
            if prompt_len.saturating_add(m) > max_context {
                return Err(context_length_exceeded(
                    max_context,
                    prompt_len,
                    m,
                    "max_tokens",
                ));
            }
            Ok(m)
        }
        None => {
            if prompt_len >= max_context {
                return Err(context_length_exceeded(
                    max_context,
                    prompt_len,
                    1,
                    prompt_param,
                ));
            }
            let room = max_context - prompt_len;
            Ok(default.map_or(room, |d| d.min(room)))
        }
    }
}

/// The model name a request asked for, checked against what we serve.
pub fn check_model(requested: Option<&str>, served: &[String]) -> Result<(), ApiError> {
    match requested {
        None => Ok(()),
        Some(name) if served.iter().any(|s| s == name) => Ok(()),
        Some(name) => Err(ApiError::ModelNotFound(name.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(fields: SamplingFields<'_>) -> Result<GenerationParams, ApiError> {
        validate_sampling(
            &fields,
            &GenerationDefaults::default(),
            &ApiLimits::default(),
            32000,
        )
    }

    fn param_of(err: ApiError) -> String {
        err.body().error.param.unwrap_or_default()
    }

    #[test]
    fn defaults_come_from_the_generation_config() {
        let defaults = GenerationDefaults {
            temperature: Some(0.6),
            top_p: Some(0.9),
            ..Default::default()
        };
        let p = validate_sampling(
            &SamplingFields::default(),
            &defaults,
            &ApiLimits::default(),
            32000,
        )
        .unwrap();
        assert_eq!(p.sampling.temperature, 0.6);
        assert_eq!(p.sampling.top_p, 0.9);
        assert_eq!(p.n, 1);
        let greedy = validate_sampling(
            &SamplingFields {
                temperature: Some(0.0),
                ..Default::default()
            },
            &defaults,
            &ApiLimits::default(),
            32000,
        )
        .unwrap();
        assert!(greedy.sampling.is_greedy());
    }

    #[test]
    fn out_of_range_values_name_their_parameter() {
        let cases: Vec<(SamplingFields<'_>, &str)> = vec![
            (
                SamplingFields {
                    temperature: Some(5.0),
                    ..Default::default()
                },
                "temperature",
            ),
            (
                SamplingFields {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p",
            ),
            (
                SamplingFields {
                    n: Some(0),
                    ..Default::default()
                },
                "n",
            ),
            (
                SamplingFields {
                    n: Some(1000),
                    ..Default::default()
                },
                "n",
            ),
            (
                SamplingFields {
                    max_tokens: Some((-3, "max_completion_tokens")),
                    ..Default::default()
                },
                "max_completion_tokens",
            ),
            (
                SamplingFields {
                    presence_penalty: Some(2.5),
                    ..Default::default()
                },
                "presence_penalty",
            ),
            (
                SamplingFields {
                    frequency_penalty: Some(-3.0),
                    ..Default::default()
                },
                "frequency_penalty",
            ),
            (
                SamplingFields {
                    top_k: Some(-5),
                    ..Default::default()
                },
                "top_k",
            ),
            (
                SamplingFields {
                    logprobs: Some(21),
                    ..Default::default()
                },
                "top_logprobs",
            ),
            (
                SamplingFields {
                    repetition_penalty: Some(0.0),
                    ..Default::default()
                },
                "repetition_penalty",
            ),
        ];
        for (fields, param) in cases {
            let err = check(fields).unwrap_err();
            assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
            assert_eq!(param_of(err), param);
        }
    }

    #[test]
    fn logit_bias_and_stop() {
        let good: HashMap<String, f64> =
            [("15".to_string(), -100.0), ("2".to_string(), 5.0)].into();
        let p = check(SamplingFields {
            logit_bias: Some(&good),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.sampling.logit_bias, vec![(2, 5.0), (15, -100.0)]);
        for bad in [
            [("abc".to_string(), 1.0)],
            [("32000".to_string(), 1.0)],
            [("5".to_string(), 101.0)],
        ] {
            let map: HashMap<String, f64> = bad.into();
            let err = check(SamplingFields {
                logit_bias: Some(&map),
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!(param_of(err), "logit_bias");
        }

        let stop = json!(["a", "b"]);
        let p = check(SamplingFields {
            stop: Some(&stop),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p.stop.stop_strings, vec!["a", "b"]);
        for bad in [json!(5), json!([1]), json!([""]), json!(vec!["x"; 17])] {
            let err = check(SamplingFields {
                stop: Some(&bad),
                ..Default::default()
            })
            .unwrap_err();
            assert_eq!(param_of(err), "stop");
        }
    }

    #[test]
    fn max_tokens_defaults_to_the_rest_of_the_context() {
        assert_eq!(
            resolve_max_tokens(None, None, 100, 512, "prompt").unwrap(),
            412
        );
        assert_eq!(
            resolve_max_tokens(None, Some(16), 100, 512, "prompt").unwrap(),
            16
        );
        assert_eq!(
            resolve_max_tokens(Some(12), None, 100, 512, "prompt").unwrap(),
            12
        );
        let err = resolve_max_tokens(Some(500), None, 100, 512, "prompt").unwrap_err();
        let body = err.body().error;
        assert_eq!(body.code.as_deref(), Some("context_length_exceeded"));
        assert!(
            body.message.contains("512") && body.message.contains("600"),
            "{}",
            body.message
        );
        let err = resolve_max_tokens(None, None, 600, 512, "messages").unwrap_err();
        assert_eq!(err.body().error.param.as_deref(), Some("messages"));
    }

    #[test]
    fn unknown_models_are_not_found() {
        let served = vec!["tiny-llama".to_string()];
        assert!(check_model(Some("tiny-llama"), &served).is_ok());
        assert!(check_model(None, &served).is_ok());
        assert_eq!(
            check_model(Some("gpt-4"), &served).unwrap_err().status(),
            axum::http::StatusCode::NOT_FOUND
        );
    }
}

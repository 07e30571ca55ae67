//! lm-evaluation-harness against the real binary, request for request as its
//! `local-completions` model sends them (lm_eval 0.4.13,
//! `lm_eval/models/openai_completions.py`, `api_models.py`, `utils.py`):
//! - the remote-tokenizer probe (`GET /tokenizer_info`, then `/tokenize`,
//!   `/detokenize`), so it needs no tokenizer download;
//! - a log-likelihood (`echo`, `max_tokens: 1`, `logprobs: 1`, token-id
//!   prompts, the sum of `token_logprobs[ctxlen:-1]`), also when the token
//!   the model generates is `</s>`;
//! - a rolling perplexity (`get_rolling_token_windows` +
//!   `make_disjoint_window`), summed over windows.
//!
//! The sums are checked against the engine's own scores of the same tokens.

use e2e::Server;
use serde_json::{json, Value};

async fn encode(server: &Server, text: &str) -> Vec<u32> {
    let reply = server
        .post_json(
            "/tokenize",
            &json!({"prompt": text, "add_special_tokens": false}),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    serde_json::from_value(reply.body["tokens"].clone()).unwrap()
}

/// lm-eval's loglikelihood payload for one (context + continuation).
fn loglikelihood_payload(input: &[u32]) -> Value {
    json!({"model": "tiny-llama", "prompt": [input], "temperature": 0, "max_tokens": 1,
           "logprobs": 1, "seed": 1234, "echo": true})
}

/// lm-eval's `parse_logprobs`: the continuation's summed logprob and whether
/// every continuation token was the most likely one.
fn parse_logprobs(body: &Value, ctxlen: usize) -> (f64, bool) {
    let lp = &body["choices"][0]["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    let tops = lp["top_logprobs"].as_array().unwrap();
    let end = token_logprobs.len() - 1;
    let sum = token_logprobs[ctxlen..end]
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    let greedy = token_logprobs[ctxlen..end]
        .iter()
        .zip(&tops[ctxlen..end])
        .all(|(tok, top)| {
            let best = top
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_f64().unwrap())
                .fold(f64::NEG_INFINITY, f64::max);
            tok.as_f64().unwrap() == best
        });
    (sum, greedy)
}

/// The engine's prompt scoring of `input` alone (no token generated):
/// entry `i` scores `input[i]` given everything before it.
async fn prompt_scores(server: &Server, input: &[u32]) -> Vec<f64> {
    let reply = server
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny-llama", "prompt": input, "max_tokens": 0, "logprobs": 1,
                    "echo": true, "temperature": 0}),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    let scores = reply.body["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert_eq!(scores.len(), input.len());
    scores
        .iter()
        .map(|v| v.as_f64().unwrap_or(f64::NAN))
        .collect()
}

async fn lm_eval_request(server: &Server, input: &[u32], force_eos: bool) -> Value {
    let mut payload = loglikelihood_payload(input);
    if force_eos {
        // What a real model often does after a sentence: its next token is `</s>`.
        payload["logit_bias"] = json!({"2": 100});
    }
    let reply = server.post_json("/v1/completions", &payload).await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    let lp = &reply.body["choices"][0]["logprobs"];
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(
            lp[key].as_array().unwrap().len(),
            input.len() + 1,
            "{key} (force_eos {force_eos}): {}",
            reply.text
        );
    }
    reply.body
}

#[tokio::test]
async fn the_tokenizer_probe_finds_the_servers_tokenizer() {
    let server = Server::builder()
        .arg("--api-key")
        .arg("sk-eval")
        .start()
        .await
        .unwrap();
    let bearer = "Bearer sk-eval";
    // Without the key: refused like every other API path.
    let refused = server
        .client()
        .get(server.url("/tokenizer_info"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    let info: Value = server
        .client()
        .get(server.url("/tokenizer_info"))
        .header("authorization", bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["eos_token"], "</s>", "{info}");
    assert_eq!(info["bos_token"], "<s>", "{info}");
    assert_eq!(info["add_bos_token"], true);
    assert!(info["model_max_length"].as_u64().unwrap() > 0);
    let template = info["chat_template"].as_str().unwrap();
    assert!(
        template.contains("[INST]") && template.contains("<<SYS>>"),
        "{template}"
    );

    let post = |path: &'static str, body: Value| {
        let request = server
            .client()
            .post(server.url(path))
            .header("authorization", bearer)
            .json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200, "{path}");
            response.json::<Value>().await.unwrap()
        }
    };
    // lm-eval's own check, then how it finds the special ids: encode(eos)[0].
    let probe = post(
        "/tokenize",
        json!({"prompt": "test", "add_special_tokens": false}),
    )
    .await;
    assert!(probe["tokens"].as_array().is_some_and(|t| !t.is_empty()));
    let eos = post(
        "/tokenize",
        json!({"prompt": "</s>", "add_special_tokens": false}),
    )
    .await;
    assert_eq!(eos["tokens"], json!([2]));
    let bos = post(
        "/tokenize",
        json!({"prompt": "<s>", "add_special_tokens": false}),
    )
    .await;
    assert_eq!(bos["tokens"], json!([1]));
    let text = "The quick brown fox";
    let ids = post(
        "/tokenize",
        json!({"prompt": text, "add_special_tokens": false}),
    )
    .await;
    let back = post("/detokenize", json!({"tokens": ids["tokens"]})).await;
    assert_eq!(back["prompt"], text);
}

#[tokio::test]
async fn a_loglikelihood_scores_the_continuation_even_when_the_model_would_end() {
    let server = Server::start().await.unwrap();
    // lm-eval's _encode_pair: trailing spaces move to the continuation, the
    // whole is encoded and split at the context's length.
    let context = "The capital of France is";
    let context_ids = encode(&server, context).await;

    // A greedy continuation, so its scores are also the generation's own.
    let generated = server
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny-llama", "prompt": context_ids, "max_tokens": 4,
                    "logprobs": 1, "temperature": 0, "logit_bias": {"2": -100}}),
        )
        .await
        .unwrap();
    assert_eq!(generated.status, 200, "{}", generated.text);
    let gen_lp = &generated.body["choices"][0]["logprobs"];
    let gen_scores: f64 = gen_lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    let continuation = generated.body["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let whole = encode(&server, &format!("{context}{continuation}")).await;
    assert!(whole.len() > context_ids.len(), "{whole:?}");
    let ctxlen = context_ids.len();

    let engine_sum: f64 = prompt_scores(&server, &whole).await[ctxlen..].iter().sum();
    for force_eos in [false, true] {
        let body = lm_eval_request(&server, &whole, force_eos).await;
        let (sum, greedy) = parse_logprobs(&body, ctxlen);
        assert!(
            (sum - engine_sum).abs() < 1e-3,
            "force_eos {force_eos}: lm-eval reads {sum}, the engine scores {engine_sum}"
        );
        if whole[ctxlen..].len() == 4 {
            // The text re-encoded to the generated ids: the generation's own scores.
            assert!((sum - gen_scores).abs() < 1e-3, "{sum} vs {gen_scores}");
            assert!(greedy, "a greedy continuation reads as greedy");
        }
    }

    // A continuation the model would not pick is not greedy, and still scored whole.
    let unlikely = encode(&server, &format!("{context} zebra umbrella")).await;
    let engine_sum: f64 = prompt_scores(&server, &unlikely).await[ctxlen..]
        .iter()
        .sum();
    for force_eos in [false, true] {
        let body = lm_eval_request(&server, &unlikely, force_eos).await;
        let (sum, greedy) = parse_logprobs(&body, ctxlen);
        assert!((sum - engine_sum).abs() < 1e-3, "{sum} vs {engine_sum}");
        assert!(!greedy);
    }
}

/// lm-eval's `get_rolling_token_windows` then `make_disjoint_window`.
fn rolling_windows(
    tokens: &[u32],
    prefix: u32,
    max_seq_len: usize,
    context_len: usize,
) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut windows = Vec::new();
    if tokens.is_empty() {
        return windows;
    }
    let pred_len = max_seq_len - context_len + 1;
    let first = max_seq_len.min(tokens.len());
    let mut input = vec![prefix];
    input.extend_from_slice(&tokens[..first - 1]);
    windows.push((input, tokens[..first].to_vec()));
    let mut predicted = first;
    while predicted < tokens.len() {
        let window_pred_len = (tokens.len() - predicted).min(pred_len);
        let end = predicted + window_pred_len;
        let start = end.saturating_sub(max_seq_len + 1);
        windows.push((
            tokens[start..end - 1].to_vec(),
            tokens[end - window_pred_len..end].to_vec(),
        ));
        predicted += window_pred_len;
    }
    windows
        .into_iter()
        .map(|(a, b)| (a[..a.len() - (b.len() - 1)].to_vec(), b))
        .collect()
}

#[tokio::test]
async fn a_rolling_perplexity_sums_every_window() {
    let server = Server::start().await.unwrap();
    let text = "It was the best of times, it was the worst of times, it was the age of \
                wisdom, it was the age of foolishness.";
    let tokens = encode(&server, text).await;
    let prefix = encode(&server, "<s>").await[0];
    // `max_length=12` in lm-eval's model_args: it keeps one token for
    // generation (11) and windows of 10, so this text takes several.
    let max_length = 11;
    let windows = rolling_windows(&tokens, prefix, max_length - 1, 1);
    assert!(windows.len() >= 3, "{} windows", windows.len());
    assert_eq!(
        windows.iter().map(|w| w.1.len()).sum::<usize>(),
        tokens.len()
    );

    let mut engine_total = 0.0;
    let mut totals = [0.0, 0.0];
    for (context, continuation) in &windows {
        let mut input = context.clone();
        input.extend_from_slice(continuation);
        let input = input[input.len().saturating_sub(max_length)..].to_vec();
        let ctxlen =
            context.len() - (context.len() + continuation.len()).saturating_sub(max_length);
        engine_total += prompt_scores(&server, &input).await[ctxlen..]
            .iter()
            .sum::<f64>();
        for (force_eos, total) in [false, true].into_iter().zip(totals.iter_mut()) {
            let body = lm_eval_request(&server, &input, force_eos).await;
            *total += parse_logprobs(&body, ctxlen).0;
        }
    }
    for total in totals {
        assert!(
            (total - engine_total).abs() < 1e-3,
            "lm-eval reads {total}, the engine scores {engine_total}"
        );
    }
}

//! `echo` on `/v1/completions`: the prompt comes back before the answer, and
//! with `logprobs` every prompt token is scored, as OpenAI's legacy API and
//! vLLM do it. lm-evaluation-harness computes log-likelihoods this way
//! (`echo`, `logprobs: 1`, `max_tokens: 1`, token-id prompts).

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::{fixture_json, parse_chunks, Server};
use serde_json::{json, Value};

fn top(entry: &Value) -> BTreeMap<String, f64> {
    entry
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect()
}

#[tokio::test]
async fn echo_with_logprobs_scores_the_prompt_like_lm_eval_expects() {
    let mut server = Server::start().await.unwrap();
    let reference = fixture_json("tiny-llama-reference.json");
    let case = reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "sentence")
        .unwrap();
    let ids: Vec<u64> = case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let reply = server
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny-llama", "prompt": ids, "max_tokens": 1, "logprobs": 5,
                    "echo": true, "temperature": 0}),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    let choice = &reply.body["choices"][0];
    let lp = &choice["logprobs"];
    let n = ids.len() + 1;
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        assert_eq!(lp[key].as_array().unwrap().len(), n, "{key}: {lp}");
    }
    // The first prompt token (BOS) has nothing before it.
    assert_eq!(lp["tokens"][0], "<s>");
    assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
    // The text is the prompt, decoded, then the answer; offsets index into it.
    let text = choice["text"].as_str().unwrap();
    assert!(text.starts_with(case["prompt"].as_str().unwrap()), "{text}");
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    assert_eq!(
        offsets[n - 1] as usize,
        case["prompt"].as_str().unwrap().chars().count()
    );
    assert_eq!(reply.body["usage"]["prompt_tokens"], ids.len());
    assert_eq!(reply.body["usage"]["completion_tokens"], 1);

    // Each prompt position scores exactly as a generation from the prompt
    // up to it does (the last entry is the generated token itself).
    for p in 1..n {
        let alone = server
            .post_json(
                "/v1/completions",
                &json!({"model": "tiny-llama", "prompt": ids[..p], "max_tokens": 1,
                        "logprobs": 5, "temperature": 0}),
            )
            .await
            .unwrap();
        assert_eq!(alone.status, 200, "{}", alone.text);
        let alone = &alone.body["choices"][0]["logprobs"];
        let (want, got) = (top(&alone["top_logprobs"][0]), top(&lp["top_logprobs"][p]));
        assert_eq!(
            want.keys().collect::<Vec<_>>(),
            got.keys().collect::<Vec<_>>(),
            "position {p}"
        );
        for (k, v) in &want {
            assert!(
                (v - got[k]).abs() < 1e-4,
                "position {p} {k}: {v} vs {}",
                got[k]
            );
        }
        // The reference's best next token at p - 1 is the best entry here.
        let best = got.iter().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().1;
        let token_lp = lp["token_logprobs"][p].as_f64().unwrap();
        assert!(token_lp <= best + 1e-6, "position {p}");
        if p < ids.len() && ids[p] == case["all_positions_top5_ids"][p - 1][0] {
            assert!(
                (token_lp - best).abs() < 1e-6,
                "position {p}: the prompt token is the best"
            );
        }
    }

    // Streamed: the echo comes first, with the prompt's logprobs.
    let data = server
        .post_sse(
            "/v1/completions",
            &json!({"model": "tiny-llama", "prompt": ids, "max_tokens": 1, "logprobs": 5,
                    "echo": true, "temperature": 0, "stream": true}),
        )
        .await
        .unwrap();
    let chunks = parse_chunks(&data);
    let first = &chunks[0]["choices"][0];
    assert_eq!(
        first["logprobs"]["tokens"].as_array().unwrap().len(),
        ids.len()
    );
    assert_eq!(
        first["logprobs"]["top_logprobs"],
        json!(lp["top_logprobs"].as_array().unwrap()[..ids.len()])
    );
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, text);

    // `max_tokens: 0` only scores the prompt: the same scores, no token.
    for n in [1, 2] {
        let scored = server
            .post_json(
                "/v1/completions",
                &json!({"model": "tiny-llama", "prompt": ids, "max_tokens": 0, "logprobs": 5,
                        "echo": true, "n": n}),
            )
            .await
            .unwrap();
        assert_eq!(scored.status, 200, "{}", scored.text);
        assert_eq!(scored.body["usage"]["completion_tokens"], 0);
        for c in scored.body["choices"].as_array().unwrap() {
            assert_eq!(c["finish_reason"], "length");
            assert_eq!(c["text"], case["prompt"]);
            assert_eq!(
                c["logprobs"]["token_logprobs"],
                json!(lp["token_logprobs"].as_array().unwrap()[..ids.len()])
            );
        }
    }
    // Without echo there is nothing to return: still refused.
    let refused = server
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny-llama", "prompt": "Hi", "max_tokens": 0}),
        )
        .await
        .unwrap();
    assert_eq!(refused.status, 400, "{}", refused.text);
    assert_eq!(refused.body["error"]["param"], "max_tokens");

    // Echo without logprobs, for text prompts and two choices: the prompt as
    // sent, then each answer.
    let reply = server
        .post_json(
            "/v1/completions",
            &json!({"model": "tiny-llama", "prompt": ["Hello", " a b"], "max_tokens": 3,
                    "echo": true, "n": 2, "temperature": 0}),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    let choices = reply.body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        let prompt = ["Hello", " a b"][i / 2];
        let text = c["text"].as_str().unwrap();
        assert!(
            text.starts_with(prompt) && text.len() > prompt.len(),
            "{i}: {text:?}"
        );
        assert!(c["logprobs"].is_null());
    }
    let idle = server.wait_idle(Duration::from_secs(10)).await.unwrap();
    assert_eq!(idle["running"], 0, "{idle}");
    server.terminate(Duration::from_secs(30)).await.unwrap();
}

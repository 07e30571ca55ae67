//! Property-based fuzzing of the request path: JSON parsing, validation, the
//! chat template and incremental detokenization.
//!
//! Every property keeps generating cases until its share of the time budget
//! is spent. `FUZZ_SECONDS` (default 20) is the wall-clock budget of the whole
//! file: each of the four properties gets an equal share, multiplied by the
//! number of test threads, so the properties running side by side end
//! together after about `FUZZ_SECONDS`. `FUZZ_SEED` (a u64) replays a run; the
//! seed is printed on failure and with `--nocapture`.
//!
//! ```text
//! FUZZ_SECONDS=60 cargo test -p llama-server --test fuzz -- --nocapture
//! ```

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use common::{harness, sse_events, tiny_dir, Harness};
use llama_engine::detokenizer::IncrementalDetokenizer;
use llama_server::codec::{ChatRole, ChatTurn, Codec, CodecError};
use llama_server::llama_codec::LlamaCodec;
use llama_server::AppOptions;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------
// Budget and driver
// ---------------------------------------------------------------------------

/// Number of `#[test]` properties in this file, which share the budget.
const PROPERTIES: usize = 4;
/// Cases per `TestRunner` round; the clock is checked between rounds.
const ROUND: u32 = 16;

fn total_budget() -> Duration {
    let secs = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(20.0);
    Duration::from_secs_f64(secs)
}

/// How many properties run at once: `--test-threads`, `RUST_TEST_THREADS`
/// or the number of CPUs, as libtest decides.
fn test_threads() -> usize {
    let args: Vec<String> = std::env::args().collect();
    let from_args = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--test-threads=")
            .map(str::to_owned)
            .or_else(|| {
                (a == "--test-threads").then(|| args.get(i + 1).cloned().unwrap_or_default())
            })
    });
    from_args
        .or_else(|| std::env::var("RUST_TEST_THREADS").ok())
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .clamp(1, PROPERTIES)
}

fn property_budget() -> Duration {
    total_budget().mul_f64(test_threads() as f64 / PROPERTIES as f64)
}

fn base_seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        })
}

/// A 32-byte ChaCha seed from (base seed, property, round).
fn round_seed(base: u64, property: &str, round: u64) -> [u8; 32] {
    let mut h = base ^ 0x9e37_79b9_7f4a_7c15;
    for b in property.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= round.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut seed = [0u8; 32];
    for (i, chunk) in seed.chunks_mut(8).enumerate() {
        // splitmix64
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&(z ^ i as u64).to_le_bytes());
    }
    seed
}

/// Runs `test` on values of `strategy` in rounds of [`ROUND`] cases until
/// this property's share of the budget is spent (at least one round), and
/// panics with the shrunk input on the first failure.
fn fuzz<S, F>(name: &str, strategy: S, test: F) -> u64
where
    S: Strategy,
    S::Value: std::fmt::Debug,
    F: Fn(S::Value) -> Result<(), TestCaseError>,
{
    let budget = property_budget();
    let base = base_seed();
    let started = Instant::now();
    let mut cases = 0u64;
    let mut round = 0u64;
    loop {
        let config = Config {
            cases: ROUND,
            failure_persistence: None,
            max_shrink_time: 60_000,
            max_shrink_iters: 4096,
            ..Config::default()
        };
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &round_seed(base, name, round));
        let mut runner = TestRunner::new_with_rng(config, rng);
        match runner.run(&strategy, &test) {
            Ok(()) => {}
            Err(TestError::Fail(reason, input)) => panic!(
                "{name}: property failed after {cases} passing cases \
                 (FUZZ_SEED={base}, round {round}): {reason}\nminimal input: {input:#?}"
            ),
            Err(TestError::Abort(reason)) => {
                panic!("{name}: aborted (FUZZ_SEED={base}, round {round}): {reason}")
            }
        }
        cases += u64::from(ROUND);
        round += 1;
        if started.elapsed() >= budget {
            break;
        }
    }
    eprintln!(
        "{name}: {cases} cases in {:.1?} (FUZZ_SEED={base})",
        started.elapsed()
    );
    cases
}

// ---------------------------------------------------------------------------
// Shared generators
// ---------------------------------------------------------------------------

/// Text that is special to the Llama 2 format, the tokenizer or JSON.
const NASTY: &[&str] = &[
    "",
    " ",
    "  ",
    "\n",
    "\r\n",
    "\t",
    "\u{0}",
    "\u{1c}",
    "\u{1f}",
    "\u{85}",
    "\u{a0}",
    "\u{3000}",
    "\u{feff}",
    "\u{200b}",
    "\u{2581}",
    "\u{2581}\u{2581}",
    "\u{fffd}",
    "\u{10ffff}",
    "[INST]",
    "[/INST]",
    " [INST] ",
    "<s>",
    "</s>",
    "<unk>",
    "<<SYS>>",
    "<</SYS>>",
    "<<SYS>>\n",
    "\n<</SYS>>\n\n",
    "<0x0A>",
    "<0xE2>",
    "▁Hello",
    "Hello",
    "world",
    "😀",
    "👨‍👩‍👧",
    "🇫🇷",
    "é",
    "e\u{301}",
    "龘",
    "𝄞",
    "Straße",
    "привет",
    "مرحبا",
    "\\",
    "\"",
    "{",
    "}",
    "data: [DONE]",
    "\n\ndata: x\n\n",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "null",
    "true",
    "0",
    "-1",
    "32000",
    "tiny-llama",
    "user",
    "assistant",
    "system",
    "developer",
    "tool",
    "function",
    "text",
    "image_url",
    "auto",
    "none",
];

fn nasty() -> impl Strategy<Value = String> {
    select(NASTY).prop_map(str::to_owned)
}

/// Short unicode text, mostly made of [`NASTY`] fragments.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => vec(
            prop_oneof![
                3 => nasty(),
                2 => "[a-zA-Z ]{1,6}",
                1 => any::<char>().prop_map(String::from),
            ],
            0..8,
        )
        .prop_map(|parts| parts.concat()),
        2 => any::<String>(),
        1 => nasty(),
    ]
    .boxed()
}

/// Sometimes very long text (body limit is 2 MiB; keep well under it).
fn maybe_long_text() -> BoxedStrategy<String> {
    prop_oneof![
        12 => text(),
        1 => (text(), 1usize..4000).prop_map(|(s, n)| s.repeat(n.min(20_000 / s.len().max(1)))),
        1 => (any::<char>(), 1usize..20_000).prop_map(|(c, n)| std::iter::repeat_n(c, n).collect()),
    ]
    .boxed()
}

/// Every field name the endpoints know, and a few they do not.
const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "tokens",
    "role",
    "content",
    "name",
    "type",
    "text",
    "image_url",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "include_usage",
    "continuous_usage_stats",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "echo",
    "suffix",
    "best_of",
    "user",
    "ignore_eos",
    "stop_token_ids",
    "add_special_tokens",
    "return_token_strs",
    "tools",
    "tool_choice",
    "tool_calls",
    "tool_call_id",
    "function_call",
    "functions",
    "parallel_tool_calls",
    "response_format",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "reasoning_effort",
    "__proto__",
    "",
];

fn field() -> BoxedStrategy<String> {
    prop_oneof![
        6 => select(FIELDS).prop_map(str::to_owned),
        1 => text(),
    ]
    .boxed()
}

fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        3 => select(INTERESTING_INTS).prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => (-40i64..600).prop_map(Value::from),
        2 => select(INTERESTING_FLOATS).prop_map(Value::from),
        1 => any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f).map(Value::Number)),
    ]
    .boxed()
}

const INTERESTING_INTS: &[i64] = &[
    0i64,
    1,
    -1,
    2,
    3,
    16,
    17,
    20,
    21,
    64,
    65,
    100,
    -100,
    101,
    511,
    512,
    513,
    31_999,
    32_000,
    u32::MAX as i64,
    u32::MAX as i64 + 1,
    i64::MAX,
    i64::MIN,
];

const INTERESTING_FLOATS: &[f64] = &[
    0.0f64,
    -0.0,
    0.5,
    1.0,
    1.0000001,
    2.0,
    2.0000001,
    -2.0,
    -2.0000001,
    100.5,
    1e-300,
    5e-324,
    1e19,
    -1e19,
    1.8446744073709552e19,
    1e300,
    f64::MAX,
    f64::MIN,
];

/// Arbitrary JSON, nested a few levels, biased toward the shapes the API uses.
fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::Bool),
        3 => number(),
        3 => maybe_long_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            vec((field(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
    .boxed()
}

// ---------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------

const ENDPOINTS: [&str; 4] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
    "/detokenize",
];

fn valid_body(endpoint: usize) -> Value {
    match endpoint {
        0 => json!({
            "model": "tiny-llama",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello!"},
            ],
            "max_tokens": 3,
        }),
        1 => json!({"model": "tiny-llama", "prompt": "Hello", "max_tokens": 3}),
        2 => json!({
            "model": "tiny-llama",
            "messages": [{"role": "user", "content": "Hello!"}],
        }),
        _ => json!({"model": "tiny-llama", "tokens": [1, 15043, 3186]}),
    }
}

const ROLES: &[&str] = &[
    "system",
    "user",
    "assistant",
    "developer",
    "tool",
    "function",
    "User",
    "",
    " user",
    "model",
];

/// One content part, valid or not.
fn content_part() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => maybe_long_text().prop_map(|t| json!({"type": "text", "text": t})),
        1 => json!({"type": "image_url", "image_url": {"url": "http://x/y.png"}}).boxed_just(),
        1 => json!({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}).boxed_just(),
        1 => Just(json!({"type": "text"})),
        1 => (text(), json_value()).prop_map(|(kind, text)| json!({"type": kind, "text": text})),
        1 => json_value(),
    ]
    .boxed()
}

trait BoxedJust {
    fn boxed_just(self) -> BoxedStrategy<Value>;
}

impl BoxedJust for Value {
    fn boxed_just(self) -> BoxedStrategy<Value> {
        Just(self).boxed()
    }
}

fn message() -> BoxedStrategy<Value> {
    let role = prop_oneof![
        8 => select(ROLES).prop_map(Value::from),
        1 => text().prop_map(Value::from),
        1 => json_value(),
    ];
    let content = prop_oneof![
        6 => maybe_long_text().prop_map(Value::from),
        2 => vec(content_part(), 0..4).prop_map(Value::Array),
        1 => Just(Value::Null),
        1 => json_value(),
    ];
    let extra = prop_oneof![
        6 => Just(None),
        1 => (field(), json_value()).prop_map(Some),
    ];
    (role, content, any::<bool>(), extra)
        .prop_map(|(role, content, with_content, extra)| {
            let mut m = Map::new();
            m.insert("role".into(), role);
            if with_content {
                m.insert("content".into(), content);
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        })
        .boxed()
}

/// A conversation that is usually well-formed, with nasty contents.
fn conversation() -> BoxedStrategy<Value> {
    prop_oneof![
        2 => (any::<bool>(), vec(maybe_long_text(), 0..6)).prop_map(|(system, texts)| {
            let mut messages = Vec::new();
            if system {
                messages.push(json!({"role": "system", "content": "Be brief."}));
            }
            let n = texts.len();
            for (i, t) in texts.into_iter().enumerate() {
                // Alternate so that the last one is a user message.
                let role = if (n - 1 - i) % 2 == 0 { "user" } else { "assistant" };
                messages.push(json!({"role": role, "content": t}));
            }
            Value::Array(messages)
        }),
        2 => vec(message(), 0..6).prop_map(Value::Array),
    ]
    .boxed()
}

/// Nests `value` `depth` levels deep in arrays or objects.
fn nest(value: Value, depth: usize, in_objects: bool) -> Value {
    (0..depth).fold(value, |v, _| {
        if in_objects {
            // Not `json!`: it would re-serialize `v` at every level.
            Value::Object(Map::from_iter([("content".to_owned(), v)]))
        } else {
            Value::Array(vec![v])
        }
    })
}

/// A value of a type the field may or may not take.
fn field_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => json_value(),
        2 => number(),
        1 => conversation(),
        1 => vec(number(), 0..20).prop_map(Value::Array),
        1 => vec(vec(number(), 0..4).prop_map(Value::Array), 0..4).prop_map(Value::Array),
        1 => vec(text().prop_map(Value::from), 0..20).prop_map(Value::Array),
        1 => vec((select(&["0", "1", "2", "15043", "31999", "32000", "-1", " 7", "x"][..]), number()), 0..4)
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        1 => any::<bool>().prop_map(|b| json!({"include_usage": b})),
    ]
    .boxed()
}

#[derive(Debug, Clone)]
enum Mutation {
    Set(String, Value),
    Remove(String),
    SetInMessage(usize, String, Value),
    PushMessage(Value),
    Nest(String, usize, bool),
    Replace(Value),
}

fn mutation() -> BoxedStrategy<Mutation> {
    prop_oneof![
        8 => (field(), field_value()).prop_map(|(k, v)| Mutation::Set(k, v)),
        2 => field().prop_map(Mutation::Remove),
        4 => (0usize..4, prop_oneof![3 => select(&["role", "content", "name", "tool_calls", "function_call"][..]).prop_map(str::to_owned), 1 => field()], field_value())
            .prop_map(|(i, k, v)| Mutation::SetInMessage(i, k, v)),
        2 => message().prop_map(Mutation::PushMessage),
        1 => (field(), prop_oneof![1usize..20, 100usize..140, 500usize..3000], any::<bool>())
            .prop_map(|(k, d, o)| Mutation::Nest(k, d, o)),
        1 => json_value().prop_map(Mutation::Replace),
    ]
    .boxed()
}

fn apply(body: &mut Value, m: Mutation) {
    match m {
        Mutation::Set(k, v) => {
            if let Some(obj) = body.as_object_mut() {
                obj.insert(k, v);
            }
        }
        Mutation::Remove(k) => {
            if let Some(obj) = body.as_object_mut() {
                obj.remove(&k);
            }
        }
        Mutation::SetInMessage(i, k, v) => {
            if let Some(Value::Array(messages)) = body.get_mut("messages") {
                if !messages.is_empty() {
                    let len = messages.len();
                    if let Some(obj) = messages[i % len].as_object_mut() {
                        obj.insert(k, v);
                    }
                }
            }
        }
        Mutation::PushMessage(m) => {
            if let Some(Value::Array(messages)) = body.get_mut("messages") {
                messages.push(m);
            }
        }
        Mutation::Nest(k, depth, in_objects) => {
            if let Some(obj) = body.as_object_mut() {
                let v = obj.remove(&k).unwrap_or(Value::Null);
                obj.insert(k, nest(v, depth, in_objects));
            }
        }
        Mutation::Replace(v) => *body = v,
    }
}

#[derive(Debug, Clone)]
struct HttpCase {
    endpoint: usize,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

fn content_type() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        12 => Just(Some("application/json")),
        1 => select(&[
            Some("application/json; charset=utf-8"),
            Some("APPLICATION/JSON"),
            Some("application/merge-patch+json"),
            Some("text/plain"),
            None,
        ][..]),
    ]
}

/// JSON values: valid bodies with a few mutations, or arbitrary JSON.
fn json_case() -> impl Strategy<Value = HttpCase> {
    let body = prop_oneof![
        6 => (0usize..4, vec(mutation(), 1..4)).prop_map(|(endpoint, ms)| {
            let mut body = valid_body(endpoint);
            for m in ms {
                apply(&mut body, m);
            }
            (endpoint, body)
        }),
        2 => (0usize..4, conversation(), any::<bool>()).prop_map(|(endpoint, messages, stream)| {
            let mut body = valid_body(endpoint);
            body["messages"] = messages;
            if stream {
                body["stream"] = Value::Bool(true);
            }
            (endpoint, body)
        }),
        1 => (0usize..4, json_value()),
    ];
    (body, content_type()).prop_map(|((endpoint, body), content_type)| HttpCase {
        endpoint,
        content_type,
        body: serde_json::to_vec(&body).expect("a Value always serializes"),
    })
}

/// Raw JSON tokens serde would never produce, spliced into a valid body.
const RAW_TOKENS: &[&str] = &[
    "NaN",
    "-NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1e-999",
    "-0",
    "0.0",
    "1.0",
    "3.0",
    "1E2",
    "99999999999999999999",
    "-99999999999999999999",
    "18446744073709551616",
    "9223372036854775808",
    "00",
    "01",
    ".5",
    "+1",
    "0x10",
    "\"\\ud800\"",
    "\"\\udc00\\ud800\"",
    "\"\\u0000\"",
    "\"\\uZZZZ\"",
    "\"\u{7f}\"",
    "\"\t\"",
    "\"\\x41\"",
    "'user'",
    "True",
    "None",
    "[1,]",
    "{\"a\":1,}",
    "{\"a\" 1}",
    "[",
    "]",
    "",
    "\"a\" \"b\"",
    "// comment\n1",
];

/// Templates of valid bodies; `@` is replaced by a raw token.
const RAW_TEMPLATES: &[(usize, &str)] = &[
    (
        0,
        r#"{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":@}"#,
    ),
    (
        0,
        r#"{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"temperature":@}"#,
    ),
    (
        0,
        r#"{"model":"tiny-llama","messages":[{"role":"user","content":@}],"max_tokens":3}"#,
    ),
    (
        0,
        r#"{"model":"tiny-llama","messages":[{"role":@,"content":"hi"}],"max_tokens":3}"#,
    ),
    (0, r#"{"model":"tiny-llama","messages":@,"max_tokens":3}"#),
    (
        0,
        r#"{"model":@,"messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#,
    ),
    (
        0,
        r#"{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"n":@,"logprobs":true,"top_logprobs":@}"#,
    ),
    (
        0,
        r#"{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"logit_bias":{"15043":@}}"#,
    ),
    (
        0,
        r#"{"model":"tiny-llama","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"seed":@,"stop_token_ids":[@]}"#,
    ),
    (1, r#"{"model":"tiny-llama","prompt":@,"max_tokens":3}"#),
    (1, r#"{"model":"tiny-llama","prompt":[@],"max_tokens":3}"#),
    (
        1,
        r#"{"model":"tiny-llama","prompt":[[1,@]],"max_tokens":3,"echo":true,"logprobs":2}"#,
    ),
    (
        1,
        r#"{"model":"tiny-llama","prompt":"hi","max_tokens":3,"logprobs":@,"top_p":@}"#,
    ),
    (2, r#"{"prompt":@,"add_special_tokens":@}"#),
    (
        2,
        r#"{"messages":[{"role":"user","content":[{"type":"text","text":@}]}]}"#,
    ),
    (3, r#"{"tokens":[@]}"#),
    (3, r#"{"tokens":[1,@,2]}"#),
    (3, r#"{"tokens":@}"#),
];

/// Arbitrary bytes, raw-token splices and byte-level damage to valid bodies.
fn bytes_case() -> impl Strategy<Value = HttpCase> {
    let raw_token = prop_oneof![
        4 => select(RAW_TOKENS).prop_map(str::to_owned),
        1 => number().prop_map(|n| n.to_string()),
        1 => text().prop_map(|t| Value::String(t).to_string()),
    ];
    let spliced = (select(RAW_TEMPLATES), raw_token).prop_map(|((endpoint, template), token)| {
        (endpoint, template.replace('@', &token).into_bytes())
    });
    let damaged = (
        0usize..4,
        vec(mutation(), 0..2),
        vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..4),
    )
        .prop_map(|(endpoint, ms, edits)| {
            let mut body = valid_body(endpoint);
            for m in ms {
                apply(&mut body, m);
            }
            let mut bytes = serde_json::to_vec(&body).expect("a Value always serializes");
            for (at, byte, op) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 => bytes.truncate(i),
                    1 if i < bytes.len() => bytes[i] = byte,
                    2 if i < bytes.len() => {
                        bytes.remove(i);
                    }
                    _ => bytes.insert(i, byte),
                }
            }
            (endpoint, bytes)
        });
    let deep = (
        0usize..4,
        100usize..200_000,
        select(&["[", "{\"a\":", "[{\"content\":"][..]),
    )
        .prop_map(|(endpoint, depth, open)| {
            let mut s = String::from("{\"model\":\"tiny-llama\",\"messages\":");
            s.push_str(&open.repeat(depth));
            (endpoint, s.into_bytes())
        });
    let body = prop_oneof![
        3 => spliced,
        3 => damaged,
        2 => (0usize..4, vec(any::<u8>(), 0..300)),
        1 => deep,
        1 => (0usize..4, any::<String>().prop_map(String::into_bytes)),
    ];
    (body, content_type()).prop_map(|((endpoint, body), content_type)| HttpCase {
        endpoint,
        content_type,
        body,
    })
}

// ---------------------------------------------------------------------------
// HTTP checks
// ---------------------------------------------------------------------------

fn check_error_shape(status: u16, body: &Value) -> Result<(), String> {
    let error = body
        .get("error")
        .and_then(Value::as_object)
        .ok_or_else(|| format!("{status} without an `error` object: {body}"))?;
    let is_str = |k: &str| error.get(k).is_some_and(Value::is_string);
    let is_str_or_null = |k: &str| matches!(error.get(k), Some(Value::String(_) | Value::Null));
    if !is_str("message") || !is_str("type") || !is_str_or_null("param") || !is_str_or_null("code")
    {
        return Err(format!("{status} with a malformed OpenAI error: {body}"));
    }
    if body.as_object().map_or(0, Map::len) != 1 {
        return Err(format!("{status} error body has extra keys: {body}"));
    }
    Ok(())
}

/// Sends one request and checks the response; returns the status.
async fn exchange(h: &Harness, case: &HttpCase) -> Result<u16, String> {
    let mut request = Request::post(ENDPOINTS[case.endpoint]);
    if let Some(ct) = case.content_type {
        request = request.header("content-type", ct);
    }
    let request = request
        .body(Body::from(case.body.clone()))
        .map_err(|e| e.to_string())?;
    let response = h.call(request).await;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = axum::body::to_bytes(response.into_body(), 256 << 20)
        .await
        .map_err(|e| format!("{status}: the body could not be read: {e}"))?;
    let text = String::from_utf8(bytes.to_vec())
        .map_err(|e| format!("{status}: the body is not UTF-8: {e}"))?;
    if status >= 500 {
        return Err(format!("server error {status}: {text}"));
    }
    if content_type.starts_with("text/event-stream") {
        if status != 200 {
            return Err(format!("{status} with an event stream: {text}"));
        }
        if !text.ends_with("data: [DONE]\n\n") {
            return Err(format!("stream does not end with [DONE]: {text}"));
        }
        for (event, data) in sse_events(&text) {
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(&data)
                .map_err(|e| format!("SSE data is not JSON ({e}): {data}"))?;
            if event.as_deref() == Some("error") {
                // The scripted engine never fails mid-stream.
                return Err(format!("error event in stream: {chunk}"));
            }
        }
        return Ok(status);
    }
    if !content_type.starts_with("application/json") {
        return Err(format!(
            "{status} with content type `{content_type}`: {text}"
        ));
    }
    let body: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{status}: the body is not JSON ({e}): {text}"))?;
    if status >= 400 {
        check_error_shape(status, &body)?;
    } else if status == 200 {
        let want_object = match case.endpoint {
            0 => Some("chat.completion"),
            1 => Some("text_completion"),
            _ => None,
        };
        if let Some(want) = want_object {
            if body["object"] != want {
                return Err(format!("200 without object {want}: {body}"));
            }
        } else if body.get("error").is_some() {
            return Err(format!("200 with an error body: {body}"));
        }
    } else {
        return Err(format!("unexpected status {status}: {body}"));
    }
    Ok(status)
}

/// A request that must keep working, whatever came before.
async fn still_serving(h: &Harness) -> Result<(), String> {
    let (status, body) = h.post("/v1/chat/completions", valid_body(0)).await;
    if status != 200 || body["choices"][0]["message"]["content"] != "t0 t1 t2" {
        return Err(format!(
            "a valid request failed afterwards: {status} {body}"
        ));
    }
    // Every engine stream the handlers opened has been dropped.
    let live = h.backend.live.load(Ordering::SeqCst);
    if live != 0 {
        return Err(format!("{live} engine streams still open"));
    }
    Ok(())
}

fn http_property(name: &str, strategy: impl Strategy<Value = HttpCase>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // One harness for the whole run, so damage would carry over between cases.
    let h = harness(AppOptions::default());
    fuzz(name, strategy, |case| {
        rt.block_on(async {
            let outcome = exchange(&h, &case).await;
            let after = still_serving(&h).await;
            outcome
                .and(after)
                .map_err(|e| TestCaseError::fail(truncate(e)))
        })
    });
}

fn truncate(mut s: String) -> String {
    if s.len() > 2000 {
        let mut end = 2000;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

/// (1a) JSON bodies through the real router: never 5xx, errors in OpenAI's
/// shape, and the service keeps answering.
#[test]
fn fuzz_http_json_bodies() {
    http_property("http_json", json_case());
}

/// (1b) Raw bytes: broken JSON, raw NaN/huge numbers, lone surrogates, deep
/// nesting, wrong content types.
#[test]
fn fuzz_http_raw_bytes() {
    http_property("http_bytes", bytes_case());
}

fn codec() -> LlamaCodec {
    LlamaCodec::from_model_dir(&tiny_dir()).expect("bundled tokenizer")
}

const BOS: u32 = 1;
const EOS: u32 = 2;
const UNK: u32 = 0;

/// Python's `str.strip()`, as Meta's reference format applies it.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The reference model of the Llama 2 format: each BOS-started segment's text
/// and whether it is closed by EOS, or `None` when the roles are invalid.
fn expected_turns(turns: &[ChatTurn], default_system: Option<&str>) -> Option<Vec<(String, bool)>> {
    let (system, dialog) = match turns.split_first() {
        None => return None,
        Some((first, rest)) if first.role == ChatRole::System => {
            (Some(first.content.as_str()), rest)
        }
        Some(_) => (default_system, turns),
    };
    let alternates = dialog.iter().enumerate().all(|(i, t)| {
        t.role
            == if i % 2 == 0 {
                ChatRole::User
            } else {
                ChatRole::Assistant
            }
    });
    if dialog.is_empty() || !alternates || dialog.last()?.role != ChatRole::User {
        return None;
    }
    Some(
        dialog
            .chunks(2)
            .enumerate()
            .map(|(i, pair)| {
                let user = match system {
                    Some(s) if i == 0 => format!("<<SYS>>\n{s}\n<</SYS>>\n\n{}", pair[0].content),
                    _ => pair[0].content.clone(),
                };
                let user = py_strip(&user);
                match pair {
                    [_, answer] => (
                        format!("[INST] {user} [/INST] {} ", py_strip(&answer.content)),
                        true,
                    ),
                    _ => (format!("[INST] {user} [/INST]"), false),
                }
            })
            .collect(),
    )
}

fn chat_turns() -> BoxedStrategy<(Vec<ChatTurn>, Option<String>)> {
    let role = prop_oneof![
        1 => Just(ChatRole::System),
        3 => Just(ChatRole::User),
        2 => Just(ChatRole::Assistant),
    ];
    let random = vec(
        (role, text()).prop_map(|(role, content)| ChatTurn { role, content }),
        0..7,
    );
    // Well-formed conversations, so the Ok path is exercised as much as errors.
    let valid = (proptest::option::of(text()), vec(text(), 0..4), text()).prop_map(
        |(system, pairs, last)| {
            let mut turns: Vec<ChatTurn> = system
                .map(|content| ChatTurn {
                    role: ChatRole::System,
                    content,
                })
                .into_iter()
                .collect();
            for (i, content) in pairs.into_iter().enumerate() {
                let role = if i % 2 == 0 {
                    ChatRole::User
                } else {
                    ChatRole::Assistant
                };
                turns.push(ChatTurn { role, content });
            }
            if turns.last().is_some_and(|t| t.role == ChatRole::User) {
                turns.push(ChatTurn {
                    role: ChatRole::Assistant,
                    content: "ok".into(),
                });
            }
            turns.push(ChatTurn {
                role: ChatRole::User,
                content: last,
            });
            turns
        },
    );
    (
        prop_oneof![1 => random, 2 => valid],
        proptest::option::of(text()),
    )
        .boxed()
}

/// (2) The chat template on arbitrary conversations: no panic; a clean
/// conversation error exactly when the roles are invalid; otherwise BOS only
/// at turn starts, EOS only closing a turn (right before the next BOS), no
/// `<unk>`, and each turn decodes back to Meta's text, so user text like
/// `<s>` or `[INST]` can never become control tokens.
#[test]
fn fuzz_chat_template() {
    let codec = codec();
    let vocab = codec.vocab_size();
    fuzz("chat_template", chat_turns(), |(turns, default_system)| {
        let result = codec.render_chat(&turns, default_system.as_deref());
        let expected = expected_turns(&turns, default_system.as_deref());
        let (ids, expected) = match (result, expected) {
            (Err(CodecError::InvalidConversation(_)), None) => return Ok(()),
            (Err(e), None) => {
                return Err(TestCaseError::fail(format!(
                    "invalid roles gave a non-client error: {e:?}"
                )))
            }
            (Err(e), Some(_)) => {
                return Err(TestCaseError::fail(format!(
                    "valid conversation refused: {e:?}"
                )))
            }
            (Ok(ids), None) => {
                return Err(TestCaseError::fail(format!(
                    "invalid roles accepted: {ids:?}"
                )))
            }
            (Ok(ids), Some(expected)) => (ids, expected),
        };
        prop_assert_eq!(ids.first(), Some(&BOS), "no leading BOS");
        prop_assert!(!ids.contains(&UNK), "<unk> in {:?}", ids);
        prop_assert!(ids.iter().all(|&id| (id as usize) < vocab));
        for (i, &id) in ids.iter().enumerate() {
            if id == BOS {
                prop_assert!(i == 0 || ids[i - 1] == EOS, "BOS inside a turn at {}", i);
            }
            if id == EOS {
                prop_assert!(
                    ids.get(i + 1) == Some(&BOS),
                    "EOS not closing a turn at {}",
                    i
                );
            }
        }
        // Split at BOS: one segment per turn.
        let mut segments: Vec<&[u32]> = ids.split(|&id| id == BOS).collect();
        segments.remove(0); // empty: ids start with BOS
        prop_assert_eq!(segments.len(), expected.len(), "turn count");
        for (segment, (text, closed)) in segments.iter().zip(&expected) {
            let (body, has_eos) = match segment.split_last() {
                Some((&EOS, body)) => (body, true),
                _ => (*segment, false),
            };
            prop_assert_eq!(has_eos, *closed);
            let decoded = codec
                .decode(body, false)
                .map_err(|e| TestCaseError::fail(format!("decode: {e:?}")))?;
            // The only lossy step: the tokenizer writes spaces as U+2581.
            let want = text.replace('\u{2581}', " ");
            prop_assert_eq!(decoded, want);
        }
        Ok(())
    });
}

const RARE: &[&str] = &["😀", "€", "龘", "𝄞", "é", "\n", "🇫🇷", "中文字"];

fn token_id() -> BoxedStrategy<u32> {
    prop_oneof![
        6 => 0u32..32_000,
        1 => 0u32..3,
        3 => 3u32..=258,
        1 => (0xE0u32 + 3)..=(0xF4 + 3),
        1 => (0x80u32 + 3)..=(0xBF + 3),
    ]
    .boxed()
}

/// Ids as they really come: random ids, byte runs of real characters.
fn token_ids(max: usize) -> BoxedStrategy<Vec<u32>> {
    vec(
        prop_oneof![
            3 => token_id().prop_map(|id| vec![id]),
            1 => select(RARE).prop_map(|s| s.bytes().map(|b| 3 + u32::from(b)).collect()),
        ],
        0..max,
    )
    .prop_map(|runs| runs.concat())
    .boxed()
}

/// (3) The incremental detokenizer on arbitrary ids: no panic, the text so far
/// is always a prefix of the final text, no U+FFFD mid-stream unless the full
/// decode has one, and the concatenated chunks equal
/// `decode(prompt + generated)[len(decode(prompt))..]` (in characters).
#[test]
fn fuzz_incremental_detokenizer() {
    let codec = codec();
    let hf = Arc::new(codec.tokenizer().hf().clone());
    let decode = |ids: &[u32]| hf.decode(ids, true).expect("decode of in-vocabulary ids");
    fuzz(
        "detokenizer",
        (token_ids(8), token_ids(100)),
        |(prompt, generated)| {
            let all: Vec<u32> = prompt.iter().chain(&generated).copied().collect();
            let want: String = decode(&all)
                .chars()
                .skip(decode(&prompt).chars().count())
                .collect();
            let mut detok = IncrementalDetokenizer::new(hf.clone(), &prompt);
            let mut streamed = String::new();
            for (i, &id) in generated.iter().enumerate() {
                let chunk = detok.push(id);
                if !want.contains('\u{FFFD}') {
                    prop_assert!(!chunk.contains('\u{FFFD}'), "U+FFFD mid-stream at {}", i);
                }
                streamed.push_str(&chunk);
                prop_assert!(
                    want.starts_with(&streamed),
                    "diverged at {}: {:?} vs {:?}",
                    i,
                    streamed,
                    want
                );
            }
            streamed.push_str(&detok.finish());
            prop_assert_eq!(&streamed, &want);
            prop_assert_eq!(detok.text(), want.as_str());
            prop_assert_eq!(detok.finish(), "", "finish twice");
            Ok(())
        },
    );
}

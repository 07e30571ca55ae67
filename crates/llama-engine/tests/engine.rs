//! The engine with the real tiny model: batching never changes outputs,
//! sampling is reproducible, cancellation and completion free every block.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use llama_engine::tokenizer::Tokenizer;
use llama_engine::{
    start_engine, EngineConfig, EngineHandle, FinishReason, GenerateRequest, SampledLogprobs,
    SamplingParams, StreamEvent, SubmitError,
};
use llama_model::{Device, KvBudget, KvCacheSpec, LlamaModel, ModelOptions};
use serde_json::Value;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama")
}

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-llama-reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn engine(config: EngineConfig) -> (EngineHandle, Tokenizer) {
    let model = LlamaModel::load(&model_dir(), &Device::Cpu, ModelOptions::default()).unwrap();
    let tokenizer = Tokenizer::from_model_dir(&model_dir()).unwrap();
    (
        start_engine(model, tokenizer.clone(), config).unwrap(),
        tokenizer,
    )
}

fn default_engine() -> (EngineHandle, Tokenizer) {
    engine_drawing_on_device(false)
}

/// `draws_on_device`: sampled rows picked by the runner next to the logits
/// (as on a GPU) instead of by the engine's sampler.
fn engine_drawing_on_device(draws_on_device: bool) -> (EngineHandle, Tokenizer) {
    engine(EngineConfig {
        kv_cache: KvCacheSpec {
            block_size: 16,
            budget: KvBudget::Tokens(16 * 400),
            dtype: None,
        },
        draws_on_device: Some(draws_on_device),
        ..Default::default()
    })
}

#[derive(Debug, Default, Clone, PartialEq)]
struct Choice {
    ids: Vec<u32>,
    text: String,
    finish: Option<FinishReason>,
    completion_tokens: usize,
    cached_tokens: usize,
    prompt_logprobs: Option<Vec<Option<SampledLogprobs>>>,
}

/// Collects every event of a generation (blocking).
fn collect(mut g: llama_engine::Generation, n: usize) -> Vec<Choice> {
    let mut choices = vec![Choice::default(); n];
    while let Some(ev) = g.blocking_next() {
        match ev.expect("no engine error") {
            StreamEvent::PromptLogprobs { index, logprobs } => {
                let choice = &mut choices[index];
                assert!(choice.ids.is_empty() && choice.prompt_logprobs.is_none());
                choice.prompt_logprobs = Some(logprobs);
            }
            StreamEvent::Token {
                index, id, text, ..
            } => {
                choices[index].ids.push(id);
                choices[index].text.push_str(&text);
            }
            StreamEvent::Done {
                index,
                finish_reason,
                usage,
            } => {
                choices[index].finish = Some(finish_reason);
                choices[index].completion_tokens = usage.completion_tokens;
                choices[index].cached_tokens = usage.cached_tokens;
            }
        }
    }
    choices
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt, max_tokens);
    r.stop.ignore_eos = true;
    r
}

fn wait_idle(handle: &EngineHandle) {
    let t0 = Instant::now();
    loop {
        let s = handle.stats();
        if s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "engine did not go idle: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Prompt logprobs (`echo` with `logprobs`): every prompt position's top 5
/// equal the reference's, in order and gaps, whether the prompt runs in one
/// step or in chunks; every choice gets them, before its first token.
#[test]
fn prompt_logprobs_match_the_reference_at_every_position() {
    let chunked = engine(EngineConfig {
        max_num_batched_tokens: 5,
        ..Default::default()
    })
    .0;
    let whole = default_engine().0;
    let mut checked = 0;
    for p in reference()["prompts"].as_array().unwrap() {
        let Some(top5_ids) = p.get("all_positions_top5_ids") else {
            continue;
        };
        let prompt = ids(&p["prompt_ids"]);
        let mut results = Vec::new();
        for handle in [&whole, &chunked] {
            let mut request = greedy(prompt.clone(), 2);
            request.prompt_logprobs = Some(5);
            request.n = 2;
            let choices = collect(handle.submit(request).unwrap(), 2);
            assert_eq!(choices[0].ids, ids(&p["greedy_ids"])[..2], "{}", p["name"]);
            assert_eq!(choices[0].prompt_logprobs, choices[1].prompt_logprobs);
            results.push(
                choices[0]
                    .prompt_logprobs
                    .clone()
                    .expect("prompt logprobs sent"),
            );
        }
        for scores in &results {
            assert_eq!(scores.len(), prompt.len(), "{}", p["name"]);
            assert!(scores[0].is_none());
            // Position `pos` (all but the last) scores prompt token `pos + 1`.
            for (pos, entry) in scores[1..].iter().enumerate() {
                let entry = entry.as_ref().expect("scored");
                assert_eq!(entry.chosen.id, prompt[pos + 1]);
                let top: Vec<u32> = entry.top.iter().map(|t| t.id).collect();
                assert_eq!(top, ids(&top5_ids[pos]), "{} position {pos}", p["name"]);
                let logits = p["all_positions_top5_logits"][pos].as_array().unwrap();
                for k in 1..5 {
                    let want = logits[0].as_f64().unwrap() - logits[k].as_f64().unwrap();
                    let got = f64::from(entry.top[0].logprob - entry.top[k].logprob);
                    assert!(
                        (want - got).abs() < 1e-3,
                        "{} position {pos}: gap {got} vs {want}",
                        p["name"]
                    );
                }
                assert!(entry.top[0].logprob < 0.0 && entry.chosen.logprob <= entry.top[0].logprob);
                if let Some(same) = entry.top.iter().find(|t| t.id == entry.chosen.id) {
                    assert_eq!(same.logprob, entry.chosen.logprob);
                }
            }
        }
        for (a, b) in results[0].iter().zip(&results[1]).skip(1) {
            let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
            assert!((a.chosen.logprob - b.chosen.logprob).abs() < 1e-4);
        }
        checked += 1;
    }
    assert_eq!(checked, 5);

    // max_tokens 0: the prompt is scored, no choice gets a token, and the
    // choices that would have forked from it free everything too.
    let mut request = GenerateRequest::new(vec![1, 15043, 29892, 3186], 0);
    request.prompt_logprobs = Some(2);
    request.n = 3;
    for choice in collect(chunked.submit(request).unwrap(), 3) {
        assert!(choice.ids.is_empty());
        assert_eq!(choice.finish, Some(FinishReason::Length));
        assert_eq!(choice.completion_tokens, 0);
        assert_eq!(choice.prompt_logprobs.map(|s| s.len()), Some(4));
    }
    // A one-token prompt has nothing to score, but still gets its one entry.
    let mut request = greedy(vec![1], 1);
    request.prompt_logprobs = Some(1);
    let choice = collect(whole.submit(request).unwrap(), 1).remove(0);
    assert_eq!(choice.prompt_logprobs, Some(vec![None]));
    assert_eq!(choice.ids.len(), 1);
    wait_idle(&whole);
    wait_idle(&chunked);
}

#[test]
fn greedy_requests_match_the_reference_text() {
    let (handle, _) = default_engine();
    for p in reference()["prompts"].as_array().unwrap() {
        let g = handle.submit(greedy(ids(&p["prompt_ids"]), 48)).unwrap();
        let c = collect(g, 1).remove(0);
        assert_eq!(c.ids, ids(&p["greedy_ids"]), "{}", p["name"]);
        assert_eq!(
            c.text,
            p["greedy_text_incremental"].as_str().unwrap(),
            "{}",
            p["name"]
        );
        assert_eq!(c.finish, Some(FinishReason::Length));
        assert_eq!(c.completion_tokens, 48);
        // Asking for logprobs takes the host path (whole logits rows) instead of
        // the runner's device-side argmax: the same ids either way.
        let mut with_logprobs = greedy(ids(&p["prompt_ids"]), 48);
        with_logprobs.logprobs = Some(1);
        let c = collect(handle.submit(with_logprobs).unwrap(), 1).remove(0);
        assert_eq!(c.ids, ids(&p["greedy_ids"]), "{} with logprobs", p["name"]);
    }
    wait_idle(&handle);
}

/// Automatic prefix caching: a prompt whose start was computed before
/// (the same prompt again, a longer one, a chat's next turn holding the last
/// answer) starts from the cached blocks and still gives the reference's
/// greedy ids, with logprobs within 1e-4 of the cold run's.
#[test]
fn prefix_cache_hits_give_the_reference_answers() {
    let (handle, _) = default_engine();
    // Greedy ids, the cached prompt tokens, and each token's logprob.
    let run = |handle: &EngineHandle, prompt: &[u32], max_tokens| {
        let mut request = greedy(prompt.to_vec(), max_tokens);
        request.logprobs = Some(1);
        let mut g = handle.submit(request).unwrap();
        let (mut ids, mut logprobs, mut cached) = (Vec::new(), Vec::new(), None);
        while let Some(ev) = g.blocking_next() {
            match ev.expect("no engine error") {
                StreamEvent::Token {
                    id, logprobs: l, ..
                } => {
                    ids.push(id);
                    logprobs.push(l.expect("asked for").chosen.logprob);
                }
                StreamEvent::Done { usage, .. } => cached = Some(usage.cached_tokens),
                StreamEvent::PromptLogprobs { .. } => unreachable!("not asked for"),
            }
        }
        (ids, cached.expect("a Done event"), logprobs)
    };
    let prompts = reference()["prompts"].as_array().unwrap().clone();
    let mut hits = 0;
    for p in &prompts {
        let prompt = ids(&p["prompt_ids"]);
        let (cold_ids, cold_cached, cold_logprobs) = run(&handle, &prompt, 48);
        assert_eq!(cold_cached, 0, "{}", p["name"]);
        assert_eq!(cold_ids, ids(&p["greedy_ids"]), "{}", p["name"]);
        let (warm_ids, warm_cached, warm_logprobs) = run(&handle, &prompt, 48);
        // Whole blocks of 16, always leaving the last prompt token to compute.
        assert_eq!(warm_cached, (prompt.len() - 1) / 16 * 16, "{}", p["name"]);
        assert_eq!(warm_ids, cold_ids, "{}", p["name"]);
        for (w, c) in warm_logprobs.iter().zip(&cold_logprobs) {
            assert!((w - c).abs() < 1e-4, "{}: {w} vs {c}", p["name"]);
        }
        hits += warm_cached;
    }
    assert_eq!(hits, 416, "prompts of 34, 35, 23 and 338 tokens hit");
    let stats = handle.stats();
    assert_eq!(stats.prefix_cache_hits_total, hits as u64);
    assert_eq!(stats.prefix_cache_queries_total, 2 * 445);

    // The 338-token prompt, after another that shares its first 200 tokens.
    let long = prompts
        .iter()
        .max_by_key(|p| p["prompt_ids"].as_array().unwrap().len())
        .unwrap();
    let prompt = ids(&long["prompt_ids"]);
    let (handle2, _) = default_engine();
    let mut other = prompt[..200].to_vec();
    other.extend([450, 4996, 17354]);
    assert_eq!(
        run(&handle2, &other, 4).1,
        0,
        "each engine has its own cache"
    );
    let (warm_ids, warm_cached, _) = run(&handle2, &prompt, 48);
    assert_eq!(warm_cached, 192);
    assert_eq!(warm_ids, ids(&long["greedy_ids"]));

    // A chat's next turn: the prompt, its answer, a new question. All but
    // the answer's last token (never computed: generation stopped there)
    // were computed by the first request.
    let (handle3, _) = default_engine();
    let (answer, _, _) = run(&handle3, &prompt, 40);
    let mut turn = prompt.clone();
    turn.extend(&answer);
    turn.extend([29871, 13, 3492, 29901]);
    let (next_ids, next_cached, _) = run(&handle3, &turn, 8);
    assert_eq!(next_cached, (prompt.len() + 39) / 16 * 16);
    let (off, _) = engine(EngineConfig {
        prefix_caching: false,
        ..Default::default()
    });
    let (cold_ids, cold_cached, _) = run(&off, &turn, 8);
    let (_, again_cached, _) = run(&off, &turn, 8);
    assert_eq!((cold_cached, again_cached), (0, 0), "caching off");
    assert_eq!(next_ids, cold_ids);
    assert_eq!(off.stats().prefix_cache_queries_total, 0);
    for h in [&handle, &handle2, &handle3, &off] {
        wait_idle(h);
    }
}

#[test]
fn fifty_concurrent_requests_give_their_solo_outputs() {
    let (handle, tokenizer) = engine(EngineConfig {
        max_num_batched_tokens: 96,
        kv_cache: KvCacheSpec {
            block_size: 16,
            budget: KvBudget::Tokens(16 * 400),
            dtype: None,
        },
        ..Default::default()
    });
    let texts = [
        "Hello",
        "The capital of France is",
        "fn main() {",
        "Once upon a time, in a land far away,",
        "1, 2, 3,",
    ];
    let requests: Vec<(Vec<u32>, usize)> = (0..50)
        .map(|i| {
            let mut prompt = tokenizer.encode(texts[i % texts.len()], true).unwrap();
            prompt.extend((0..(i * 3) % 40).map(|k| 100 + (k * 37 + i) as u32 % 5000));
            (prompt, 4 + (i * 7) % 30)
        })
        .collect();
    let solo: Vec<Vec<u32>> = requests
        .iter()
        .map(|(p, n)| {
            collect(handle.submit(greedy(p.clone(), *n)).unwrap(), 1)
                .remove(0)
                .ids
        })
        .collect();
    let gens: Vec<_> = requests
        .iter()
        .map(|(p, n)| handle.submit(greedy(p.clone(), *n)).unwrap())
        .collect();
    let batched: Vec<Vec<u32>> = gens
        .into_iter()
        .map(|g| collect(g, 1).remove(0).ids)
        .collect();
    for (i, (a, b)) in solo.iter().zip(&batched).enumerate() {
        assert_eq!(a, b, "request {i}");
    }
    wait_idle(&handle);
}

fn sampled(prompt: Vec<u32>, seed: u64, n: usize) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt, 24);
    r.stop.ignore_eos = true;
    r.n = n;
    r.sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        top_k: 50,
        seed: Some(seed),
        ..Default::default()
    };
    r
}

#[test]
fn seeded_sampling_is_reproducible_solo_and_batched() {
    seeded_sampling_is_reproducible(false);
}

#[test]
fn seeded_sampling_drawn_next_to_the_logits_is_reproducible_solo_and_batched() {
    seeded_sampling_is_reproducible(true);
}

fn seeded_sampling_is_reproducible(draws_on_device: bool) {
    let (handle, tokenizer) = engine_drawing_on_device(draws_on_device);
    let prompt = tokenizer.encode("The weather today", true).unwrap();
    let solo = collect(handle.submit(sampled(prompt.clone(), 42, 1)).unwrap(), 1);
    // The same request among 10 others with different seeds and prompts;
    // some ask for logprobs or a penalty, which the engine's sampler serves
    // from the whole row, so the steps mix both kinds of pick.
    let other = |text: String, i: u64| {
        let mut r = sampled(tokenizer.encode(&text, true).unwrap(), i, 1);
        match i % 3 {
            0 => r.logprobs = Some(2),
            1 => r.sampling.presence_penalty = 0.5,
            _ => {}
        }
        handle.submit(r).unwrap()
    };
    let mut others: Vec<_> = (0..5).map(|i| other(format!("Noise {i}"), i)).collect();
    let again = handle.submit(sampled(prompt.clone(), 42, 1)).unwrap();
    others.extend((5..10).map(|i| other(format!("More {i}"), i)));
    let again = collect(again, 1);
    for g in others {
        collect(g, 1);
    }
    assert_eq!(solo, again);
    let other_seed = collect(handle.submit(sampled(prompt.clone(), 43, 1)).unwrap(), 1);
    assert_ne!(solo[0].ids, other_seed[0].ids);
    // top_k = 1 keeps only the best token: sampling gives the greedy answer.
    let mut top1 = sampled(prompt.clone(), 5, 1);
    top1.sampling.top_k = 1;
    let want = collect(handle.submit(greedy(prompt, 24)).unwrap(), 1);
    assert_eq!(collect(handle.submit(top1).unwrap(), 1)[0].ids, want[0].ids);
    wait_idle(&handle);
}

#[test]
fn n_choices_share_a_prefill_and_differ() {
    n_choices_differ(false);
}

#[test]
fn n_choices_drawn_next_to_the_logits_differ() {
    n_choices_differ(true);
}

fn n_choices_differ(draws_on_device: bool) {
    let (handle, tokenizer) = engine_drawing_on_device(draws_on_device);
    let prompt = tokenizer.encode("Tell me a story about", true).unwrap();
    let choices = collect(handle.submit(sampled(prompt.clone(), 7, 3)).unwrap(), 3);
    assert_eq!(choices.len(), 3);
    for c in &choices {
        assert_eq!(c.completion_tokens, 24);
        assert_eq!(c.finish, Some(FinishReason::Length));
    }
    assert!(choices[0].ids != choices[1].ids || choices[1].ids != choices[2].ids);
    // Seeded: the same request gives the same three choices.
    assert_eq!(
        choices,
        collect(handle.submit(sampled(prompt.clone(), 7, 3)).unwrap(), 3)
    );
    // Greedy n=3: three identical choices equal to the n=1 answer.
    let mut g = greedy(prompt.clone(), 16);
    g.n = 3;
    let three = collect(handle.submit(g).unwrap(), 3);
    let one = collect(handle.submit(greedy(prompt, 16)).unwrap(), 1);
    for c in &three {
        assert_eq!(c.ids, one[0].ids);
    }
    wait_idle(&handle);
}

#[test]
fn stop_strings_end_the_choice_and_never_leak() {
    let (handle, tokenizer) = default_engine();
    let p = &reference()["prompts"][1];
    let full = p["greedy_text_incremental"].as_str().unwrap().to_string();
    // Pick a stop string from the middle of the greedy answer, spanning several tokens.
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 4].iter().collect();
    let mut r = greedy(ids(&p["prompt_ids"]), 48);
    r.stop.stop_strings = vec!["never-appears".into(), stop.clone()];
    let c = collect(handle.submit(r).unwrap(), 1).remove(0);
    let expected = &full[..full.find(&stop).unwrap()];
    assert_eq!(c.text, expected);
    assert_eq!(c.finish, Some(FinishReason::Stop));
    let _ = tokenizer;
    wait_idle(&handle);
}

/// A mix of requests, all at once: greedy of several lengths, stop strings
/// that end a choice mid-step, EOS allowed, a stop token id, logprobs, and
/// seeded n = 3 sampling.
fn mixed_requests(tokenizer: &Tokenizer) -> Vec<(GenerateRequest, usize)> {
    let texts = [
        "Hello",
        "The capital of France is",
        "fn main() {",
        "Once upon a time, in a land far away,",
    ];
    let reference = reference();
    let answer = reference["prompts"][1]["greedy_text_incremental"]
        .as_str()
        .unwrap()
        .to_string();
    let answer_prompt = ids(&reference["prompts"][1]["prompt_ids"]);
    let mut out = Vec::new();
    for i in 0..24usize {
        let prompt = tokenizer.encode(texts[i % texts.len()], true).unwrap();
        let mut r = greedy(prompt.clone(), 3 + (i * 5) % 29);
        let mut n = 1;
        match i % 6 {
            1 => {
                // Ends on a stop string some tokens into the answer.
                r = greedy(answer_prompt.clone(), 48);
                let at = answer.len() * (i % 5 + 1) / 7;
                let at = (at..).find(|&k| answer.is_char_boundary(k)).unwrap();
                let end = (at + 3..).find(|&k| answer.is_char_boundary(k)).unwrap();
                r.stop.stop_strings = vec![answer[at..end].to_string()];
            }
            2 => r.stop.ignore_eos = false,
            3 => r.logprobs = Some(2),
            4 => {
                r = sampled(prompt, i as u64, 3);
                n = 3;
            }
            5 => r.stop.stop_token_ids = vec![29889, 13],
            _ => {}
        }
        out.push((r, n));
    }
    out
}

#[test]
fn tokens_sent_while_the_next_step_runs_are_the_same_tokens() {
    let mut answers = Vec::new();
    // The last run's pool is too small for all requests at once: sequences
    // are preempted and recomputed while tokens are sent during steps.
    let mut preemptions = 0;
    for (overlap, blocks) in [(false, 400), (true, 400), (true, 24)] {
        let (handle, tokenizer) = engine(EngineConfig {
            max_num_batched_tokens: 64,
            kv_cache: KvCacheSpec {
                block_size: 16,
                budget: KvBudget::Tokens(16 * blocks),
                dtype: None,
            },
            overlap: Some(overlap),
            ..Default::default()
        });
        let requests = mixed_requests(&tokenizer);
        let gens: Vec<_> = requests
            .iter()
            .map(|(r, n)| (handle.submit(r.clone()).unwrap(), *n))
            .collect();
        let mut got: Vec<Vec<Choice>> = gens.into_iter().map(|(g, n)| collect(g, n)).collect();
        // Alone, so that its last token is picked with nothing else to run:
        // it must still be sent, not wait for another request.
        let lone = handle
            .submit(greedy(requests[0].0.prompt.clone(), 5))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(collect(lone, 1)));
        got.push(
            rx.recv_timeout(Duration::from_secs(30))
                .expect("the lone request's last token was sent"),
        );
        wait_idle(&handle);
        let s = handle.stats();
        assert_eq!(
            s.requests_finished_total,
            requests.len() as u64 + 1,
            "{s:?}"
        );
        preemptions = s.preemptions_total;
        answers.push(got);
    }
    assert!(preemptions > 0, "the small pool preempted nothing");
    let by_stop_string = answers[0]
        .iter()
        .flatten()
        .filter(|c| c.finish == Some(FinishReason::Stop) && !c.text.is_empty())
        .count();
    assert!(by_stop_string >= 4, "{by_stop_string} ended by a stop");
    for run in &answers[1..] {
        for (i, (a, b)) in answers[0].iter().zip(run).enumerate() {
            assert_eq!(a, b, "request {i}");
        }
    }
}

#[test]
fn full_queue_is_refused_and_context_checked() {
    let (handle, tokenizer) = engine(EngineConfig {
        max_queue: 2,
        max_num_seqs: 1,
        kv_cache: KvCacheSpec {
            block_size: 16,
            budget: KvBudget::Tokens(16 * 64),
            dtype: None,
        },
        ..Default::default()
    });
    let prompt = tokenizer.encode("Hello", true).unwrap();
    let mut accepted = Vec::new();
    let mut refused = 0;
    for _ in 0..20 {
        match handle.submit(greedy(prompt.clone(), 200)) {
            Ok(g) => accepted.push(g),
            Err(SubmitError::Overloaded { .. }) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(refused >= 15, "only {refused} refused");
    assert!(accepted.len() <= 4);
    let err = handle.submit(greedy(prompt.clone(), 10_000)).unwrap_err();
    assert!(
        matches!(
            err,
            SubmitError::ContextLength {
                max_context: 512,
                ..
            }
        ),
        "{err:?}"
    );
    drop(accepted);
    wait_idle(&handle);
}

#[test]
fn thousand_requests_with_cancellations_leak_nothing() {
    thousand_requests_with_cancellations(false);
}

#[test]
fn thousand_requests_with_cancellations_leak_nothing_with_tokens_sent_during_steps() {
    thousand_requests_with_cancellations(true);
}

fn thousand_requests_with_cancellations(overlap: bool) {
    let (handle, tokenizer) = engine(EngineConfig {
        overlap: Some(overlap),
        max_queue: 2000,
        kv_cache: KvCacheSpec {
            block_size: 16,
            budget: KvBudget::Tokens(16 * 200),
            dtype: None,
        },
        ..Default::default()
    });
    let total_blocks = handle.stats().kv_blocks_total;
    let prompt = tokenizer.encode("A short prompt", true).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..1000usize {
            let g = handle.submit(greedy(prompt.clone(), 2 + i % 6)).unwrap();
            tasks.push(tokio::spawn(async move {
                let mut g = g;
                let mut seen = 0;
                while let Some(ev) = g.next_event().await {
                    ev.unwrap();
                    seen += 1;
                    if i % 10 == 0 && seen == 1 {
                        return false; // client gone mid-stream
                    }
                }
                true
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    wait_idle(&handle);
    let s = handle.stats();
    assert_eq!(s.kv_blocks_total, total_blocks);
    assert!(s.requests_cancelled_total >= 1, "{s:?}");
    assert_eq!(
        s.requests_finished_total + s.requests_cancelled_total,
        1000,
        "{s:?}"
    );
}

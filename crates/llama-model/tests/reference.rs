//! Parity with Hugging Face transformers on the tiny fixture model (f32).

use std::path::{Path, PathBuf};

use llama_model::{
    AttentionImpl, BatchInput, BlockAllocator, BlockTable, Device, KvBudget, KvCache, KvCacheSpec,
    LlamaModel, ModelOptions, SeqChunk,
};
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

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// `LLAMA_TEST_DEVICE=cuda` runs the parity tests on a GPU (scripts/gpu-run.sh does).
fn device() -> Device {
    let spec = std::env::var("LLAMA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    spec.parse::<llama_model::DeviceSpec>()
        .unwrap()
        .open()
        .unwrap()
}

fn load() -> LlamaModel {
    LlamaModel::load(&model_dir(), &device(), ModelOptions::default()).unwrap()
}

fn cache(model: &LlamaModel) -> (KvCache, BlockAllocator) {
    cache_of(model, None)
}

fn cache_of(model: &LlamaModel, dtype: Option<llama_model::DType>) -> (KvCache, BlockAllocator) {
    let spec = KvCacheSpec {
        block_size: 16,
        budget: KvBudget::Tokens(16 * 256),
        dtype,
    };
    let kv = model.new_kv_cache(&spec).unwrap();
    let alloc = kv.allocator();
    (kv, alloc)
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// A sequence driven step by step: its tokens, how many are in the cache, its blocks.
struct Seq {
    tokens: Vec<u32>,
    cached: usize,
    table: BlockTable,
    generated: Vec<u32>,
}

impl Seq {
    fn new(prompt: Vec<u32>) -> Self {
        Self {
            tokens: prompt,
            cached: 0,
            table: BlockTable::new(),
            generated: Vec::new(),
        }
    }
}

/// One step over `seqs`, each feeding up to `chunk` of its uncached tokens; returns last logits rows.
fn step(
    model: &LlamaModel,
    kv: &KvCache,
    alloc: &mut BlockAllocator,
    seqs: &mut [&mut Seq],
    chunk: usize,
) -> Vec<Vec<f32>> {
    for s in seqs.iter_mut() {
        let upto = (s.cached + chunk).min(s.tokens.len());
        alloc.ensure_capacity(&mut s.table, upto).unwrap();
    }
    let batch = BatchInput::new(
        seqs.iter()
            .map(|s| {
                let upto = (s.cached + chunk).min(s.tokens.len());
                SeqChunk {
                    tokens: &s.tokens[s.cached..upto],
                    start_pos: s.cached,
                    block_table: &s.table,
                    all_logits: false,
                }
            })
            .collect(),
    );
    let logits = model.forward(&batch, kv).unwrap();
    drop(batch);
    let rows: Vec<Vec<f32>> = logits.last().unwrap().to_vec2().unwrap();
    for s in seqs.iter_mut() {
        s.cached = (s.cached + chunk).min(s.tokens.len());
    }
    rows
}

/// Greedy decode: a sequence whose prompt is fully cached takes its argmax as next token.
fn advance(seqs: &mut [&mut Seq], rows: &[Vec<f32>]) {
    for (s, row) in seqs.iter_mut().zip(rows) {
        if s.cached == s.tokens.len() {
            let next = argmax(row);
            s.tokens.push(next);
            s.generated.push(next);
        }
    }
}

fn check_top5(row: &[f32], top_ids: &[u32], top_logits: &[f32], what: &str) {
    for (id, want) in top_ids.iter().zip(top_logits) {
        let got = row[*id as usize];
        assert!(
            (got - want).abs() < 1e-3,
            "{what}: logit of {id} is {got}, reference {want}"
        );
    }
    assert_eq!(argmax(row), top_ids[0], "{what}: argmax");
}

#[test]
fn tokenizer_gives_the_reference_prompt_ids() {
    let tok = tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
    for p in reference()["prompts"].as_array().unwrap() {
        let enc = tok.encode(p["prompt"].as_str().unwrap(), true).unwrap();
        assert_eq!(
            enc.get_ids(),
            ids(&p["prompt_ids"]).as_slice(),
            "{}",
            p["name"]
        );
    }
}

#[test]
fn solo_greedy_matches_reference_with_both_attention_paths() {
    let mut model = load();
    let reference = reference();
    for imp in [AttentionImpl::Auto, AttentionImpl::Generic] {
        model.set_attention(imp);
        let (kv, mut alloc) = cache(&model);
        for p in reference["prompts"].as_array().unwrap() {
            let name = format!("{imp:?}/{}", p["name"].as_str().unwrap());
            let mut seq = Seq::new(ids(&p["prompt_ids"]));
            let steps_ids = p["greedy_step_top5_ids"].as_array().unwrap();
            let steps_logits = p["greedy_step_top5_logits"].as_array().unwrap();
            for i in 0..48 {
                let chunk = if i == 0 { usize::MAX } else { 1 };
                let rows = step(&model, &kv, &mut alloc, &mut [&mut seq], chunk);
                if i == 0 {
                    check_top5(
                        &rows[0],
                        &ids(&p["last_top5_ids"]),
                        &floats(&p["last_top5_logits"]),
                        &name,
                    );
                }
                check_top5(
                    &rows[0],
                    &ids(&steps_ids[i]),
                    &floats(&steps_logits[i]),
                    &format!("{name} step {i}"),
                );
                advance(&mut [&mut seq], &rows);
            }
            assert_eq!(seq.generated, ids(&p["greedy_ids"]), "{name}");
            alloc.release(&mut seq.table).unwrap();
        }
        assert_eq!(alloc.num_free(), alloc.num_blocks());
    }
}

#[test]
fn all_position_logits_match_the_causal_reference() {
    let model = load();
    let (kv, mut alloc) = cache(&model);
    for p in reference()["prompts"].as_array().unwrap() {
        if p.get("all_positions_top5_ids").is_none() {
            continue;
        }
        let prompt = ids(&p["prompt_ids"]);
        let mut table = BlockTable::new();
        alloc.ensure_capacity(&mut table, prompt.len()).unwrap();
        let batch = BatchInput::new(vec![SeqChunk {
            tokens: &prompt,
            start_pos: 0,
            block_table: &table,
            all_logits: true,
        }]);
        let logits = model.forward(&batch, &kv).unwrap();
        let (first, count) = logits.all_rows[0].unwrap();
        assert_eq!(count, prompt.len());
        let rows: Vec<Vec<f32>> = logits.values.to_vec2().unwrap();
        let want_ids = p["all_positions_top5_ids"].as_array().unwrap();
        let want_logits = p["all_positions_top5_logits"].as_array().unwrap();
        for pos in 0..prompt.len() {
            check_top5(
                &rows[first + pos],
                &ids(&want_ids[pos]),
                &floats(&want_logits[pos]),
                &format!("{} pos {pos}", p["name"]),
            );
        }
        alloc.release(&mut table).unwrap();
    }
}

fn prompts_by_name(reference: &Value) -> std::collections::HashMap<String, (Vec<u32>, Vec<u32>)> {
    reference["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                (ids(&p["prompt_ids"]), ids(&p["greedy_ids"])),
            )
        })
        .collect()
}

#[test]
fn batched_prompts_decode_exactly_like_their_solo_runs() {
    let model = load();
    let reference = reference();
    let by_name = prompts_by_name(&reference);
    let batched = &reference["batched"];
    let names: Vec<String> = batched["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    let (kv, mut alloc) = cache(&model);
    let mut seqs: Vec<Seq> = names
        .iter()
        .map(|n| Seq::new(by_name[n].0.clone()))
        .collect();
    for i in 0..48 {
        let chunk = if i == 0 { usize::MAX } else { 1 };
        let mut refs: Vec<&mut Seq> = seqs.iter_mut().collect();
        let rows = step(&model, &kv, &mut alloc, &mut refs, chunk);
        advance(&mut refs, &rows);
    }
    for (n, (s, want)) in names
        .iter()
        .zip(seqs.iter().zip(batched["greedy_ids"].as_array().unwrap()))
    {
        assert_eq!(s.generated, ids(want), "{n}");
        assert_eq!(s.generated, by_name[n].1, "{n} vs solo");
    }
}

#[test]
fn sequences_join_and_leave_mid_way() {
    // `long` prefills in chunks of 64 while others decode; `short` leaves after 10 tokens
    // and `unicode` joins at step 5. Every sequence must still produce its solo greedy ids.
    let model = load();
    let by_name = prompts_by_name(&reference());
    let (kv, mut alloc) = cache(&model);
    let mut live: Vec<(String, Seq, usize)> = Vec::new(); // (name, seq, tokens to generate)
    let mut done: Vec<(String, Vec<u32>)> = Vec::new();
    let schedule = [
        (0, "short", 10),
        (0, "code", 48),
        (2, "long", 48),
        (5, "unicode", 40),
        (7, "chat", 48),
        (9, "sentence", 30),
    ];
    for step_no in 0..200 {
        for (at, name, n) in schedule {
            if at == step_no {
                live.push((name.to_string(), Seq::new(by_name[name].0.clone()), n));
            }
        }
        if live.is_empty() {
            break;
        }
        let mut refs: Vec<&mut Seq> = live.iter_mut().map(|(_, s, _)| s).collect();
        let rows = step(&model, &kv, &mut alloc, &mut refs, 64);
        advance(&mut refs, &rows);
        let mut i = 0;
        while i < live.len() {
            if live[i].1.generated.len() == live[i].2 {
                let (name, mut s, _) = live.remove(i);
                alloc.release(&mut s.table).unwrap();
                done.push((name, s.generated));
            } else {
                i += 1;
            }
        }
    }
    assert_eq!(done.len(), schedule.len());
    for (name, generated) in done {
        let solo = &by_name[&name].1;
        assert_eq!(generated, solo[..generated.len()], "{name}");
    }
    assert_eq!(alloc.num_free(), alloc.num_blocks());
}

#[test]
fn chunked_prefill_gives_the_same_logits() {
    let model = load();
    let by_name = prompts_by_name(&reference());
    let prompt = by_name["long"].0.clone();
    let mut last_rows = Vec::new();
    for chunk in [usize::MAX, 1, 7, 64] {
        let (kv, mut alloc) = cache(&model);
        let mut seq = Seq::new(prompt.clone());
        let mut rows = Vec::new();
        while seq.cached < seq.tokens.len() {
            rows = step(&model, &kv, &mut alloc, &mut [&mut seq], chunk);
        }
        last_rows.push(rows.remove(0));
    }
    for (i, rows) in last_rows.iter().enumerate().skip(1) {
        let max_diff = rows
            .iter()
            .zip(&last_rows[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < 1e-4, "chunking #{i}: max logit diff {max_diff}");
    }
}

#[test]
fn random_weights_run_and_are_seeded() {
    let cfg = llama_model::ModelShape::Tiny.config();
    let a = LlamaModel::random(cfg.clone(), 7, &device(), ModelOptions::default()).unwrap();
    let b = LlamaModel::random(cfg, 7, &device(), ModelOptions::default()).unwrap();
    let (kv, mut alloc) = cache(&a);
    let mut s1 = Seq::new(vec![1, 2, 3, 4]);
    let r1 = step(&a, &kv, &mut alloc, &mut [&mut s1], usize::MAX);
    let mut s2 = Seq::new(vec![1, 2, 3, 4]);
    let r2 = step(&b, &kv, &mut alloc, &mut [&mut s2], usize::MAX);
    assert_eq!(r1, r2);
    assert!(r1[0].iter().all(|v| v.is_finite()));
}

/// In bf16 (the GPU dtype) the fixture README expects logit errors of 1e-2 to
/// 1e-1 (on CPU the worst here is 0.12, on logits of about 8): every
/// reference top-5 logit is checked at 0.15 at every step, with the
/// reference ids fed back (teacher forcing) so that the steps stay comparable,
/// and the argmax must be the reference id wherever the reference's top-1
/// margin is wider than that error.
#[test]
fn bf16_stays_within_the_fixture_tolerance() {
    let mut model = LlamaModel::load(
        &model_dir(),
        &device(),
        ModelOptions {
            dtype: llama_model::DType::BF16,
            ..Default::default()
        },
    )
    .unwrap();
    for imp in [AttentionImpl::Auto, AttentionImpl::Generic] {
        model.set_attention(imp);
        teacher_forced_within(&model, None, 0.15, &format!("bf16 {imp:?}"));
    }
}

/// An f32 model with an f16 KV cache (`--kv-cache-dtype f16`, llama.cpp's
/// default): the cache's rounding (about 5e-4 relative) moves the logits far
/// less than a bf16 model does (worst top-5 error here 0.003, against 0.12).
/// A bf16 cache rounds 8× more coarsely (worst 0.025).
#[test]
fn narrow_kv_caches_stay_close_to_the_reference() {
    let mut model = load();
    if !model.device().is_cpu() {
        // The CUDA kernels read the cache as the activations' dtype.
        return;
    }
    for imp in [AttentionImpl::Auto, AttentionImpl::Generic] {
        model.set_attention(imp);
        for (dtype, tol) in [
            (llama_model::DType::F16, 0.01),
            (llama_model::DType::BF16, 0.06),
        ] {
            let label = format!("f32 model, {dtype:?} cache, {imp:?}");
            teacher_forced_within(&model, Some(dtype), tol, &label);
        }
    }
}

/// Every reference top-5 logit within `tol` at each of the 48 steps, with the
/// reference ids fed back (teacher forcing) so that the steps stay
/// comparable; and the argmax is the reference id wherever the reference's
/// top-1 margin is wider than twice that.
fn teacher_forced_within(
    model: &LlamaModel,
    kv_dtype: Option<llama_model::DType>,
    tol: f32,
    label: &str,
) {
    let reference = reference();
    let (kv, mut alloc) = cache_of(model, kv_dtype);
    let mut worst = 0f32;
    let mut margin_checked = 0;
    for p in reference["prompts"].as_array().unwrap() {
        let name = format!("{label}/{}", p["name"].as_str().unwrap());
        let mut seq = Seq::new(ids(&p["prompt_ids"]));
        let greedy = ids(&p["greedy_ids"]);
        let steps_ids = p["greedy_step_top5_ids"].as_array().unwrap();
        let steps_logits = p["greedy_step_top5_logits"].as_array().unwrap();
        for i in 0..48 {
            let chunk = if i == 0 { usize::MAX } else { 1 };
            let rows = step(model, &kv, &mut alloc, &mut [&mut seq], chunk);
            let (top_ids, top) = (ids(&steps_ids[i]), floats(&steps_logits[i]));
            for (id, want) in top_ids.iter().zip(&top) {
                let err = (rows[0][*id as usize] - want).abs();
                worst = worst.max(err);
                assert!(err < tol, "{name} step {i}: logit of {id} off by {err}");
            }
            if top[0] - top[1] > 2.0 * tol {
                margin_checked += 1;
                assert_eq!(argmax(&rows[0]), greedy[i], "{name} step {i}: argmax");
            }
            seq.tokens.push(greedy[i]);
        }
        alloc.release(&mut seq.table).unwrap();
    }
    println!(
        "{label}: worst top-5 logit error {worst:.4}, argmax checked at {margin_checked} steps"
    );
    assert!(margin_checked > 0, "no step had a clear reference margin");
}

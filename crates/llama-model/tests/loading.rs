//! Loading: sharded checkpoints, PyTorch checkpoints, and errors that name
//! their culprit.

mod gguf_writer;
mod torch_save;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use llama_model::{
    BatchInput, BlockTable, Device, KvBudget, KvCacheSpec, LlamaModel, ModelOptions, SeqChunk,
    Tensor,
};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama")
}

/// How a test checkpoint's weights are written.
#[derive(Clone, Copy, PartialEq)]
enum Format {
    Safetensors,
    /// As `torch.save` does. Every third tensor is stored as f32 and every
    /// fifth as a view into a larger storage, as real checkpoints mix them.
    Pytorch,
}

/// A copy of the fixture directory whose weights are `tensors`, split into
/// `shards` files (with an index when more than one), named as Hugging Face
/// names them.
fn checkpoint_with(
    tensors: &HashMap<String, Tensor>,
    shards: usize,
    format: Format,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    let (single, stem, extension) = match format {
        Format::Safetensors => ("model.safetensors", "model", "safetensors"),
        Format::Pytorch => ("pytorch_model.bin", "pytorch_model", "bin"),
    };
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names
        .chunks(names.len().div_ceil(shards).max(1))
        .enumerate()
    {
        let file = if shards == 1 {
            single.to_string()
        } else {
            format!("{stem}-{:05}-of-{shards:05}.{extension}", i + 1)
        };
        let path = dir.path().join(&file);
        match format {
            Format::Safetensors => {
                let part: HashMap<String, Tensor> = chunk
                    .iter()
                    .map(|n| ((*n).clone(), tensors[*n].clone()))
                    .collect();
                candle_core::safetensors::save(&part, path).unwrap();
            }
            Format::Pytorch => {
                let seen = weight_map.len();
                let entries: Vec<torch_save::Entry> = (seen + 1..)
                    .zip(chunk)
                    .map(|(nth, name)| torch_save::Entry {
                        name,
                        tensor: &tensors[*name],
                        dtype: if nth % 3 == 0 {
                            candle_core::DType::F32
                        } else {
                            candle_core::DType::F16
                        },
                        offset: if nth % 5 == 0 { 7 } else { 0 },
                    })
                    .collect();
                torch_save::save(&entries, &path);
            }
        }
        for n in chunk {
            weight_map.insert((*n).clone(), file.clone().into());
        }
    }
    if shards > 1 {
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(
            dir.path().join(format!("{single}.index.json")),
            index.to_string(),
        )
        .unwrap();
    }
    dir
}

fn model_with(tensors: &HashMap<String, Tensor>, shards: usize) -> tempfile::TempDir {
    checkpoint_with(tensors, shards, Format::Safetensors)
}

fn pytorch_model_with(tensors: &HashMap<String, Tensor>, shards: usize) -> tempfile::TempDir {
    checkpoint_with(tensors, shards, Format::Pytorch)
}

fn fixture_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("model.safetensors"), &Device::Cpu).unwrap()
}

fn last_logits(dir: &Path) -> Vec<f32> {
    let model = LlamaModel::load(dir, &Device::Cpu, ModelOptions::default()).unwrap();
    let kv = model
        .new_kv_cache(&KvCacheSpec {
            block_size: 16,
            budget: KvBudget::Tokens(64),
            dtype: None,
        })
        .unwrap();
    let mut alloc = kv.allocator();
    let mut table = BlockTable::new();
    let prompt = [1u32, 15043, 29892, 3186];
    alloc.ensure_capacity(&mut table, prompt.len()).unwrap();
    let batch = BatchInput::new(vec![SeqChunk {
        tokens: &prompt,
        start_pos: 0,
        block_table: &table,
        all_logits: false,
    }]);
    model
        .forward(&batch, &kv)
        .unwrap()
        .last()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn load_err(dir: &Path) -> String {
    match LlamaModel::load(dir, &Device::Cpu, ModelOptions::default()) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sharded_checkpoint_loads_the_same_model() {
    let single = last_logits(&fixture());
    let dir = model_with(&fixture_tensors(), 3);
    assert!(dir
        .path()
        .join("model-00003-of-00003.safetensors")
        .is_file());
    assert_eq!(last_logits(dir.path()), single);
}

/// Checkpoints published before safetensors (`pytorch_model.bin`, one file
/// or sharded with an index) load to exactly the same model.
#[test]
fn pytorch_checkpoint_loads_the_same_model() {
    let single = last_logits(&fixture());
    let tensors = fixture_tensors();
    // The fixture's weights are float16 on disk, so writing some as f32
    // changes no value.
    assert!(tensors
        .values()
        .all(|t| t.dtype() == candle_core::DType::F16));
    for shards in [1, 3] {
        let dir = pytorch_model_with(&tensors, shards);
        assert_eq!(last_logits(dir.path()), single, "{shards} shard(s)");
    }
    // Shards without their index are found by name; other .bin files
    // (training_args.bin) are not taken for weights.
    let dir = pytorch_model_with(&tensors, 2);
    std::fs::remove_file(dir.path().join("pytorch_model.bin.index.json")).unwrap();
    std::fs::write(dir.path().join("training_args.bin"), b"not weights").unwrap();
    assert_eq!(last_logits(dir.path()), single, "shards without an index");

    // Where both formats are present, safetensors is read, as transformers does.
    let dir = pytorch_model_with(&tensors, 1);
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"unreadable").unwrap();
    assert_eq!(last_logits(dir.path()), single, "safetensors beside .bin");
}

#[test]
fn pytorch_checkpoint_errors_name_file_and_tensor() {
    let mut tensors = fixture_tensors();
    tensors.remove("model.norm.weight");
    let dir = pytorch_model_with(&tensors, 2);
    let err = load_err(dir.path());
    assert!(err.contains("missing tensor `model.norm.weight`"), "{err}");

    let mut tensors = fixture_tensors();
    let bad = tensors["model.layers.0.mlp.down_proj.weight"]
        .narrow(1, 0, 8)
        .unwrap();
    tensors.insert("model.layers.0.mlp.down_proj.weight".into(), bad);
    let err = load_err(pytorch_model_with(&tensors, 1).path());
    assert!(
        err.contains("model.layers.0.mlp.down_proj.weight") && err.contains(", 8]"),
        "{err}"
    );

    let dir = pytorch_model_with(&fixture_tensors(), 1);
    std::fs::write(dir.path().join("pytorch_model.bin"), b"PK not a zip").unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("pytorch_model.bin") && err.contains("not a PyTorch checkpoint"),
        "{err}"
    );

    // A pickle whose tensor is rebuilt from too few arguments: Candle's
    // unpickler panics on it; loading fails with an error instead.
    let mut pickle = vec![0x80, 2, b'}', b'(', b'X', 1, 0, 0, 0, b'w'];
    pickle.extend_from_slice(
        b"ctorch._utils\n_rebuild_tensor_v2\n(J\x00\x00\x00\x00J\x01\x00\x00\x00tRu.",
    );
    torch_save::write_archive(&pickle, &[], &dir.path().join("pytorch_model.bin"));
    let err = load_err(dir.path());
    assert!(
        err.contains("pytorch_model.bin") && err.contains("malformed pickle"),
        "{err}"
    );
}

#[test]
fn half_precision_loads_and_stays_close() {
    let f32_logits = last_logits(&fixture());
    for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
        let model = LlamaModel::load(
            &fixture(),
            &Device::Cpu,
            ModelOptions {
                dtype,
                ..Default::default()
            },
        )
        .unwrap();
        let kv = model
            .new_kv_cache(&KvCacheSpec {
                block_size: 16,
                budget: KvBudget::Tokens(64),
                dtype: None,
            })
            .unwrap();
        let mut table = BlockTable::new();
        kv.allocator().ensure_capacity(&mut table, 4).unwrap();
        let prompt = [1u32, 15043, 29892, 3186];
        let batch = BatchInput::new(vec![SeqChunk {
            tokens: &prompt,
            start_pos: 0,
            block_table: &table,
            all_logits: false,
        }]);
        let got: Vec<f32> = model
            .forward(&batch, &kv)
            .unwrap()
            .last()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let max = got
            .iter()
            .zip(&f32_logits)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max < 0.5, "{dtype:?}: max logit diff {max}");
    }
}

#[test]
fn missing_config_field_is_named() {
    let dir = model_with(&fixture_tensors(), 1);
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    cfg.as_object_mut().unwrap().remove("intermediate_size");
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("intermediate_size") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let mut tensors = fixture_tensors();
    tensors.remove("model.layers.1.mlp.up_proj.weight");
    let dir = model_with(&tensors, 2);
    let err = load_err(dir.path());
    assert!(
        err.contains("missing tensor `model.layers.1.mlp.up_proj.weight`"),
        "{err}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let mut tensors = fixture_tensors();
    let bad = tensors["model.layers.0.self_attn.k_proj.weight"]
        .narrow(0, 0, 16)
        .unwrap();
    tensors.insert("model.layers.0.self_attn.k_proj.weight".into(), bad);
    let dir = model_with(&tensors, 1);
    let err = load_err(dir.path());
    assert!(
        err.contains("model.layers.0.self_attn.k_proj.weight"),
        "{err}"
    );
    assert!(
        err.contains("[16, 64]") && err.contains("[32, 64]"),
        "{err}"
    );
}

#[test]
fn unreadable_shard_is_named() {
    let dir = model_with(&fixture_tensors(), 2);
    std::fs::write(
        dir.path().join("model-00002-of-00002.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");

    let dir = model_with(&fixture_tensors(), 2);
    std::fs::remove_file(dir.path().join("model-00001-of-00002.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("model-00001-of-00002.safetensors") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn directory_without_weights_says_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("no weights"), "{err}");
}

fn fixture_config() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap()
}

/// The fixture written as a GGUF file, each tensor in `format(name, shape)`.
fn gguf_with(format: &dyn Fn(&str, &[usize]) -> GgmlDType) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-llama.gguf");
    gguf_writer::write_gguf(&path, &fixture_config(), &fixture_tensors(), format, None);
    (dir, path)
}

/// ‖a − b‖ / ‖b‖.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f32 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

#[test]
fn gguf_float_weights_give_the_safetensors_logits() {
    // The fixture's weights are f16: in F16 or F32 the GGUF file holds the
    // very same values, so only a wrong q/k row order or fusion could
    // change a logit.
    let reference = last_logits(&fixture());
    for dtype in [GgmlDType::F32, GgmlDType::F16] {
        let (dir, path) = gguf_with(&|_, shape| {
            if shape.len() < 2 {
                GgmlDType::F32
            } else {
                dtype
            }
        });
        assert_eq!(last_logits(&path), reference, "{dtype:?}");
        // A directory holding only the file loads it too.
        assert_eq!(last_logits(dir.path()), reference, "{dtype:?} by directory");
    }
}

#[test]
fn quantized_gguf_stays_close_to_the_float_model() {
    let reference = last_logits(&fixture());
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    for (format, bound) in [
        (GgmlDType::Q8_0, 0.02),
        (GgmlDType::Q4_0, 0.25),
        (GgmlDType::Q4_1, 0.25),
    ] {
        let (_dir, path) = gguf_with(&|_, shape| gguf_writer::or_f16(format, shape));
        let logits = last_logits(&path);
        let err = relative_error(&logits, &reference);
        eprintln!("{format:?}: relative error {err}");
        assert!(err < bound, "{format:?}: {err}");
        if format == GgmlDType::Q8_0 {
            assert_eq!(argmax(&logits), argmax(&reference));
        }
    }
    // Formats mixed inside the fused projections (llama.cpp's Q4_K_M keeps
    // attn_v and some FFN weights in a wider format): q and k in Q8_0 with v
    // in F32 holding the same values as a Q8_0 v runs them side by side, and
    // gives what one Q8_0 matmul over all three gives.
    let (_dir, all_q8) = gguf_with(&|_, shape| gguf_writer::or_f16(GgmlDType::Q8_0, shape));
    let mut tensors = fixture_tensors();
    for (name, t) in tensors.iter_mut() {
        if name.ends_with("v_proj.weight") || name.ends_with("up_proj.weight") {
            let q = candle_core::quantized::QTensor::quantize(
                &t.to_dtype(candle_core::DType::F32).unwrap(),
                GgmlDType::Q8_0,
            )
            .unwrap();
            *t = q.dequantize(&Device::Cpu).unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let mixed = dir.path().join("mixed.gguf");
    gguf_writer::write_gguf(
        &mixed,
        &fixture_config(),
        &tensors,
        &|name, shape| {
            if name.ends_with("attn_v.weight") || name.ends_with("ffn_up.weight") {
                GgmlDType::F32
            } else {
                gguf_writer::or_f16(GgmlDType::Q8_0, shape)
            }
        },
        None,
    );
    let (a, b) = (last_logits(&all_q8), last_logits(&mixed));
    let err = relative_error(&b, &a);
    eprintln!("mixed vs uniform Q8_0: relative error {err}");
    assert!(err < 0.03, "{err}");
}

#[test]
fn gguf_problems_are_named() {
    let (dir, path) = gguf_with(&|_, shape| gguf_writer::or_f16(GgmlDType::Q8_0, shape));
    // Two files and no config.json: which one is meant?
    std::fs::copy(&path, dir.path().join("other.gguf")).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("2 GGUF files") && err.contains("other.gguf"),
        "{err}"
    );
    // Not GGUF at all.
    std::fs::write(&path, b"not a gguf file").unwrap();
    let err = load_err(&path);
    assert!(
        err.contains("not a GGUF file") && err.contains("tiny-llama.gguf"),
        "{err}"
    );
    // A missing tensor is named, with the file.
    let mut tensors = fixture_tensors();
    tensors.remove("model.layers.1.mlp.down_proj.weight");
    gguf_writer::write_gguf(
        &path,
        &fixture_config(),
        &tensors,
        &|_, _| GgmlDType::F32,
        None,
    );
    let err = load_err(&path);
    assert!(
        err.contains("blk.1.ffn_down.weight") && err.contains("tiny-llama.gguf"),
        "{err}"
    );
    // A Hugging Face directory with a GGUF file beside it stays a Hugging Face checkpoint.
    let hf = checkpoint_with(&fixture_tensors(), 1, Format::Safetensors);
    std::fs::copy(&path, hf.path().join("broken.gguf")).unwrap();
    assert_eq!(last_logits(hf.path()), last_logits(&fixture()));
}

//! Checkpoint weights from a local directory: safetensors (one file, or an
//! index and its shards; memory-mapped), or, for checkpoints published before
//! safetensors, PyTorch's `pytorch_model.bin` (one file, or an index and its
//! shards).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// One weights file, opened.
enum WeightFile {
    Safetensors(MmapedSafetensors),
    /// `torch.save`'s zip of a pickled state dict. Candle's unpickler only
    /// rebuilds tensors (it runs no Python), so an untrusted file cannot
    /// execute code the way `torch.load` without `weights_only` could.
    Pytorch(PthTensors),
}

/// The tensors of a checkpoint, with a name → file routing.
pub struct CheckpointWeights {
    files: Vec<PathBuf>,
    opened: Vec<WeightFile>,
    routing: HashMap<String, usize>,
}

fn shard_list_from_index(index_path: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let bad = |message: String| ModelError::BadIndex {
        path: index_path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index_path).map_err(|source| ModelError::Io {
        path: index_path.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shards = BTreeSet::new();
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| bad(format!("`{name}` maps to a non-string")))?;
        if file.contains("..") || file.starts_with('/') {
            return Err(bad(format!(
                "shard path `{file}` leaves the model directory"
            )));
        }
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        return Err(bad("`weight_map` is empty".into()));
    }
    Ok(shards.into_iter().map(|f| dir.join(f)).collect())
}

/// The weights files of a model directory, in the order Hugging Face writes
/// them. Safetensors wins when both formats are there, as in transformers.
pub fn discover_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for (index, single, extension) in [
        (
            "model.safetensors.index.json",
            "model.safetensors",
            "safetensors",
        ),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "bin"),
    ] {
        let index = dir.join(index);
        if index.is_file() {
            return shard_list_from_index(&index, dir);
        }
        let single = dir.join(single);
        if single.is_file() {
            return Ok(vec![single]);
        }
        let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        // Shards without their index. Other `.bin` files (training_args.bin,
        // optimizer state) are not weights, so only pytorch_model* counts.
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == extension))
            .filter(|p| {
                extension == "safetensors"
                    || p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("pytorch_model"))
            })
            .collect();
        files.sort();
        if !files.is_empty() {
            return Ok(files);
        }
    }
    Err(ModelError::NoWeights {
        dir: dir.to_path_buf(),
    })
}

/// Candle's unpickler indexes into what the file says without checking it
/// first, so a malformed checkpoint can panic inside it: that is an error
/// naming the file, not a crash.
fn without_panics<T>(read: impl FnOnce() -> candle_core::Result<T>) -> candle_core::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("malformed pickle");
        Err(candle_core::Error::Msg(format!(
            "malformed pickle ({message})"
        )))
    })
}

fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "safetensors")
}

impl CheckpointWeights {
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Self::open_files(discover_weight_files(dir)?)
    }

    pub fn open_files(files: Vec<PathBuf>) -> Result<Self> {
        let mut opened = Vec::with_capacity(files.len());
        let mut routing = HashMap::new();
        for (index, path) in files.iter().enumerate() {
            let unreadable = |message: String| ModelError::UnreadableShard {
                path: path.clone(),
                message,
            };
            if !path.is_file() {
                return Err(unreadable("file not found".into()));
            }
            let file = if is_safetensors(path) {
                // SAFETY: the mapping is read-only; like every mmap loader we assume
                // nobody truncates the checkpoint while the server runs.
                let mmap = unsafe { MmapedSafetensors::new(path) }
                    .map_err(|e| unreadable(e.to_string()))?;
                for (name, _) in mmap.tensors() {
                    routing.insert(name, index);
                }
                WeightFile::Safetensors(mmap)
            } else {
                let pth = without_panics(|| PthTensors::new(path, None))
                    .map_err(|e| unreadable(format!("not a PyTorch checkpoint: {e}")))?;
                if pth.tensor_infos().is_empty() {
                    return Err(unreadable("no tensors in this PyTorch checkpoint".into()));
                }
                for name in pth.tensor_infos().keys() {
                    routing.insert(name.clone(), index);
                }
                WeightFile::Pytorch(pth)
            };
            opened.push(file);
        }
        Ok(Self {
            files,
            opened,
            routing,
        })
    }

    fn files_list(&self) -> String {
        self.files
            .iter()
            .map(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// Loads `name`, checks its shape and converts it to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let index = *self
            .routing
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                files: self.files_list(),
            })?;
        let unreadable = |e: candle_core::Error| ModelError::UnreadableShard {
            path: self.files[index].clone(),
            message: format!("tensor `{name}`: {e}"),
        };
        let check_shape = |actual: &[usize]| {
            if actual == shape {
                Ok(())
            } else {
                Err(ModelError::TensorShape {
                    name: name.to_string(),
                    expected: shape.to_vec(),
                    actual: actual.to_vec(),
                })
            }
        };
        match &self.opened[index] {
            WeightFile::Safetensors(mmap) => {
                let view = mmap.get(name).map_err(unreadable)?;
                check_shape(view.shape())?;
                Ok(view.load(device).map_err(unreadable)?.to_dtype(dtype)?)
            }
            WeightFile::Pytorch(pth) => {
                let info = &pth.tensor_infos()[name];
                check_shape(info.layout.dims())?;
                // Read into host memory, then converted before it is moved,
                // so a GPU never holds the file's dtype and ours at once.
                let host = without_panics(|| pth.get(name))
                    .map_err(unreadable)?
                    .ok_or_else(|| ModelError::MissingTensor {
                        name: name.to_string(),
                        files: self.files_list(),
                    })?;
                Ok(host.to_dtype(dtype)?.to_device(device)?)
            }
        }
    }
}

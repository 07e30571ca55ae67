//! Safetensors weights from a local directory: one file or index + shards, memory-mapped.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// The tensors of a checkpoint, memory-mapped, with a name → file routing.
pub struct SafetensorsWeights {
    files: Vec<PathBuf>,
    mmaps: Vec<MmapedSafetensors>,
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

/// The safetensors files of a model directory, in the order Hugging Face writes them.
pub fn discover_weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return shard_list_from_index(&index, dir);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    Ok(files)
}

impl SafetensorsWeights {
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Self::open_files(discover_weight_files(dir)?)
    }

    pub fn open_files(files: Vec<PathBuf>) -> Result<Self> {
        let mut mmaps = Vec::with_capacity(files.len());
        let mut routing = HashMap::new();
        for (index, path) in files.iter().enumerate() {
            if !path.is_file() {
                return Err(ModelError::UnreadableShard {
                    path: path.clone(),
                    message: "file not found".into(),
                });
            }
            // SAFETY: the mapping is read-only; like every mmap loader we assume
            // nobody truncates the checkpoint while the server runs.
            let mmap = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
                ModelError::UnreadableShard {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
            for (name, _) in mmap.tensors() {
                routing.insert(name, index);
            }
            mmaps.push(mmap);
        }
        Ok(Self {
            files,
            mmaps,
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
        let view = self.mmaps[index]
            .get(name)
            .map_err(|e| ModelError::UnreadableShard {
                path: self.files[index].clone(),
                message: e.to_string(),
            })?;
        if view.shape() != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: view.shape().to_vec(),
            });
        }
        let tensor = view.load(device).map_err(|e| ModelError::UnreadableShard {
            path: self.files[index].clone(),
            message: format!("tensor `{name}`: {e}"),
        })?;
        Ok(tensor.to_dtype(dtype)?)
    }
}

//! Llama 2 on Candle: configuration, weight loading, a batched forward pass over
//! sequences at different positions, and the paged KV cache.
//!
//! The model is stateless: [`LlamaModel::forward`] takes a [`BatchInput`] (each
//! sequence's new tokens, start position and KV block table) and a [`KvCache`]
//! it writes into, and returns next-token [`Logits`]. Which blocks belong to
//! which sequence is decided by a [`BlockAllocator`] held by the caller.

pub mod attention;
pub mod config;
mod cpu_gemm;
mod cpu_kernels;
#[cfg(feature = "cuda")]
mod cuda_kernels;
mod decode_graphs;
pub mod device;
pub mod error;
pub mod fused;
pub mod gguf;
mod hugepages;
pub mod kv;
pub mod linear;
pub mod loader;
pub mod model;
pub mod profile;
pub mod rope;
pub mod sampling;
pub mod shapes;
pub mod weights;

pub use attention::AttentionImpl;
pub use candle_core::{DType, Device, Tensor};
pub use config::LlamaConfig;
pub use decode_graphs::{graph_batch, DecodeGraphs, GraphStats};
pub use device::{DTypeSpec, DeviceSpec};
pub use error::{ModelError, Result};
pub use gguf::{gguf_path, GgufFile, GgufVocab};
pub use kv::{BlockAllocator, BlockHash, BlockTable, KvBudget, KvCache, KvCacheSpec, KvError};
pub use model::{BatchInput, LlamaModel, Logits, ModelOptions, SeqChunk};
pub use shapes::{resolve_shape, ModelShape};

//! KV memory: block bookkeeping ([`BlockAllocator`]) apart from the tensors ([`KvCache`]).

mod blocks;
mod cache;

pub use blocks::{BlockAllocator, BlockHash, BlockTable};
pub use cache::{parse_byte_size, KvBudget, KvCache, KvCacheSpec};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("out of KV blocks: {requested} requested, {free} free")]
    OutOfBlocks { requested: usize, free: usize },
    #[error("block {0} was freed twice or never allocated")]
    NotAllocated(u32),
    #[error("the KV budget of {budget} holds no block of {block_size} tokens ({bytes_per_block} bytes per block)")]
    BudgetTooSmall {
        budget: String,
        block_size: usize,
        bytes_per_block: usize,
    },
    #[error("block size must be positive")]
    ZeroBlockSize,
    #[error("{0}")]
    Budget(String),
    #[error("{0}")]
    Dtype(String),
}

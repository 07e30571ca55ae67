//! Names the contents of full KV blocks for automatic prefix caching.
//!
//! A block's hash covers its tokens and, through its parent's hash, every
//! token before them: two sequences share a block only when they agree on
//! everything up to its end, which is when its keys and values are equal.

use std::hash::{BuildHasher, Hash, Hasher};

use llama_model::BlockHash;

/// 128 bits from two SipHash keys drawn at random for this process: a
/// collision (another prompt's keys and values served) is as likely as
/// guessing a 128-bit number, and no client can steer one, since no client
/// knows the keys.
pub(super) struct BlockHasher {
    keys: [std::collections::hash_map::RandomState; 2],
}

impl BlockHasher {
    pub(super) fn new() -> Self {
        Self {
            keys: [Default::default(), Default::default()],
        }
    }

    fn hash(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        let half = |key: &std::collections::hash_map::RandomState| {
            let mut h = key.build_hasher();
            parent.hash(&mut h);
            tokens.hash(&mut h);
            h.finish() as u128
        };
        half(&self.keys[0]) << 64 | half(&self.keys[1])
    }

    /// Extends `hashes` (of `tokens`' first full blocks) to cover `blocks`
    /// full blocks.
    pub(super) fn extend(
        &self,
        hashes: &mut Vec<BlockHash>,
        tokens: &[u32],
        block_size: usize,
        blocks: usize,
    ) {
        debug_assert!(blocks * block_size <= tokens.len());
        while hashes.len() < blocks {
            let i = hashes.len();
            let block = &tokens[i * block_size..(i + 1) * block_size];
            hashes.push(self.hash(hashes.last().copied(), block));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_hash_names_its_whole_prefix() {
        let hasher = BlockHasher::new();
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        hasher.extend(&mut a, &[1, 2, 3, 4, 5, 6], 2, 3);
        hasher.extend(&mut b, &[1, 2, 3, 4, 5, 6, 7], 2, 2);
        hasher.extend(&mut b, &[1, 2, 3, 4, 5, 6, 7], 2, 3);
        assert_eq!(a, b, "extending step by step is hashing at once");
        // Same last block after a different first one: a different prefix.
        hasher.extend(&mut c, &[9, 2, 3, 4, 5, 6], 2, 3);
        assert_ne!(a[0], c[0]);
        assert_ne!(a[1], c[1]);
        assert_ne!(a[2], c[2]);
        // Block boundaries matter: [1,2],[3,4] is not [1],[2]...
        let mut d = Vec::new();
        hasher.extend(&mut d, &[1, 2, 3, 4], 4, 1);
        assert!(!a.contains(&d[0]));
    }
}

use super::KvError;

/// A sequence's KV blocks in order: token `p` lives in block `blocks[p / block_size]`
/// at offset `p % block_size`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<u32>,
}

impl BlockTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Tokens the table can hold without growing.
    pub fn capacity(&self, block_size: usize) -> usize {
        self.blocks.len() * block_size
    }

    /// The cache slot of token position `pos`.
    pub fn slot(&self, pos: usize, block_size: usize) -> u32 {
        self.blocks[pos / block_size] * block_size as u32 + (pos % block_size) as u32
    }
}

/// Fixed pool of KV blocks: pure bookkeeping, no tensors, so the scheduler can
/// plan admissions and preemptions and be tested without a model.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    free: Vec<u32>,
    in_use: Vec<bool>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self, KvError> {
        if block_size == 0 {
            return Err(KvError::ZeroBlockSize);
        }
        // Reverse so that `pop` hands out low block ids first: easier to read in traces.
        let free = (0..num_blocks as u32).rev().collect();
        Ok(Self {
            block_size,
            free,
            in_use: vec![false; num_blocks],
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.in_use.len()
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Blocks needed to hold `num_tokens` tokens from scratch.
    pub fn blocks_for(&self, num_tokens: usize) -> usize {
        num_tokens.div_ceil(self.block_size)
    }

    /// Extra blocks `table` needs to hold `num_tokens` tokens.
    pub fn extra_blocks_for(&self, table: &BlockTable, num_tokens: usize) -> usize {
        self.blocks_for(num_tokens).saturating_sub(table.len())
    }

    pub fn can_hold(&self, table: &BlockTable, num_tokens: usize) -> bool {
        self.extra_blocks_for(table, num_tokens) <= self.num_free()
    }

    /// Grows `table` to hold `num_tokens` tokens: all blocks or none.
    pub fn ensure_capacity(
        &mut self,
        table: &mut BlockTable,
        num_tokens: usize,
    ) -> Result<(), KvError> {
        let extra = self.extra_blocks_for(table, num_tokens);
        if extra > self.free.len() {
            return Err(KvError::OutOfBlocks {
                requested: extra,
                free: self.free.len(),
            });
        }
        for _ in 0..extra {
            let block = self.free.pop().expect("checked above");
            self.in_use[block as usize] = true;
            table.blocks.push(block);
        }
        Ok(())
    }

    /// Returns every block of `table` to the pool and empties it.
    pub fn release(&mut self, table: &mut BlockTable) -> Result<(), KvError> {
        for &block in &table.blocks {
            match self.in_use.get_mut(block as usize) {
                Some(used) if *used => *used = false,
                _ => return Err(KvError::NotAllocated(block)),
            }
        }
        self.free.extend(table.blocks.drain(..).rev());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_to_the_last_block_and_free_everything() {
        let mut pool = BlockAllocator::new(10, 16).unwrap();
        let mut tables: Vec<BlockTable> = (0..5).map(|_| BlockTable::new()).collect();
        for t in tables.iter_mut() {
            pool.ensure_capacity(t, 32).unwrap();
        }
        assert_eq!(pool.num_free(), 0);
        let mut extra = BlockTable::new();
        let err = pool.ensure_capacity(&mut extra, 1).unwrap_err();
        assert_eq!(
            err,
            KvError::OutOfBlocks {
                requested: 1,
                free: 0
            }
        );
        assert!(extra.is_empty(), "a refused request takes nothing");
        for t in tables.iter_mut() {
            pool.release(t).unwrap();
        }
        assert_eq!(pool.num_free(), 10);
        let mut all: Vec<u32> = pool.free.clone();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn over_request_is_refused_without_partial_allocation() {
        let mut pool = BlockAllocator::new(4, 16).unwrap();
        let mut t = BlockTable::new();
        pool.ensure_capacity(&mut t, 20).unwrap();
        assert_eq!(t.len(), 2);
        assert!(pool.ensure_capacity(&mut t, 16 * 5).is_err());
        assert_eq!(t.len(), 2);
        assert_eq!(pool.num_free(), 2);
        pool.ensure_capacity(&mut t, 64).unwrap();
        assert_eq!(pool.num_free(), 0);
    }

    #[test]
    fn slots_follow_the_table() {
        let mut pool = BlockAllocator::new(8, 4).unwrap();
        let mut a = BlockTable::new();
        let mut b = BlockTable::new();
        pool.ensure_capacity(&mut a, 4).unwrap();
        pool.ensure_capacity(&mut b, 4).unwrap();
        pool.ensure_capacity(&mut a, 5).unwrap();
        assert_eq!(a.blocks(), &[0, 2]);
        assert_eq!(a.slot(3, 4), 3);
        assert_eq!(a.slot(4, 4), 8);
        assert_eq!(b.slot(1, 4), 5);
    }

    #[test]
    fn double_release_is_an_error() {
        let mut pool = BlockAllocator::new(2, 4).unwrap();
        let mut a = BlockTable::new();
        pool.ensure_capacity(&mut a, 4).unwrap();
        let mut copy = a.clone();
        pool.release(&mut a).unwrap();
        assert!(matches!(
            pool.release(&mut copy),
            Err(KvError::NotAllocated(0))
        ));
    }
}

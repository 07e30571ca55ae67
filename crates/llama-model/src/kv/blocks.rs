use std::collections::HashMap;

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

/// What a full block holds, prefix included: a hash of the tokens of every
/// block up to and including this one (see the engine's scheduler). Equal
/// hashes mean equal keys and values, so a block can serve every sequence
/// that starts with the same tokens.
pub type BlockHash = u128;

/// Fixed pool of KV blocks: pure bookkeeping, no tensors, so the scheduler can
/// plan admissions and preemptions and be tested without a model.
///
/// Blocks are reference-counted: a full block is shared, read-only, by every
/// sequence whose prefix it holds (automatic prefix caching, forked
/// choices). A block nobody references is free, but keeps its contents, and
/// the index that finds it by [`BlockHash`], until it is handed out again:
/// free blocks that hold nothing go first, then cached ones, least recently
/// freed first.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    block_size: usize,
    refs: Vec<u32>,
    free: FreeList,
    contents: Vec<Option<BlockHash>>,
    cached: HashMap<BlockHash, u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self, KvError> {
        if block_size == 0 {
            return Err(KvError::ZeroBlockSize);
        }
        Ok(Self {
            block_size,
            refs: vec![0; num_blocks],
            // Low block ids first: easier to read in traces.
            free: FreeList::with_all(num_blocks),
            contents: vec![None; num_blocks],
            cached: HashMap::new(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks no sequence references (cached ones included: they are reused
    /// when nothing else is left).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    /// Blocks whose contents can be found by hash.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
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

    /// Grows `table` with blocks of its own to hold `num_tokens` tokens: all
    /// blocks or none. A cached block handed out here forgets its contents.
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
            let block = self.free.pop_front().expect("checked above");
            if let Some(hash) = self.contents[block as usize].take() {
                self.cached.remove(&hash);
            }
            self.refs[block as usize] = 1;
            table.blocks.push(block);
        }
        Ok(())
    }

    /// Drops `table`'s reference to each of its blocks and empties it. Blocks
    /// left without a reference are free; those with contents go to the back
    /// of the free list, the table's last blocks first, so that the blocks
    /// more sequences start with stay cached longest.
    pub fn release(&mut self, table: &mut BlockTable) -> Result<(), KvError> {
        // Checked before any change, so that a bad table leaves the pool as it was.
        // (A table never holds a block twice: it grows by fresh blocks and by
        // cached ones of distinct prefixes.)
        if let Some(&bad) = table
            .blocks
            .iter()
            .find(|&&b| self.refs.get(b as usize).is_none_or(|&r| r == 0))
        {
            return Err(KvError::NotAllocated(bad));
        }
        for block in table.blocks.drain(..).rev() {
            let refs = &mut self.refs[block as usize];
            *refs -= 1;
            if *refs == 0 {
                if self.contents[block as usize].is_some() {
                    self.free.push_back(block);
                } else {
                    self.free.push_front(block);
                }
            }
        }
        Ok(())
    }

    /// The blocks holding the longest run of `hashes` from the start.
    pub fn cached_prefix(&self, hashes: &[BlockHash]) -> Vec<u32> {
        hashes
            .iter()
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// How many of `blocks` nobody references now: sharing them takes that
    /// many blocks off the free list.
    pub fn num_unreferenced(&self, blocks: &[u32]) -> usize {
        blocks
            .iter()
            .filter(|&&b| self.refs[b as usize] == 0)
            .count()
    }

    /// Appends `blocks` (cached or referenced elsewhere) to `table`, shared.
    /// The caller must never write to them: they hold other sequences' keys
    /// and values.
    pub fn share(&mut self, table: &mut BlockTable, blocks: &[u32]) {
        for &block in blocks {
            let refs = &mut self.refs[block as usize];
            assert!(
                *refs > 0 || self.contents[block as usize].is_some(),
                "block {block} is neither referenced nor cached"
            );
            if *refs == 0 {
                self.free.remove(block);
            }
            *refs += 1;
            table.blocks.push(block);
        }
    }

    /// Records that `block`, now full and written, holds the prefix `hash`.
    /// The first block to hold a prefix keeps it; a block keeps its first hash.
    pub fn register(&mut self, block: u32, hash: BlockHash) {
        let slot = &mut self.contents[block as usize];
        if slot.is_none() && !self.cached.contains_key(&hash) {
            *slot = Some(hash);
            self.cached.insert(hash, block);
        }
    }
}

/// The free blocks in order, as a doubly linked list threaded through two
/// arrays, so that a cache hit takes its block out of the middle in O(1).
#[derive(Debug, Clone)]
struct FreeList {
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    len: usize,
}

const NIL: u32 = u32::MAX;

impl FreeList {
    fn with_all(n: usize) -> Self {
        let mut list = Self {
            prev: vec![NIL; n],
            next: vec![NIL; n],
            head: NIL,
            tail: NIL,
            len: 0,
        };
        for block in 0..n as u32 {
            list.push_back(block);
        }
        list
    }

    fn len(&self) -> usize {
        self.len
    }

    fn push_back(&mut self, block: u32) {
        let b = block as usize;
        self.prev[b] = self.tail;
        self.next[b] = NIL;
        match self.tail {
            NIL => self.head = block,
            t => self.next[t as usize] = block,
        }
        self.tail = block;
        self.len += 1;
    }

    fn push_front(&mut self, block: u32) {
        let b = block as usize;
        self.next[b] = self.head;
        self.prev[b] = NIL;
        match self.head {
            NIL => self.tail = block,
            h => self.prev[h as usize] = block,
        }
        self.head = block;
        self.len += 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let block = self.head;
        if block == NIL {
            return None;
        }
        self.remove(block);
        Some(block)
    }

    fn remove(&mut self, block: u32) {
        let b = block as usize;
        let (p, n) = (self.prev[b], self.next[b]);
        match p {
            NIL => self.head = n,
            p => self.next[p as usize] = n,
        }
        match n {
            NIL => self.tail = p,
            n => self.prev[n as usize] = p,
        }
        self.prev[b] = NIL;
        self.next[b] = NIL;
        self.len -= 1;
    }

    #[cfg(test)]
    fn to_vec(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.len);
        let mut at = self.head;
        while at != NIL {
            out.push(at);
            at = self.next[at as usize];
        }
        out
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
        let mut all: Vec<u32> = pool.free.to_vec();
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

    #[test]
    fn shared_blocks_are_freed_by_their_last_reference() {
        let mut pool = BlockAllocator::new(4, 4).unwrap();
        let mut a = BlockTable::new();
        pool.ensure_capacity(&mut a, 8).unwrap();
        let mut b = BlockTable::new();
        pool.share(&mut b, &a.blocks()[..1]);
        assert_eq!(b.blocks(), &[0]);
        assert_eq!(pool.num_free(), 2);
        pool.release(&mut a).unwrap();
        assert_eq!(pool.num_free(), 3, "block 0 is still b's");
        pool.release(&mut b).unwrap();
        assert_eq!(pool.num_free(), 4);
        let mut again = b.clone();
        again.blocks.push(0);
        assert_eq!(pool.release(&mut again), Err(KvError::NotAllocated(0)));
        assert_eq!(pool.num_free(), 4, "a refused release changes nothing");
    }

    #[test]
    fn cached_blocks_are_found_until_they_are_handed_out_again() {
        let mut pool = BlockAllocator::new(4, 4).unwrap();
        let mut a = BlockTable::new();
        pool.ensure_capacity(&mut a, 12).unwrap();
        pool.register(a.blocks()[0], 10);
        pool.register(a.blocks()[1], 11);
        // Another block with a prefix already cached does not replace it.
        pool.register(a.blocks()[2], 10);
        assert_eq!(pool.num_cached(), 2);
        assert_eq!(pool.cached_prefix(&[10, 11, 12]), vec![0, 1]);
        assert_eq!(pool.cached_prefix(&[11]), vec![1]);
        assert_eq!(pool.cached_prefix(&[12, 10]), Vec::<u32>::new());
        pool.release(&mut a).unwrap();
        // Free, but still found: a new sequence shares them.
        assert_eq!(pool.num_free(), 4);
        let hits = pool.cached_prefix(&[10, 11]);
        assert_eq!(pool.num_unreferenced(&hits), 2);
        let mut b = BlockTable::new();
        pool.share(&mut b, &hits);
        assert_eq!(pool.num_free(), 2);
        assert_eq!(pool.num_unreferenced(&hits), 0);
        pool.release(&mut b).unwrap();
        // Blocks without contents go first, then the least recently freed
        // cached block, b's last before its first.
        let mut c = BlockTable::new();
        pool.ensure_capacity(&mut c, 8).unwrap();
        assert_eq!(c.blocks(), &[2, 3]);
        pool.ensure_capacity(&mut c, 12).unwrap();
        assert_eq!(c.blocks(), &[2, 3, 1]);
        assert_eq!(pool.cached_prefix(&[10, 11]), vec![0], "block 1 forgot 11");
        assert_eq!(pool.num_cached(), 1);
        pool.ensure_capacity(&mut c, 16).unwrap();
        assert!(pool.cached_prefix(&[10]).is_empty());
        assert_eq!(pool.num_free(), 0);
        pool.release(&mut c).unwrap();
        assert_eq!(pool.num_free(), 4);
    }

    #[test]
    fn the_free_list_keeps_order_through_removals() {
        let mut list = FreeList::with_all(5);
        list.remove(2);
        list.remove(0);
        list.remove(4);
        assert_eq!(list.to_vec(), vec![1, 3]);
        list.push_front(4);
        list.push_back(0);
        assert_eq!(list.to_vec(), vec![4, 1, 3, 0]);
        assert_eq!(list.pop_front(), Some(4));
        list.remove(0);
        list.remove(1);
        list.remove(3);
        assert_eq!(list.len(), 0);
        assert_eq!(list.pop_front(), None);
        list.push_back(2);
        assert_eq!(list.to_vec(), vec![2]);
    }
}

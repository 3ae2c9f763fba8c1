//! Automatic prefix caching, as vLLM's: the KV cache of recent prompts is kept, and a new
//! request whose prompt starts with the same tokens — under the same adapter version, since an
//! adapter changes keys and values — starts from a copy of that prefix and prefills only the
//! rest. A repeated system prompt is then computed once. Entries are evicted least recently
//! used beyond their own budget in tokens, and whenever running requests need the room under
//! the server's KV budget. An entry is a whole prompt, and a new prompt reuses its longest
//! common prefix with any entry (token-exact, where vLLM reuses whole blocks); the reused part
//! shares the entry's tensors until the request appends to them.
//!
//! Keys and values of a position depend only on the tokens up to it, so the reused prefix is
//! what a full prefill would compute (up to rounding: a prefill of a different length can sum
//! in a different order).

use std::sync::Weak;

use graft_core::backend::GraftBackend;
use graft_core::model::SeqCache;

use crate::registry::AdapterEntry;

/// Shortest prefix worth reusing (shorter ones are cheaper to recompute than to look up).
const MIN_REUSE: usize = 16;

/// Which weights made a cache: the base, or one adapter version in memory, held weakly. An
/// entry lives no longer than its adapter version: once that version is replaced, unloaded
/// or evicted and no request holds it, no request can use the entry again and it is dropped
/// (a server that replaces adapters all day would otherwise fill the cache's budget with
/// prompts of versions gone). A version read again after an eviction starts afresh.
pub enum CacheKey<B: GraftBackend> {
    Base,
    Adapter(Weak<AdapterEntry<B>>),
}

impl<B: GraftBackend> CacheKey<B> {
    fn same(&self, other: &Self) -> bool {
        match (self, other) {
            (CacheKey::Base, CacheKey::Base) => true,
            // The same allocation is the same version (a Weak keeps it from being reused).
            (CacheKey::Adapter(a), CacheKey::Adapter(b)) => a.ptr_eq(b),
            _ => false,
        }
    }

    fn alive(&self) -> bool {
        match self {
            CacheKey::Base => true,
            CacheKey::Adapter(a) => a.strong_count() > 0,
        }
    }
}

struct Entry<B: GraftBackend> {
    key: CacheKey<B>,
    tokens: Vec<u32>,
    cache: SeqCache<B>,
    last_used: u64,
}

/// The kept prompt caches of the engine.
pub struct PrefixCache<B: GraftBackend> {
    entries: Vec<Entry<B>>,
    budget: usize,
    clock: u64,
}

impl<B: GraftBackend> PrefixCache<B> {
    /// A cache keeping at most `budget` tokens (0 disables it).
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            entries: Vec::new(),
            budget,
            clock: 0,
        }
    }

    /// The longest kept prefix of `prompt` under `key`, leaving at least one token to feed
    /// (its logits start generation): the cache of that prefix and its length.
    pub fn lookup(&mut self, key: &CacheKey<B>, prompt: &[u32]) -> Option<(SeqCache<B>, usize)> {
        self.drop_dead();
        let limit = prompt.len().saturating_sub(1);
        let (best, n) = self
            .entries
            .iter_mut()
            .filter(|e| e.key.same(key))
            .map(|e| {
                let common = e
                    .tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (e, common.min(limit))
            })
            .max_by_key(|(_, n)| *n)?;
        if n < MIN_REUSE {
            return None;
        }
        self.clock += 1;
        best.last_used = self.clock;
        Some((best.cache.prefix(n), n))
    }

    /// Keeps the cache of a prefilled `prompt` (the cache holds exactly its tokens).
    pub fn insert(&mut self, key: CacheKey<B>, prompt: &[u32], cache: &SeqCache<B>) {
        self.drop_dead();
        if prompt.len() < MIN_REUSE
            || prompt.len() > self.budget
            || cache.len() != prompt.len()
            || !key.alive()
        {
            return;
        }
        self.clock += 1;
        // A kept prompt that this one extends is superseded by it.
        self.entries
            .retain(|e| !(e.key.same(&key) && prompt.starts_with(&e.tokens)));
        if self
            .entries
            .iter()
            .any(|e| e.key.same(&key) && e.tokens.starts_with(prompt))
        {
            return; // already covered by a longer one
        }
        self.entries.push(Entry {
            key,
            tokens: prompt.to_vec(),
            cache: cache.clone(),
            last_used: self.clock,
        });
        self.shrink_to(self.budget);
    }

    /// Evicts least recently used prompts until at most `tokens` are kept (running requests
    /// need the room: the kept prompts count against the KV budget too).
    pub fn shrink_to(&mut self, tokens: usize) {
        while self.tokens() > tokens {
            let Some(lru) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            self.entries.swap_remove(lru);
        }
    }

    /// Drops the entries of adapter versions no longer in use.
    fn drop_dead(&mut self) {
        self.entries.retain(|e| e.key.alive());
    }

    /// Tokens kept.
    pub fn tokens(&self) -> usize {
        self.entries.iter().map(|e| e.tokens.len()).sum()
    }
}

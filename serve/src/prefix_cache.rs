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

use graft_core::backend::GraftBackend;
use graft_core::model::SeqCache;

/// Shortest prefix worth reusing (shorter ones are cheaper to recompute than to look up).
const MIN_REUSE: usize = 16;

/// Which weights made a cache: the base (None) or an adapter version.
pub type CacheKey = Option<(String, u64)>;

struct Entry<B: GraftBackend> {
    key: CacheKey,
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
    pub fn lookup(&mut self, key: &CacheKey, prompt: &[u32]) -> Option<(SeqCache<B>, usize)> {
        let limit = prompt.len().saturating_sub(1);
        let (best, n) = self
            .entries
            .iter_mut()
            .filter(|e| &e.key == key)
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
    pub fn insert(&mut self, key: CacheKey, prompt: &[u32], cache: &SeqCache<B>) {
        if prompt.len() < MIN_REUSE || prompt.len() > self.budget || cache.len() != prompt.len() {
            return;
        }
        self.clock += 1;
        // A kept prompt that this one extends is superseded by it.
        self.entries
            .retain(|e| !(e.key == key && prompt.starts_with(&e.tokens)));
        if self
            .entries
            .iter()
            .any(|e| e.key == key && e.tokens.starts_with(prompt))
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

    /// Tokens kept.
    pub fn tokens(&self) -> usize {
        self.entries.iter().map(|e| e.tokens.len()).sum()
    }
}

//! Replay protection for circuit setup.
//!
//! Every successfully opened setup layer yields a 32-byte replay tag derived
//! from the hop's x25519 shared secret (see [`crate::onion`]). A hop refuses a
//! setup whose tag it has already seen, so a recorded setup packet cannot be
//! replayed to re-create a circuit or to watch where it goes.
//!
//! The cache only has to remember tags for as long as the onion key that
//! produced them is accepted: a setup made for an old epoch's key cannot be
//! opened once that key is retired. The node therefore keeps one cache per
//! onion-key epoch (or clears it when the epoch rotates) and sizes it for the
//! setups it expects within an epoch. [`MemoryReplayCache`] is bounded: when
//! full it forgets the oldest tag, which a node must treat as the point where
//! it rotates its key early rather than silently accepting old replays.

use std::collections::{HashSet, VecDeque};

/// A set of replay tags seen so far.
///
/// Object safe so the node can plug in a persistent implementation (sled)
/// behind `&mut dyn ReplayCache`.
pub trait ReplayCache {
    /// Records `tag` and reports whether it was fresh: `true` the first time
    /// a tag is seen, `false` for a replay.
    fn check_and_insert(&mut self, tag: [u8; 32]) -> bool;
}

impl<T: ReplayCache + ?Sized> ReplayCache for &mut T {
    fn check_and_insert(&mut self, tag: [u8; 32]) -> bool {
        (**self).check_and_insert(tag)
    }
}

impl<T: ReplayCache + ?Sized> ReplayCache for Box<T> {
    fn check_and_insert(&mut self, tag: [u8; 32]) -> bool {
        (**self).check_and_insert(tag)
    }
}

/// An in-memory replay cache holding at most `capacity` tags; when full the
/// oldest tag is evicted first (FIFO).
///
/// Pair it with onion-key epoch rotation (see the module docs): eviction is
/// only safe for tags whose key has been retired.
#[derive(Debug, Clone)]
pub struct MemoryReplayCache {
    capacity: usize,
    seen: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
}

impl MemoryReplayCache {
    /// A cache that remembers up to `capacity` tags (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            // Grow on demand: a large configured capacity costs nothing until used.
            seen: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// The most tags this cache holds before it evicts.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many tags it holds now.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether it holds no tag.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Whether `tag` is currently remembered (does not insert it).
    pub fn contains(&self, tag: &[u8; 32]) -> bool {
        self.seen.contains(tag)
    }

    /// Forgets every tag; call when the onion key these tags belong to is retired.
    pub fn clear(&mut self) {
        self.seen.clear();
        self.order.clear();
    }
}

impl ReplayCache for MemoryReplayCache {
    fn check_and_insert(&mut self, tag: [u8; 32]) -> bool {
        if self.seen.contains(&tag) {
            return false;
        }
        while self.order.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.seen.remove(&old);
                }
                None => break,
            }
        }
        self.seen.insert(tag);
        self.order.push_back(tag);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(n: u8) -> [u8; 32] {
        [n; 32]
    }

    #[test]
    fn fresh_then_replay() {
        let mut c = MemoryReplayCache::new(4);
        assert!(c.check_and_insert(tag(1)));
        assert!(!c.check_and_insert(tag(1)));
        assert!(c.check_and_insert(tag(2)));
        assert!(!c.check_and_insert(tag(2)));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn evicts_oldest_first_and_stays_bounded() {
        let mut c = MemoryReplayCache::new(3);
        for n in 0..3 {
            assert!(c.check_and_insert(tag(n)));
        }
        assert!(c.check_and_insert(tag(3))); // evicts 0
        assert_eq!(c.len(), 3);
        assert!(!c.contains(&tag(0)));
        assert!(c.contains(&tag(1)) && c.contains(&tag(2)) && c.contains(&tag(3)));
        assert!(!c.check_and_insert(tag(1)), "1 is still remembered");
        assert!(
            c.check_and_insert(tag(0)),
            "0 was evicted, so it is fresh again"
        );
        assert!(
            !c.contains(&tag(1)),
            "inserting 0 evicted the next oldest, 1"
        );
    }

    #[test]
    fn zero_capacity_is_clamped_to_one() {
        let mut c = MemoryReplayCache::new(0);
        assert_eq!(c.capacity(), 1);
        assert!(c.check_and_insert(tag(7)));
        assert!(!c.check_and_insert(tag(7)));
        assert!(c.check_and_insert(tag(8)));
        assert!(c.check_and_insert(tag(7)));
    }

    #[test]
    fn clear_forgets_and_trait_object_works() {
        let mut c = MemoryReplayCache::new(8);
        {
            let dynamic: &mut dyn ReplayCache = &mut c;
            assert!(dynamic.check_and_insert(tag(9)));
            assert!(!dynamic.check_and_insert(tag(9)));
        }
        c.clear();
        assert!(c.is_empty());
        assert!(c.check_and_insert(tag(9)));
    }
}

//! Which provider created a stored Responses API response, so a follow-up
//! with `previous_response_id` goes to the provider that holds the
//! conversation (another provider has never seen the id).
//!
//! `Pins` is a bounded map with a time to live and a clock parameter. It is
//! hand-written, not a cache crate: every entry lives for the same `ttl`, so
//! insertion order is expiry order and a queue beside the map is the whole
//! eviction policy (oldest first, when full or expired), and tests drive the
//! clock without sleeping (moka, the cache the module uses, reads its own
//! clock).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Where a response was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The key that created it: another key's id is answered as unknown,
    /// so one key cannot continue another key's conversation.
    pub key_id: String,
    /// The provider (config name) that created and stores it.
    pub provider: String,
    /// What the provider holds of the conversation up to this response (its
    /// input + output tokens), which a follow-up is billed as input again;
    /// 0 until the response's usage is known.
    pub tokens: u64,
}

/// Response id → [`Pin`], at most `capacity` entries, each for `ttl`.
#[derive(Debug)]
pub struct Pins {
    capacity: usize,
    ttl: Duration,
    map: HashMap<String, (Pin, Instant, u64)>,
    // Ids in insertion order with their insertion time and number; an id
    // re-inserted later has a stale older entry here, skipped when popped.
    order: VecDeque<(String, Instant, u64)>,
    inserted: u64,
}

/// Why a follow-up cannot be routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpinned {
    /// Never created through this gateway (or by another key, or evicted).
    Unknown,
    /// Created here, but longer ago than the time to live.
    Expired,
}

impl Pins {
    /// An empty map holding at most `capacity` ids, each for `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Pins {
            capacity: capacity.max(1),
            ttl,
            map: HashMap::new(),
            order: VecDeque::new(),
            inserted: 0,
        }
    }

    /// Remembers that `id` was created at `pin` at `now`; the oldest entry
    /// goes when the map is full.
    pub fn insert(&mut self, id: &str, pin: Pin, now: Instant) {
        self.purge(now);
        if !self.map.contains_key(id) {
            while self.map.len() >= self.capacity {
                if !self.pop_oldest() {
                    break;
                }
            }
        }
        self.inserted += 1;
        let n = self.inserted;
        self.map.insert(id.to_owned(), (pin, now, n));
        self.order.push_back((id.to_owned(), now, n));
        // Re-inserted ids leave stale queue entries; keep the queue bounded.
        if self.order.len() > 2 * self.capacity {
            let map = &self.map;
            self.order
                .retain(|(k, _, n)| map.get(k).is_some_and(|e| e.2 == *n));
        }
    }

    /// Where `id` lives, for `key_id`, at `now`.
    pub fn get(&self, id: &str, key_id: &str, now: Instant) -> Result<&Pin, Unpinned> {
        match self.map.get(id) {
            Some((pin, _, _)) if pin.key_id != key_id => Err(Unpinned::Unknown),
            Some((_, at, _)) if now.saturating_duration_since(*at) >= self.ttl => {
                Err(Unpinned::Expired)
            }
            Some((pin, _, _)) => Ok(pin),
            None => Err(Unpinned::Unknown),
        }
    }

    /// Records the tokens of the conversation up to `id` once its usage is
    /// known (a stream reports it in its last event, after the pin).
    pub fn set_tokens(&mut self, id: &str, tokens: u64) {
        if let Some((pin, _, _)) = self.map.get_mut(id) {
            pin.tokens = tokens;
        }
    }

    /// Entries held (expired ones included until the next insert).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn purge(&mut self, now: Instant) {
        while let Some((_, at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            self.pop_oldest();
        }
    }

    /// Drops the oldest queue entry (and its map entry unless re-inserted
    /// since); false when the queue is empty.
    fn pop_oldest(&mut self) -> bool {
        let Some((id, _, n)) = self.order.pop_front() else {
            return false;
        };
        if self.map.get(&id).is_some_and(|e| e.2 == n) {
            self.map.remove(&id);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(key: &str, provider: &str) -> Pin {
        Pin {
            key_id: key.into(),
            provider: provider.into(),
            tokens: 0,
        }
    }

    #[test]
    fn a_conversations_tokens_are_set_once_known() {
        let t0 = Instant::now();
        let mut pins = Pins::new(10, Duration::from_secs(60));
        pins.insert("resp_1", pin("k", "p"), t0);
        pins.set_tokens("resp_1", 1234);
        pins.set_tokens("resp_unknown", 5);
        assert_eq!(pins.get("resp_1", "k", t0).map(|p| p.tokens), Ok(1234));
        assert_eq!(pins.len(), 1);
    }

    #[test]
    fn a_pin_is_found_for_its_key_until_it_expires() {
        let t0 = Instant::now();
        let mut pins = Pins::new(10, Duration::from_secs(60));
        pins.insert("resp_1", pin("k", "b"), t0);
        assert_eq!(pins.get("resp_1", "k", t0).unwrap().provider, "b");
        let late = t0 + Duration::from_secs(59);
        assert!(pins.get("resp_1", "k", late).is_ok());
        assert_eq!(
            pins.get("resp_1", "other", t0),
            Err(Unpinned::Unknown),
            "another key's response is unknown to this key"
        );
        assert_eq!(pins.get("resp_2", "k", t0), Err(Unpinned::Unknown));
        let expired = t0 + Duration::from_secs(60);
        assert_eq!(pins.get("resp_1", "k", expired), Err(Unpinned::Expired));
        pins.insert("resp_3", pin("k", "a"), expired);
        assert_eq!(pins.len(), 1, "expired entries are purged on insert");
    }

    #[test]
    fn the_oldest_goes_when_full() {
        let t0 = Instant::now();
        let mut pins = Pins::new(3, Duration::from_secs(60));
        for i in 0..5u64 {
            pins.insert(
                &format!("r{i}"),
                pin("k", &format!("p{i}")),
                t0 + Duration::from_secs(i),
            );
        }
        assert_eq!(pins.len(), 3);
        let now = t0 + Duration::from_secs(5);
        assert_eq!(pins.get("r0", "k", now), Err(Unpinned::Unknown));
        assert_eq!(pins.get("r1", "k", now), Err(Unpinned::Unknown));
        assert_eq!(pins.get("r4", "k", now).unwrap().provider, "p4");
    }

    #[test]
    fn reinserting_refreshes_and_the_queue_stays_bounded() {
        let t0 = Instant::now();
        let mut pins = Pins::new(2, Duration::from_secs(10));
        for i in 0..100u64 {
            pins.insert("same", pin("k", "p"), t0 + Duration::from_secs(i / 20));
        }
        assert_eq!(pins.len(), 1);
        assert!(pins.order.len() <= 4, "{}", pins.order.len());
        pins.insert("other", pin("k", "q"), t0 + Duration::from_secs(5));
        pins.insert("third", pin("k", "q"), t0 + Duration::from_secs(5));
        assert_eq!(pins.len(), 2, "capacity holds with stale queue entries");
        // `same` was refreshed at t0+4 s: it outlives its first insertion's ttl.
        assert_eq!(
            pins.get("same", "k", t0 + Duration::from_secs(12)),
            Err(Unpinned::Unknown),
            "evicted as the oldest live entry when `third` came"
        );
        assert!(pins.get("third", "k", t0 + Duration::from_secs(14)).is_ok());
    }
}

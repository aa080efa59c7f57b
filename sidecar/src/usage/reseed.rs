//! Start-up reseeding of the reservation ledger (design §3): budgets and token
//! windows must not renew because the sidecar restarted. Before it serves,
//! the sidecar sums each key's rows in the usage store — spend since the start
//! of the UTC day and of the UTC month, tokens in the current and the previous
//! 60 s window — through the one query layer, so SQLite and PostgreSQL give
//! the same seeds.
//!
//! Rows are stamped when their request arrived, and a request's reservation
//! counts in the window it was made in, so the sums land where the ledger of
//! the previous run had them.

use std::collections::BTreeMap;

use afr_core::ledger::Seed;
use afr_core::limits::Period;
use afr_core::ratelimit::WINDOW_MS;

use super::query::{GroupBy, UsageQuery, UsageReader};
use super::StoreError;

/// Each key's [`Seed`] at `now_ms` (Unix ms), from the rows in `reader`;
/// keys with no row in this month or the last two windows have none.
pub fn ledger_seeds(reader: &UsageReader, now_ms: u64) -> Result<Vec<(String, Seed)>, StoreError> {
    let (day_start, _) = Period::Day.bounds(now_ms);
    let (month_start, _) = Period::Month.bounds(now_ms);
    let window_start = now_ms - now_ms % WINDOW_MS;
    let mut seeds: BTreeMap<String, Seed> = BTreeMap::new();
    let blank = Seed {
        day_start,
        month_start,
        window_start,
        ..Seed::default()
    };
    // Each sum is over [since, until) by key; `put` stores it in the seed.
    let mut sum = |since: u64, until: Option<u64>, put: fn(&mut Seed, u64, u64)| {
        let q = UsageQuery {
            since_ms: Some(since as i64),
            until_ms: until.map(|u| u as i64),
            group_by: vec![GroupBy::Key],
            ..UsageQuery::default()
        };
        for row in reader.query(&q)? {
            let Some(key) = row.key_id.filter(|k| !k.is_empty()) else {
                continue;
            };
            put(
                seeds.entry(key).or_insert(blank),
                row.cost_nanos,
                row.total_tokens,
            );
        }
        Ok::<(), StoreError>(())
    };
    sum(month_start, None, |s, nanos, _| s.month_nanos = nanos)?;
    sum(day_start, None, |s, nanos, _| s.day_nanos = nanos)?;
    sum(window_start - WINDOW_MS, Some(window_start), |s, _, t| {
        s.prev_tokens = t
    })?;
    sum(window_start, None, |s, _, t| s.curr_tokens = t)?;
    Ok(seeds.into_iter().collect())
}

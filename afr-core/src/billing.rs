//! What a request is billed once its provider is done (design §3): the
//! provider's counts when it said they are final, otherwise at least the
//! estimate of everything it produced.
//!
//! Usage is final only when the provider says so: OpenAI's usage chunk (or a
//! whole answer's `usage`), the Responses API's `response.completed`,
//! Anthropic's `message_delta`. Before that — a stream cut by the client, by
//! the provider or by the network, or a 200 whose answer has no usage at
//! all — the provider may still bill what it generated, so the request
//! settles at max(reported, estimate), flagged as estimated.

use crate::sse::TokenUsage;

/// Tokens for `chars` characters of text: about four characters a token
/// for English (the estimator's rule, see the README's "What a request costs").
pub fn tokens_of_chars(chars: usize) -> u64 {
    chars.div_ceil(4) as u64
}

/// What a request is billed, and whether it is the provider's own count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Billed {
    /// Tokens by class.
    pub usage: TokenUsage,
    /// Estimated by the gateway (the provider's count was missing or not final).
    pub estimated: bool,
}

/// Settles a request the provider answered. `reported`: the counts it gave
/// so far; `is_final`: whether it said they are final; `prompt_estimate`:
/// the gateway's estimate of the prompt (computed only when needed); `output_chars`: characters of
/// everything generated that the gateway saw (text, tool-call arguments,
/// thinking and reasoning); `output_cap`: the most output the provider was
/// allowed to produce (what the reservation held), if known.
///
/// A final count is billed as is, unless it claims no output for an answer
/// that carried some (a count that is not the provider's: a translation
/// that never got one). Otherwise the prompt is the reported one (when
/// reported) or the estimate, and the output the larger of the reported and
/// the estimated — the estimate never past `output_cap`, which no provider
/// bills beyond, so an estimated settlement stays within the reservation's
/// output; the classes reported (cache reads and writes, reasoning) are kept.
pub fn settle(
    reported: Option<TokenUsage>,
    is_final: bool,
    prompt_estimate: impl FnOnce() -> u64,
    output_chars: usize,
    output_cap: Option<u64>,
) -> Billed {
    let output_estimate = tokens_of_chars(output_chars).min(output_cap.unwrap_or(u64::MAX));
    if let Some(usage) = reported {
        let believable = usage.completion_tokens > 0 || output_chars == 0;
        if is_final && believable {
            return Billed {
                usage: with_total(usage),
                estimated: false,
            };
        }
    }
    let mut usage = reported.unwrap_or_default();
    if usage.prompt_tokens == 0 {
        usage.prompt_tokens = prompt_estimate();
    }
    usage.completion_tokens = usage.completion_tokens.max(output_estimate);
    usage.total_tokens = 0;
    Billed {
        usage: with_total(usage),
        estimated: true,
    }
}

fn with_total(mut usage: TokenUsage) -> TokenUsage {
    let sum = usage.prompt_tokens + usage.completion_tokens;
    if usage.total_tokens < sum {
        usage.total_tokens = sum;
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reported(prompt: u64, completion: u64) -> Option<TokenUsage> {
        Some(TokenUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            ..TokenUsage::default()
        })
    }

    #[test]
    fn a_final_count_is_billed_as_reported() {
        let b = settle(reported(10, 3), true, || 99, 4000, None);
        assert_eq!((b.usage.prompt_tokens, b.usage.completion_tokens), (10, 3));
        assert!(!b.estimated);
    }

    #[test]
    fn an_anthropic_stream_cut_before_message_delta_bills_what_was_streamed() {
        // message_start reported the input and a placeholder output of 1.
        let b = settle(reported(656, 1), false, || 10, 400, None);
        assert_eq!(
            (b.usage.prompt_tokens, b.usage.completion_tokens),
            (656, 100)
        );
        assert_eq!(b.usage.total_tokens, 756);
        assert!(b.estimated);
    }

    #[test]
    fn a_usage_less_answer_bills_the_estimates() {
        let b = settle(None, true, || 12, 41, None);
        assert_eq!((b.usage.prompt_tokens, b.usage.completion_tokens), (12, 11));
        assert!(b.estimated);
        // A translated stream's zero count for an answer with content is not believed.
        let b = settle(reported(0, 0), true, || 12, 41, None);
        assert_eq!((b.usage.prompt_tokens, b.usage.completion_tokens), (12, 11));
        assert!(b.estimated);
        // Nothing generated and nothing reported: the prompt was still read.
        let b = settle(None, false, || 12, 0, None);
        assert_eq!((b.usage.prompt_tokens, b.usage.completion_tokens), (12, 0));
    }

    #[test]
    fn an_estimate_never_bills_past_the_output_cap_but_a_report_may() {
        // 4000 characters streamed under max_tokens 300: the provider could not bill more.
        let b = settle(reported(10, 1), false, || 10, 4000, Some(300));
        assert_eq!(b.usage.completion_tokens, 300);
        // A provider that reports more than the cap is believed (it is what it billed).
        let b = settle(reported(10, 400), false, || 10, 40, Some(300));
        assert_eq!(b.usage.completion_tokens, 400);
    }

    #[test]
    fn reported_classes_survive_an_estimate() {
        let mut u = reported(100, 2).unwrap();
        u.cached_tokens = 80;
        u.cache_write_1h = 10;
        let b = settle(Some(u), false, || 5, 40, None);
        assert_eq!(b.usage.cached_tokens, 80);
        assert_eq!(b.usage.cache_write_1h, 10);
        assert_eq!(b.usage.completion_tokens, 10);
    }

    proptest! {
        /// Whatever was reported, an unfinished count never bills less than
        /// either the report or the estimate of what was streamed.
        #[test]
        fn never_below_the_report_or_the_estimate(
            prompt in 0u64..1_000_000, completion in 0u64..1_000_000,
            estimate in 0u64..1_000_000, chars in 0usize..4_000_000,
            has_report: bool, is_final: bool, cap in proptest::option::of(0u64..2_000_000),
        ) {
            let r = has_report.then(|| reported(prompt, completion).unwrap());
            let b = settle(r, is_final, || estimate, chars, cap);
            prop_assert!(b.usage.total_tokens >= b.usage.prompt_tokens + b.usage.completion_tokens);
            if let Some(r) = r {
                prop_assert!(b.usage.completion_tokens >= r.completion_tokens);
            }
            if !b.estimated {
                prop_assert!(is_final && has_report);
            } else {
                let est = tokens_of_chars(chars).min(cap.unwrap_or(u64::MAX));
                prop_assert!(b.usage.completion_tokens >= est);
                // The documented bound: an estimate never bills past the cap.
                let reported_out = r.map_or(0, |r| r.completion_tokens);
                prop_assert!(b.usage.completion_tokens <= reported_out.max(cap.unwrap_or(u64::MAX)));
            }
        }
    }
}

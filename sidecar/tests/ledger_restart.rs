//! A restart is not a budget reset (design §3): the sidecar seeds its
//! reservation ledger from the usage store before it serves, so a key that
//! spent its budget, or filled its token window, is still refused by the next
//! process.

mod common;

use common::*;
use serde_json::{json, Value};

/// One model whose only route has a price ($1000 per million tokens in and
/// out: a few cents a request).
fn priced_gateway() -> (Mock, Sidecar) {
    let mock = Mock::start(&[]);
    let body = format!(
        "{}{}price = {{ input = 1000.0, output = 1000.0 }}\n",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "up")]),
    );
    let sidecar = Sidecar::start(&body);
    (mock, sidecar)
}

/// `POST /v1/chat/completions` as nginx sends it for `key` with `limits`
/// (`X-Afr-Limits`); returns the status, the error code, if any, and
/// `x-ratelimit-remaining-tokens`.
async fn chat_full(
    sidecar: &Sidecar,
    key: &str,
    limits: &str,
) -> (u16, Option<String>, Option<u64>) {
    let resp = sidecar
        .client
        .post(sidecar.url("/v1/chat/completions"))
        .header("X-Afr-Secret", SECRET)
        .header("X-Afr-Key-Id", key)
        .header("X-Afr-Limits", limits)
        .json(&json!({"model": "m", "max_tokens": 20, "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .expect("sidecar answered");
    let status = resp.status().as_u16();
    let remaining = resp
        .headers()
        .get("x-ratelimit-remaining-tokens")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let code = body["error"]["code"].as_str().map(str::to_owned);
    (status, code, remaining)
}

async fn chat(sidecar: &Sidecar, key: &str, limits: &str) -> (u16, Option<String>) {
    let (status, code, _) = chat_full(sidecar, key, limits).await;
    (status, code)
}

/// Sends requests until the first refusal; returns how many were admitted.
async fn until_refused(sidecar: &Sidecar, key: &str, limits: &str, code: &str) -> usize {
    for admitted in 0..200 {
        let (status, got) = chat(sidecar, key, limits).await;
        if status == 429 {
            assert_eq!(got.as_deref(), Some(code));
            return admitted;
        }
        assert_eq!(status, 200, "{got:?}");
    }
    panic!("never refused");
}

#[tokio::test]
async fn spent_budget_and_full_token_window_survive_a_restart() {
    let (_mock, mut sidecar) = priced_gateway();
    // Worst case ≈ (3 prompt + 20) tokens × $0.001 = $0.023; a real answer
    // costs less, so a few fit before the budget of $0.1 is spent.
    let budget = "budget=100000000/day";
    let tpm = "tpm=120";
    let spent = until_refused(&sidecar, "spender", budget, "insufficient_quota").await;
    let filled = until_refused(&sidecar, "tokens", tpm, "rate_limit_exceeded").await;
    assert!(spent >= 2 && filled >= 2, "{spent} {filled}");
    // A key that used little keeps its room across the restart too.
    assert_eq!(chat(&sidecar, "light", budget).await.0, 200);

    assert!(sidecar.terminate().success());
    sidecar.restart();

    let (status, code) = chat(&sidecar, "spender", budget).await;
    assert_eq!(
        (status, code.as_deref()),
        (429, Some("insufficient_quota")),
        "a restart renewed the day's budget"
    );
    // The window was full (under 23 of 120 left) a moment ago; it decays
    // by 2 tokens a second at most, so well under half is left — unless a
    // restart emptied it (then 97 would be left after this request).
    let (_, _, remaining) = chat_full(&sidecar, "tokens", tpm).await;
    let remaining = remaining.expect("x-ratelimit-remaining-tokens");
    assert!(
        remaining < 60,
        "a restart emptied the token window: {remaining} left"
    );
    // The seed is what was spent, not more: the light key still has room.
    assert_eq!(chat(&sidecar, "light", budget).await.0, 200);
    assert!(
        sidecar.log().contains("ledger seeded from the usage store"),
        "{}",
        sidecar.log()
    );
}

/// `POST /v1/chat/completions` for `key` with `limits` on `model`: the
/// response's status, its error code and whether it may be retried.
async fn chat_model(
    sidecar: &Sidecar,
    model: &str,
    limits: &str,
) -> (u16, Option<String>, Option<String>) {
    let resp = sidecar
        .client
        .post(sidecar.url("/v1/chat/completions"))
        .header("X-Afr-Secret", SECRET)
        .header("X-Afr-Key-Id", "k")
        .header("X-Afr-Limits", limits)
        .json(&json!({"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("sidecar answered");
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok().map(str::to_owned));
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (
        status,
        body["error"]["code"].as_str().map(str::to_owned),
        retry,
    )
}

#[tokio::test]
async fn budgets_fail_closed_without_a_usage_store() {
    let mock = Mock::start(&[]);
    let body = format!(
        "{}{}price = {{ input = 1.0, output = 1.0 }}\n",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "up")]),
    );
    let sidecar = Sidecar::start_with_usage_env(&body, 5, "record = false", &[]);
    let (status, code, retry) = chat_model(&sidecar, "m", "budget=100000000/day").await;
    assert_eq!((status, code.as_deref()), (503, Some("budget_unavailable")));
    assert_eq!(retry.as_deref(), Some("false"), "no retry can help");
    assert_eq!(mock.requests().await.len(), 0);
    // Keys without a budget are served as before.
    assert_eq!(chat_model(&sidecar, "m", "tpm=1000").await.0, 200);
    assert_eq!(chat_model(&sidecar, "m", "").await.0, 200);
    assert!(sidecar.log().contains("keys with a budget are refused"));
}

#[tokio::test]
async fn a_budgeted_key_is_never_served_by_an_unpriced_route() {
    let unpriced = Mock::start(&[]);
    let priced = Mock::start(&[]);
    let body = format!(
        "{}{}{}{}[[models.mixed.routes]]\nprovider = \"priced\"\nmodel = \"up\"\nprice = {{ input = 1.0, output = 1.0 }}\n",
        openai_provider("unpriced", &unpriced.base(), ""),
        openai_provider("priced", &priced.base(), ""),
        model("free", &[("unpriced", "up")]),
        model("mixed", &[("unpriced", "up")]),
    );
    let sidecar = Sidecar::start(&body);
    let budget = "budget=100000000/day";
    let (status, code, _) = chat_model(&sidecar, "free", budget).await;
    assert_eq!((status, code.as_deref()), (400, Some("model_not_priced")));
    assert_eq!(unpriced.requests().await.len(), 0);
    // The unpriced first route is skipped for the budget, the priced one serves.
    assert_eq!(chat_model(&sidecar, "mixed", budget).await.0, 200);
    assert_eq!(
        (
            unpriced.requests().await.len(),
            priced.requests().await.len()
        ),
        (0, 1)
    );
    // Without a budget the unpriced route serves as before.
    assert_eq!(chat_model(&sidecar, "free", "tpm=1000").await.0, 200);
    assert_eq!(unpriced.requests().await.len(), 1);
}

#[tokio::test]
async fn token_classes_reach_the_metrics() {
    let mock = Mock::start(&["--cache-read", "2", "--reasoning-tokens", "3"]);
    let body = format!(
        "{}{}price = {{ input = 1.0, output = 1.0 }}\n",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "up")]),
    );
    let sidecar = Sidecar::start(&body);
    assert_eq!(chat_model(&sidecar, "m", "").await.0, 200);
    let m = sidecar.metrics().await;
    let line = |kind: &str, n: u64| {
        format!("afr_tokens_total{{model=\"m\",provider=\"mock\",kind=\"{kind}\"}} {n}")
    };
    assert!(m.contains(&line("cached_prompt", 2)), "{m}");
    assert!(m.contains(&line("reasoning", 3)), "{m}");
    assert!(
        !m.contains("kind=\"cache_write_5m\""),
        "an unused class adds no series: {m}"
    );
}

#[tokio::test]
async fn a_budgeted_key_is_refused_a_service_tier_no_route_prices() {
    let mock = Mock::start(&[]);
    let body = format!(
        "{}{}price = {{ input = 1.0, output = 1.0 }}\n",
        openai_provider("mock", &mock.base(), ""),
        model("m", &[("mock", "up")]),
    );
    let sidecar = Sidecar::start(&body);
    let send = |path: &'static str, limits: &'static str, tier: &'static str| {
        let body = if path == "/v1/responses" {
            json!({"model": "m", "input": "hi", "service_tier": tier})
        } else {
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "service_tier": tier})
        };
        sidecar
            .client
            .post(sidecar.url(path))
            .header("X-Afr-Secret", SECRET)
            .header("X-Afr-Key-Id", "k")
            .header("X-Afr-Limits", limits)
            .json(&body)
            .send()
    };
    let budget = "budget=100000000/day";
    for path in ["/v1/chat/completions", "/v1/responses"] {
        let refused = send(path, budget, "priority").await.unwrap();
        assert_eq!(refused.status(), 400, "{path}");
        let v: Value = refused.json().await.unwrap();
        assert_eq!(v["error"]["code"], "service_tier_not_priced", "{v}");
        assert_eq!(v["error"]["param"], "service_tier");
        assert_eq!(
            send(path, budget, "auto").await.unwrap().status(),
            200,
            "{path}"
        );
        assert_eq!(
            send(path, "tpm=100000", "flex").await.unwrap().status(),
            200,
            "{path}"
        );
    }
    assert_eq!(
        mock.requests().await.len(),
        4,
        "refused before any provider"
    );
}

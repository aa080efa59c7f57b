//! `POST /v1/embeddings`, `/v1/completions` and `/v1/responses`: passed
//! through byte for byte (only `model` and, for a completions stream,
//! `stream_options.include_usage` are the gateway's edits) to the routes
//! whose provider speaks the endpoint, with the same failover, breakers and
//! accounting as chat completions (`serve::chat`).
//!
//! A stream commits on its first output event (a chunk with text; for the
//! Responses API anything after `response.created`/`response.in_progress`)
//! or after `server.stream_hold`; before that a failure moves on to the next
//! route. A Responses request with `previous_response_id` continues a
//! conversation stored at one provider: it goes to the model's first
//! serving route only, never failed over (another provider does not know
//! the id).

use crate::providers::{ProviderError, Reply, UpstreamCall};
use crate::serve::accounting::Accounting;
use crate::serve::chat::{admit_model, reject, Caller};
use crate::serve::error::{json_response, Body, GatewayError};
use crate::serve::relay::{self, StreamStart, Wire};
use crate::serve::state::{BreakerTicket, Gateway, Runtime};
use afr_core::attempt::{Attempt, Holding};
use afr_core::breaker::{Admission, Outcome};
use afr_core::endpoint::{body_usage, validate_passthrough, Endpoint};
use afr_core::route::{Exhausted, RouteFailure, RoutePlan};
use afr_core::sse::has_data;
use afr_core::validate::Invalid;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Response, StatusCode};
use std::sync::Arc;
use std::time::Instant;
use tokio::time::timeout_at;

/// Preamble events held back at most before a stream commits anyway.
const MAX_HELD_EVENTS: usize = 8;

/// Handles one request on a passthrough endpoint; never fails (errors
/// become responses). `usage` is the request's accounting.
pub async fn passthrough(
    gateway: Arc<Gateway>,
    runtime: Arc<Runtime>,
    caller: Caller,
    mut usage: Accounting,
    endpoint: Endpoint,
    body: Bytes,
) -> Response<Body> {
    let request = match validate_passthrough(endpoint, &body) {
        Ok(r) => r,
        Err(invalid) => return reject(&caller, usage, GatewayError::Invalid(invalid)),
    };
    let admitted = admit_model(
        &runtime,
        &caller,
        &mut usage,
        &request.model,
        request.stream,
        endpoint,
    );
    let model = match admitted {
        Ok(model) => model,
        Err(invalid) => return reject(&caller, usage, GatewayError::Invalid(invalid)),
    };
    let serving = |i: usize| {
        runtime
            .providers
            .get(&model.routes[i].provider)
            .filter(|p| p.serves(endpoint))
    };
    let Some(first_serving) = (0..model.routes.len()).find(|&i| serving(i).is_some()) else {
        tracing::error!(request_id = %caller.request_id, model = %request.model, endpoint = endpoint.path(), "no enabled route of this model speaks this endpoint");
        let error = GatewayError::NoProvider {
            model: request.model.clone(),
        };
        return reject(&caller, usage, error);
    };
    // A continued conversation lives at one provider: pinned, no failover.
    let pinned = request
        .previous_response_id
        .is_some()
        .then_some(first_serving);
    // Reserve the worst case before any provider is called (design §3);
    // embeddings produce no output tokens, the others up to the default.
    if caller.limits.tpm.is_some() || caller.limits.budget.is_some() {
        let cap = if endpoint == Endpoint::Embeddings {
            0
        } else {
            afr_core::validate::DEFAULT_MAX_TOKENS
        };
        let worst = crate::serve::chat::worst_case(
            request.prompt_chars,
            model,
            |p| runtime.providers.contains_key(p),
            |_| cap,
        );
        if let Err(refusal) = usage.reserve(&caller.limits, request.prompt_chars, worst) {
            return reject(&caller, usage, refusal.into());
        }
    }
    let strip_usage = request.stream && !request.include_usage;
    let wire = match endpoint {
        Endpoint::Responses => Wire::Responses,
        _ => Wire::OpenAi,
    };

    let mut plan = RoutePlan::new(model.routes.len());
    let mut last_provider = String::new();
    loop {
        let next = plan.next_route(|i| {
            if pinned.is_some_and(|p| p != i) {
                return None;
            }
            serving(i)?;
            Some(gateway.admit(&model.routes[i].provider, Instant::now()))
        });
        let Some((index, admission)) = next else {
            break;
        };
        let route = &model.routes[index];
        let Some(provider) = serving(index) else {
            continue;
        };
        if !last_provider.is_empty() {
            gateway.metrics.failover(&request.model, &last_provider);
        }
        last_provider = route.provider.clone();
        usage.route(&route.provider, &route.model, route.price);
        let call = UpstreamCall {
            body: Bytes::from(request.upstream_body(&body, route, strip_usage)),
            upstream_model: route.model.clone(),
            include_usage: request.stream,
            stream: request.stream,
            request_id: caller.request_id.clone(),
            event_idle: route.event_idle(),
        };

        let ticket = BreakerTicket::new(gateway.clone(), &route.provider, admission);
        let server = &runtime.config.server;
        let attempt = Attempt::new(
            &provider.timeouts(),
            server.stream_hold,
            server.stream_keepalive,
            Instant::now(),
        );
        let (answer_by, expiry) = attempt.answer_by(request.stream, admission == Admission::Probe);
        let outcome = match timeout_at(answer_by.into(), provider.forward(endpoint, call)).await {
            Ok(r) => r,
            Err(_) => Err(ProviderError::Timeout(expiry.limit.as_str())),
        };
        let reply = match outcome {
            Ok(reply) => reply,
            Err(error) if error.is_retryable() => {
                tracing::warn!(request_id = %caller.request_id, provider = %route.provider, error = %error, "provider failed; trying the next route");
                plan.failed(error.route_failure());
                ticket.settle(error.breaker_outcome());
                continue;
            }
            Err(error) => {
                ticket.success();
                let gw_error = GatewayError::Upstream {
                    provider: route.provider.clone(),
                    error,
                };
                let status = gw_error.status().as_u16();
                tracing::info!(request_id = %caller.request_id, provider = %route.provider, status, error = %gw_error, "provider refused the request");
                usage.finish(status);
                return gw_error.into_response(&caller.request_id);
            }
        };
        let mut events = match reply {
            Reply::Complete { body, .. } => {
                ticket.success();
                usage.apply_usage(body_usage(endpoint, &body));
                usage.finish(200);
                return json_response(StatusCode::OK, body, &caller.request_id);
            }
            Reply::Stream(events) => events,
        };
        let (hold_end, at_hold_end) = attempt.holding(Instant::now());
        let mut held = Vec::new();
        let mut content_held = false;
        let held_up = loop {
            match timeout_at(hold_end.into(), events.next()).await {
                Ok(Some(Ok(event))) if wire.is_error(&event) => {
                    break Err(format!(
                        "error event before any output: {}",
                        String::from_utf8_lossy(&event).trim()
                    ));
                }
                Ok(Some(Ok(event))) => {
                    if !has_data(&event) {
                        continue;
                    }
                    content_held = wire.is_content(&event);
                    held.push(event);
                    if content_held || held.len() >= MAX_HELD_EVENTS {
                        break Ok(Holding::Commit);
                    }
                }
                Ok(Some(Err(error))) => break Err(error.to_string()),
                Ok(None) => break Err("the stream ended before any output".into()),
                Err(_) => break Ok(at_hold_end),
            }
        };
        match held_up {
            Err(reason) => {
                tracing::warn!(request_id = %caller.request_id, provider = %route.provider, error = %reason, "stream failed before its first output; trying the next route");
                plan.failed(RouteFailure::Other);
                ticket.failure();
                continue;
            }
            Ok(Holding::Expire(expiry)) => {
                ticket.settle(Outcome::Neutral);
                let error = GatewayError::ContentTimeout {
                    limit: expiry.limit.as_str(),
                    timeout: expiry.timeout,
                };
                tracing::warn!(request_id = %caller.request_id, provider = %route.provider, error = %error, "provider answered but sent no output in time; not retried");
                usage.finish(error.status().as_u16());
                return error.into_response(&caller.request_id);
            }
            Ok(Holding::Commit) => {}
        }
        if content_held {
            ticket.success();
        } else {
            ticket.settle(Outcome::Neutral);
        }
        let start = StreamStart {
            gateway: gateway.clone(),
            provider: route.provider.clone(),
            first: held,
            content_held,
            events,
            strip_usage,
            wire,
            attempt,
            usage,
            prompt_chars: request.prompt_chars,
            request_id: caller.request_id.clone(),
        };
        return relay::respond(start);
    }

    let error = match plan.exhausted() {
        Exhausted::AllOpen { retry_after_secs } => GatewayError::AllOpen {
            model: request.model.clone(),
            retry_after_secs,
        },
        Exhausted::AllRateLimited { retry_after, .. } => GatewayError::RateLimited {
            model: request.model.clone(),
            retry_after,
        },
        Exhausted::Unservable => GatewayError::Invalid(Invalid {
            param: Some("model".into()),
            message: format!(
                "No route of the model '{}' can serve /v1/{}.",
                request.model,
                endpoint.path()
            ),
            code: None,
        }),
        Exhausted::AllFailed { tried } => {
            let tried: Vec<&str> = tried
                .iter()
                .map(|&i| model.routes[i].provider.as_str())
                .collect();
            tracing::error!(request_id = %caller.request_id, model = %request.model, tried = ?tried, "every provider failed");
            GatewayError::AllFailed {
                model: request.model.clone(),
            }
        }
    };
    let status = error.status().as_u16();
    usage.finish(status);
    error.into_response(&caller.request_id)
}

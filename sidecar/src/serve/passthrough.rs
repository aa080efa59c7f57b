//! `POST /v1/embeddings`, `/v1/completions` and `/v1/responses`: passed
//! through byte for byte (only `model` and, for a completions stream,
//! `stream_options.include_usage` are the gateway's edits) to the routes
//! whose provider speaks the endpoint. Failover, breakers, the stream hold
//! and accounting are chat's route loop (`chat::route`); this file only says
//! how to build and send one route's call (`PassthroughExchange`).
//!
//! A stream commits on its first output event (a chunk with text; for the
//! Responses API anything after `response.created`/`response.in_progress`)
//! or after `server.stream_hold`; before that a failure moves on to the next
//! route. A Responses request with `previous_response_id` continues a
//! conversation stored at the provider that created that response: the
//! gateway remembers which provider created each response it relayed
//! (`afr_core::pins`, per key, bounded, with a time to live) and sends the
//! follow-up there only, never failed over (another provider does not know
//! the id). An id the gateway does not know, or no longer knows, is a 400
//! naming `previous_response_id`.

use crate::providers::{Provider, ProviderError, Reply, UpstreamCall};
use crate::serve::accounting::Accounting;
use crate::serve::chat::{admit_model, reject, route, Answer, Asked, Caller, Exchange};
use crate::serve::error::{Body, GatewayError};
use crate::serve::relay::Wire;
use crate::serve::state::{Gateway, Runtime};
use afr_core::config::RouteConfig;
use afr_core::endpoint::{
    body_usage, response_body_id, responses_event, validate_passthrough,
    validate_passthrough_counting, Endpoint, PassthroughRequest,
};
use afr_core::pins::{Pin, Unpinned};
use afr_core::validate::Invalid;
use async_trait::async_trait;
use bytes::Bytes;
use http::Response;
use std::sync::Arc;
use std::time::Instant;

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
    // A key with limits reserves its prompt estimate: counted in the pass
    // that checks the body's prompt rather than in a pass of its own.
    let limited = caller.limits.reserves();
    let validated = if limited {
        validate_passthrough_counting(endpoint, &body)
    } else {
        validate_passthrough(endpoint, &body)
    };
    let request = match validated {
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
    let serves = |r: &RouteConfig| {
        runtime
            .providers
            .get(&r.provider)
            .is_some_and(|p| p.serves(endpoint))
    };
    if !model.routes.iter().any(serves) {
        tracing::error!(request_id = %caller.request_id, model = %request.model, endpoint = endpoint.path(), "no enabled route of this model speaks this endpoint");
        let error = GatewayError::NoProvider {
            model: request.model.clone(),
        };
        return reject(&caller, usage, error);
    }
    // A continued conversation lives at the provider that created it.
    let pinned = match &request.previous_response_id {
        None => None,
        Some(id) => {
            let found = gateway
                .pins()
                .get(id, &caller.key_id, Instant::now())
                .map(|pin| (pin.provider.clone(), pin.tokens));
            match found {
                Ok((provider, tokens))
                    if model
                        .routes
                        .iter()
                        .any(|r| r.provider == provider && serves(r)) =>
                {
                    Some((provider, tokens))
                }
                Ok((provider, _)) => {
                    tracing::info!(request_id = %caller.request_id, provider = %provider, model = %request.model, "previous_response_id was created by a provider this model no longer routes to");
                    let invalid = unknown_previous(id, Unpinned::Unknown);
                    return reject(&caller, usage, GatewayError::Invalid(invalid));
                }
                Err(why) => {
                    return reject(
                        &caller,
                        usage,
                        GatewayError::Invalid(unknown_previous(id, why)),
                    )
                }
            }
        }
    };
    let (pinned, history) = match pinned {
        Some((provider, tokens)) => (Some(provider), tokens),
        None => (None, 0),
    };
    let exchange = PassthroughExchange {
        endpoint,
        request,
        body,
        pinned,
        history,
        gateway: gateway.clone(),
        key_id: caller.key_id.clone(),
        query: caller.query.clone(),
    };
    route(gateway, runtime, caller, usage, &exchange).await
}

/// The 400 for a `previous_response_id` the gateway cannot route.
fn unknown_previous(id: &str, why: Unpinned) -> Invalid {
    let message = match why {
        Unpinned::Unknown => format!(
            "Previous response with id '{id}' not found: it was not created through this gateway with this key, or the gateway has restarted or forgotten it since."
        ),
        Unpinned::Expired => format!(
            "Previous response with id '{id}' has expired at this gateway: continue from a newer response or send the whole conversation."
        ),
    };
    Invalid {
        param: Some("previous_response_id".into()),
        message,
        code: Some("previous_response_not_found"),
    }
}

/// A validated passthrough request and the client's bytes.
struct PassthroughExchange {
    endpoint: Endpoint,
    request: PassthroughRequest,
    body: Bytes,
    /// The provider holding `previous_response_id`'s conversation.
    pinned: Option<String>,
    /// What that provider holds of it (input + output tokens so far): the
    /// follow-up's input includes it.
    history: u64,
    gateway: Arc<Gateway>,
    key_id: String,
    /// The client's query string (see `UpstreamCall::query`).
    query: Option<String>,
}

#[async_trait]
impl Exchange for PassthroughExchange {
    fn asked(&self) -> Asked<'_> {
        let r = &self.request;
        Asked {
            history: self.history,
            special_tier: r.special_tier.as_deref(),
            prompt_tokens: r.prompt_tokens,
            ..Asked::openai(
                &r.model,
                r.stream,
                &self.body,
                r.estimate_wire(),
                r.include_usage,
            )
        }
    }

    fn output_cap(&self, route: &RouteConfig) -> u64 {
        self.request.output_cap(route)
    }

    fn wire(&self) -> Wire {
        match self.endpoint {
            Endpoint::Responses => Wire::Responses,
            _ => Wire::OpenAi,
        }
    }

    fn prepare(
        &self,
        provider: &dyn Provider,
        route: &RouteConfig,
        request_id: &str,
    ) -> Result<UpstreamCall, Invalid> {
        if !provider.serves(self.endpoint) {
            return Err(Invalid {
                param: Some("model".into()),
                message: format!(
                    "No route of the model '{}' can serve /v1/{}.",
                    self.request.model,
                    self.endpoint.path()
                ),
                code: None,
            });
        }
        if let Some(pinned) = &self.pinned {
            if *pinned != route.provider {
                return Err(Invalid {
                    param: Some("previous_response_id".into()),
                    message: format!(
                        "The provider holding previous response '{}' cannot serve it now.",
                        self.request
                            .previous_response_id
                            .as_deref()
                            .unwrap_or_default()
                    ),
                    code: None,
                });
            }
        }
        Ok(UpstreamCall {
            body: Bytes::from(self.request.upstream_body(
                &self.body,
                route,
                self.asked().strip_usage,
            )),
            upstream_model: route.model.clone(),
            include_usage: self.request.stream,
            stream: self.request.stream,
            request_id: request_id.to_owned(),
            event_idle: route.event_idle(),
            query: self.query.clone(),
            traceparent: None,
            facts: false,
        })
    }

    async fn send(
        &self,
        provider: &dyn Provider,
        call: UpstreamCall,
    ) -> Result<Reply, ProviderError> {
        match provider.forward(self.endpoint, call).await? {
            Reply::Complete { body, facts, .. } => Ok(Reply::Complete {
                usage: body_usage(self.endpoint, &body),
                body,
                facts,
            }),
            stream => Ok(stream),
        }
    }

    fn answered(&self, route: &RouteConfig, answer: Answer<'_>) {
        if self.endpoint != Endpoint::Responses {
            return;
        }
        // A whole answer's usage is known now; a stream's comes with its
        // last event, which the stream's meter records (`Accounting::conversation`).
        let (id, tokens) = match answer {
            Answer::Body(body) => (
                response_body_id(body),
                body_usage(self.endpoint, body).map_or(0, |u| u.total_tokens),
            ),
            Answer::Event(raw) => (responses_event(raw).response_id, 0),
        };
        if let Some(id) = id {
            let pin = Pin {
                key_id: self.key_id.clone(),
                provider: route.provider.clone(),
                tokens,
            };
            self.gateway.pins().insert(&id, pin, Instant::now());
        }
    }
}

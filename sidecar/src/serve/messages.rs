//! `POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's
//! Messages API, for the Anthropic SDKs and Claude Code.
//!
//! The request walks the model's route plan like a chat completion
//! (`chat::route`: failover before the first content, breakers, one usage
//! row). An Anthropic route gets the client's bytes with only the gateway's
//! edits and its answer unchanged, events included; an OpenAI-compatible
//! route gets the request translated to a chat completion, and its answer
//! and stream translated back (`afr_core::anthropic::reverse`).
//! `count_tokens` goes to the model's Anthropic routes; a model with none
//! gets an estimate.
//! Errors are Anthropic-shaped (`Caller::shape`).

use crate::providers::{
    AnthropicClient, EventStream, MessagesEndpoint, Provider, ProviderError, Reply, UpstreamCall,
};
use crate::serve::accounting::Accounting;
use crate::serve::chat::{admit_model, reject, route, Asked, Caller, Exchange};
use crate::serve::error::{json_response, Body, GatewayError};
use crate::serve::relay::Wire;
use crate::serve::state::{Gateway, Runtime};
use afr_core::anthropic::{request_to_openai, response_to_anthropic, ChatToMessages};
use afr_core::config::RouteConfig;
use afr_core::endpoint::Endpoint;
use afr_core::messages::{
    estimate_input_tokens, validate_messages, validate_messages_counting, MessagesRequest,
};
use afr_core::splice::Splice;
use afr_core::validate::Invalid;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Response, StatusCode};
use serde_json::Value;
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

/// The path of the token-counting endpoint.
pub const COUNT_TOKENS_PATH: &str = "/v1/messages/count_tokens";

/// What the client sent beside its body that an Anthropic provider must see.
pub fn anthropic_client(headers: &HeaderMap, query: Option<&str>) -> AnthropicClient {
    AnthropicClient {
        version: headers.get("anthropic-version").cloned(),
        beta: headers.get("anthropic-beta").cloned(),
        query: query.filter(|q| !q.is_empty()).map(str::to_owned),
    }
}

/// Handles one Messages (or count_tokens) request; never fails.
pub async fn messages(
    gateway: Arc<Gateway>,
    runtime: Arc<Runtime>,
    caller: Caller,
    mut usage: Accounting,
    body: Bytes,
    client: AnthropicClient,
    endpoint: MessagesEndpoint,
) -> Response<Body> {
    let count_tokens = endpoint == MessagesEndpoint::CountTokens;
    // A key with limits reserves its prompt estimate: counted in
    // validation's pass rather than in a pass of its own.
    let limited = caller.limits.reserves();
    let validated = if limited {
        validate_messages_counting(&body, count_tokens)
    } else {
        validate_messages(&body, count_tokens)
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
        Endpoint::Messages,
    );
    if let Err(invalid) = admitted {
        return reject(&caller, usage, GatewayError::Invalid(invalid));
    }
    let can_count = runtime.config.models.get(&request.model).is_some_and(|m| {
        m.routes.iter().any(|r| {
            runtime
                .providers
                .get(&r.provider)
                .is_some_and(|p| p.speaks_messages())
        })
    });
    if count_tokens && !can_count {
        // No provider of this model can count: OpenAI-compatible APIs have
        // no token counter, and an estimate (about four characters a token)
        // beats failing Claude Code's context bookkeeping. Answered here,
        // not through the route loop: no provider is asked, so no breaker
        // may read this as a provider's success.
        let tokens = estimate_input_tokens(&body);
        usage.finish(200);
        return json_response(
            StatusCode::OK,
            format!("{{\"input_tokens\":{tokens}}}"),
            &caller.request_id,
        );
    }
    let exchange = MessagesExchange {
        request,
        body,
        tree: OnceLock::new(),
        client,
        endpoint,
    };
    route(gateway, runtime, caller, usage, &exchange).await
}

/// A validated Messages request and the client's bytes.
struct MessagesExchange {
    request: MessagesRequest,
    body: Bytes,
    /// The body as a tree, read by the first route that translates it: an
    /// Anthropic route forwards the bytes and never needs it (building it
    /// anyway was ~7% of a 20 KB Claude Code turn's instructions, callgrind).
    tree: OnceLock<Value>,
    client: AnthropicClient,
    endpoint: MessagesEndpoint,
}

fn invalid(message: String) -> Invalid {
    Invalid {
        param: None,
        message,
        code: None,
    }
}

#[async_trait]
impl Exchange for MessagesExchange {
    fn asked(&self) -> Asked<'_> {
        let r = &self.request;
        let (model, stream) = (&r.model, r.stream);
        // Anthropic streams carry usage in their own events: nothing to strip.
        Asked {
            model,
            stream,
            body: &self.body,
            prompt_wire: afr_core::estimate::Wire::Messages,
            history: 0,
            // Anthropic's `service_tier` ("auto", "standard_only") does not
            // choose a dearer tier by itself.
            special_tier: None,
            long_context: self
                .client
                .beta
                .as_ref()
                .is_some_and(|b| b.as_bytes().windows(10).any(|w| w == b"context-1m")),
            strip_usage: false,
            prompt_tokens: r.prompt_tokens,
        }
    }

    fn output_cap(&self, route: &RouteConfig) -> u64 {
        self.request.output_cap(route)
    }

    fn billed(&self) -> bool {
        // count_tokens is free at Anthropic: neither reserved nor billed.
        self.endpoint != MessagesEndpoint::CountTokens
    }

    fn wire(&self) -> Wire {
        Wire::Anthropic
    }

    fn prepare(
        &self,
        provider: &dyn Provider,
        route: &RouteConfig,
        request_id: &str,
    ) -> Result<UpstreamCall, Invalid> {
        let body = if provider.speaks_messages() {
            // The client's bytes with only the gateway's own edits (design §3).
            self.request.upstream_body(&self.body, route)
        } else if self.endpoint == MessagesEndpoint::CountTokens {
            // Another route of this model can count (see `messages`).
            return Err(invalid(
                "This model's provider cannot count tokens.".to_owned(),
            ));
        } else {
            let tree = self
                .tree
                .get_or_init(|| serde_json::from_slice(&self.body).unwrap_or(Value::Null));
            let chat = request_to_openai(tree, &route.model).map_err(|e| match e {
                afr_core::anthropic::TranslateError::InvalidRequest { param, message } => Invalid {
                    param,
                    message,
                    code: None,
                },
                other => invalid(other.to_string()),
            })?;
            let chat = serde_json::to_vec(&chat).map_err(|e| invalid(e.to_string()))?;
            // The route's adaptations (renames, drops, clamps) are written
            // for chat bodies: they apply to the translation.
            let mut splice = Splice::parse(&chat).map_err(|e| invalid(e.to_string()))?;
            route.adapt(&mut splice);
            splice.finish()
        };
        Ok(UpstreamCall {
            body: Bytes::from(body),
            upstream_model: route.model.clone(),
            include_usage: self.request.stream,
            stream: self.request.stream,
            request_id: request_id.to_owned(),
            event_idle: route.event_idle(),
            // A translated call: the Anthropic client's query (`?beta=true`)
            // means nothing to an OpenAI-format provider.
            query: None,
            traceparent: None,
            facts: false,
        })
    }

    async fn send(
        &self,
        provider: &dyn Provider,
        call: UpstreamCall,
    ) -> Result<Reply, ProviderError> {
        if provider.speaks_messages() {
            return provider.messages(call, self.endpoint, &self.client).await;
        }
        match provider.chat(call).await? {
            Reply::Complete { body, .. } => {
                let translated = response_to_anthropic(&body)
                    .map_err(|e| ProviderError::Protocol(e.to_string()))?;
                Ok(Reply::Complete {
                    body: Bytes::from(translated.body),
                    usage: translated.usage,
                    // The client's answer is the translation: the span
                    // reads its id and stop reason from it.
                    facts: None,
                })
            }
            Reply::Stream(events) => Ok(Reply::Stream(translate_stream(events))),
        }
    }
}

/// `chat.completion.chunk` events → Anthropic Messages events.
fn translate_stream(upstream: EventStream) -> EventStream {
    struct State {
        upstream: EventStream,
        translator: ChatToMessages,
        ready: VecDeque<Bytes>,
    }
    let state = State {
        upstream,
        translator: ChatToMessages::new(),
        ready: VecDeque::new(),
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.ready.pop_front() {
                return Some((Ok(event), s));
            }
            if s.translator.is_finished() {
                return None;
            }
            let events = match s.upstream.next().await {
                Some(Ok(raw)) => s.translator.push_raw(&raw),
                // Before the first content this fails over; after, the relay
                // ends the client's stream with its own error event.
                Some(Err(e)) => return Some((Err(e), s)),
                None => s.translator.finish(),
            };
            s.ready.extend(events.into_iter().map(Bytes::from));
        }
    })
    .boxed()
}

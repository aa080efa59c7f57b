//! `POST /v1/chat/completions`: validate, walk the model's route plan with
//! failover and breakers, then answer with the provider's body or relay its
//! stream (see `relay`).
//!
//! A stream commits to a provider once its first content event arrived (the
//! content-free role chunk before it is held back) or, for a provider that
//! answered 200 and is still thinking, after `server.stream_hold`; before
//! that any failure moves on to the next route, after it a failure ends the
//! stream with an error event. How long each phase may take is decided by
//! `afr_core::attempt`.

use crate::providers::{Provider, ProviderError, Reply, UpstreamCall};
use crate::serve::accounting::Accounting;
use crate::serve::error::{json_response, Body, GatewayError};
use crate::serve::relay::{self, excerpt, Meter, StreamStart, Wire};
use crate::serve::state::{BreakerTicket, Budgets, Gateway, Runtime};
use crate::serve::telemetry::attempt_error_type;
use afr_core::attempt::{Attempt, Holding};
use afr_core::breaker::{Admission, Outcome};
use afr_core::config::ANTHROPIC_LONG_CONTEXT_ABOVE;
use afr_core::config::{ModelConfig, RouteConfig};
use afr_core::endpoint::{wrong_endpoint, Endpoint};
use afr_core::error::ErrorShape;
use afr_core::estimate::Wire as PromptWire;
use afr_core::ledger::Amount;
use afr_core::limits::KeyLimits;
use afr_core::route::{Exhausted, RouteFailure, RoutePlan};
use afr_core::sse::{has_data, is_malformed};
use afr_core::validate::{
    check_model, validate_chat, validate_chat_counting, ChatRequest, Invalid,
};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Response, StatusCode};
use std::sync::Arc;
use std::time::Instant;
use tokio::time::timeout_at;

/// Preamble events held back at most before a stream commits anyway.
const MAX_HELD_EVENTS: usize = 8;

/// Who is asking, as nginx told us.
pub struct Caller {
    /// Gateway request id.
    pub request_id: String,
    /// The key's id (`X-Afr-Key-Id`).
    pub key_id: String,
    /// The key's model allow-list (`X-Afr-Models`); `None`: every model.
    pub allowed: Option<Vec<String>>,
    /// The key's token and budget limits (`X-Afr-Limits`).
    pub limits: KeyLimits,
    /// When the request arrived.
    pub started: Instant,
    /// Arrival as Unix milliseconds.
    pub ts_ms: i64,
    /// The error body shape this endpoint answers in.
    pub shape: ErrorShape,
    /// The request's query string, for a provider of the client's wire.
    pub query: Option<String>,
}

/// What the route loop needs from one endpoint's request: failover,
/// breakers, holding a stream until its first content and relaying it are
/// the same for every API; building each route's call, sending it and the
/// stream's wire format are not.
#[async_trait]
pub trait Exchange: Send + Sync {
    /// What the route loop reads of the request.
    fn asked(&self) -> Asked<'_>;
    /// The most output tokens `route` may produce for this request, for the
    /// worst case a key's `tpm` and budget reserve. The default is the
    /// contract's default `max_tokens`; endpoints that know better say so.
    fn output_cap(&self, route: &RouteConfig) -> u64;
    /// Whether the request is billed (reserved, and settled to the
    /// provider's usage). Anthropic's `count_tokens` is free, so it is not.
    fn billed(&self) -> bool {
        true
    }
    /// The format of the events the client gets.
    fn wire(&self) -> Wire;
    /// The call for one route, or why the route cannot serve this request
    /// (the gateway's own refusal, before any breaker is asked).
    fn prepare(
        &self,
        provider: &dyn Provider,
        route: &RouteConfig,
        request_id: &str,
    ) -> Result<UpstreamCall, Invalid>;
    /// Sends a prepared call. For streams, returns once the response headers
    /// arrived; events then come from the stream.
    async fn send(
        &self,
        provider: &dyn Provider,
        call: UpstreamCall,
    ) -> Result<Reply, ProviderError>;
    /// Sees the answer `route` gave once the request is committed to it:
    /// the whole body, or each event held before the stream committed (an
    /// endpoint with provider-side state remembers where it lives).
    fn answered(&self, route: &RouteConfig, answer: Answer<'_>) {
        let _ = (route, answer);
    }
}

/// A committed answer, as `Exchange::answered` sees it.
#[derive(Debug, Clone, Copy)]
pub enum Answer<'a> {
    /// A whole (non-streamed) answer body.
    Body(&'a [u8]),
    /// One raw event of a stream, held before it committed.
    Event(&'a [u8]),
}

/// What the route loop reads of a request, whatever its endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    /// The catalogue model asked for.
    pub model: &'a str,
    /// Whether the answer streams.
    pub stream: bool,
    /// The client's body and which of its members carry the prompt, for
    /// the prompt estimate (`afr_core::estimate`), made only when needed.
    pub body: &'a Bytes,
    /// The API the body is written for.
    pub prompt_wire: PromptWire,
    /// Tokens of an earlier conversation the provider bills as input again
    /// (a Responses `previous_response_id`); 0 elsewhere.
    pub history: u64,
    /// A `service_tier` the routes' prices do not cover (`flex`, `priority`…).
    pub special_tier: Option<&'a str>,
    /// The client enabled Anthropic's long-context tier (the `context-1m`
    /// beta): a prompt above [`ANTHROPIC_LONG_CONTEXT_ABOVE`] tokens is then
    /// billed at prices an Anthropic route must declare (`long_context`).
    pub long_context: bool,
    /// Whether the gateway, not the client, asked for the usage chunk.
    pub strip_usage: bool,
    /// The prompt estimate when validation already counted it (a chat
    /// request of a key with limits); otherwise it is counted when needed.
    pub prompt_tokens: Option<u64>,
}

impl<'a> Asked<'a> {
    /// An OpenAI-format request: the gateway asks for usage on every stream
    /// and strips it again unless the client asked for it (design §5).
    pub fn openai(
        model: &'a str,
        stream: bool,
        body: &'a Bytes,
        prompt_wire: PromptWire,
        include_usage: bool,
    ) -> Self {
        Asked {
            model,
            stream,
            body,
            prompt_wire,
            history: 0,
            special_tier: None,
            long_context: false,
            prompt_tokens: None,
            strip_usage: stream && !include_usage,
        }
    }
}

/// A validated chat completion and the client's bytes.
struct ChatExchange {
    request: ChatRequest,
    body: Bytes,
    /// The client's query string (see `UpstreamCall::query`).
    query: Option<String>,
}

#[async_trait]
impl Exchange for ChatExchange {
    fn asked(&self) -> Asked<'_> {
        let r = &self.request;
        Asked {
            special_tier: r.special_tier.as_deref(),
            long_context: false,
            prompt_tokens: r.prompt_tokens,
            ..Asked::openai(
                &r.model,
                r.stream,
                &self.body,
                PromptWire::Chat,
                r.include_usage,
            )
        }
    }

    fn output_cap(&self, route: &RouteConfig) -> u64 {
        self.request.output_cap(route)
    }

    fn wire(&self) -> Wire {
        Wire::OpenAi
    }

    fn prepare(
        &self,
        provider: &dyn Provider,
        route: &RouteConfig,
        request_id: &str,
    ) -> Result<UpstreamCall, Invalid> {
        provider.prepare(UpstreamCall {
            // The client's bytes with only the gateway's own edits (design §3).
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
        provider.chat(call).await
    }
}

/// Handles one chat completion; never fails (errors become responses).
/// `usage` is the request's accounting, which ends with it whatever happens.
pub async fn chat_completions(
    gateway: Arc<Gateway>,
    runtime: Arc<Runtime>,
    caller: Caller,
    mut usage: Accounting,
    body: Bytes,
) -> Response<Body> {
    // A key with limits reserves its prompt estimate: counted in
    // validation's pass rather than in a pass of its own.
    let limited = caller.limits.reserves();
    let validated = if limited {
        validate_chat_counting(&body)
    } else {
        validate_chat(&body)
    };
    let request = match validated {
        Ok(r) => r,
        Err(invalid) => return reject(&caller, usage, GatewayError::Invalid(invalid)),
    };
    if let Some(trace) = usage.trace() {
        trace.request_params(&body, &request.spans);
    }
    let admitted = admit_model(
        &runtime,
        &caller,
        &mut usage,
        &request.model,
        request.stream,
        Endpoint::ChatCompletions,
    );
    if let Err(invalid) = admitted {
        return reject(&caller, usage, GatewayError::Invalid(invalid));
    }
    let query = caller.query.clone();
    route(
        gateway,
        runtime,
        caller,
        usage,
        &ChatExchange {
            request,
            body,
            query,
        },
    )
    .await
}

/// The one model-admission step every endpoint shares: puts the model (when
/// it is in the catalogue) and whether the request streams on its usage row,
/// then checks the name against the catalogue, the key's allow-list and the
/// endpoints the model's kind serves.
pub fn admit_model<'r>(
    runtime: &'r Runtime,
    caller: &Caller,
    usage: &mut Accounting,
    model: &str,
    stream: bool,
    endpoint: Endpoint,
) -> Result<&'r ModelConfig, Invalid> {
    let config = runtime.config.models.get(model);
    if config.is_some() {
        // A name outside the catalogue is the client's free text: it must not
        // become a metrics label or a usage row of its own (unbounded series).
        usage.record().model = model.to_owned();
    }
    usage.record().stream = stream;
    check_model(model, config.is_some(), caller.allowed.as_deref())?;
    match config {
        Some(config) if config.kind.serves(endpoint) => Ok(config),
        Some(config) => Err(wrong_endpoint(model, config.kind, endpoint)),
        // Not reached: check_model refused a name outside the catalogue.
        None => Err(Invalid {
            param: Some("model".into()),
            message: format!("The model '{model}' does not exist."),
            code: Some("model_not_found"),
        }),
    }
}

/// Answers with an error no provider was involved in. The request still
/// gets its usage row (no provider, no tokens) so a key's rejected calls show.
pub fn reject(caller: &Caller, usage: Accounting, error: GatewayError) -> Response<Body> {
    let status = error.status().as_u16();
    tracing::info!(request_id = %caller.request_id, key_id = %caller.key_id, status, error = %error, "rejected");
    usage.finish(status);
    error.respond(caller.shape, &caller.request_id)
}

/// Walks the model's route plan for one request: failover, breakers, the
/// stream hold, then the answer or the relayed stream.
pub async fn route(
    gateway: Arc<Gateway>,
    runtime: Arc<Runtime>,
    caller: Caller,
    mut usage: Accounting,
    request: &dyn Exchange,
) -> Response<Body> {
    let asked = request.asked();
    let model_name = asked.model.to_owned();
    let stream = asked.stream;
    let wire = request.wire();
    let Some(model) = runtime.config.models.get(&model_name) else {
        return reject(&caller, usage, GatewayError::NotFound(model_name));
    };
    if !model
        .routes
        .iter()
        .any(|r| runtime.providers.contains_key(&r.provider))
    {
        // Without this, every route reads as "breaker open" and clients would
        // be told to retry in 30 s forever.
        tracing::error!(request_id = %caller.request_id, model = %model_name, "no route of this model has an enabled provider: set the api_key_env variables its providers name");
        let error = GatewayError::NoProvider {
            model: model_name.clone(),
        };
        return reject(&caller, usage, error);
    }
    usage.prompt(asked.body.clone(), asked.prompt_wire, asked.history);
    if let Some(tokens) = asked.prompt_tokens {
        usage.prompt_counted(tokens);
    }
    if caller.limits.budget.is_some() && request.billed() {
        let unavailable = match gateway.budgets() {
            Budgets::Ready => None,
            Budgets::Seeding => Some(Some(crate::serve::SEED_RETRY.as_secs())),
            Budgets::NoStore => Some(None),
        };
        if let Some(retry_after_secs) = unavailable {
            let error = GatewayError::BudgetUnavailable { retry_after_secs };
            return reject(&caller, usage, error);
        }
        if let Some(tier) = asked.special_tier {
            // Budgets fail closed: a route has one price, for the standard tier.
            let invalid = Invalid {
                param: Some("service_tier".into()),
                message: format!("This key has a budget, and the gateway has no price for service_tier '{tier}' (its routes are priced for the standard tier): leave service_tier out or set it to 'auto' or 'default'."),
                code: Some("service_tier_not_priced"),
            };
            return reject(&caller, usage, GatewayError::Invalid(invalid));
        }
    }
    // Reserve the worst case before any provider is called (design §3).
    let limited = caller.limits.reserves();
    if limited && request.billed() {
        let prompt = usage.prompt_estimate();
        let worst = worst_case(
            prompt,
            model,
            |p| {
                runtime
                    .providers
                    .get(p)
                    .map(|provider| provider.speaks_messages())
            },
            |r| request.output_cap(r),
        );
        if let Err(refusal) = usage.reserve(&caller.limits, worst).await {
            return reject(&caller, usage, refusal.into());
        }
    }
    let strip_usage = asked.strip_usage;
    // A budgeted request that may be billed Anthropic's long-context prices
    // is never served by an Anthropic route that has none (budgets fail
    // closed). The estimate never under-counts: at or below the threshold
    // the standard prices apply for certain.
    let long_prompt = asked.long_context
        && caller.limits.budget.is_some()
        && request.billed()
        && usage.prompt_estimate() > ANTHROPIC_LONG_CONTEXT_ABOVE;

    let mut plan = RoutePlan::new(model.routes.len());
    let mut last_provider = String::new();
    // The first refusal by a route that cannot serve this request (the
    // gateway's own, before dispatch), answered if no route can.
    let mut refusal = None;
    let mut prepared = None;
    loop {
        let next = plan.next_route(|i| {
            let route = &model.routes[i];
            let Some(provider) = runtime.providers.get(&route.provider) else {
                // Disabled (no API key): it cannot serve anything, and must not
                // read as "open, retry in 30 s" (a model with only disabled
                // routes is answered `no_provider` above).
                return None;
            };
            if route.price.is_none() && caller.limits.budget.is_some() && request.billed() {
                // Budgets fail closed: a cost the gateway cannot know could
                // spend past the budget unseen.
                tracing::info!(request_id = %caller.request_id, provider = %route.provider, "route has no price; skipped for a key with a budget");
                refusal.get_or_insert(Invalid {
                    param: Some("model".into()),
                    message: format!("This key has a budget, and no route of the model '{model_name}' that could serve this request has a price: the gateway does not serve budgeted keys at an unknown cost. Use another model, or ask the gateway's operator to price it."),
                    code: Some("model_not_priced"),
                });
                return None;
            }
            let long_priced = route.price.is_some_and(|p| p.long_context.is_some());
            if long_prompt && provider.speaks_messages() && !long_priced {
                tracing::info!(request_id = %caller.request_id, provider = %route.provider, "route has no long-context price; skipped for a key with a budget");
                refusal.get_or_insert(Invalid {
                    param: None,
                    message: format!("This key has a budget, and this request (the context-1m beta, a prompt of over {ANTHROPIC_LONG_CONTEXT_ABOVE} tokens) would be billed Anthropic's long-context prices, which no route of the model '{model_name}' has: the gateway does not serve budgeted keys at an unknown cost. Shorten the prompt, or ask the gateway's operator to price the route's long_context tier."),
                    code: Some("long_context_not_priced"),
                });
                return None;
            }
            match request.prepare(provider.as_ref(), route, &caller.request_id) {
                Ok(call) => prepared = Some(call),
                Err(invalid) => {
                    tracing::info!(request_id = %caller.request_id, provider = %route.provider, reason = %invalid.message, "route cannot serve this request; skipped");
                    refusal.get_or_insert(invalid);
                    return None;
                }
            }
            let admission = gateway.admit(&route.provider, Instant::now());
            if let (Admission::Rejected { retry_after }, Some(trace), Some(config)) = (
                admission,
                usage.trace(),
                runtime.config.providers.get(&route.provider),
            ) {
                trace.breaker_open(&route.provider, config.kind, retry_after);
            }
            Some(admission)
        });
        let Some((index, admission)) = next else {
            break;
        };
        let route = &model.routes[index];
        let (Some(provider), Some(mut call)) =
            (runtime.providers.get(&route.provider), prepared.take())
        else {
            continue;
        };
        if !last_provider.is_empty() {
            gateway.metrics.failover(&model_name, &last_provider);
        }
        last_provider = route.provider.clone();
        usage.route(route, request.output_cap(route));
        let config = runtime.config.providers.get(&route.provider);
        let probe = admission == Admission::Probe;
        call.traceparent = usage.trace_attempt(route, config, provider.server(), probe);
        call.facts = usage.trace().is_some_and(|t| t.recording());

        let ticket = BreakerTicket::new(gateway.clone(), &route.provider, admission);
        let server = &runtime.config.server;
        let attempt = Attempt::new(
            &provider.timeouts(),
            server.stream_hold,
            server.stream_keepalive,
            Instant::now(),
        );
        let (answer_by, expiry) = attempt.answer_by(stream, admission == Admission::Probe);
        let outcome =
            match timeout_at(answer_by.into(), request.send(provider.as_ref(), call)).await {
                Ok(r) => r,
                Err(_) => Err(ProviderError::Timeout(expiry.limit.as_str())),
            };
        if let (Err(error), Some(trace)) = (&outcome, usage.trace()) {
            trace.attempt_failed(attempt_error_type(error));
        }
        let reply = match outcome {
            Ok(reply) => reply,
            Err(ProviderError::Local(why)) => {
                // The gateway's own limit (open files, ports), not the
                // provider's health: no breaker verdict, and no other route,
                // which would only fail the same way.
                ticket.settle(Outcome::Neutral);
                tracing::error!(request_id = %caller.request_id, provider = %route.provider, error = %why, "cannot connect to the provider: the sidecar is out of local resources (raise its open-file limit, e.g. LimitNOFILE)");
                gateway.metrics.local_exhausted();
                let error = GatewayError::Overloaded(why);
                usage.finish(error.status().as_u16());
                return error.respond(caller.shape, &caller.request_id);
            }
            Err(error) if error.is_retryable() => {
                tracing::warn!(request_id = %caller.request_id, provider = %route.provider, error = %error, "provider failed; trying the next route");
                plan.failed(error.route_failure());
                ticket.settle(error.breaker_outcome());
                continue;
            }
            Err(error) => {
                // The provider is healthy; the request is at fault.
                ticket.success();
                let gw_error = GatewayError::Upstream {
                    provider: route.provider.clone(),
                    error,
                };
                let status = gw_error.status().as_u16();
                tracing::info!(request_id = %caller.request_id, provider = %route.provider, status, error = %gw_error, "provider refused the request");
                usage.finish(status);
                return gw_error.respond(caller.shape, &caller.request_id);
            }
        };
        match reply {
            Reply::Complete {
                body,
                usage: tokens,
                facts,
            } => {
                ticket.success();
                request.answered(route, Answer::Body(&body));
                if let Some(trace) = usage.trace() {
                    trace.answer_body(&body, facts);
                }
                if request.billed() {
                    // A whole answer's usage is final; without one, the
                    // estimate of the text in the answer stands in (an
                    // embedding's vectors are no output tokens).
                    let generated = tokens.is_none() && request.output_cap(route) > 0;
                    let output_chars = if generated { text_chars(&body) } else { 0 };
                    usage.bill(tokens, true, output_chars);
                }
                usage.finish(200);
                return json_response(StatusCode::OK, body, &caller.request_id);
            }
            Reply::Stream(mut events) => {
                // Hold the content-free preamble (the role chunk): until content
                // arrives nothing has reached the client and failover is clean.
                // A healthy answer commits after the hold even without content,
                // so the client has its headers while a reasoning model thinks.
                let (hold_end, at_hold_end) = attempt.holding(Instant::now());
                let mut held = Vec::new();
                let mut content_held = false;
                let held_up = loop {
                    match timeout_at(hold_end.into(), events.next()).await {
                        Ok(Some(Ok(event))) if wire.is_error(&event) => {
                            break Err(format!(
                                "error event before any content: {}",
                                String::from_utf8_lossy(&event).trim()
                            ));
                        }
                        Ok(Some(Ok(event))) if is_malformed(&event) => {
                            // Cut or garbled JSON: nothing reached the client
                            // yet, so another provider can still answer whole.
                            break Err(format!(
                                "malformed event before any content: {}",
                                excerpt(&event)
                            ));
                        }
                        Ok(Some(Ok(event))) => {
                            if !has_data(&event) {
                                // A keep-alive comment (e.g. OpenRouter's
                                // ": OPENROUTER PROCESSING") carries nothing for the
                                // client; it must not use up the held-event budget
                                // and commit the stream before any content.
                                continue;
                            }
                            content_held = !wire.is_preamble(&event);
                            held.push(event);
                            if content_held || held.len() >= MAX_HELD_EVENTS {
                                break Ok(Holding::Commit);
                            }
                        }
                        Ok(Some(Err(error))) => break Err(error.to_string()),
                        Ok(None) => break Err("the stream ended before any content".into()),
                        Err(_) => break Ok(at_hold_end),
                    }
                };
                match held_up {
                    Err(reason) => {
                        tracing::warn!(request_id = %caller.request_id, provider = %route.provider, error = %reason, "stream failed before its first content; trying the next route");
                        if let Some(trace) = usage.trace() {
                            trace.attempt_failed("stream_failed_before_content".into());
                        }
                        if request.billed() {
                            // It answered: it may have billed the prompt it read.
                            let mut meter = Meter::new(wire);
                            for event in &held {
                                meter.event(event);
                            }
                            meter.bill_failed_attempt(&mut usage);
                        }
                        plan.failed(RouteFailure::Other);
                        ticket.failure();
                        continue;
                    }
                    Ok(Holding::Expire(expiry)) => {
                        // Answered but slow (a hold longer than first_content):
                        // no failover, no verdict on the provider.
                        ticket.settle(Outcome::Neutral);
                        let error = GatewayError::ContentTimeout {
                            limit: expiry.limit.as_str(),
                            timeout: expiry.timeout,
                        };
                        tracing::warn!(request_id = %caller.request_id, provider = %route.provider, error = %error, "provider answered but sent no content in time; not retried");
                        usage.finish(error.status().as_u16());
                        return error.respond(caller.shape, &caller.request_id);
                    }
                    Ok(Holding::Commit) => {}
                }
                if content_held {
                    ticket.success();
                } else {
                    // Committed by the hold, before any content: the provider
                    // answered, but a success now would reset its failure count
                    // (or close it, as a probe) while it may never send content.
                    ticket.settle(Outcome::Neutral);
                }
                for event in &held {
                    request.answered(route, Answer::Event(event));
                }
                return relay::respond(StreamStart {
                    gateway: gateway.clone(),
                    provider: route.provider.clone(),
                    first: held,
                    content_held,
                    events,
                    strip_usage,
                    wire,
                    attempt,
                    usage,
                    request_id: caller.request_id.clone(),
                });
            }
        }
    }

    // The providers a verdict is about, for the log.
    let names = |tried: &[usize]| -> Vec<&str> {
        tried
            .iter()
            .map(|&i| model.routes[i].provider.as_str())
            .collect()
    };
    let error = match plan.exhausted() {
        Exhausted::AllOpen { retry_after_secs } => GatewayError::AllOpen {
            model: model_name.clone(),
            retry_after_secs,
        },
        Exhausted::AllRateLimited { tried, retry_after } => {
            tracing::warn!(request_id = %caller.request_id, model = %model_name, tried = ?names(&tried), retry_after = ?retry_after, "every provider answered 429");
            GatewayError::RateLimited {
                model: model_name.clone(),
                retry_after,
            }
        }
        Exhausted::Unservable => match refusal {
            Some(invalid) => GatewayError::Invalid(invalid),
            None => GatewayError::NoProvider {
                model: model_name.clone(),
            },
        },
        Exhausted::AllOverloaded { tried } => {
            tracing::warn!(request_id = %caller.request_id, model = %model_name, tried = ?names(&tried), "every provider is overloaded");
            GatewayError::AllOverloaded {
                model: model_name.clone(),
            }
        }
        Exhausted::AllFailed { tried } => {
            tracing::error!(request_id = %caller.request_id, model = %model_name, tried = ?names(&tried), "every provider failed");
            GatewayError::AllFailed {
                model: model_name.clone(),
            }
        }
    };
    let status = error.status().as_u16();
    usage.finish(status);
    error.respond(caller.shape, &caller.request_id)
}

/// The most a request can consume on any route it may be sent to (failover
/// can move it): estimated prompt tokens plus the largest completion the
/// route allows after its adaptations, and the highest cost of that — every
/// prompt token at the dearest input class the route can bill (a cache
/// write on a provider that writes caches). `enabled` says whether a
/// provider is enabled and, if so, whether it writes prompt caches.
pub fn worst_case(
    prompt: u64,
    model: &afr_core::config::ModelConfig,
    enabled: impl Fn(&str) -> Option<bool>,
    output_cap: impl Fn(&RouteConfig) -> u64,
) -> Amount {
    let mut worst = Amount::default();
    for route in &model.routes {
        let Some(writes_cache) = enabled(&route.provider) else {
            continue;
        };
        let out = output_cap(route);
        worst.tokens = worst.tokens.max(prompt.saturating_add(out));
        if let Some(p) = route.price {
            worst.cost_nanos = worst
                .cost_nanos
                .max(p.worst_nanos(prompt, out, writes_cache));
        }
    }
    worst
}

/// Characters of the text in a whole answer (its strings, the generated
/// text among them): the output estimate of an answer without usage. It
/// counts ids and names too, so it over-counts by a few tokens, never under.
fn text_chars(body: &[u8]) -> usize {
    serde_json::from_slice::<serde_json::Value>(body)
        .map(|v| afr_core::messages::text_chars(&v))
        .unwrap_or(body.len())
}

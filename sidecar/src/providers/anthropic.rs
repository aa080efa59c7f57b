//! Anthropic Messages API, translated both ways by `afr_core::anthropic`:
//! OpenAI request → Messages request, Messages response or event stream →
//! `chat.completion` or `chat.completion.chunk` events, errors → OpenAI shape.

use super::{
    read_error_body, read_success_body, retry_after, send_error, sse_events, AnthropicClient,
    EventStream, MessagesEndpoint, Provider, ProviderError, Reply, UpstreamCall,
};
use afr_core::anthropic::{
    error_to_openai, request_to_anthropic, response_to_openai, StreamTranslator, TranslateError,
    ANTHROPIC_VERSION,
};
use afr_core::config::{ProviderConfig, Timeouts};
use afr_core::redact::mask_secrets;
use afr_core::validate::Invalid;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

/// An Anthropic endpoint.
pub struct Anthropic {
    server: Option<super::Server>,
    url: String,
    api_key: Option<String>,
    timeouts: Timeouts,
    client: super::client::HttpClient,
}

impl Anthropic {
    /// A provider posting to `{base_url}/messages`.
    pub fn new(
        _name: &str,
        config: &ProviderConfig,
        api_key: Option<String>,
        client: super::client::HttpClient,
    ) -> Self {
        Anthropic {
            server: super::Server::of(&config.base_url),
            url: format!("{}/messages", config.base_url.trim_end_matches('/')),
            api_key,
            timeouts: config.timeouts,
            client,
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A response that could not be translated: the provider's answer is at fault.
fn malformed(e: TranslateError) -> ProviderError {
    ProviderError::Protocol(e.to_string())
}

#[async_trait]
impl Provider for Anthropic {
    fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    fn server(&self) -> Option<&super::Server> {
        self.server.as_ref()
    }

    fn prepare(&self, mut call: UpstreamCall) -> Result<UpstreamCall, Invalid> {
        // Translation rebuilds the body; serde_json keeps each object's key
        // order (`preserve_order`), so tool and response schemas keep the
        // client's property order.
        let openai: Value = serde_json::from_slice(&call.body).map_err(|e| Invalid {
            param: None,
            message: format!("We could not parse the JSON body of your request: {e}"),
            code: None,
        })?;
        call.include_usage = openai
            .get("stream_options")
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let request = request_to_anthropic(&openai, &call.upstream_model).map_err(|e| match e {
            TranslateError::InvalidRequest { param, message } => Invalid {
                param,
                message,
                code: None,
            },
            other => Invalid {
                param: None,
                message: other.to_string(),
                code: None,
            },
        })?;
        call.body = serde_json::to_vec(&request)
            .map(Bytes::from)
            .map_err(|e| Invalid {
                param: None,
                message: e.to_string(),
                code: None,
            })?;
        Ok(call)
    }

    async fn chat(&self, call: UpstreamCall) -> Result<Reply, ProviderError> {
        let include_usage = call.include_usage;
        let mut builder = self
            .client
            .post(&self.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("anthropic-version", ANTHROPIC_VERSION)
            .correlate(&call)
            .body(call.body.clone());
        if let Some(key) = &self.api_key {
            builder = builder.header("x-api-key", key);
        }
        let response = builder.send().await.map_err(send_error)?;
        if !response.status().is_success() {
            return Err(status_error(response).await);
        }
        if call.stream {
            return Ok(Reply::Stream(translate_stream(
                sse_events(response, call.event_idle),
                include_usage,
            )));
        }
        let body = read_success_body(response).await?;
        let translated = response_to_openai(&body, now_secs()).map_err(malformed)?;
        Ok(Reply::Complete {
            body: Bytes::from(translated.body),
            usage: Some(translated.usage),
            // The span reads the translated body itself.
            facts: None,
        })
    }

    fn speaks_messages(&self) -> bool {
        true
    }

    async fn messages(
        &self,
        call: UpstreamCall,
        endpoint: MessagesEndpoint,
        client: &AnthropicClient,
    ) -> Result<Reply, ProviderError> {
        let mut url = match endpoint {
            MessagesEndpoint::Messages => self.url.clone(),
            MessagesEndpoint::CountTokens => format!("{}/count_tokens", self.url),
        };
        if let Some(query) = &client.query {
            url = format!("{url}?{query}");
        }
        // Built afresh: of the client's headers only its API version and
        // beta flags go up; its key (`x-api-key`) never does.
        let version = client
            .version
            .clone()
            .unwrap_or(http::HeaderValue::from_static(ANTHROPIC_VERSION));
        let mut builder = self
            .client
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("anthropic-version", version)
            .correlate(&call)
            .body(call.body);
        if let Some(beta) = &client.beta {
            builder = builder.header("anthropic-beta", beta.clone());
        }
        if let Some(key) = &self.api_key {
            builder = builder.header("x-api-key", key);
        }
        let response = builder.send().await.map_err(send_error)?;
        if !response.status().is_success() {
            return Err(status_error(response).await);
        }
        if call.stream {
            return Ok(Reply::Stream(sse_events(response, call.event_idle)));
        }
        let body = read_success_body(response).await?;
        // A 200 that is not one JSON object (a portal's page) fails over, as
        // on every route; the counts are Anthropic's.
        let (_, facts) = super::read_answer(&body, call.facts)?;
        let usage = afr_core::messages::response_usage(&body);
        Ok(Reply::Complete { body, usage, facts })
    }
}

/// Reads an Anthropic error response into a [`ProviderError`] (OpenAI fields).
async fn status_error(response: super::client::Response) -> ProviderError {
    let status = response.status().as_u16();
    let wait = retry_after(response.headers());
    let body = read_error_body(response).await;
    let error = error_to_openai(status, &body).body;
    ProviderError::Status {
        status,
        // Logged and possibly sent to the client: no echoed credential.
        message: mask_secrets(&error.message).into_owned(),
        kind: Some(error.kind.to_owned()),
        param: error.param,
        code: error.code.map(str::to_owned),
        retry_after: wait,
    }
}

/// Anthropic events → OpenAI `chat.completion.chunk` events.
fn translate_stream(upstream: EventStream, include_usage: bool) -> EventStream {
    struct State {
        upstream: EventStream,
        translator: StreamTranslator,
        ready: VecDeque<Bytes>,
        ended: bool,
    }
    let state = State {
        upstream,
        translator: StreamTranslator::new(include_usage, now_secs()),
        ready: VecDeque::new(),
        ended: false,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.ready.pop_front() {
                return Some((Ok(event), s));
            }
            if s.ended {
                return None;
            }
            let items = match s.upstream.next().await {
                // The translator would skip an event it cannot read; a cut
                // one is the provider's failure (failover or error event).
                Some(Ok(raw)) if afr_core::sse::is_malformed(&raw) => {
                    s.ended = true;
                    let error =
                        ProviderError::Protocol("malformed event in the Anthropic stream".into());
                    return Some((Err(error), s));
                }
                Some(Ok(raw)) => s.translator.push_raw(&raw),
                Some(Err(e)) => {
                    s.ended = true;
                    return Some((Err(e), s));
                }
                None => {
                    s.ended = true;
                    s.translator.finish()
                }
            };
            s.ready
                .extend(items.iter().map(|item| Bytes::from(item.to_sse())));
            if s.translator.is_finished() {
                s.ended = true;
            }
        }
    })
    .boxed()
}

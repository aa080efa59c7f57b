//! OpenAI-compatible providers (OpenAI, vLLM, Ollama, Groq, OpenRouter, the
//! mock): the body goes up as is and the answer comes back unchanged.

use super::{
    openai_status_error, read_answer, read_success_body, send_error, send_openai_format,
    sse_events, Provider, ProviderError, Reply, UpstreamCall,
};
use afr_core::config::{ProviderConfig, Timeouts};
use afr_core::endpoint::Endpoint;
use async_trait::async_trait;

/// An OpenAI-compatible endpoint.
pub struct OpenAi {
    server: Option<super::Server>,
    url: String,
    /// `base_url` without its trailing slash; passthrough endpoints hang off it.
    base_url: String,
    api_key: Option<String>,
    timeouts: Timeouts,
    client: super::client::HttpClient,
}

impl OpenAi {
    /// A provider posting to `{base_url}/chat/completions`.
    pub fn new(
        _name: &str,
        config: &ProviderConfig,
        api_key: Option<String>,
        client: super::client::HttpClient,
    ) -> Self {
        OpenAi {
            server: super::Server::of(&config.base_url),
            url: format!("{}/chat/completions", config.base_url.trim_end_matches('/')),
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            api_key,
            timeouts: config.timeouts,
            client,
        }
    }
}

#[async_trait]
impl Provider for OpenAi {
    fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    fn server(&self) -> Option<&super::Server> {
        self.server.as_ref()
    }

    async fn chat(&self, call: UpstreamCall) -> Result<Reply, ProviderError> {
        let mut request = self
            .client
            .post(&self.url)
            .client_query(call.query.as_deref(), &[])
            .header(http::header::CONTENT_TYPE, "application/json")
            .correlate(&call)
            .body(call.body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(send_error)?;
        if !response.status().is_success() {
            return Err(openai_status_error(response).await);
        }
        if call.stream {
            return Ok(Reply::Stream(sse_events(response, call.event_idle)));
        }
        let body = read_success_body(response).await?;
        let (usage, facts) = read_answer(&body, call.facts)?;
        Ok(Reply::Complete { body, usage, facts })
    }

    fn serves(&self, _endpoint: Endpoint) -> bool {
        // OpenAI speaks all of them; a compatible server that lacks one
        // answers 404, which is the client's answer (not a failover).
        true
    }

    async fn forward(
        &self,
        endpoint: Endpoint,
        call: UpstreamCall,
    ) -> Result<Reply, ProviderError> {
        let mut request = self
            .client
            .post(format!("{}/{}", self.base_url, endpoint.path()))
            .client_query(call.query.as_deref(), &[])
            .header(http::header::CONTENT_TYPE, "application/json")
            .correlate(&call)
            .body(call.body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        send_openai_format(request, call.stream, call.event_idle, call.facts).await
    }
}

//! OpenAI-compatible providers (OpenAI, vLLM, Ollama, Groq, OpenRouter, the
//! mock): the body goes up as is and the answer comes back unchanged.

use super::{
    body_usage, openai_status_error, read_success_body, send_error, sse_events, Provider,
    ProviderError, Reply, UpstreamCall,
};
use afr_core::config::{ProviderConfig, Timeouts};
use async_trait::async_trait;

/// An OpenAI-compatible endpoint.
pub struct OpenAi {
    url: String,
    api_key: Option<String>,
    timeouts: Timeouts,
    client: reqwest::Client,
}

impl OpenAi {
    /// A provider posting to `{base_url}/chat/completions`.
    pub fn new(
        _name: &str,
        config: &ProviderConfig,
        api_key: Option<String>,
        client: reqwest::Client,
    ) -> Self {
        OpenAi {
            url: format!("{}/chat/completions", config.base_url.trim_end_matches('/')),
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

    async fn chat(&self, call: UpstreamCall) -> Result<Reply, ProviderError> {
        let mut request = self
            .client
            .post(&self.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-request-id", &call.request_id)
            .body(call.body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(send_error)?;
        if !response.status().is_success() {
            return Err(openai_status_error(response).await);
        }
        if call.stream {
            return Ok(Reply::Stream(sse_events(response)));
        }
        let body = read_success_body(response).await?;
        let usage = body_usage(&body)?;
        Ok(Reply::Complete { body, usage })
    }
}

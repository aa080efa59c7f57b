//! Azure OpenAI: OpenAI's wire format at a deployment URL with an
//! `api-version` query parameter and an `api-key` header
//! (tests/fixtures/azure-openai-notes.md). The route's `model` names the deployment.

use super::{
    openai_status_error, read_answer, read_success_body, send_error, send_openai_format,
    sse_events, Provider, ProviderError, Reply, UpstreamCall,
};
use afr_core::config::{ProviderConfig, Timeouts};
use afr_core::endpoint::Endpoint;
use async_trait::async_trait;

/// An Azure OpenAI resource.
pub struct Azure {
    server: Option<super::Server>,
    base_url: String,
    api_version: String,
    api_key: Option<String>,
    timeouts: Timeouts,
    client: super::client::HttpClient,
}

impl Azure {
    /// A provider posting to `{base_url}/openai/deployments/{model}/chat/completions`.
    pub fn new(
        _name: &str,
        config: &ProviderConfig,
        api_key: Option<String>,
        client: super::client::HttpClient,
    ) -> Self {
        Azure {
            server: super::Server::of(&config.base_url),
            base_url: config.base_url.trim_end_matches('/').to_owned(),
            api_version: config.api_version.clone().unwrap_or_default(),
            api_key,
            timeouts: config.timeouts,
            client,
        }
    }
}

#[async_trait]
impl Provider for Azure {
    fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    fn server(&self) -> Option<&super::Server> {
        self.server.as_ref()
    }

    async fn chat(&self, call: UpstreamCall) -> Result<Reply, ProviderError> {
        let url = format!(
            "{}/openai/deployments/{}/chat/completions",
            self.base_url, call.upstream_model
        );
        let mut request = self
            .client
            .post(url)
            .client_query(call.query.as_deref(), &["api-version"])
            .query(&[("api-version", self.api_version.as_str())])
            .header(http::header::CONTENT_TYPE, "application/json")
            .correlate(&call)
            .body(call.body);
        if let Some(key) = &self.api_key {
            request = request.header("api-key", key);
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

    fn serves(&self, endpoint: Endpoint) -> bool {
        // Deployment URLs exist for these; Azure's Responses API lives on
        // its separate v1 surface and is not routed here.
        matches!(
            endpoint,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Embeddings
        )
    }

    async fn forward(
        &self,
        endpoint: Endpoint,
        call: UpstreamCall,
    ) -> Result<Reply, ProviderError> {
        let url = format!(
            "{}/openai/deployments/{}/{}",
            self.base_url,
            call.upstream_model,
            endpoint.path()
        );
        let mut request = self
            .client
            .post(url)
            .client_query(call.query.as_deref(), &["api-version"])
            .query(&[("api-version", self.api_version.as_str())])
            .header(http::header::CONTENT_TYPE, "application/json")
            .correlate(&call)
            .body(call.body);
        if let Some(key) = &self.api_key {
            request = request.header("api-key", key);
        }
        send_openai_format(request, call.stream, call.event_idle, call.facts).await
    }
}

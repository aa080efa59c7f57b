//! Anthropic Messages API, translated both ways by `afr_core::anthropic`.

use super::{Provider, ProviderError, Reply, UpstreamCall};
use afr_core::config::{ProviderConfig, Timeouts};
use async_trait::async_trait;

/// An Anthropic endpoint.
pub struct Anthropic {
    timeouts: Timeouts,
}

impl Anthropic {
    /// A provider posting to `{base_url}/messages`.
    pub fn new(
        _name: &str,
        config: &ProviderConfig,
        _api_key: Option<String>,
        _client: reqwest::Client,
    ) -> Self {
        Anthropic {
            timeouts: config.timeouts,
        }
    }
}

#[async_trait]
impl Provider for Anthropic {
    fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    async fn chat(&self, _call: UpstreamCall) -> Result<Reply, ProviderError> {
        Err(ProviderError::Protocol(
            "anthropic translation is not wired yet".into(),
        ))
    }
}

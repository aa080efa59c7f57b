//! Anthropic Messages stream events → OpenAI `chat.completion.chunk` events.
//!
//! Mapping: `message_start` → the role chunk; `text_delta` → a content chunk;
//! a `tool_use` block start and its `input_json_delta`s → `tool_calls` deltas;
//! `message_delta` → the finish chunk (and the final output token count);
//! `message_stop` → the usage chunk (`"choices":[]`, only with
//! `include_usage`) then `[DONE]`; `event: error` → an OpenAI `{"error":…}`
//! event that ends the stream. `ping`, `content_block_stop`, thinking blocks
//! and unknown events produce nothing.

use serde::{Deserialize, Serialize};

use super::{error_from_wire, finish_reason, ErrorInner, Tokens, UsageOut, UsageWire};
use crate::error::ErrorBody;
use crate::sse::{event_data, event_name, TokenUsage};

/// One event for the OpenAI client, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamItem {
    /// A `chat.completion.chunk` JSON object. `content` is true when it
    /// carries generated text or tool-call data (false for the role, finish
    /// and usage chunks): a gateway that fails over only before the first
    /// content byte can hold back the others until then.
    Chunk {
        /// The chunk JSON.
        json: String,
        /// Whether it carries generated content.
        content: bool,
    },
    /// An `{"error":{…}}` JSON object: the provider failed mid-stream (or the
    /// stream was cut or malformed). Send it and close; nothing follows.
    Error(String),
    /// The stream completed: send `data: [DONE]`.
    Done,
}

impl StreamItem {
    /// The item framed as one SSE event (`data: …` and a blank line; never an
    /// `event:` line, which older OpenAI SDKs mis-parse).
    pub fn to_sse(&self) -> String {
        match self {
            StreamItem::Chunk { json, .. } | StreamItem::Error(json) => format!("data: {json}\n\n"),
            StreamItem::Done => "data: [DONE]\n\n".to_owned(),
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum EventWire {
    MessageStart {
        message: MessageStartWire,
    },
    ContentBlockStart {
        index: u64,
        content_block: BlockStartWire,
    },
    ContentBlockDelta {
        index: u64,
        delta: DeltaWire,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaWire,
        #[serde(default)]
        usage: Option<UsageWire>,
    },
    MessageStop,
    Error {
        #[allow(dead_code)] // parsed again by error_from_wire, which also copes with junk
        error: ErrorInner,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageStartWire {
    #[serde(default)]
    id: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    usage: UsageWire,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockStartWire {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum DeltaWire {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize, Default)]
struct MessageDeltaWire {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Serialize)]
struct ChunkOut<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChoiceOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<UsageOut>>,
}

#[derive(Serialize)]
struct ChoiceOut<'a> {
    index: u32,
    delta: DeltaOut<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct DeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolDeltaOut<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolDeltaOut<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDeltaOut<'a>,
}

#[derive(Serialize)]
struct FunctionDeltaOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

/// Turns one Anthropic Messages stream into OpenAI chunks, event by event.
///
/// Feed it every upstream event in order ([`push_raw`](Self::push_raw) with
/// the raw bytes from [`crate::sse::EventFramer`], or
/// [`push_event`](Self::push_event) with name and data), then call
/// [`finish`](Self::finish) when the upstream body ends.
#[derive(Debug)]
pub struct StreamTranslator {
    include_usage: bool,
    created: u64,
    id: String,
    model: String,
    tokens: Tokens,
    saw_start: bool,
    finish_sent: bool,
    ended: bool,
    /// Anthropic content-block index → OpenAI tool-call index.
    tools: Vec<(u64, u32)>,
}

impl StreamTranslator {
    /// A translator for one stream. `include_usage`: whether the client asked
    /// for `stream_options.include_usage` (then every chunk carries
    /// `"usage":null` and a usage chunk precedes `[DONE]`, as OpenAI does);
    /// `created`: the chunks' Unix timestamp, from the caller's clock.
    pub fn new(include_usage: bool, created: u64) -> Self {
        StreamTranslator {
            include_usage,
            created,
            id: String::new(),
            model: String::new(),
            tokens: Tokens::default(),
            saw_start: false,
            finish_sent: false,
            ended: false,
            tools: Vec::new(),
        }
    }

    /// Token counts so far (final once the stream is done); `None` before
    /// `message_start`.
    pub fn usage(&self) -> Option<TokenUsage> {
        self.saw_start.then(|| self.tokens.usage())
    }

    /// Whether the stream has ended (done or failed); later events are ignored.
    pub fn is_finished(&self) -> bool {
        self.ended
    }

    /// Translates one raw SSE event (its bytes including the blank line).
    pub fn push_raw(&mut self, raw: &[u8]) -> Vec<StreamItem> {
        match event_data(raw) {
            Some(data) => self.push_event(event_name(raw).as_deref(), &data),
            None => Vec::new(), // comment-only or empty event
        }
    }

    /// Translates one event given its `event:` name (if any) and `data`.
    pub fn push_event(&mut self, event: Option<&str>, data: &str) -> Vec<StreamItem> {
        if self.ended {
            return Vec::new();
        }
        if event == Some("error") {
            return self.fail(error_from_wire(data.as_bytes(), 0));
        }
        let parsed = match serde_json::from_str::<EventWire>(data) {
            Ok(e) => e,
            Err(e) => {
                return self.fail(ErrorBody::new(
                    "server_error",
                    Some("bad_upstream_response"),
                    format!("malformed event from the Anthropic provider: {e}"),
                ))
            }
        };
        let mut out = Vec::new();
        match parsed {
            EventWire::MessageStart { message } => {
                self.id = message.id;
                self.model = message.model;
                self.tokens.update(&message.usage);
                self.saw_start = true;
                out.push(self.chunk(
                    DeltaOut {
                        role: Some("assistant"),
                        content: Some(""),
                        ..DeltaOut::default()
                    },
                    None,
                    false,
                ));
            }
            EventWire::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                BlockStartWire::Text { text } if !text.is_empty() => out.push(self.text(&text)),
                BlockStartWire::ToolUse { id, name } => {
                    let tool = self.tools.len() as u32;
                    self.tools.push((index, tool));
                    let delta = DeltaOut {
                        tool_calls: Some([ToolDeltaOut {
                            index: tool,
                            id: Some(&id),
                            kind: Some("function"),
                            function: FunctionDeltaOut {
                                name: Some(&name),
                                arguments: "",
                            },
                        }]),
                        ..DeltaOut::default()
                    };
                    out.push(self.chunk(delta, None, true));
                }
                _ => {}
            },
            EventWire::ContentBlockDelta { index, delta } => match delta {
                DeltaWire::TextDelta { text } => out.push(self.text(&text)),
                DeltaWire::InputJsonDelta { partial_json } => {
                    if let Some(&(_, tool)) = self.tools.iter().find(|(i, _)| *i == index) {
                        let delta = DeltaOut {
                            tool_calls: Some([ToolDeltaOut {
                                index: tool,
                                id: None,
                                kind: None,
                                function: FunctionDeltaOut {
                                    name: None,
                                    arguments: &partial_json,
                                },
                            }]),
                            ..DeltaOut::default()
                        };
                        out.push(self.chunk(delta, None, true));
                    }
                }
                DeltaWire::Other => {}
            },
            EventWire::MessageDelta { delta, usage } => {
                if let Some(u) = usage {
                    self.tokens.update(&u);
                }
                if let Some(reason) = delta.stop_reason {
                    out.push(self.finish_chunk(finish_reason(&reason)));
                }
            }
            EventWire::MessageStop => {
                if !self.finish_sent {
                    out.push(self.finish_chunk("stop"));
                }
                if self.include_usage {
                    out.push(self.usage_chunk());
                }
                out.push(StreamItem::Done);
                self.ended = true;
            }
            EventWire::Error { .. } => return self.fail(error_from_wire(data.as_bytes(), 0)),
            EventWire::Other => {}
        }
        out
    }

    /// The upstream body ended. A stream cut before `message_stop` ends with
    /// an error event, never a silent truncation.
    pub fn finish(&mut self) -> Vec<StreamItem> {
        if self.ended {
            return Vec::new();
        }
        self.fail(ErrorBody::new(
            "server_error",
            Some("stream_truncated"),
            "the Anthropic provider ended the stream before it was complete",
        ))
    }

    fn fail(&mut self, body: ErrorBody) -> Vec<StreamItem> {
        self.ended = true;
        vec![StreamItem::Error(body.to_json())]
    }

    fn text(&self, text: &str) -> StreamItem {
        let delta = DeltaOut {
            content: Some(text),
            ..DeltaOut::default()
        };
        self.chunk(delta, None, true)
    }

    fn finish_chunk(&mut self, reason: &'static str) -> StreamItem {
        self.finish_sent = true;
        self.chunk(DeltaOut::default(), Some(reason), false)
    }

    fn chunk(
        &self,
        delta: DeltaOut<'_>,
        finish: Option<&'static str>,
        content: bool,
    ) -> StreamItem {
        let out = ChunkOut {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![ChoiceOut {
                index: 0,
                delta,
                logprobs: None,
                finish_reason: finish,
            }],
            usage: self.include_usage.then_some(None),
        };
        StreamItem::Chunk {
            json: serde_json::to_string(&out).unwrap_or_default(),
            content,
        }
    }

    fn usage_chunk(&self) -> StreamItem {
        let out = ChunkOut {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: Vec::new(),
            usage: Some(Some(self.tokens.out())),
        };
        StreamItem::Chunk {
            json: serde_json::to_string(&out).unwrap_or_default(),
            content: false,
        }
    }
}

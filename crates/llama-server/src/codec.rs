//! Text ↔ tokens as the HTTP layer needs it: prompt encoding, the chat
//! template and `/tokenize`. A trait, like [`crate::backend::Backend`], so the
//! handlers do not depend on how a model directory spells its tokenizer.
//! Every method may be slow (long prompts): call them through
//! [`crate::state::AppState::blocking`], on the codec pool.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: ChatRole,
    pub content: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CodecError {
    /// The conversation cannot be rendered (role order, empty, ...): the client's fault.
    #[error("{0}")]
    InvalidConversation(String),
    /// The text cannot be encoded: the client's fault.
    #[error("{0}")]
    InvalidInput(String),
    #[error("{0}")]
    Internal(String),
}

/// A prompt that asks for the text between a prefix and a suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfillPrompt {
    pub ids: Vec<u32>,
    /// Generation stops here (finish_reason `stop`), like at EOS.
    pub end_token: u32,
}

/// What a client needs to tokenize and template as the server does: the
/// special tokens and the chat template as Jinja (`GET /tokenizer_info`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerInfo {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
    /// Whether `encode(text, add_special_tokens = true)` starts with BOS.
    pub add_bos_token: bool,
    /// The model's own template, or Meta's Llama 2 template (as transformers
    /// ships it) when the model has none: what the chat endpoint renders.
    pub chat_template: String,
}

pub trait Codec: Send + Sync + 'static {
    /// `add_special_tokens` adds BOS as the tokenizer's config asks.
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, CodecError>;
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, CodecError>;
    /// The prompt ids of a conversation, ready for the model (BOS included).
    fn render_chat(
        &self,
        turns: &[ChatTurn],
        default_system_prompt: Option<&str>,
    ) -> Result<Vec<u32>, CodecError>;
    /// Code Llama's fill-in-the-middle prompt for text between `prefix` and
    /// `suffix`, with the token that ends the middle; `None` for models
    /// without infill tokens.
    fn infill_prompt(&self, prefix: &str, suffix: &str)
        -> Result<Option<InfillPrompt>, CodecError>;
    fn vocab_size(&self) -> usize;
    /// The vocabulary piece of `id`, e.g. `▁Hello` or `<0x0A>`.
    fn token_str(&self, id: u32) -> Option<String>;
    /// The text of `id` alone as logprobs show it (` Hello`, `\n`).
    fn token_text(&self, id: u32) -> String;
    /// `decode(ids)` (special tokens skipped) and, per token, the character
    /// offset in it where the token's text begins.
    fn decode_with_offsets(&self, ids: &[u32]) -> (String, Vec<usize>);
    fn tokenizer_info(&self) -> TokenizerInfo;
}

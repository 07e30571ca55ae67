//! [`Codec`] over the engine's Llama tokenizer and chat template.

use llama_engine::chat_template::{
    ChatMessage, ChatTemplate, ChatTemplateError, Role, LLAMA2_CHAT_TEMPLATE,
};
use llama_engine::detokenizer::IncrementalDetokenizer;
use llama_engine::tokenizer::{Tokenizer, TokenizerError};

use crate::codec::{ChatRole, ChatTurn, Codec, CodecError, InfillPrompt, TokenizerInfo};

pub struct LlamaCodec {
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

impl LlamaCodec {
    pub fn new(tokenizer: Tokenizer, template: ChatTemplate) -> Self {
        Self {
            tokenizer,
            template,
        }
    }

    /// Tokenizer and chat template of a model directory.
    pub fn from_model_dir(dir: &std::path::Path) -> anyhow::Result<Self> {
        let tokenizer = Tokenizer::from_model_dir(dir)?;
        let template = ChatTemplate::from_model_dir(dir)?;
        Ok(Self::new(tokenizer, template))
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

fn tokenizer_error(err: TokenizerError) -> CodecError {
    match err {
        TokenizerError::Encode(message) | TokenizerError::Decode(message) => {
            CodecError::InvalidInput(message)
        }
        other => CodecError::Internal(other.to_string()),
    }
}

impl Codec for LlamaCodec {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, CodecError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(tokenizer_error)
    }

    fn infill_prompt(
        &self,
        prefix: &str,
        suffix: &str,
    ) -> Result<Option<InfillPrompt>, CodecError> {
        let (Some(tokens), Some(ids)) = (
            self.tokenizer.infill_tokens(),
            self.tokenizer
                .encode_infill(prefix, suffix)
                .map_err(tokenizer_error)?,
        ) else {
            return Ok(None);
        };
        Ok(Some(InfillPrompt {
            ids,
            end_token: tokens.end,
        }))
    }

    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, CodecError> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(tokenizer_error)
    }

    fn render_chat(
        &self,
        turns: &[ChatTurn],
        default_system_prompt: Option<&str>,
    ) -> Result<Vec<u32>, CodecError> {
        let messages: Vec<ChatMessage> = turns
            .iter()
            .map(|t| {
                let role = match t.role {
                    ChatRole::System => Role::System,
                    ChatRole::User => Role::User,
                    ChatRole::Assistant => Role::Assistant,
                };
                ChatMessage::new(role, t.content.clone())
            })
            .collect();
        self.template
            .render_ids(&messages, &self.tokenizer, default_system_prompt)
            .map_err(|err| match err {
                ChatTemplateError::Empty
                | ChatTemplateError::RoleOrder { .. }
                | ChatTemplateError::LastNotUser { .. }
                | ChatTemplateError::Raised(_) => CodecError::InvalidConversation(err.to_string()),
                ChatTemplateError::Tokenizer(e) => tokenizer_error(e),
                other => CodecError::Internal(other.to_string()),
            })
    }

    fn vocab_size(&self) -> usize {
        self.tokenizer.vocab_size()
    }

    fn token_str(&self, id: u32) -> Option<String> {
        self.tokenizer.hf().id_to_token(id)
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.token_text(id)
    }

    fn decode_with_offsets(&self, ids: &[u32]) -> (String, Vec<usize>) {
        // Streamed as generated text is, so offsets mean the same for both.
        let mut detok = IncrementalDetokenizer::new(self.tokenizer.shared_hf(), &[]);
        let mut chars = 0;
        let mut offsets = Vec::with_capacity(ids.len());
        for &id in ids {
            offsets.push(chars);
            chars += detok.push(id).chars().count();
        }
        detok.finish();
        (detok.text().to_string(), offsets)
    }

    fn tokenizer_info(&self) -> TokenizerInfo {
        let piece = |id: Option<u32>| id.and_then(|id| self.token_str(id));
        let hf = self.tokenizer.hf();
        TokenizerInfo {
            bos_token: piece(self.tokenizer.bos_id()),
            eos_token: piece(self.tokenizer.eos_id()),
            unk_token: hf.token_to_id("<unk>").and_then(|id| hf.id_to_token(id)),
            pad_token: hf
                .get_padding()
                .map(|p| p.pad_token.clone())
                .filter(|t| hf.token_to_id(t).is_some()),
            add_bos_token: self.tokenizer.add_bos(),
            chat_template: match &self.template {
                ChatTemplate::Llama2 => LLAMA2_CHAT_TEMPLATE.to_string(),
                ChatTemplate::Jinja { source, .. } => source.clone(),
            },
        }
    }
}

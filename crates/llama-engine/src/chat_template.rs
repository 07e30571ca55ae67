//! Chat messages to prompt ids.
//!
//! Llama 2 chat models are built at the token level, exactly like Meta's
//! reference `chat_completion` (facebookresearch/llama `llama/generation.py`):
//! each `[INST] user [/INST] answer ` pair is encoded on its own between
//! explicit BOS and EOS ids. Rendering the HF Jinja template to a string and
//! tokenizing that gives the same ids except when user text contains `<s>` or
//! `</s>`, which the string route turns into control tokens (prompt injection),
//! so the string route is kept only for fine-tunes with a template of their own.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::tokenizer::{token_content, Tokenizer, TokenizerError};

const B_INST: &str = "[INST]";
const E_INST: &str = "[/INST]";
const B_SYS: &str = "<<SYS>>\n";
const E_SYS: &str = "\n<</SYS>>\n\n";

/// The `chat_template` of meta-llama/Llama-2-*-chat-hf: a model that ships it
/// gets the exact token-level rendering instead.
pub const LLAMA2_CHAT_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("messages must not be empty")]
    Empty,
    #[error(
        "message {index} has role {found} where {expected} was expected: \
         roles must alternate user/assistant after an optional system message"
    )]
    RoleOrder {
        index: usize,
        expected: Role,
        found: Role,
    },
    #[error("the last message must have role user, found {found}")]
    LastNotUser { found: Role },
    #[error("the chat template raised an exception: {0}")]
    Raised(String),
    #[error("cannot render the chat template: {0}")]
    Render(String),
    #[error("the tokenizer has no {0} token, which the Llama 2 chat format needs")]
    MissingSpecialToken(&'static str),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("cannot read the chat template from {path}: {message}")]
    Config { path: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatTemplate {
    /// Meta's reference format, built at the token level.
    Llama2,
    /// A fine-tune's own HF chat template, rendered with minijinja.
    Jinja {
        source: String,
        bos_token: String,
        eos_token: String,
    },
}

impl ChatTemplate {
    /// Reads `chat_template` from `tokenizer_config.json` (or a
    /// `chat_template.jinja` next to it, as newer transformers save it).
    /// No template, or Llama 2's own, selects [`ChatTemplate::Llama2`].
    pub fn from_model_dir(dir: &Path) -> Result<Self, ChatTemplateError> {
        if let Some(path) = llama_model::gguf_path(dir).map_err(|e| config_error(dir, e))? {
            return Self::from_gguf(&path);
        }
        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let jinja_path = dir.join("chat_template.jinja");
        let source = match template_source(&config["chat_template"]) {
            Some(source) => source,
            None if jinja_path.is_file() => {
                std::fs::read_to_string(&jinja_path).map_err(|e| config_error(&jinja_path, e))?
            }
            None => return Ok(ChatTemplate::Llama2),
        };
        if without_whitespace(&source) == without_whitespace(LLAMA2_CHAT_TEMPLATE) {
            return Ok(ChatTemplate::Llama2);
        }
        let map = read_json_if_present(&dir.join("special_tokens_map.json"))?;
        let special = |key: &str, fallback: &str| {
            token_content(config.get(key))
                .or_else(|| token_content(map.get(key)))
                .unwrap_or_else(|| fallback.to_owned())
        };
        Ok(ChatTemplate::Jinja {
            bos_token: special("bos_token", "<s>"),
            eos_token: special("eos_token", "</s>"),
            source,
        })
    }

    /// A GGUF file's `tokenizer.chat_template`; Llama 2's format when it has none.
    pub fn from_gguf(path: &Path) -> Result<Self, ChatTemplateError> {
        let vocab = llama_model::GgufFile::open(path)
            .and_then(|g| g.vocab())
            .map_err(|e| config_error(path, e))?;
        let Some(source) = vocab.chat_template else {
            return Ok(ChatTemplate::Llama2);
        };
        if without_whitespace(&source) == without_whitespace(LLAMA2_CHAT_TEMPLATE) {
            return Ok(ChatTemplate::Llama2);
        }
        let piece = |id: Option<u32>, fallback: &str| {
            id.and_then(|i| vocab.tokens.get(i as usize))
                .cloned()
                .unwrap_or_else(|| fallback.to_owned())
        };
        Ok(ChatTemplate::Jinja {
            bos_token: piece(vocab.bos_id, "<s>"),
            eos_token: piece(vocab.eos_id, "</s>"),
            source,
        })
    }

    /// The prompt ids for `messages`, ending where the assistant's answer starts.
    /// `default_system_prompt` applies only when the request has no system message.
    pub fn render_ids(
        &self,
        messages: &[ChatMessage],
        tokenizer: &Tokenizer,
        default_system_prompt: Option<&str>,
    ) -> Result<Vec<u32>, ChatTemplateError> {
        match self {
            ChatTemplate::Llama2 => {
                let bos = tokenizer
                    .bos_id()
                    .ok_or(ChatTemplateError::MissingSpecialToken("BOS"))?;
                let eos = tokenizer
                    .eos_id()
                    .ok_or(ChatTemplateError::MissingSpecialToken("EOS"))?;
                let mut ids = Vec::new();
                for turn in llama2_turns(messages, default_system_prompt)? {
                    ids.push(bos);
                    ids.extend(tokenizer.encode_plain(&turn.text)?);
                    if turn.closed {
                        ids.push(eos);
                    }
                }
                Ok(ids)
            }
            ChatTemplate::Jinja { .. } => {
                let text = self.render_text(messages, default_system_prompt)?;
                // The template writes its own BOS as text.
                Ok(tokenizer.encode(&text, false)?)
            }
        }
    }

    /// The prompt as a string, for logs and tests. For Llama 2 it is what HF's
    /// template renders; tokenizing it is not safe, use [`Self::render_ids`].
    pub fn render_text(
        &self,
        messages: &[ChatMessage],
        default_system_prompt: Option<&str>,
    ) -> Result<String, ChatTemplateError> {
        match self {
            ChatTemplate::Llama2 => {
                let mut text = String::new();
                for turn in llama2_turns(messages, default_system_prompt)? {
                    text.push_str("<s>");
                    text.push_str(&turn.text);
                    if turn.closed {
                        text.push_str("</s>");
                    }
                }
                Ok(text)
            }
            ChatTemplate::Jinja {
                source,
                bos_token,
                eos_token,
            } => {
                let has_system = messages.iter().any(|m| m.role == Role::System);
                let default = default_system_prompt.filter(|_| !has_system);
                let mut all: Vec<ChatMessage> = default
                    .map(|s| ChatMessage::new(Role::System, s))
                    .into_iter()
                    .collect();
                all.extend_from_slice(messages);
                render_jinja(source, &all, bos_token, eos_token)
            }
        }
    }
}

/// One BOS-started segment of a Llama 2 prompt; `closed` segments (a finished
/// user/assistant exchange) end with EOS.
struct Turn {
    text: String,
    closed: bool,
}

fn llama2_turns(
    messages: &[ChatMessage],
    default_system_prompt: Option<&str>,
) -> Result<Vec<Turn>, ChatTemplateError> {
    let (system, dialog) = match messages.split_first() {
        None => return Err(ChatTemplateError::Empty),
        Some((first, rest)) if first.role == Role::System => (Some(first.content.as_str()), rest),
        Some(_) => (default_system_prompt, messages),
    };
    let offset = messages.len() - dialog.len();
    for (i, message) in dialog.iter().enumerate() {
        let expected = [Role::User, Role::Assistant][i % 2];
        if message.role != expected {
            let (index, found) = (i + offset, message.role);
            return Err(ChatTemplateError::RoleOrder {
                index,
                expected,
                found,
            });
        }
    }
    let found = dialog.last().map_or(Role::System, |m| m.role);
    if found != Role::User {
        return Err(ChatTemplateError::LastNotUser { found });
    }

    // Alternation was checked, so every chunk is a user message and its
    // answer except the last, which is the open user turn.
    let mut turns = Vec::with_capacity(dialog.len().div_ceil(2));
    for (i, pair) in dialog.chunks(2).enumerate() {
        // Meta folds the system prompt into the first user message before
        // stripping: the system text keeps its whitespace, only the combined
        // message's ends are trimmed.
        let user = match system {
            Some(system) if i == 0 => format!("{B_SYS}{system}{E_SYS}{}", pair[0].content),
            _ => pair[0].content.clone(),
        };
        let user = py_strip(&user);
        turns.push(match pair {
            [_, answer] => Turn {
                text: format!("{B_INST} {user} {E_INST} {} ", py_strip(&answer.content)),
                closed: true,
            },
            _ => Turn {
                text: format!("{B_INST} {user} {E_INST}"),
                closed: false,
            },
        });
    }
    Ok(turns)
}

/// Python's `str.strip()`: Rust's `trim` lacks the ASCII separators
/// U+001C..U+001F, which Python counts as whitespace.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

fn render_jinja(
    source: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, ChatTemplateError> {
    let mut env = minijinja::Environment::new();
    // As transformers' sandboxed Jinja environment is configured.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // minijinja's error only carries a rendered message, so the template's
    // own message is kept aside to report it as a request error.
    let raised = Arc::new(Mutex::new(None::<String>));
    let sink = Arc::clone(&raised);
    env.add_function(
        "raise_exception",
        move |message: String| -> Result<String, minijinja::Error> {
            *sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    let ctx = minijinja::context! {
        messages => messages,
        bos_token => bos_token,
        eos_token => eos_token,
        add_generation_prompt => true,
    };
    env.render_str(source, ctx).map_err(|e| {
        match raised.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(message) => ChatTemplateError::Raised(message),
            None => ChatTemplateError::Render(format!("{e:#}")),
        }
    })
}

/// HF allows a single template string or a list of named templates.
fn template_source(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

fn without_whitespace(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

/// A missing file reads as `null`: model repositories omit these freely.
fn read_json_if_present(path: &Path) -> Result<Value, ChatTemplateError> {
    if !path.is_file() {
        return Ok(Value::Null);
    }
    let bytes = std::fs::read(path).map_err(|e| config_error(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| config_error(path, e))
}

fn config_error(path: &Path, e: impl std::fmt::Display) -> ChatTemplateError {
    ChatTemplateError::Config {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const SYSTEM: Role = Role::System;
    const USER: Role = Role::User;
    const ASSISTANT: Role = Role::Assistant;

    fn model_dir() -> std::path::PathBuf {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/tiny-llama").into()
    }

    fn tok() -> Tokenizer {
        Tokenizer::from_model_dir(&model_dir()).unwrap()
    }

    fn fixture() -> Value {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
        let bytes = std::fs::read(format!("{dir}/llama2-chat-template.json")).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    fn jinja(source: &str) -> ChatTemplate {
        let (bos_token, eos_token) = ("<s>".into(), "</s>".into());
        ChatTemplate::Jinja {
            source: source.into(),
            bos_token,
            eos_token,
        }
    }

    /// Each fixture conversation as (name, messages, case).
    fn conversations(fx: &Value) -> Vec<(String, Vec<ChatMessage>, &Value)> {
        let list = fx["conversations"].as_array().unwrap();
        assert_eq!(list.len(), 12);
        let parse = |c: &Value| serde_json::from_value(c["messages"].clone()).unwrap();
        list.iter()
            .map(|c| (c["name"].to_string(), parse(c), c))
            .collect()
    }

    fn ids(value: &Value) -> Vec<u32> {
        serde_json::from_value(value.clone()).unwrap()
    }

    fn msgs(list: &[(Role, &str)]) -> Vec<ChatMessage> {
        list.iter()
            .map(|&(role, content)| ChatMessage::new(role, content))
            .collect()
    }

    fn llama2_text(list: &[(Role, &str)], default: Option<&str>) -> String {
        ChatTemplate::Llama2
            .render_text(&msgs(list), default)
            .unwrap()
    }

    #[test]
    fn model_dir_with_llama2_template_is_llama2() {
        assert_eq!(
            ChatTemplate::from_model_dir(&model_dir()).unwrap(),
            ChatTemplate::Llama2
        );
        assert_eq!(fixture()["chat_template"], LLAMA2_CHAT_TEMPLATE);
    }

    #[test]
    fn llama2_ids_equal_meta_for_every_conversation() {
        let (tok, fx) = (tok(), fixture());
        for (name, messages, case) in conversations(&fx) {
            let got = ChatTemplate::Llama2
                .render_ids(&messages, &tok, None)
                .unwrap();
            assert_eq!(got, ids(&case["meta_ids"]), "{name}");
            let text = ChatTemplate::Llama2.render_text(&messages, None).unwrap();
            assert_eq!(text, case["prompt"], "{name}");
        }
    }

    #[test]
    fn jinja_path_renders_fixture_prompts() {
        let (tok, fx) = (tok(), fixture());
        let template = jinja(fx["chat_template"].as_str().unwrap());
        for (name, messages, case) in conversations(&fx) {
            assert_eq!(
                template.render_text(&messages, None).unwrap(),
                case["prompt"],
                "{name}"
            );
            let got = template.render_ids(&messages, &tok, None).unwrap();
            assert_eq!(got, ids(&case["template_tokenized_ids"]), "{name}");
        }
    }

    #[test]
    fn default_system_prompt_only_without_a_system_message() {
        let with_default = llama2_text(&[(USER, "Hello")], Some("Be kind."));
        assert_eq!(
            with_default,
            "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHello [/INST]"
        );
        let tok = tok();
        let (user, explicit) = (
            msgs(&[(USER, "Hello")]),
            msgs(&[(SYSTEM, "Be kind."), (USER, "Hello")]),
        );
        let defaulted = ChatTemplate::Llama2
            .render_ids(&user, &tok, Some("Be kind."))
            .unwrap();
        assert_eq!(
            defaulted,
            ChatTemplate::Llama2
                .render_ids(&explicit, &tok, None)
                .unwrap()
        );
        // An explicit (even empty) system message wins over the default.
        let empty_system = llama2_text(&[(SYSTEM, ""), (USER, "Hello")], Some("Be kind."));
        assert_eq!(
            empty_system,
            "<s>[INST] <<SYS>>\n\n<</SYS>>\n\nHello [/INST]"
        );
        let hf = jinja(LLAMA2_CHAT_TEMPLATE)
            .render_text(&user, Some("Be kind."))
            .unwrap();
        assert_eq!(hf, with_default);
    }

    #[test]
    fn strip_follows_python() {
        assert_eq!(py_strip("\u{1c}\u{1f} a b\u{3000}\u{85}\u{a0}"), "a b");
        assert_eq!(py_strip("\u{200b}x"), "\u{200b}x");
        assert_eq!(
            llama2_text(&[(USER, "\u{1e} hi \u{1d}")], None),
            "<s>[INST] hi [/INST]"
        );
    }

    #[test]
    fn bad_role_orders_error() {
        let tok = tok();
        let error = |list: &[(Role, &str)]| {
            let err = ChatTemplate::Llama2
                .render_ids(&msgs(list), &tok, None)
                .unwrap_err();
            let text_err = ChatTemplate::Llama2.render_text(&msgs(list), Some("default"));
            assert_eq!(text_err.unwrap_err().to_string(), err.to_string());
            err.to_string()
        };
        assert_eq!(error(&[]), "messages must not be empty");
        let last = "the last message must have role user, found";
        assert_eq!(error(&[(SYSTEM, "s")]), format!("{last} system"));
        assert_eq!(
            error(&[(USER, "u"), (ASSISTANT, "a")]),
            format!("{last} assistant")
        );
        let order = "roles must alternate user/assistant after an optional system message";
        let cases: [(&[(Role, &str)], &str); 4] = [
            (
                &[(ASSISTANT, "a"), (USER, "u")],
                "message 0 has role assistant where user",
            ),
            (
                &[(USER, "u"), (SYSTEM, "s"), (USER, "u")],
                "message 1 has role system where assistant",
            ),
            (
                &[(SYSTEM, "s"), (SYSTEM, "s"), (USER, "u")],
                "message 1 has role system where user",
            ),
            (
                &[(USER, "u"), (USER, "u")],
                "message 1 has role user where assistant",
            ),
        ];
        for (list, prefix) in cases {
            assert_eq!(error(list), format!("{prefix} was expected: {order}"));
        }

        let err = jinja(LLAMA2_CHAT_TEMPLATE).render_text(&msgs(&[(USER, "u"), (USER, "u")]), None);
        let expected = "Conversation roles must alternate user/assistant/user/assistant/...";
        assert!(
            matches!(&err, Err(ChatTemplateError::Raised(m)) if m == expected),
            "{err:?}"
        );
    }

    #[test]
    fn custom_chatml_template_renders() {
        let source = "{% for m in messages %}\n\
                      {{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>' }}\n\
                      {% endfor %}\n\
                      {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let messages = [
            (SYSTEM, "Be brief."),
            (USER, " Hi "),
            (ASSISTANT, "Hello."),
            (USER, "Bye"),
        ];
        let messages = msgs(&messages);
        let expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                        <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
                        <|im_start|>assistant\n";
        // trim_blocks drops the newline after a block tag (not after `}}`), as in transformers.
        assert_eq!(
            jinja(source).render_text(&messages, None).unwrap(),
            expected
        );
        let (tok, template) = (tok(), jinja(source));
        let got = template.render_ids(&messages, &tok, None).unwrap();
        assert_eq!(got, tok.encode(expected, false).unwrap());
        let broken = jinja("{% for %}").render_text(&messages, None);
        assert!(
            matches!(broken, Err(ChatTemplateError::Render(_))),
            "{broken:?}"
        );
    }

    #[test]
    fn model_dir_with_other_template_is_jinja() {
        let dir = std::env::temp_dir().join(format!("llama-chat-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = |config: Value| {
            std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
            ChatTemplate::from_model_dir(&dir).unwrap()
        };
        let render = |t: ChatTemplate| t.render_text(&msgs(&[(USER, "x")]), None).unwrap();

        let source =
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}";
        let tokens =
            json!({"chat_template": source, "bos_token": {"content": "<B>"}, "eos_token": "<E>"});
        assert_eq!(render(load(tokens)), "<B>x<E>");
        let named = json!([{"name": "tool_use", "template": "no"}, {"name": "default", "template": source}]);
        assert_eq!(render(load(json!({ "chat_template": named }))), "<s>x</s>");

        // Llama 2's template reformatted is still Llama 2's.
        let reformatted = LLAMA2_CHAT_TEMPLATE.replace("%}{%", "%}\n  {%");
        assert_eq!(
            load(json!({ "chat_template": reformatted })),
            ChatTemplate::Llama2
        );
        assert_eq!(load(json!({ "add_bos_token": true })), ChatTemplate::Llama2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

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

use serde::Serialize;
use serde_json::Value;

use crate::tokenizer::{token_content, Tokenizer, TokenizerError};

const B_INST: &str = "[INST]";
const E_INST: &str = "[/INST]";
const B_SYS: &str = "<<SYS>>\n";
const E_SYS: &str = "\n<</SYS>>\n\n";

/// The `chat_template` of meta-llama/Llama-2-*-chat-hf: a model that ships it
/// gets the exact token-level rendering instead.
pub const LLAMA2_CHAT_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

#[derive(Debug, Clone, Serialize)]
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
        "message {index} has role {found} where {expected} was expected: roles must alternate user/assistant after an optional system message"
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
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            Value::Null
        };
        let source =
            match template_source(&config.get("chat_template").cloned().unwrap_or(Value::Null)) {
                Some(source) => Some(source),
                None => {
                    let jinja_path = dir.join("chat_template.jinja");
                    if jinja_path.is_file() {
                        Some(
                            std::fs::read_to_string(&jinja_path)
                                .map_err(|e| config_error(&jinja_path, e))?,
                        )
                    } else {
                        None
                    }
                }
            };
        let Some(source) = source else {
            return Ok(ChatTemplate::Llama2);
        };
        if without_whitespace(&source) == without_whitespace(LLAMA2_CHAT_TEMPLATE) {
            return Ok(ChatTemplate::Llama2);
        }
        let special = |key: &str, fallback: &str| -> Result<String, ChatTemplateError> {
            if let Some(token) = token_content(config.get(key)) {
                return Ok(token);
            }
            let map_path = dir.join("special_tokens_map.json");
            if map_path.is_file() {
                if let Some(token) = token_content(read_json(&map_path)?.get(key)) {
                    return Ok(token);
                }
            }
            Ok(fallback.to_owned())
        };
        Ok(ChatTemplate::Jinja {
            source,
            bos_token: special("bos_token", "<s>")?,
            eos_token: special("eos_token", "</s>")?,
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
                let mut all = Vec::with_capacity(messages.len() + 1);
                if let (Some(system), false) = (
                    default_system_prompt,
                    messages.iter().any(|m| m.role == Role::System),
                ) {
                    all.push(ChatMessage::new(Role::System, system));
                }
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
    let first = messages.first().ok_or(ChatTemplateError::Empty)?;
    let (system, offset) = match first.role {
        Role::System => (Some(first.content.as_str()), 1),
        _ => (default_system_prompt, 0),
    };
    let dialog = &messages[offset..];
    for (i, message) in dialog.iter().enumerate() {
        let expected = if i % 2 == 0 {
            Role::User
        } else {
            Role::Assistant
        };
        if message.role != expected {
            return Err(ChatTemplateError::RoleOrder {
                index: i + offset,
                expected,
                found: message.role,
            });
        }
    }
    match dialog.last() {
        Some(last) if last.role == Role::User => {}
        Some(last) => return Err(ChatTemplateError::LastNotUser { found: last.role }),
        None => {
            return Err(ChatTemplateError::LastNotUser {
                found: Role::System,
            })
        }
    }

    // Meta folds the system prompt into the first user message before
    // stripping, so the system text keeps its whitespace and only the
    // combined message's ends are trimmed.
    let mut users = dialog
        .iter()
        .step_by(2)
        .map(|m| m.content.clone())
        .collect::<Vec<_>>();
    if let Some(system) = system {
        users[0] = format!("{B_SYS}{system}{E_SYS}{}", users[0]);
    }
    let answers = dialog.iter().skip(1).step_by(2);
    let mut turns: Vec<Turn> = users
        .iter()
        .zip(answers)
        .map(|(user, answer)| Turn {
            text: format!(
                "{B_INST} {} {E_INST} {} ",
                py_strip(user),
                py_strip(&answer.content)
            ),
            closed: true,
        })
        .collect();
    let last = users.last().map(String::as_str).unwrap_or_default();
    turns.push(Turn {
        text: format!("{B_INST} {} {E_INST}", py_strip(last)),
        closed: false,
    });
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

fn read_json(path: &Path) -> Result<Value, ChatTemplateError> {
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
    use std::path::PathBuf;

    use super::*;

    fn model_dir() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/tiny-llama"
        ))
    }

    fn fixture() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/llama2-chat-template.json"
        );
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn ids(value: &Value) -> Vec<u32> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    }

    fn messages(value: &Value) -> Vec<ChatMessage> {
        let role = |r: &str| match r {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => panic!("unknown role {other}"),
        };
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                ChatMessage::new(
                    role(m["role"].as_str().unwrap()),
                    m["content"].as_str().unwrap(),
                )
            })
            .collect()
    }

    fn msgs(list: &[(Role, &str)]) -> Vec<ChatMessage> {
        list.iter()
            .map(|&(role, content)| ChatMessage::new(role, content))
            .collect()
    }

    fn fixture_jinja(fx: &Value) -> ChatTemplate {
        ChatTemplate::Jinja {
            source: fx["chat_template"].as_str().unwrap().to_owned(),
            bos_token: fx["bos_token"].as_str().unwrap().to_owned(),
            eos_token: fx["eos_token"].as_str().unwrap().to_owned(),
        }
    }

    #[test]
    fn model_dir_with_llama2_template_is_llama2() {
        assert_eq!(
            ChatTemplate::from_model_dir(&model_dir()).unwrap(),
            ChatTemplate::Llama2
        );
        assert_eq!(
            fixture()["chat_template"].as_str().unwrap(),
            LLAMA2_CHAT_TEMPLATE
        );
    }

    #[test]
    fn llama2_ids_equal_meta_for_every_conversation() {
        let tok = Tokenizer::from_model_dir(&model_dir()).unwrap();
        let fx = fixture();
        let conversations = fx["conversations"].as_array().unwrap();
        assert_eq!(conversations.len(), 12);
        for case in conversations {
            let name = case["name"].as_str().unwrap();
            let msgs = messages(&case["messages"]);
            let got = ChatTemplate::Llama2.render_ids(&msgs, &tok, None).unwrap();
            assert_eq!(got, ids(&case["meta_ids"]), "{name}");
            let text = ChatTemplate::Llama2.render_text(&msgs, None).unwrap();
            assert_eq!(text, case["prompt"].as_str().unwrap(), "{name}");
        }
    }

    #[test]
    fn jinja_path_renders_fixture_prompts() {
        let tok = Tokenizer::from_model_dir(&model_dir()).unwrap();
        let fx = fixture();
        let template = fixture_jinja(&fx);
        for case in fx["conversations"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let msgs = messages(&case["messages"]);
            assert_eq!(
                template.render_text(&msgs, None).unwrap(),
                case["prompt"].as_str().unwrap(),
                "{name}"
            );
            let got = template.render_ids(&msgs, &tok, None).unwrap();
            assert_eq!(got, ids(&case["template_tokenized_ids"]), "{name}");
        }
    }

    #[test]
    fn eos_literal_in_user_text_is_not_a_control_token() {
        let tok = Tokenizer::from_model_dir(&model_dir()).unwrap();
        let msgs = msgs(&[(Role::User, "Say </s> then <s> please")]);
        let ids = ChatTemplate::Llama2.render_ids(&msgs, &tok, None).unwrap();
        assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 1);
        assert!(!ids.contains(&2));
    }

    #[test]
    fn default_system_prompt_only_without_a_system_message() {
        let tok = Tokenizer::from_model_dir(&model_dir()).unwrap();
        let user = msgs(&[(Role::User, "Hello")]);
        let text = ChatTemplate::Llama2
            .render_text(&user, Some("Be kind."))
            .unwrap();
        assert_eq!(
            text,
            "<s>[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\nHello [/INST]"
        );
        let explicit = msgs(&[(Role::System, "Be kind."), (Role::User, "Hello")]);
        assert_eq!(
            ChatTemplate::Llama2
                .render_ids(&user, &tok, Some("Be kind."))
                .unwrap(),
            ChatTemplate::Llama2
                .render_ids(&explicit, &tok, None)
                .unwrap()
        );
        // An explicit (even empty) system message wins over the default.
        let empty_system = msgs(&[(Role::System, ""), (Role::User, "Hello")]);
        let text = ChatTemplate::Llama2
            .render_text(&empty_system, Some("Be kind."))
            .unwrap();
        assert_eq!(text, "<s>[INST] <<SYS>>\n\n<</SYS>>\n\nHello [/INST]");

        let jinja = fixture_jinja(&fixture());
        assert_eq!(
            jinja.render_text(&user, Some("Be kind.")).unwrap(),
            ChatTemplate::Llama2.render_text(&explicit, None).unwrap()
        );
    }

    #[test]
    fn strip_follows_python() {
        assert_eq!(py_strip("\u{1c}\u{1f} a b\u{3000}\u{85}\u{a0}"), "a b");
        assert_eq!(py_strip("\u{200b}x"), "\u{200b}x");
        let text = ChatTemplate::Llama2
            .render_text(&msgs(&[(Role::User, "\u{1e} hi \u{1d}")]), None)
            .unwrap();
        assert_eq!(text, "<s>[INST] hi [/INST]");
    }

    #[test]
    fn bad_role_orders_error() {
        let tok = Tokenizer::from_model_dir(&model_dir()).unwrap();
        let jinja = fixture_jinja(&fixture());
        let cases: Vec<(Vec<ChatMessage>, &str)> = vec![
            (vec![], "empty"),
            (msgs(&[(Role::System, "s")]), "last"),
            (msgs(&[(Role::Assistant, "a"), (Role::User, "u")]), "order"),
            (msgs(&[(Role::User, "u"), (Role::User, "u")]), "order"),
            (
                msgs(&[(Role::User, "u"), (Role::System, "s"), (Role::User, "u")]),
                "order",
            ),
            (
                msgs(&[(Role::System, "s"), (Role::System, "s"), (Role::User, "u")]),
                "order",
            ),
            (msgs(&[(Role::User, "u"), (Role::Assistant, "a")]), "last"),
        ];
        for (messages, kind) in cases {
            let err = ChatTemplate::Llama2
                .render_ids(&messages, &tok, None)
                .unwrap_err();
            let ok = match kind {
                "empty" => matches!(err, ChatTemplateError::Empty),
                "last" => matches!(err, ChatTemplateError::LastNotUser { .. }),
                _ => matches!(err, ChatTemplateError::RoleOrder { .. }),
            };
            assert!(ok, "{messages:?}: {err}");
            assert!(ChatTemplate::Llama2.render_text(&messages, None).is_err());
        }
        let err = ChatTemplate::Llama2
            .render_text(&msgs(&[(Role::User, "u"), (Role::User, "u")]), None)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "message 1 has role user where assistant was expected: roles must alternate user/assistant after an optional system message"
        );

        let err = jinja
            .render_text(&msgs(&[(Role::User, "u"), (Role::User, "u")]), None)
            .unwrap_err();
        assert!(
            matches!(&err, ChatTemplateError::Raised(m) if m == "Conversation roles must alternate user/assistant/user/assistant/..."),
            "{err}"
        );
    }

    #[test]
    fn custom_chatml_template_renders() {
        let tok = Tokenizer::from_model_dir(&model_dir()).unwrap();
        let source = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim + '<|im_end|>\n' }}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let template = ChatTemplate::Jinja {
            source: source.into(),
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        };
        let messages = msgs(&[
            (Role::System, "Be brief."),
            (Role::User, " Hi "),
            (Role::Assistant, "Hello."),
            (Role::User, "Bye"),
        ]);
        let text = template.render_text(&messages, None).unwrap();
        let expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(text, expected);
        assert_eq!(
            template.render_ids(&messages, &tok, None).unwrap(),
            tok.encode(expected, false).unwrap()
        );

        let broken = ChatTemplate::Jinja {
            source: "{% for %}".into(),
            bos_token: String::new(),
            eos_token: String::new(),
        };
        assert!(matches!(
            broken.render_text(&messages, None),
            Err(ChatTemplateError::Render(_))
        ));
    }

    #[test]
    fn model_dir_with_other_template_is_jinja() {
        let dir =
            std::env::temp_dir().join(format!("llama-engine-chat-template-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |config: Value| {
            std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap()
        };

        write(
            serde_json::json!({"chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}", "bos_token": {"content": "<B>"}, "eos_token": "<E>"}),
        );
        let template = ChatTemplate::from_model_dir(&dir).unwrap();
        assert!(
            matches!(&template, ChatTemplate::Jinja { bos_token, eos_token, .. } if bos_token == "<B>" && eos_token == "<E>")
        );
        assert_eq!(
            template
                .render_text(&msgs(&[(Role::User, "x")]), None)
                .unwrap(),
            "<B>x"
        );

        // Llama 2's template reformatted is still Llama 2's.
        write(
            serde_json::json!({"chat_template": LLAMA2_CHAT_TEMPLATE.replace("%}{%", "%}\n  {%")}),
        );
        assert_eq!(
            ChatTemplate::from_model_dir(&dir).unwrap(),
            ChatTemplate::Llama2
        );

        write(
            serde_json::json!({"chat_template": [{"name": "default", "template": "{{ eos_token }}"}]}),
        );
        let template = ChatTemplate::from_model_dir(&dir).unwrap();
        assert_eq!(
            template
                .render_text(&msgs(&[(Role::User, "x")]), None)
                .unwrap(),
            "</s>"
        );

        write(serde_json::json!({"add_bos_token": true}));
        assert_eq!(
            ChatTemplate::from_model_dir(&dir).unwrap(),
            ChatTemplate::Llama2
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

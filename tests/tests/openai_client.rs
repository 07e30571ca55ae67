//! A real OpenAI client library (async-openai) against the real server: if a
//! field is missing or shaped differently, its typed deserialisation fails.

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestUserMessage, ChatCompletionStreamOptions, CompletionFinishReason,
    CreateChatCompletionRequestArgs, FinishReason, Prompt, Role,
};
use async_openai::types::completions::CreateCompletionRequestArgs;
use async_openai::Client;
use e2e::{fixture_json, Server};
use futures::StreamExt;
use serde_json::{json, Value};

const MODEL: &str = "tiny-llama";
const MAX_TOKENS: u32 = 48;

fn client(server: &Server) -> Client<OpenAIConfig> {
    // The key is ignored by a server started without --api-key, but the client insists on one.
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(server.openai_base())
            .with_api_key("unused"),
    )
}

fn reference_prompts() -> Vec<Value> {
    fixture_json("tiny-llama-reference.json")["prompts"]
        .as_array()
        .expect("prompts")
        .clone()
}

fn conversation() -> Vec<ChatCompletionRequestMessage> {
    vec![
        ChatCompletionRequestSystemMessage::from("You are terse.").into(),
        ChatCompletionRequestUserMessage::from("Name three colours.").into(),
    ]
}

#[tokio::test]
async fn models_are_listed() {
    let server = Server::start().await.unwrap();
    let client = client(&server);
    let models = client.models().list().await.unwrap();
    assert!(
        models.data.iter().any(|m| m.id == MODEL),
        "{:?}",
        models.data
    );
    let model = client.models().retrieve(MODEL).await.unwrap();
    assert_eq!(model.id, MODEL);
}

#[tokio::test]
async fn greedy_completions_equal_the_reference() {
    let server = Server::start().await.unwrap();
    let client = client(&server);
    for p in reference_prompts() {
        let name = p["name"].as_str().unwrap();
        let request = CreateCompletionRequestArgs::default()
            .model(MODEL)
            .prompt(p["prompt"].as_str().unwrap())
            .max_tokens(MAX_TOKENS)
            .temperature(0.0)
            .build()
            .unwrap();
        let response = client.completions().create(request).await.unwrap();
        assert!(
            response.id.starts_with("cmpl-"),
            "{name}: id {}",
            response.id
        );
        assert_eq!(response.object, "text_completion");
        assert_eq!(response.model, MODEL);
        assert_eq!(response.choices.len(), 1);
        let choice = &response.choices[0];
        assert_eq!(
            choice.text,
            p["greedy_text_incremental"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(
            choice.finish_reason,
            Some(CompletionFinishReason::Length),
            "{name}"
        );
        let usage = response.usage.expect("usage");
        assert_eq!(
            u64::from(usage.prompt_tokens),
            p["num_prompt_tokens"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(usage.completion_tokens, MAX_TOKENS, "{name}");
        assert_eq!(usage.total_tokens, usage.prompt_tokens + MAX_TOKENS);
    }
}

#[tokio::test]
async fn greedy_token_id_prompts_equal_the_reference() {
    // Token ids are used as given (the reference ids already start with BOS).
    let server = Server::start().await.unwrap();
    let client = client(&server);
    let p = &reference_prompts()[1];
    let ids: Vec<u32> = p["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let request = CreateCompletionRequestArgs::default()
        .model(MODEL)
        .prompt(Prompt::IntegerArray(ids.clone()))
        .max_tokens(MAX_TOKENS)
        .temperature(0.0)
        .build()
        .unwrap();
    let response = client.completions().create(request).await.unwrap();
    assert_eq!(
        response.choices[0].text,
        p["greedy_text_incremental"].as_str().unwrap()
    );
    assert_eq!(response.usage.unwrap().prompt_tokens as usize, ids.len());
}

#[tokio::test]
async fn streamed_greedy_completions_equal_the_reference() {
    let server = Server::start().await.unwrap();
    let client = client(&server);
    for p in reference_prompts() {
        let name = p["name"].as_str().unwrap();
        let request = CreateCompletionRequestArgs::default()
            .model(MODEL)
            .prompt(p["prompt"].as_str().unwrap())
            .max_tokens(MAX_TOKENS)
            .temperature(0.0)
            .stream_options(ChatCompletionStreamOptions {
                include_usage: Some(true),
                include_obfuscation: None,
            })
            .build()
            .unwrap();
        let mut stream = client.completions().create_stream(request).await.unwrap();
        let mut text = String::new();
        let mut finish = None;
        let mut usage = None;
        let mut ids = std::collections::BTreeSet::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap_or_else(|e| panic!("{name}: {e}"));
            ids.insert(chunk.id.clone());
            for choice in &chunk.choices {
                text.push_str(&choice.text);
                if choice.finish_reason.is_some() {
                    finish = choice.finish_reason;
                }
            }
            if let Some(u) = chunk.usage {
                usage = Some(u);
            }
        }
        assert_eq!(ids.len(), 1, "{name}: one id for the whole stream: {ids:?}");
        assert_eq!(
            text,
            p["greedy_text_incremental"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(finish, Some(CompletionFinishReason::Length), "{name}");
        let usage = usage.unwrap_or_else(|| panic!("{name}: no usage chunk"));
        assert_eq!(
            u64::from(usage.prompt_tokens),
            p["num_prompt_tokens"].as_u64().unwrap()
        );
        assert_eq!(usage.completion_tokens, MAX_TOKENS);
    }
}

#[tokio::test]
async fn chat_streamed_and_not_agree() {
    let server = Server::start().await.unwrap();
    let client = client(&server);
    let request = |stream: bool| {
        let mut args = CreateChatCompletionRequestArgs::default();
        args.model(MODEL)
            .messages(conversation())
            .max_completion_tokens(24u32)
            .temperature(0.8)
            .seed(7)
            .n(2);
        if stream {
            args.stream_options(ChatCompletionStreamOptions {
                include_usage: Some(true),
                include_obfuscation: None,
            });
        }
        args.build().unwrap()
    };

    let whole = client.chat().create(request(false)).await.unwrap();
    assert!(whole.id.starts_with("chatcmpl-"), "id {}", whole.id);
    assert_eq!(whole.object, "chat.completion");
    assert_eq!(whole.model, MODEL);
    assert_eq!(whole.choices.len(), 2);
    for (i, choice) in whole.choices.iter().enumerate() {
        assert_eq!(choice.index as usize, i);
        assert_eq!(choice.message.role, Role::Assistant);
        assert_eq!(choice.finish_reason, Some(FinishReason::Length));
        assert!(choice
            .message
            .content
            .as_deref()
            .is_some_and(|c| !c.is_empty()));
    }
    let usage = whole.usage.clone().expect("usage");
    assert_eq!(usage.completion_tokens, 2 * 24, "n=2 counts both choices");
    let templated = server
        .post_json(
            "/tokenize",
            &json!({"messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name three colours."}
            ]}),
        )
        .await
        .unwrap();
    assert_eq!(templated.status, 200, "{}", templated.text);
    assert_eq!(
        Some(u64::from(usage.prompt_tokens)),
        templated.body["count"].as_u64()
    );

    let mut stream = client.chat().create_stream(request(true)).await.unwrap();
    let mut texts = [String::new(), String::new()];
    let mut finishes = [None, None];
    let mut streamed_usage = None;
    let mut first = true;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.object, "chat.completion.chunk");
        if first {
            assert!(
                chunk
                    .choices
                    .iter()
                    .all(|c| c.delta.role == Some(Role::Assistant)),
                "first chunk carries the role: {chunk:?}"
            );
            first = false;
        }
        for choice in &chunk.choices {
            let i = choice.index as usize;
            if let Some(content) = &choice.delta.content {
                texts[i].push_str(content);
            }
            if choice.finish_reason.is_some() {
                finishes[i] = choice.finish_reason;
            }
        }
        if chunk.usage.is_some() {
            streamed_usage = chunk.usage;
        }
    }
    for (i, choice) in whole.choices.iter().enumerate() {
        assert_eq!(
            Some(texts[i].as_str()),
            choice.message.content.as_deref(),
            "choice {i}"
        );
        assert_eq!(finishes[i], Some(FinishReason::Length));
    }
    let streamed_usage = streamed_usage.expect("usage chunk");
    assert_eq!(streamed_usage.prompt_tokens, usage.prompt_tokens);
    assert_eq!(streamed_usage.completion_tokens, usage.completion_tokens);
}

#[tokio::test]
async fn greedy_chat_is_deterministic() {
    let server = Server::start().await.unwrap();
    let client = client(&server);
    let request = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages(conversation())
        .max_tokens(16u32)
        .temperature(0.0)
        .build()
        .unwrap();
    let a = client.chat().create(request.clone()).await.unwrap();
    let b = client.chat().create(request).await.unwrap();
    assert_eq!(a.choices[0].message.content, b.choices[0].message.content);
    assert_ne!(a.id, b.id, "every response gets its own id");
}

#[tokio::test]
async fn errors_surface_as_api_errors() {
    let server = Server::start().await.unwrap();
    let client = client(&server);
    let request = CreateChatCompletionRequestArgs::default()
        .model("gpt-4")
        .messages(conversation())
        .build()
        .unwrap();
    let err = client.chat().create(request).await.unwrap_err();
    match err {
        async_openai::error::OpenAIError::ApiError(response) => {
            assert_eq!(response.status_code, 404);
            let api = response.api_error;
            assert!(api.message.contains("gpt-4"), "{api:?}");
            assert_eq!(api.code.as_deref(), Some("model_not_found"));
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

//! `GET /v1/models`, `GET /v1/models/{id}`.

use axum::extract::{Path, State};
use axum::Json;

use crate::error::ApiError;
use crate::openai::models::{ModelCard, ModelList};
use crate::state::AppState;

fn card(state: &AppState) -> ModelCard {
    ModelCard {
        id: state.model.id.clone(),
        object: "model".into(),
        created: state.model.created,
        owned_by: state.model.owned_by.clone(),
        max_model_len: state.backend.max_context(),
    }
}

pub async fn list(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![card(&state)],
    })
}

/// `{*id}` because repository names such as `meta-llama/Llama-2-7b-chat-hf` contain a slash.
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    if state.model_names.contains(&id) {
        Ok(Json(card(&state)))
    } else {
        Err(ApiError::ModelNotFound(id))
    }
}

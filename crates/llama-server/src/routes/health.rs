//! `GET /health` (the process answers) and `GET /ready` (it can take work).
//! Orchestrators restart on the first and route on the second.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::AppState;

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let alive = state.backend.is_alive();
    let accepting = state.backend.is_accepting();
    let stats = state.backend.stats();
    let body = |status: &str| {
        json!({
            "status": status,
            "model": state.model.id,
            "running": stats.running,
            "waiting": stats.waiting,
        })
    };
    if alive && accepting {
        (StatusCode::OK, Json(body("ready")))
    } else if alive {
        (StatusCode::SERVICE_UNAVAILABLE, Json(body("draining")))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(body("engine stopped")),
        )
    }
}

//! `persona-lens serve`: the live user-model dashboard. A local web app (axum, bound to
//! 127.0.0.1 by default, one page with no external resources) over the library's
//! [`answer_with_readouts`]: chat with the model through its chat template, tokens streamed as
//! NDJSON with the saved probes' read-outs at every position, sliders that steer along each
//! attribute's persona direction (applied once per position through the KV cache), and the
//! autorater's grade and perplexity beside every answer with the unsteered answer for comparison.
//!
//! [`Dashboard`] is the library half (the tests call it without HTTP); [`router`] and [`serve`]
//! are the thin HTTP layer.

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use persona_lens_analysis::user_model::{
    answer_with_readouts, load_probe_dir, rate_answer, steer_vector, steering_norm, AnswerEvent,
    AttributeInfo, Conversation, ConversationSet, ProbeWeights, Reader, Steer, SteerSpec,
    MAX_STRENGTH,
};
use persona_lens_engine::tokenizer::ChatMessage;
use persona_lens_engine::{HookName, Model};
use persona_lens_study::engine_jobs::load_model;
use persona_lens_study::{at_least_one, ModelArgs};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_stream::StreamExt;

/// The page: HTML, CSS and script in one file, nothing fetched from elsewhere.
pub const PAGE: &str = include_str!("page.html");

#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Probe weights: a probe_weights.json, or a folder holding one (or one per subfolder), as
    /// `persona-lens probe --out` writes. Without it the page chats but reads nothing.
    #[arg(long)]
    pub probes: Option<PathBuf>,
    /// Read every attribute at this residual row instead of each probe file's selected row.
    #[arg(long)]
    pub hook: Option<String>,
    /// Address to bind. The page has no authentication: keep it on loopback unless the network
    /// is yours.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port (0 = any free port; the first line printed names the address).
    #[arg(long, default_value_t = 7878)]
    pub port: u16,
    /// Most new tokens an answer may have.
    #[arg(long, default_value_t = 96, value_parser = at_least_one)]
    pub max_new_tokens: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub steer: Vec<SteerSpec>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    /// With steering on, also generate the unsteered answer for comparison.
    #[serde(default = "yes")]
    pub compare: bool,
}

fn yes() -> bool {
    true
}

/// The model, its readers and the persona directions: what every request works with.
pub struct Dashboard {
    pub model: Model,
    pub readers: Vec<(Reader, AttributeInfo)>,
    weights: Vec<ProbeWeights>,
    /// Mean residual norm per row, measured once on neutral prompts (steering's unit).
    norms: Mutex<HashMap<HookName, f64>>,
    /// One answer at a time: concurrent sessions queue (flat memory, per-token latency honest).
    gate: Mutex<()>,
    pub max_new_tokens: usize,
    /// How the model and probes were named on the command line (for the export).
    model_spec: String,
    probes_spec: Option<String>,
}

impl Dashboard {
    pub fn new(
        model: Model,
        weights: Vec<ProbeWeights>,
        hook: Option<&str>,
        max_new_tokens: usize,
        model_spec: String,
        probes_spec: Option<String>,
    ) -> Result<Self> {
        if model.tokenizer.chat_template.is_none() {
            anyhow::bail!(
                "model {} has no chat template: the dashboard chats; pick a chat model (e.g. --model smollm2-135m-instruct)",
                model.info.name
            );
        }
        let readers = Reader::for_model(&model, &weights, hook)?;
        Ok(Dashboard {
            model,
            readers,
            weights,
            norms: Mutex::new(HashMap::new()),
            gate: Mutex::new(()),
            max_new_tokens,
            model_spec,
            probes_spec,
        })
    }

    /// What the page shows before the first message.
    pub fn info(&self) -> Value {
        let attrs: Vec<Value> = self
            .readers
            .iter()
            .zip(&self.weights)
            .map(|((_, info), w)| {
                json!({
                    "attribute": info.attribute, "classes": info.classes, "hook": info.hook,
                    "selected_by": info.selected_by, "trained_on_chat": info.trained_on_chat,
                    "rows": w.probes.iter().map(|p| p.hook.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!({
            "model": self.model.info.name, "chat_model": self.model.is_chat_model(),
            "attributes": attrs, "max_new_tokens": self.max_new_tokens,
            "max_strength": MAX_STRENGTH,
        })
    }

    /// Checks a request and builds its steering vectors; the error is the 400's message.
    pub fn check(&self, req: &ChatRequest) -> std::result::Result<Vec<Steer>, String> {
        let conv = Conversation {
            id: "request".into(),
            turns: req.messages.clone(),
            cue_turn: None,
            cue_class: None,
        };
        conv.check().map_err(|e| e.to_string())?;
        if req.messages.last().map(|m| m.role.as_str()) != Some("user") {
            return Err("the last message must be the user's: the model answers it".into());
        }
        if let Some(n) = req.max_new_tokens {
            if n == 0 || n > self.max_new_tokens {
                return Err(format!(
                    "max_new_tokens {n}: give 1 to {} (serve --max-new-tokens)",
                    self.max_new_tokens
                ));
            }
        }
        let mut out = Vec::new();
        for spec in &req.steer {
            let v = steer_vector(&self.model, &self.weights, spec, &mut |h| self.mean_norm(h))
                .map_err(|e| e.to_string())?;
            out.extend(v);
        }
        Ok(out)
    }

    fn mean_norm(&self, hook: HookName) -> persona_lens_analysis::Result<f64> {
        if let Some(&n) = self
            .norms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hook)
        {
            return Ok(n);
        }
        let n = steering_norm(&self.model, hook)?;
        self.norms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hook, n);
        Ok(n)
    }

    /// Answers `req` (checked, with its steering vectors), sending NDJSON events through `emit`
    /// (false = the client left: stop). Events: `prompt` (tokens, turn of each, read-outs),
    /// `token` (text, read-outs at its position), `done` (answer, grade, perplexity, timing,
    /// and the unsteered answer when steered).
    pub fn answer(
        &self,
        req: &ChatRequest,
        steer: &[Steer],
        emit: &mut dyn FnMut(Value) -> bool,
    ) -> Result<()> {
        let _one_at_a_time = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        let max_new = req.max_new_tokens.unwrap_or(self.max_new_tokens);
        let readers: Vec<Reader> = self.readers.iter().map(|(r, _)| r.clone()).collect();
        let t0 = Instant::now();
        let mut first_token_ms = None;
        let mut open = true;
        let answer = answer_with_readouts(
            &self.model,
            &req.messages,
            max_new,
            steer,
            &readers,
            &mut |ev| {
                open = match ev {
                    AnswerEvent::Prompt(r, proba) => {
                        let tokens: Vec<String> = r
                            .ids
                            .iter()
                            .map(|&i| self.model.tokenizer.decode(&[i], false).unwrap_or_default())
                            .collect();
                        emit(json!({
                            "event": "prompt", "tokens": tokens, "turn_of": r.turn_of,
                            "proba": proba, "steered": !steer.is_empty(),
                        }))
                    }
                    AnswerEvent::Token(step) => {
                        first_token_ms.get_or_insert(t0.elapsed().as_secs_f64() * 1e3);
                        emit(json!({"event": "token", "text": step.text, "proba": step.proba}))
                    }
                };
                open
            },
        )?;
        if !open {
            return Ok(());
        }
        let gen_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut done = serde_json::to_value(rate_answer(&self.model, &answer)?)?;
        let unsteered = if !steer.is_empty() && req.compare {
            let plain =
                answer_with_readouts(&self.model, &req.messages, max_new, &[], &[], &mut |_| true)?;
            serde_json::to_value(rate_answer(&self.model, &plain)?)?
        } else {
            Value::Null
        };
        let n = answer.steps.len().max(1) as f64;
        done["event"] = json!("done");
        done["unsteered"] = unsteered;
        done["ms_per_token"] = json!(gen_ms / n);
        done["first_token_ms"] = json!(first_token_ms);
        emit(done);
        Ok(())
    }

    /// The session as a conversations dataset (`session`: every turn; `session-last-answer`: the
    /// turns before the last answer) and the `conversation` command that reads it back with the
    /// same probes and regenerates the last answer with the same steering.
    pub fn export(&self, req: &ChatRequest) -> std::result::Result<Value, String> {
        let conv = |id: &str, turns: &[ChatMessage]| Conversation {
            id: id.into(),
            turns: turns.to_vec(),
            cue_turn: None,
            cue_class: None,
        };
        let mut conversations = vec![conv("session", &req.messages)];
        if let [before @ .., last] = req.messages.as_slice() {
            if last.role == "assistant" && !before.is_empty() {
                conversations.push(conv("session-last-answer", before));
            }
        }
        let set = ConversationSet { conversations };
        set.check().map_err(|e| e.to_string())?;
        let mut cmd = format!(
            "persona-lens conversation --model {} --dataset session.json --answer --max-new-tokens {}",
            self.model_spec,
            req.max_new_tokens.unwrap_or(self.max_new_tokens)
        );
        if let Some(p) = &self.probes_spec {
            cmd.push_str(&format!(" --probes {p}"));
        }
        for s in req.steer.iter().filter(|s| s.strength != 0.0) {
            cmd.push_str(&format!(" --steer '{s}'"));
        }
        Ok(json!({
            "dataset": set,
            "steer": req.steer,
            "command": cmd,
            "model": self.model.info.name,
        }))
    }
}

fn bad(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

type App = Arc<Dashboard>;

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn info(State(app): State<App>) -> Json<Value> {
    Json(app.info())
}

async fn chat(
    State(app): State<App>,
    body: std::result::Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => return bad(e.status(), e.body_text()),
    };
    let checked = {
        let app = app.clone();
        let req = req.clone();
        // Measuring a row's norm the first time runs the model: off the async threads.
        tokio::task::spawn_blocking(move || app.check(&req)).await
    };
    let steer = match checked {
        Ok(Ok(s)) => s,
        Ok(Err(m)) => return bad(StatusCode::BAD_REQUEST, m),
        Err(_) => {
            return bad(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error checking the request",
            )
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(256);
    tokio::task::spawn_blocking(move || {
        let mut emit = |v: Value| tx.blocking_send(format!("{v}\n")).is_ok();
        if let Err(e) = app.answer(&req, &steer, &mut emit) {
            emit(json!({"event": "error", "message": persona_lens_study::one_line(&e)}));
        }
    });
    let stream =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| bad(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
}

async fn export(
    State(app): State<App>,
    body: std::result::Result<Json<ChatRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(r)) => match app.export(&r) {
            Ok(v) => Json(v).into_response(),
            Err(m) => bad(StatusCode::BAD_REQUEST, m),
        },
        Err(e) => bad(e.status(), e.body_text()),
    }
}

async fn not_found() -> Response {
    bad(
        StatusCode::NOT_FOUND,
        "no such page: the dashboard is at / and its API under /api/",
    )
}

/// The dashboard's routes: `/`, `GET /api/info`, `POST /api/chat` (NDJSON stream),
/// `POST /api/export`.
pub fn router(app: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/info", get(info))
        .route("/api/chat", post(chat))
        .route("/api/export", post(export))
        .fallback(not_found)
        .with_state(app)
}

/// `persona-lens serve`: checks the inputs and binds the port before the model loads, then
/// serves until Ctrl-C.
pub fn serve(a: ServeArgs) -> Result<()> {
    let weights = match &a.probes {
        Some(p) => load_probe_dir(p)?,
        None => vec![],
    };
    let listener = std::net::TcpListener::bind((a.host, a.port)).with_context(|| {
        format!(
            "cannot listen on {}:{} (in use? pick another --port)",
            a.host, a.port
        )
    })?;
    let model = load_model(&a.model)?;
    let app = Arc::new(Dashboard::new(
        model,
        weights,
        a.hook.as_deref(),
        a.max_new_tokens,
        a.model.model.clone(),
        a.probes.as_ref().map(|p| p.display().to_string()),
    )?);
    if app.readers.is_empty() {
        eprintln!("no --probes: the page chats and steers nothing; train probes with `persona-lens probe`");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        println!(
            "persona-lens dashboard: http://{addr}/ (model {}; Ctrl-C stops it)",
            app.model.info.name
        );
        use std::io::Write;
        std::io::stdout().flush().ok();
        axum::serve(listener, router(app))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(())
    })
}

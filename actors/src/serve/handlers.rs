//! HTTP endpoints: `/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`, `/v1/models`,
//! `/tokenize`,
//! `/detokenize`, `/health`, `/metrics`.

use super::error::ApiError;
use super::generation::{Collected, Generation};
use super::openai::{check_model, ChatRequest, Checked, CompletionRequest, PromptInput, Usage};
use super::reply::{stream_response, Kind, Meta};
use super::{echo, embeddings, tokens, AppState};
use crate::messages::{Constraint, GenerateRequest, Prompt, SamplingParams};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rocmforge::grammar::GrammarCompiler;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

type AppRef = State<Arc<AppState>>;

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/embeddings", post(embeddings_endpoint))
        .route("/tokenize", post(tokenize_endpoint))
        .route("/detokenize", post(detokenize_endpoint))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// The request's number (in its `cmpl-N` id and log line) and when it arrived.
#[derive(Clone, Copy, Debug)]
struct RequestTag {
    id: u64,
    arrived: Instant,
}

/// Set on a response by the generation endpoints: the tokens for the request's log line.
#[derive(Clone, Copy, Debug)]
enum Logged {
    Tokens {
        prompt: usize,
        completion: usize,
    },
    /// A stream logs its own line when it ends.
    Streaming,
}

/// One log line per request: id, method, path, status, tokens, time.
fn log_request(
    tag: RequestTag,
    method: &str,
    path: &str,
    status: u16,
    tokens: Option<(usize, usize)>,
) {
    let ms = tag.arrived.elapsed().as_secs_f64() * 1e3;
    match tokens {
        Some((p, c)) => tracing::info!(
            "request {} {method} {path} {status} prompt_tokens={p} completion_tokens={c} \
             time_ms={ms:.1}",
            tag.id
        ),
        None => tracing::info!(
            "request {} {method} {path} {status} time_ms={ms:.1}",
            tag.id
        ),
    }
}

/// Counts every answer by endpoint and status (unknown paths share one label, so a scanner
/// cannot blow up the number of series), tags the request and logs it.
async fn count_requests(State(s): AppRef, mut req: Request, next: Next) -> Response {
    let endpoint: &'static str = match req.uri().path() {
        "/v1/completions" => "/v1/completions",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        "/v1/embeddings" => "/v1/embeddings",
        "/tokenize" => "/tokenize",
        "/detokenize" => "/detokenize",
        "/health" => "/health",
        "/metrics" => "/metrics",
        _ => "other",
    };
    let tag = RequestTag {
        id: s.next_id.fetch_add(1, Ordering::Relaxed),
        arrived: Instant::now(),
    };
    req.extensions_mut().insert(tag);
    let method = req.method().clone();
    let r = next.run(req).await;
    let status = r.status().as_u16();
    s.metrics.count_request(endpoint, status);
    match r.extensions().get::<Logged>() {
        Some(Logged::Streaming) => {}
        Some(Logged::Tokens { prompt, completion }) => log_request(
            tag,
            method.as_str(),
            endpoint,
            status,
            Some((*prompt, *completion)),
        ),
        None => log_request(tag, method.as_str(), endpoint, status, None),
    }
    r
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown endpoint",
    )
    .code("unknown_url")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method not allowed on this endpoint",
    )
}

/// 200 while the model serves; 503 while loading, shutting down, or while part of the model
/// cannot be loaded (`model_failed`, with the failure). A failed state also asks the runtime to
/// retry the failed loads (at most once a second), so a probe sees recovery without traffic.
/// A model file that changed on disk while every weight is resident is a `warning`, not a
/// failure: the loaded weights still serve.
async fn health(State(s): AppRef) -> Response {
    if !s.ready.load(Ordering::Acquire) || s.runtime.is_shut_down() {
        return ApiError::not_ready().into_response();
    }
    let rt = s.runtime.clone();
    // `stat` of the model file: off the async workers (a hung NFS mount must not stall them).
    let h = match tokio::task::spawn_blocking(move || rt.model_health()).await {
        Ok(h) => h,
        Err(e) => return ApiError::model_failed(format!("health check: {e}")).into_response(),
    };
    if !h.is_ok() {
        s.runtime.retry_failed_loads();
        let msg = format!(
            "{} unit(s) of the model cannot be loaded: {}",
            h.units_failed,
            h.last_failure.as_deref().unwrap_or("unknown failure")
        );
        return ApiError::model_failed(msg).into_response();
    }
    let mut body = json!({"status": "ok"});
    if let Some(change) = h.file_changed {
        body["warning"] = json!(format!(
            "the model file changed since it was loaded ({change}); resident weights still \
             serve, reads from the file are refused until it is restored or reloaded"
        ));
    }
    (StatusCode::OK, axum::Json(body)).into_response()
}

async fn metrics(State(s): AppRef) -> Response {
    let page = s.metrics.render(
        &s.runtime,
        s.ready.load(Ordering::Acquire),
        s.queue_capacity,
    );
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        page,
    )
        .into_response()
}

async fn models(State(s): AppRef) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": s.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "rocmforge",
        }],
    }))
    .into_response()
}

async fn embeddings_endpoint(State(s): AppRef, headers: HeaderMap, body: Body) -> Response {
    use embeddings::EmbeddingInput;
    let r = async {
        let req: embeddings::EmbeddingRequest = parse_body(&s, &headers, body).await?;
        check_model(req.model.as_deref(), &s.model_name)?;
        let base64 = req.base64()?;
        if req.dimensions.is_some() {
            return Err(ApiError::invalid(
                "dimensions",
                "dimensions is not supported: vectors have the model's width",
            ));
        }
        ready(&s)?;
        let inputs: Vec<Vec<u32>> = match req.input {
            EmbeddingInput::Text(t) => vec![tokenize(&s, t).await?],
            EmbeddingInput::Texts(v) => {
                if v.len() > embeddings::MAX_INPUTS {
                    return Err(too_many_inputs());
                }
                let mut out = Vec::with_capacity(v.len());
                for t in v {
                    out.push(tokenize(&s, t).await?);
                }
                out
            }
            EmbeddingInput::Tokens(t) => vec![t],
            EmbeddingInput::TokenLists(v) => v,
        };
        if inputs.is_empty() {
            return Err(ApiError::invalid("input", "input must not be empty"));
        }
        if inputs.len() > embeddings::MAX_INPUTS {
            return Err(too_many_inputs());
        }
        for (i, t) in inputs.iter().enumerate() {
            if t.is_empty() {
                return Err(ApiError::invalid("input", format!("input {i} is empty")));
            }
            if t.len() > s.ctx {
                return Err(ApiError::invalid(
                    "input",
                    format!(
                        "input {i} has {} tokens; this model's context is {}",
                        t.len(),
                        s.ctx
                    ),
                )
                .code("context_length_exceeded"));
            }
        }
        // One after another: a request takes one queue place at a time.
        let mut vectors = Vec::with_capacity(inputs.len());
        let mut prompt_tokens = 0;
        for t in inputs {
            prompt_tokens += t.len();
            vectors.push(s.runtime.embed(t, s.pooling).get().await?);
        }
        Ok((
            embeddings::body(&s, &vectors, prompt_tokens, base64),
            prompt_tokens,
        ))
    }
    .await;
    match r {
        Ok((body, prompt)) => {
            let mut r = axum::Json(body).into_response();
            r.extensions_mut().insert(Logged::Tokens {
                prompt,
                completion: 0,
            });
            r
        }
        Err(e) => e.into_response(),
    }
}

fn too_many_inputs() -> ApiError {
    ApiError::invalid(
        "input",
        format!("at most {} inputs per request", embeddings::MAX_INPUTS),
    )
}

async fn tokenize_endpoint(State(s): AppRef, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let req: tokens::TokenizeRequest = parse_body(&s, &headers, body).await?;
        tokens::tokenize(&s, req).await
    }
    .await;
    r.map(axum::Json).into_response()
}

async fn detokenize_endpoint(State(s): AppRef, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let req: tokens::DetokenizeRequest = parse_body(&s, &headers, body).await?;
        tokens::detokenize(&s, &req)
    }
    .await;
    r.map(axum::Json).into_response()
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!("request body larger than {limit} bytes"),
    )
    .code("request_too_large")
}

/// The whole body within the size limit and the body timeout: 413 past the size (at once when
/// `Content-Length` says so, before reading a byte), 408 past the time.
async fn read_body(s: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.body_limit as u64) {
        return Err(too_large(s.body_limit));
    }
    let limited = http_body_util::Limited::new(body, s.body_limit);
    let collected = tokio::time::timeout(s.body_timeout, http_body_util::BodyExt::collect(limited))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!(
                    "the request body did not arrive within {:?}",
                    s.body_timeout
                ),
            )
            .code("request_timeout")
        })?;
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(s.body_limit)),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

/// The body as JSON of type `T`, or an OpenAI-style 400/408/413.
async fn parse_body<T: serde::de::DeserializeOwned>(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = read_body(s, headers, body).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The tag `count_requests` put on the request (a fresh one if the layer is missing).
fn tag_of(s: &AppState, ext: Option<axum::Extension<RequestTag>>) -> RequestTag {
    ext.map(|e| e.0).unwrap_or_else(|| RequestTag {
        id: s.next_id.fetch_add(1, Ordering::Relaxed),
        arrived: Instant::now(),
    })
}

async fn completions(
    State(s): AppRef,
    tag: Option<axum::Extension<RequestTag>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let tag = tag_of(&s, tag);
    let r = async {
        let req: CompletionRequest = parse_body(&s, &headers, body).await?;
        if req.common.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(ApiError::invalid(
                "tools",
                "tools are for /v1/chat/completions; completions take a raw prompt",
            ));
        }
        let checked = req.common.check(&s.model_name)?;
        ready(&s)?;
        // A BOS the tokenizer adds to a text prompt is not part of an echo.
        let (tokens, added_bos) = match req.prompt {
            PromptInput::Text(t) => (tokenize(&s, t).await?, s.tokenizer.add_bos()),
            PromptInput::Texts(mut v) if v.len() == 1 => {
                (tokenize(&s, v.remove(0)).await?, s.tokenizer.add_bos())
            }
            PromptInput::Tokens(t) => (t, false),
            PromptInput::TokenLists(mut v) if v.len() == 1 => (v.remove(0), false),
            _ => {
                return Err(ApiError::invalid(
                    "prompt",
                    "exactly one prompt per request is supported",
                ))
            }
        };
        // OpenAI's legacy default for completions.
        let default_max = 16;
        let extra = Extra {
            tools: false,
            echo: checked.echo.then_some(added_bos),
        };
        start(
            &s,
            tag,
            Kind::Completion,
            tokens,
            checked,
            default_max,
            "prompt",
            extra,
        )
        .await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

async fn chat_completions(
    State(s): AppRef,
    tag: Option<axum::Extension<RequestTag>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let tag = tag_of(&s, tag);
    let r = async {
        let req: ChatRequest = parse_body(&s, &headers, body).await?;
        if req.common.echo {
            return Err(ApiError::invalid("echo", "echo is for /v1/completions"));
        }
        let mut checked = req.common.check(&s.model_name)?;
        let plan = req.tool_plan()?;
        if let Some(p) = &plan {
            // Every function's schema compiles on its own first, so a bad one is named.
            for (i, f) in p.specs.iter().enumerate() {
                let c = Constraint::JsonSchema(f.parameters.clone());
                check_constraint(&s, &c, &format!("tools[{i}].function.parameters")).await?;
            }
            checked.constraint = p.constraint();
            checked.constraint_param = "tools";
        }
        ready(&s)?;
        let turns = req.turns()?;
        let tokens = s
            .chat
            .tokens(turns, plan.as_ref().map(|p| p.declared.clone()))
            .await?;
        // Chat defaults to the rest of the context.
        let default_max = s.ctx.saturating_sub(tokens.len());
        let extra = Extra {
            tools: plan.is_some(),
            echo: None,
        };
        start(
            &s,
            tag,
            Kind::Chat,
            tokens,
            checked,
            default_max,
            "messages",
            extra,
        )
        .await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Compiles `c` once here, so a schema the compiler rejects is a 400 before any response
/// starts (the runtime compiles its own copy for the generation).
async fn check_constraint(s: &Arc<AppState>, c: &Constraint, param: &str) -> Result<(), ApiError> {
    let (s, c, param) = (s.clone(), c.clone(), param.to_string());
    tokio::task::spawn_blocking(move || {
        let compiler = s
            .grammar
            .get_or_init(|| GrammarCompiler::new(&s.tokenizer).map_err(|e| e.to_string()));
        match compiler {
            Ok(g) => g
                .compile(&c)
                .map(drop)
                .map_err(|e| ApiError::invalid(&param, e.to_string())),
            Err(e) => Err(ApiError::invalid(
                &param,
                format!("constrained decoding is not available for this model: {e}"),
            )),
        }
    })
    .await
    .map_err(ApiError::internal)?
}

fn ready(s: &AppState) -> Result<(), ApiError> {
    if s.ready.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(ApiError::not_ready())
    }
}

/// Text to token ids off the async threads (a long prompt takes a while to encode).
async fn tokenize(s: &AppState, text: String) -> Result<Vec<u32>, ApiError> {
    if text.len() > s.max_prompt_bytes {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "the prompt has {} bytes; this server takes at most {}",
                text.len(),
                s.max_prompt_bytes
            ),
        )
        .code("context_length_exceeded"));
    }
    let tok = s.tokenizer.clone();
    tokio::task::spawn_blocking(move || tok.encode(&text, true, true))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize: {e}")))
}

/// What a reply does besides the text: tool calls parsed out of it (chat), the prompt in front
/// of it (completions' `echo`: `Some(added_bos)`, whether the tokenizer put a BOS in front).
pub(crate) struct Extra {
    pub tools: bool,
    pub echo: Option<bool>,
}

#[allow(clippy::too_many_arguments)]
async fn start(
    s: &Arc<AppState>,
    tag: RequestTag,
    kind: Kind,
    tokens: Vec<u32>,
    checked: Checked,
    default_max: usize,
    prompt_param: &str,
    extra: Extra,
) -> Result<Response, ApiError> {
    let n_prompt = tokens.len();
    if n_prompt == 0 {
        return Err(ApiError::invalid(prompt_param, "the prompt is empty"));
    }
    // The seed in use (the client's, or the one drawn for it), so a reply can be reproduced.
    tracing::debug!("request {} seed={:?}", tag.id, checked.sampling.seed);
    if n_prompt >= s.ctx {
        return Err(ApiError::invalid(
            prompt_param,
            format!(
                "this model's context is {} tokens; the prompt has {n_prompt}",
                s.ctx
            ),
        )
        .code("context_length_exceeded"));
    }
    let max_tokens = checked.max_tokens.unwrap_or(default_max);
    if n_prompt.saturating_add(max_tokens) > s.ctx {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "this model's context is {} tokens; {n_prompt} in the prompt plus {max_tokens} \
                 to generate do not fit",
                s.ctx
            ),
        )
        .code("context_length_exceeded"));
    }
    if let Some(c) = &checked.constraint {
        check_constraint(s, c, checked.constraint_param).await?;
    }
    // The echo (and its prompt scoring) once the request is known to be good.
    let echo = match extra.echo {
        Some(added_bos) => Some(echo::prompt(s, &tokens, added_bos, checked.logprobs).await?),
        None => None,
    };
    // `best_of` (>= `n`) sequences, one after another: the first prefills the prompt, the
    // others resume the session it left (only the last prompt token is fed again); each has its
    // own seed. With more than `n`, the ranking needs every token's log-probability.
    let n = checked.n;
    let total = if checked.max_tokens_zero {
        0
    } else {
        checked.best_of
    };
    let ranked = total > n;
    let logprobs = if ranked {
        Some(checked.logprobs.unwrap_or(0))
    } else {
        checked.logprobs
    };
    let session = (total > 1).then(|| s.runtime.new_session());
    let seed = checked.sampling.seed.unwrap_or_else(rand::random);
    let mut gens = Vec::with_capacity(total);
    for i in 0..total {
        let request = GenerateRequest {
            prompt: Prompt::Tokens(tokens.clone()),
            max_tokens,
            sampling: SamplingParams {
                seed: Some(seed.wrapping_add(i as u64)),
                ..checked.sampling.clone()
            },
            stop_at_eos: true,
            session,
            end_session: i + 1 == total,
            logprobs,
            constraint: checked.constraint.clone(),
        };
        // A choice the queue cannot take fails the request; the ones admitted are dropped,
        // which cancels them.
        gens.push(Generation::admit(
            s.runtime.generate(request),
            // The prompt counted once in the metrics, as in `usage`.
            if i == 0 { n_prompt } else { 0 },
            &checked.stop,
            s.metrics.clone(),
        )?);
    }
    let meta = Meta {
        id: match kind {
            Kind::Completion => format!("cmpl-{}", tag.id),
            Kind::Chat => format!("chatcmpl-{}", tag.id),
        },
        created: unix_now(),
        model: s.model_name.clone(),
        kind,
        request: tag.id,
        arrived: tag.arrived,
        prompt_tokens: n_prompt,
        logprobs: checked.logprobs.is_some(),
        tokenizer: s.tokenizer.clone(),
        tools: extra.tools,
        echo,
    };
    if checked.max_tokens_zero {
        // Nothing generated: `n` choices of the echoed prompt alone.
        let choices: Vec<Collected> = (0..n).map(|_| Collected::empty("length")).collect();
        return Ok(reply(
            &meta,
            &choices,
            checked.stream,
            checked.include_usage,
        ));
    }
    if checked.stream {
        let mut r = stream_response(gens, meta, checked.include_usage);
        r.extensions_mut().insert(Logged::Streaming);
        Ok(r)
    } else {
        let mut choices = Vec::with_capacity(total);
        for g in gens {
            choices.push(g.collect().await?);
        }
        // Every generated token is billed, the ones of sequences not returned too (OpenAI).
        let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
        if ranked {
            choices = best(choices, n, &s.tokenizer);
        }
        let mut body = meta.body(&choices);
        body["usage"] =
            serde_json::to_value(Usage::new(n_prompt, completion)).map_err(ApiError::internal)?;
        let mut r = axum::Json(body).into_response();
        r.extensions_mut().insert(Logged::Tokens {
            prompt: n_prompt,
            completion,
        });
        Ok(r)
    }
}

/// The `n` sequences with the highest cumulative log-probability, best first: the sum over the
/// tokens a reply's `logprobs` lists (an end-of-generation token that ended it is not in the
/// text, and not counted).
fn best(
    mut choices: Vec<Collected>,
    n: usize,
    tok: &rocmforge::tokenizer::Tokenizer,
) -> Vec<Collected> {
    let score = |c: &Collected| {
        c.logprobs
            .iter()
            .filter(|l| !tok.is_eog(l.token))
            .map(|l| f64::from(l.logprob))
            .sum::<f64>()
    };
    choices.sort_by(|a, b| score(b).total_cmp(&score(a)));
    choices.truncate(n);
    choices
}

/// The answer of a request that generates nothing (`max_tokens: 0` with `echo`).
fn reply(meta: &Meta, choices: &[Collected], stream: bool, include_usage: bool) -> Response {
    if stream {
        let mut r = super::reply::stream_collected(choices, meta, include_usage);
        r.extensions_mut().insert(Logged::Streaming);
        return r;
    }
    let mut r = axum::Json(meta.body(choices)).into_response();
    r.extensions_mut().insert(Logged::Tokens {
        prompt: meta.prompt_tokens,
        completion: 0,
    });
    r
}

//! The admin API (`Authorization: Bearer <admin token>`). Amounts are decimal USDT strings.

use super::{bearer, App, Request};
use crate::error::{json_response, ApiError};
use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tollgate_actors::account::CreditRequest;
use tollgate_actors::directory::ChildQuery;
use tollgate_actors::keys::{hash_key, random_id, KeyError, NewKey};
use tollgate_actors::store::{EntryKind, KeyRow, StoreError, UsageRecord};
use tollgate_actors::supervisor::TreeNode;
use tollgate_actors::Amount;
use warp::reply::Response;

pub fn authorize(app: &App, req: &Request) -> Result<(), ApiError> {
    let token = bearer(&req.headers).ok_or(ApiError::InvalidAdminToken)?;
    // Compare digests: equal-length inputs, so the comparison's timing says nothing useful.
    if hash_key(token) == app.admin_token {
        Ok(())
    } else {
        Err(ApiError::InvalidAdminToken)
    }
}

pub async fn route(
    app: &App,
    req: &Request,
    path: &[&str],
    body: Bytes,
) -> Result<Response, ApiError> {
    let m = &req.method;
    match path {
        ["accounts"] if m == Method::POST => create_account(app, &body).await,
        ["accounts", id] if m == Method::GET => get_account(app, id).await,
        ["accounts", id, "credits"] if m == Method::POST => credit(app, id, &body).await,
        ["accounts", id, "keys"] if m == Method::POST => create_key(app, id, &body).await,
        ["accounts", id, "usage"] if m == Method::GET => usage(app, id, &req.query).await,
        ["keys", id] if m == Method::DELETE => revoke_key(app, id).await,
        ["actors"] if m == Method::GET => {
            let tree = app.system.tree(actors_query(&req.query)?).await;
            Ok(json_response(StatusCode::OK, &tree_json(&tree)))
        }
        ["providers"] if m == Method::GET => {
            let data: Vec<Value> = app
                .system
                .provider_status()
                .await
                .into_iter()
                .map(|p| {
                    json!({
                        "name": p.name, "kind": p.kind, "in_flight": p.in_flight,
                        "max_concurrency": p.max_concurrency,
                        "requests_per_minute": p.requests_per_minute,
                        "tokens_per_minute": p.tokens_per_minute,
                        "leases_granted": p.leases_granted, "leases_refused": p.leases_refused,
                        "health": p.health, "consecutive_failures": p.consecutive_failures,
                        "calls_succeeded": p.calls_succeeded, "calls_failed": p.calls_failed,
                        "last_failure_ms": p.last_failure_ms,
                        "idle_connections": p.idle_connections,
                        "connections_opened": p.connections_opened,
                        "retries": p.retries, "failovers": p.failovers,
                    })
                })
                .collect();
            Ok(json_response(
                StatusCode::OK,
                &json!({"object": "list", "data": data}),
            ))
        }
        ["accounts"]
        | ["accounts", _]
        | ["accounts", _, "credits" | "keys" | "usage"]
        | ["keys", _]
        | ["actors"]
        | ["providers"] => Err(ApiError::MethodNotAllowed(m.to_string())),
        _ => Err(ApiError::NotFound(format!(
            "No route for {} {}.",
            m, req.path
        ))),
    }
}

/// A body is one JSON object. (Serde's derived structs would also take a JSON array, field by
/// field in order: `["x@y.z"]` must not create an account.) Deserialized straight into `T`, so
/// that a field given twice is refused rather than the last one winning.
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    let value = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidRequest(format!("Invalid JSON body: {e}")))?;
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::InvalidRequest(
            "The request body must be a JSON object.".to_owned(),
        ));
    }
    Ok(value)
}

/// Text kept in the store and shown to operators holds no control characters. NUL in
/// particular: Postgres cannot store it, and a ledger entry it cannot store would be retried
/// by the ledger writer forever.
fn has_control(text: &str) -> bool {
    text.chars().any(char::is_control)
}

/// The most an account may hold, and the largest single adjustment: 1e9 USDT, about a ninth of
/// what an i64 of nano-USDT can count, so that a balance plus a credit never overflows the
/// store's BIGINT or the account actor's i64.
const MAX_BALANCE: Amount = Amount(1_000_000_000 * tollgate_actors::money::NANOS_PER_USDT);

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::DuplicateEmail(email) => {
            ApiError::Conflict(format!("An account with email `{email}` exists."))
        }
        other => {
            tracing::error!(error = %other, "store error");
            ApiError::Unavailable("store".to_owned())
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    email: String,
}

fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && email.len() <= 254
        && !email.chars().any(char::is_whitespace)
        && !has_control(email)
}

async fn create_account(app: &App, body: &[u8]) -> Result<Response, ApiError> {
    let new: NewAccount = parse(body)?;
    let email = new.email.trim().to_lowercase();
    if !valid_email(&email) {
        return Err(ApiError::InvalidRequest(
            "`email` is not a valid email address.".to_owned(),
        ));
    }
    let id = random_id("acct_").map_err(|_| ApiError::Internal)?;
    let row = app
        .store
        .create_account(&id, &email)
        .await
        .map_err(store_error)?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({"id": row.id, "object": "account", "email": row.email, "balance": row.balance, "reserved": Amount::ZERO, "created_at": row.created_at}),
    ))
}

async fn get_account(app: &App, id: &str) -> Result<Response, ApiError> {
    let row = app
        .store
        .account(id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::NotFound(format!("No account `{id}`.")))?;
    // The actor's view is exact: it includes charges being committed right now.
    let view = app.system.billing.balance(id).await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": row.id, "object": "account", "email": row.email, "balance": view.balance, "reserved": view.reserved, "created_at": row.created_at}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credit {
    amount: Value,
    reason: Option<String>,
    /// Repeating a credit with the same key applies it once.
    idempotency_key: Option<String>,
}

async fn credit(app: &App, id: &str, body: &[u8]) -> Result<Response, ApiError> {
    let c: Credit = parse(body)?;
    let Value::String(text) = &c.amount else {
        return Err(ApiError::InvalidRequest(
            "`amount` must be a decimal string in USDT, e.g. \"10.5\".".to_owned(),
        ));
    };
    let amount: Amount = text
        .parse()
        .map_err(|e| ApiError::InvalidRequest(format!("`amount`: {e}")))?;
    if amount == Amount::ZERO {
        return Err(ApiError::InvalidRequest(
            "`amount` must not be zero.".to_owned(),
        ));
    }
    if amount > MAX_BALANCE || amount < Amount(-MAX_BALANCE.nanos()) {
        return Err(ApiError::InvalidRequest(format!(
            "`amount` must be between -{MAX_BALANCE} and {MAX_BALANCE}."
        )));
    }
    let reason = c
        .reason
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty());
    let Some(reason) = reason else {
        return Err(ApiError::InvalidRequest(
            "`reason` is required: adjustments are audited.".to_owned(),
        ));
    };
    if reason.len() > 500 {
        return Err(ApiError::InvalidRequest(
            "`reason` is longer than 500 characters.".to_owned(),
        ));
    }
    // Line breaks and tabs are fine in an audit note; NUL and the rest are not.
    if reason
        .chars()
        .any(|ch| ch.is_control() && !matches!(ch, '\n' | '\r' | '\t'))
    {
        return Err(ApiError::InvalidRequest(
            "`reason` must not contain control characters.".to_owned(),
        ));
    }
    let entry_id = match c.idempotency_key {
        Some(k) if !k.is_empty() && k.len() <= 200 && !has_control(&k) => format!("adj:{id}:{k}"),
        Some(_) => {
            return Err(ApiError::InvalidRequest(
                "`idempotency_key` must be 1 to 200 characters, none of them control characters."
                    .to_owned(),
            ))
        }
        None => random_id("adj_").map_err(|_| ApiError::Internal)?,
    };
    if app.store.account(id).await.map_err(store_error)?.is_none() {
        return Err(ApiError::NotFound(format!("No account `{id}`.")));
    }
    if !amount.is_negative() {
        // Checked before the ledger sees it: a balance past i64 would make the commit fail
        // forever (Postgres) or store a float (SQLite). Credits racing each other can each
        // pass this check; with MAX_BALANCE at a ninth of the range it takes eight at once.
        let view = app.system.billing.balance(id).await?;
        if view
            .balance
            .checked_add(amount)
            .is_none_or(|total| total > MAX_BALANCE)
        {
            return Err(ApiError::InvalidRequest(format!(
                "This credit would take the balance above the maximum of {MAX_BALANCE} USDT."
            )));
        }
    }
    let view = app
        .system
        .billing
        .credit(
            id,
            CreditRequest {
                entry_id: entry_id.clone(),
                kind: EntryKind::Adjustment,
                amount,
                reason: Some(reason),
            },
        )
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({"id": id, "object": "account", "entry_id": entry_id, "amount": amount, "balance": view.balance, "reserved": view.reserved}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    spend_cap: Option<String>,
    /// Unix seconds.
    expires_at: Option<i64>,
    allowed_models: Option<Vec<String>>,
}

fn key_json(row: &KeyRow) -> Value {
    json!({
        "id": row.id, "object": "api_key", "account_id": row.account_id, "name": row.name,
        "prefix": row.prefix, "spend_cap": row.spend_cap, "spent": row.spent,
        "expires_at": row.expires_at.map(|t| t / 1000), "allowed_models": row.allowed_models,
        "created_at": row.created_at, "revoked": row.revoked_at.is_some(),
    })
}

async fn create_key(app: &App, id: &str, body: &[u8]) -> Result<Response, ApiError> {
    let k: CreateKey = parse(body)?;
    let name = k.name.trim().to_owned();
    if name.is_empty() || name.len() > 100 || has_control(&name) {
        return Err(ApiError::InvalidRequest(
            "`name` must be 1 to 100 characters, none of them control characters.".to_owned(),
        ));
    }
    let spend_cap = match k.spend_cap {
        None => None,
        Some(s) => {
            let cap: Amount = s
                .parse()
                .map_err(|e| ApiError::InvalidRequest(format!("`spend_cap`: {e}")))?;
            if cap.is_negative() {
                return Err(ApiError::InvalidRequest(
                    "`spend_cap` must not be negative.".to_owned(),
                ));
            }
            Some(cap)
        }
    };
    if let Some(models) = &k.allowed_models {
        if let Some(unknown) = models.iter().find(|m| !app.catalog.contains_key(*m)) {
            return Err(ApiError::InvalidRequest(format!(
                "`allowed_models`: no model `{unknown}`."
            )));
        }
    }
    if app.store.account(id).await.map_err(store_error)?.is_none() {
        return Err(ApiError::NotFound(format!("No account `{id}`.")));
    }
    let new = NewKey {
        name,
        spend_cap,
        expires_at: k.expires_at.map(|s| s.saturating_mul(1000)),
        allowed_models: k.allowed_models,
    };
    let (row, full) = app.keys.create(id, new).await.map_err(|e| match e {
        KeyError::Store(s) => store_error(s),
        _ => ApiError::Internal,
    })?;
    let mut out = key_json(&row);
    out["key"] = Value::String(full);
    Ok(json_response(StatusCode::CREATED, &out))
}

async fn revoke_key(app: &App, id: &str) -> Result<Response, ApiError> {
    let row = app.keys.revoke(id).await.map_err(|e| match e {
        KeyError::Store(s) => store_error(s),
        _ => ApiError::Internal,
    })?;
    let row = row.ok_or_else(|| ApiError::NotFound(format!("No key `{id}`.")))?;
    Ok(json_response(StatusCode::OK, &key_json(&row)))
}

fn usage_json(u: &UsageRecord) -> Value {
    json!({
        "request_id": u.request_id, "model": u.model, "provider": u.provider, "key_id": u.key_id,
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "cached_tokens": u.cached_tokens, "cost": u.cost, "uncollected": u.uncollected,
        "status": u.status, "stream": u.stream,
        "usage_source": match u.usage_source { tollgate_actors::store::UsageSource::Upstream => "upstream", tollgate_actors::store::UsageSource::Estimated => "estimated" },
        "latency_ms": u.latency_ms, "created_at": u.created_at,
    })
}

async fn usage(app: &App, id: &str, query: &str) -> Result<Response, ApiError> {
    let mut limit = 50u32;
    for (k, v) in query.split('&').filter_map(|p| p.split_once('=')) {
        if k == "limit" {
            limit = v
                .parse()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| {
                    ApiError::InvalidRequest(
                        "`limit` must be an integer from 1 to 1000.".to_owned(),
                    )
                })?;
        }
    }
    if app.store.account(id).await.map_err(store_error)?.is_none() {
        return Err(ApiError::NotFound(format!("No account `{id}`.")));
    }
    // A charge is answered from the node's journal and reaches the store a moment later: wait
    // for what is on its way, so the list has every call that has completed.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        app.system.billing.flush(),
    )
    .await;
    let rows = app.store.usage(id, limit).await.map_err(store_error)?;
    let data: Vec<Value> = rows.iter().map(usage_json).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data}),
    ))
}

/// `?accounts=N` (0 to 1000, default 100): how many account actors to list, worst off first;
/// `?account=ID`: only that account's.
fn actors_query(query: &str) -> Result<ChildQuery, ApiError> {
    let mut q = ChildQuery {
        limit: 100,
        account: None,
    };
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "accounts" => {
                q.limit = v.parse().ok().filter(|n| *n <= 1000).ok_or_else(|| {
                    ApiError::InvalidRequest(
                        "`accounts` must be an integer from 0 to 1000.".to_owned(),
                    )
                })?;
            }
            "account" => q.account = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok(q)
}

fn tree_json(node: &TreeNode) -> Value {
    json!({
        "name": node.name, "kind": node.kind, "status": node.status, "restarts": node.restarts,
        "uptime_secs": node.uptime.as_secs(), "mailbox_depth": node.mailbox_depth,
        "messages": node.messages,
        "children": node.children.iter().map(tree_json).collect::<Vec<_>>(),
        "children_total": node.children_total,
    })
}

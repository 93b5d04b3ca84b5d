//! An in-process Kubernetes API server for the local control plane: the resources the operator
//! uses (its CRDs, Deployments, Pods, Services, ConfigMaps, Events, Leases) with the semantics
//! kube-rs and kubectl rely on: resource versions and conflicts, list and watch with bookmarks,
//! the status subresource, generations, finalizers, owner-reference garbage collection, merge /
//! JSON / apply patches, discovery, and RBAC for users that have rules.
//!
//! Plain HTTP on a loopback address, bearer tokens. Objects persist under a data directory.

mod kinds;
mod patch;
mod rbac;
mod selector;
mod store;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::rbac::v1::PolicyRule;
use kinds::Kind;
use selector::{FieldSelector, LabelSelector};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{ApiError, ObjKey, Part, PatchType, Store};
use tokio::sync::{broadcast, mpsc, watch};

pub struct User {
    /// The bearer token that authenticates the user.
    pub token: String,
    pub name: String,
    /// RBAC rules held to; `None`: may do anything.
    pub rules: Option<Vec<PolicyRule>>,
}

pub struct ApiServerOptions {
    pub addr: SocketAddr,
    /// Where objects persist (`state.json`); `None` keeps them in memory only.
    pub data_dir: Option<PathBuf>,
    pub users: Vec<User>,
    /// The user that requests without a token act as (kubectl sends no bearer token over
    /// plain HTTP); `None`: they are refused.
    pub anonymous: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Snapshot { path: PathBuf, message: String },
    #[error("RBAC rules: {0}")]
    Rules(String),
}

/// The rules of the ClusterRoles in a YAML stream.
pub fn rules_from_yaml(yaml: &str) -> Result<Vec<PolicyRule>, ApiServerError> {
    rbac::rules_from_yaml(yaml).map_err(ApiServerError::Rules)
}

pub struct ApiServer {
    url: String,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    flusher: tokio::task::JoinHandle<()>,
}

struct Ctx {
    store: Store,
    users: HashMap<String, User>,
    anonymous: Option<String>,
    addr: String,
    requests: Mutex<BTreeMap<(String, String, String), u64>>,
    stop: watch::Receiver<bool>,
}

fn snapshot_path(dir: &std::path::Path) -> PathBuf {
    dir.join("state.json")
}

fn flush(store: &Store, dir: Option<&std::path::Path>) {
    let (Some(dir), Some(bytes)) = (dir, store.snapshot_if_dirty()) else {
        return;
    };
    let path = snapshot_path(dir);
    let tmp = path.with_extension("json.tmp");
    let written = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot save the API server's objects");
    }
}

impl ApiServer {
    pub async fn start(opts: ApiServerOptions) -> Result<ApiServer, ApiServerError> {
        let snapshot = match &opts.data_dir {
            Some(dir) => {
                let path = snapshot_path(dir);
                match std::fs::read(&path) {
                    Ok(bytes) => Some((path, bytes)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => {
                        return Err(ApiServerError::Snapshot {
                            path,
                            message: e.to_string(),
                        });
                    }
                }
            }
            None => None,
        };
        let store = match &snapshot {
            Some((path, bytes)) => {
                Store::new(Some(bytes)).map_err(|message| ApiServerError::Snapshot {
                    path: path.clone(),
                    message,
                })?
            }
            None => Store::new(None).map_err(ApiServerError::Rules)?,
        };
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .map_err(|source| ApiServerError::Bind {
                addr: opts.addr,
                source,
            })?;
        let local = listener
            .local_addr()
            .map_err(|source| ApiServerError::Bind {
                addr: opts.addr,
                source,
            })?;
        let (stop, stop_rx) = watch::channel(false);
        let ctx = Arc::new(Ctx {
            store,
            anonymous: opts.anonymous.and_then(|name| {
                opts.users
                    .iter()
                    .find(|u| u.name == name)
                    .map(|u| u.token.clone())
            }),
            users: opts
                .users
                .into_iter()
                .map(|u| (u.token.clone(), u))
                .collect(),
            addr: local.to_string(),
            requests: Mutex::new(BTreeMap::new()),
            stop: stop_rx.clone(),
        });
        let app = axum::Router::new().fallback(handle).with_state(ctx.clone());
        let mut server_stop = stop_rx.clone();
        let server = tokio::spawn(async move {
            let shutdown = async move {
                let _ = server_stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "API server");
            }
        });
        let data_dir = opts.data_dir.clone();
        let mut flush_stop = stop_rx;
        let flusher = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = flush_stop.wait_for(|s| *s) => break,
                }
                flush(&ctx.store, data_dir.as_deref());
            }
            flush(&ctx.store, data_dir.as_deref());
        });
        Ok(ApiServer {
            url: format!("http://{local}"),
            stop,
            server,
            flusher,
        })
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A kubeconfig for the user with this token, `namespace` as its default.
    pub fn kubeconfig_yaml(&self, token: &str, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: sjob-local\n  cluster:\n    server: {url}\nusers:\n- name: sjob-local\n  user:\n    token: {token}\ncontexts:\n- name: sjob-local\n  context:\n    cluster: sjob-local\n    user: sjob-local\n    namespace: {namespace}\ncurrent-context: sjob-local\n",
            url = self.url
        )
    }

    /// Ends watches, stops serving and saves the objects.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
        let _ = self.flusher.await;
    }
}

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.status())
}

fn not_found() -> Response {
    error_response(&ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    ))
}

/// One API request, its path taken apart.
struct Target<'a> {
    kind: Kind,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
    status: bool,
}

fn parse_target<'a>(
    kinds: &[Kind],
    group: &str,
    version: &str,
    rest: &[&'a str],
) -> Option<Target<'a>> {
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(*ns), tail),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [p] => (*p, None, None),
        [p, n] => (*p, Some(*n), None),
        [p, n, s] => (*p, Some(*n), Some(*s)),
        _ => return None,
    };
    let kind = kinds
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)?
        .clone();
    if !kind.namespaced && namespace.is_some()
        || kind.namespaced && namespace.is_none() && name.is_some()
    {
        return None;
    }
    let status = match sub {
        None => false,
        Some("status") if kind.status => true,
        Some(_) => return None,
    };
    Some(Target {
        kind,
        namespace,
        name,
        status,
    })
}

async fn handle(
    State(ctx): State<Arc<Ctx>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["healthz"] | ["livez"] | ["readyz"] => return "ok".into_response(),
        ["version"] => {
            return json_response(
                200,
                &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-sjob-local", "platform": "linux/amd64"}),
            );
        }
        _ => {}
    }
    let token = match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(v) => v.strip_prefix("Bearer ").unwrap_or_default(),
        None => ctx.anonymous.as_deref().unwrap_or_default(),
    };
    let Some(mut user) = ctx.users.get(token) else {
        return error_response(&ApiError::new(401, "Unauthorized", "Unauthorized"));
    };
    // Impersonation (`kubectl --as NAME`), for users without RBAC limits.
    if let Some(name) = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
    {
        match ctx.users.values().find(|u| u.name == name) {
            Some(other) if user.rules.is_none() => user = other,
            _ => {
                return error_response(&ApiError::new(
                    403,
                    "Forbidden",
                    format!("User {:?} cannot impersonate user {name:?}", user.name),
                ));
            }
        }
    }
    let kinds = ctx.store.kinds();
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["debug", "requests"] => return json_response(200, &request_counts(&ctx)),
        ["api"] => return json_response(200, &kinds::api_versions(&ctx.addr)),
        ["openapi", "v3"] => return json_response(200, &kinds::openapi_index(&kinds)),
        ["openapi", "v3", "api", v] => {
            return kinds::openapi_group_version(&kinds, "", v)
                .map_or_else(not_found, |d| json_response(200, &d));
        }
        ["openapi", "v3", "apis", g, v] => {
            return kinds::openapi_group_version(&kinds, g, v)
                .map_or_else(not_found, |d| json_response(200, &d));
        }
        ["apis"] => return json_response(200, &kinds::api_group_list(&kinds)),
        ["apis", g] => {
            return kinds::api_group(&kinds, g).map_or_else(not_found, |d| json_response(200, &d));
        }
        ["api", v] => {
            return kinds::resource_list(&kinds, "", v)
                .map_or_else(not_found, |d| json_response(200, &d));
        }
        ["apis", g, v] => {
            return kinds::resource_list(&kinds, g, v)
                .map_or_else(not_found, |d| json_response(200, &d));
        }
        ["api", v, rest @ ..] => ("", v, rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return not_found(),
    };
    let Some(target) = parse_target(&kinds, group, version, rest) else {
        return not_found();
    };
    let query: HashMap<String, String> = uri
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, target.name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) if is_watch => "watch",
        (&Method::GET, None) => "list",
        (&Method::POST, None) => "create",
        (&Method::PUT, Some(_)) => "update",
        (&Method::PATCH, Some(_)) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        _ => {
            return error_response(&ApiError::new(
                405,
                "MethodNotAllowed",
                format!("{method} is not supported on {path}"),
            ));
        }
    };
    let resource = if target.status {
        format!("{}/status", target.kind.plural)
    } else {
        target.kind.plural.clone()
    };
    count(&ctx, &user.name, verb, &target.kind.qualified());
    if let Some(rules) = &user.rules {
        let attrs = rbac::Attributes {
            verb,
            group: &target.kind.group,
            resource: &resource,
            name: target.name,
        };
        if !rbac::allows(rules, &attrs) {
            let what = match target.name {
                Some(n) => format!("{} {n:?}", target.kind.qualified()),
                None => target.kind.qualified(),
            };
            let scope = match target.namespace {
                Some(ns) => format!("in the namespace {ns:?}"),
                None => "at the cluster scope".into(),
            };
            return error_response(&ApiError::new(
                403,
                "Forbidden",
                format!(
                    "{what} is forbidden: User {:?} cannot {verb} resource {resource:?} in API group {:?} {scope}",
                    user.name, target.kind.group
                ),
            ));
        }
    }
    if query.contains_key("dryRun") {
        return error_response(&ApiError::bad_request(
            "dryRun is not supported by this server",
        ));
    }
    let table = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"));
    let result = match verb {
        "watch" => return watch_response(&ctx, &target, &query),
        "list" => list(&ctx, &target, &query, table),
        "get" => get(&ctx, &target, table),
        "create" => parse_body(&body).and_then(|obj| {
            ctx.store
                .create(&target.kind, target.namespace.unwrap_or_default(), obj)
                .map(|o| (201, o))
        }),
        "update" => parse_body(&body).and_then(|obj| {
            ctx.store
                .update(&target.kind, &key_of(&target), obj, part(&target))
                .map(|o| (200, o))
        }),
        "patch" => patch(&ctx, &target, &headers, &query, &body).map(|o| (200, o)),
        _ => ctx
            .store
            .delete(&target.kind, &key_of(&target))
            .map(|o| (200, o)),
    };
    match result {
        Ok((code, body)) => json_response(code, &body),
        Err(e) => error_response(&e),
    }
}

fn count(ctx: &Ctx, user: &str, verb: &str, resource: &str) {
    let mut counts = ctx.requests.lock().unwrap_or_else(|p| p.into_inner());
    *counts
        .entry((user.to_string(), verb.to_string(), resource.to_string()))
        .or_default() += 1;
}

fn request_counts(ctx: &Ctx) -> Value {
    let counts = ctx.requests.lock().unwrap_or_else(|p| p.into_inner());
    let rows: Vec<Value> = counts
        .iter()
        .map(|((user, verb, resource), n)| json!({"user": user, "verb": verb, "resource": resource, "count": n}))
        .collect();
    json!({"requests": rows})
}

fn part(t: &Target) -> Part {
    if t.status { Part::Status } else { Part::Main }
}

fn key_of(t: &Target) -> ObjKey {
    ObjKey {
        group: t.kind.group.clone(),
        resource: t.kind.plural.clone(),
        namespace: t.namespace.unwrap_or_default().to_string(),
        name: t.name.unwrap_or_default().to_string(),
    }
}

fn parse_body(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
}

fn selectors(query: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn get(ctx: &Ctx, t: &Target, table: bool) -> Result<(u16, Value), ApiError> {
    let key = key_of(t);
    let obj = ctx
        .store
        .get(&key)
        .ok_or_else(|| ApiError::not_found(&t.kind, &key.name))?;
    if table {
        let rv = obj["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        return Ok((200, to_table(&t.kind, &[obj], &rv)));
    }
    Ok((200, obj))
}

fn list(
    ctx: &Ctx,
    t: &Target,
    query: &HashMap<String, String>,
    table: bool,
) -> Result<(u16, Value), ApiError> {
    let (labels, fields) = selectors(query)?;
    let (items, rv) = ctx.store.list(&t.kind, t.namespace, &labels, &fields);
    if table {
        return Ok((200, to_table(&t.kind, &items, &rv.to_string())));
    }
    Ok((
        200,
        json!({
            "kind": format!("{}List", t.kind.kind),
            "apiVersion": t.kind.api_version(),
            "metadata": {"resourceVersion": rv.to_string()},
            "items": items,
        }),
    ))
}

fn patch(
    ctx: &Ctx,
    t: &Target,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<Value, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    let (ty, value) = match media {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            (PatchType::Merge, parse_body(body)?)
        }
        "application/json-patch+json" => (PatchType::Json, parse_body(body)?),
        "application/apply-patch+yaml" => (
            PatchType::Apply,
            serde_yaml::from_slice::<Value>(body)
                .map_err(|e| ApiError::bad_request(format!("the apply body is not YAML: {e}")))?,
        ),
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the patch content type {other:?} is not supported"),
            ));
        }
    };
    ctx.store.patch(
        &t.kind,
        &key_of(t),
        ty,
        &value,
        part(t),
        query.get("fieldManager").map(String::as_str),
    )
}

fn watch_line(ty: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": ty, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_response(ctx: &Arc<Ctx>, t: &Target, query: &HashMap<String, String>) -> Response {
    let (labels, fields) = match selectors(query) {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(rv) => match rv.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resourceVersion {rv:?}"
                )));
            }
        },
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(1800);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let kind = t.kind.clone();
    let namespace = t.namespace.map(str::to_string);
    let body = Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    }));
    let (replay, mut changes) = match ctx.store.watch(&kind, from) {
        Ok(w) => w,
        Err(floor) => {
            let e = ApiError::new(
                410,
                "Expired",
                format!(
                    "too old resource version: {} ({floor})",
                    from.unwrap_or_default()
                ),
            );
            let _ = tx.try_send(watch_line("ERROR", &e.status()));
            drop(tx);
            return json_response_stream(body);
        }
    };
    let mut seen = from.unwrap_or_else(|| ctx.store.current_rv());
    let mut stop = ctx.stop.clone();
    let matches = move |c: &store::Change| {
        c.key.group == kind.group
            && c.key.resource == kind.plural
            && namespace.as_deref().is_none_or(|ns| c.key.namespace == ns)
            && labels.matches(&c.object)
            && fields.matches(&c.object)
    };
    let bookmark_kind = (t.kind.kind.clone(), t.kind.api_version());
    tokio::spawn(async move {
        for c in replay.iter().filter(|c| matches(c)) {
            seen = seen.max(c.rv);
            if tx
                .send(watch_line(c.kind.as_str(), &c.object))
                .await
                .is_err()
            {
                return;
            }
        }
        let end = tokio::time::sleep(Duration::from_secs(timeout));
        tokio::pin!(end);
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = &mut end => break,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
                _ = tick.tick(), if bookmarks => {
                    let b = json!({"kind": bookmark_kind.0, "apiVersion": bookmark_kind.1, "metadata": {"resourceVersion": seen.to_string()}});
                    if tx.send(watch_line("BOOKMARK", &b)).await.is_err() {
                        break;
                    }
                }
                r = changes.recv() => match r {
                    Ok(c) => {
                        if c.rv <= seen && from.is_some() {
                            continue;
                        }
                        seen = seen.max(c.rv);
                        if matches(&c) && tx.send(watch_line(c.kind.as_str(), &c.object)).await.is_err() {
                            break;
                        }
                    }
                    // Fell behind: end the watch; the client resumes from its last version.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
    });
    json_response_stream(body)
}

fn json_response_stream(body: Body) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// A human age as kubectl prints it: 45s, 3m20s, 5h, 2d.
fn age(created: &str) -> String {
    let Ok(t) = created.parse::<jiff::Timestamp>() else {
        return "<unknown>".into();
    };
    let s = (jiff::Timestamp::now().as_second() - t.as_second()).max(0);
    match s {
        0..120 => format!("{s}s"),
        120..600 => format!("{}m{}s", s / 60, s % 60),
        600..10_800 => format!("{}m", s / 60),
        10_800..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn json_path(obj: &Value, path: &str) -> Value {
    let ptr: String = path
        .trim_start_matches('.')
        .split('.')
        .map(|s| format!("/{s}"))
        .collect();
    obj.pointer(&ptr).cloned().unwrap_or(Value::Null)
}

/// The server-side table kubectl prints: the name, the kind's columns, the age.
fn to_table(kind: &Kind, items: &[Value], rv: &str) -> Value {
    let mut columns: Vec<(String, String, String)> =
        vec![("Name".into(), "string".into(), ".metadata.name".into())];
    match kind.plural.as_str() {
        "pods" => {
            columns.push(("Phase".into(), "string".into(), ".status.phase".into()));
            columns.push(("IP".into(), "string".into(), ".status.podIP".into()));
        }
        "deployments" => {
            columns.push((
                "Ready".into(),
                "integer".into(),
                ".status.readyReplicas".into(),
            ));
            columns.push((
                "Available".into(),
                "integer".into(),
                ".status.availableReplicas".into(),
            ));
        }
        _ => {}
    }
    columns.extend(kind.columns.iter().cloned());
    if !columns.iter().any(|(n, _, _)| n == "Age") {
        columns.push((
            "Age".into(),
            "date".into(),
            ".metadata.creationTimestamp".into(),
        ));
    }
    let defs: Vec<Value> = columns
        .iter()
        .map(|(name, ty, _)| {
            let ty = if ty == "date" { "string" } else { ty.as_str() };
            json!({"name": name, "type": ty, "format": if name == "Name" { "name" } else { "" }, "description": "", "priority": 0})
        })
        .collect();
    let rows: Vec<Value> = items
        .iter()
        .map(|obj| {
            let cells: Vec<Value> = columns
                .iter()
                .map(|(_, ty, path)| {
                    let v = json_path(obj, path);
                    match (ty.as_str(), v) {
                        ("date", Value::String(s)) => json!(age(&s)),
                        (_, Value::Null) => json!("<none>"),
                        (_, v) => v,
                    }
                })
                .collect();
            json!({"cells": cells, "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]}})
        })
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": rv},
        "columnDefinitions": defs,
        "rows": rows,
    })
}

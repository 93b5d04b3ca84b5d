//! Who may do what through the engine's REST API: where a savepoint may be written (the
//! configured roots) and, optionally, a bearer token every job-facing request must carry.
//! Health, readiness, metrics and the cluster overview stay open: they reveal no job and
//! change nothing, and the kubelet's probes carry no token.

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// Paths served without a token.
const OPEN_PATHS: &[&str] = &["/healthz", "/readyz", "/metrics", "/overview", "/config"];

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read the REST token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the REST token file {0} is empty")]
    EmptyToken(String),
    #[error("savepoint root {root}: {reason}")]
    Root { root: String, reason: String },
}

/// Where savepoints may be written. Empty: anywhere the process can write (as Flink does).
#[derive(Clone, Debug, Default)]
pub struct SavepointRoots {
    roots: Vec<PathBuf>,
    /// Object store roots, as `s3://bucket/prefix` (`az://container/prefix`) without a
    /// trailing `/`.
    urls: Vec<String>,
}

/// An object store URL (`s3://`, `s3a://`, `az://`, `azure://`) in one spelling:
/// `s3://bucket/a/b`, `az://container/a/b`. `None` for anything else; an error for `.`, `..`
/// or empty segments.
fn object_url(target: &str) -> Option<Result<String, String>> {
    let (scheme, rest) = [
        ("s3://", "s3"),
        ("s3a://", "s3"),
        ("az://", "az"),
        ("azure://", "az"),
    ]
    .into_iter()
    .find_map(|(prefix, scheme)| target.strip_prefix(prefix).map(|rest| (scheme, rest)))?;
    let rest = rest.trim_end_matches('/');
    if rest
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Some(Err(format!(
            "savepoint target '{target}' has an empty, '.' or '..' segment"
        )));
    }
    Some(Ok(format!("{scheme}://{rest}")))
}

impl SavepointRoots {
    /// Roots are absolute paths, `file:` URLs or `s3://bucket/prefix`; symbolic links in
    /// local ones are resolved.
    pub fn new(roots: &[String]) -> Result<SavepointRoots, AccessError> {
        let mut urls = Vec::new();
        let mut local = Vec::new();
        for r in roots {
            match object_url(r) {
                Some(Ok(url)) => urls.push(url),
                Some(Err(reason)) => {
                    return Err(AccessError::Root {
                        root: r.clone(),
                        reason,
                    });
                }
                None => local.push(r),
            }
        }
        let roots = local
            .into_iter()
            .map(|r| {
                let path = local_path(r);
                if !path.is_absolute() {
                    return Err(AccessError::Root {
                        root: r.clone(),
                        reason: "not an absolute path".into(),
                    });
                }
                Ok(resolve(&path))
            })
            .collect::<Result<_, _>>()?;
        Ok(SavepointRoots { roots, urls })
    }

    pub fn is_restricted(&self) -> bool {
        !self.roots.is_empty() || !self.urls.is_empty()
    }

    fn allowed(&self) -> String {
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .chain(self.urls.iter().cloned())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The target as the engine will write it, or why it is refused. `..` cannot climb out of
    /// a root and a symbolic link inside a root that leads out of it is followed first.
    pub fn check(&self, target: &str) -> Result<String, String> {
        if let Some(url) = object_url(target) {
            let url = url?;
            if !self.is_restricted()
                || self
                    .urls
                    .iter()
                    .any(|r| url == *r || url.starts_with(&format!("{r}/")))
            {
                return Ok(url);
            }
            return Err(format!(
                "savepoint target '{target}' is outside the engine's savepoint roots ({}); \
                 allowed roots are set with --savepoint-root",
                self.allowed()
            ));
        }
        let path = local_path(target);
        if !self.is_restricted() {
            return Ok(path.to_string_lossy().into_owned());
        }
        if !path.is_absolute() {
            return Err(format!(
                "savepoint target '{target}' is not an absolute path or file: URL, and the \
                 engine only writes savepoints under its savepoint roots"
            ));
        }
        let resolved = resolve(&path);
        if self.roots.iter().any(|root| resolved.starts_with(root)) {
            return Ok(path.to_string_lossy().into_owned());
        }
        Err(format!(
            "savepoint target '{target}' is outside the engine's savepoint roots ({}); \
             allowed roots are set with --savepoint-root",
            self.allowed()
        ))
    }
}

/// Flink writes file URLs both as file:/path and file:///path.
fn local_path(target: &str) -> PathBuf {
    match target.strip_prefix("file:") {
        Some(p) => PathBuf::from(format!("/{}", p.trim_start_matches('/'))),
        None => PathBuf::from(target),
    }
}

/// `path` without `.` and `..`, with the symbolic links of its longest existing prefix
/// resolved: what the file system will reach when the path is created.
fn resolve(path: &Path) -> PathBuf {
    let mut lexical = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                lexical.pop();
            }
            Component::CurDir => {}
            other => lexical.push(other),
        }
    }
    let mut existing = lexical.clone();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            let mut out = real;
            out.extend(rest.iter().rev());
            return out;
        }
        match (
            existing.file_name().map(|n| n.to_owned()),
            existing.parent(),
        ) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent.to_path_buf();
            }
            _ => return lexical,
        }
    }
}

/// The bearer token requests must carry, when one is configured.
#[derive(Clone)]
pub struct RestToken(Arc<str>);

impl std::fmt::Debug for RestToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RestToken(…)")
    }
}

impl RestToken {
    pub fn new(token: &str) -> Option<RestToken> {
        let token = token.trim();
        (!token.is_empty()).then(|| RestToken(token.into()))
    }

    /// The token in `path` (surrounding white space ignored); an empty file is an error.
    pub fn from_file(path: &Path) -> Result<RestToken, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::TokenFile {
            path: path.display().to_string(),
            source,
        })?;
        RestToken::new(&text).ok_or_else(|| AccessError::EmptyToken(path.display().to_string()))
    }

    pub fn secret(&self) -> &str {
        &self.0
    }

    fn accepts(&self, header: Option<&str>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        bool::from(given.trim().as_bytes().ct_eq(self.0.as_bytes()))
    }
}

/// Middleware: refuses job-facing requests without the token (401, in Flink's error shape).
pub async fn require_token(
    State(token): State<Option<RestToken>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = token else {
        return next.run(request).await;
    };
    if OPEN_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if token.accepts(given) {
        return next.run(request).await;
    }
    let message = if given.is_some() {
        "Unauthorized: the bearer token is not this engine's"
    } else {
        "Unauthorized: this engine requires a bearer token (Authorization: Bearer …; sjob --token-file)"
    };
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(json!({ "errors": [message] })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_must_stay_inside_the_roots() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("sp");
        std::fs::create_dir(&root).unwrap();
        let outside = dir.path().join("elsewhere");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let roots = SavepointRoots::new(&[root.display().to_string()]).unwrap();
        let r = root.display();
        assert!(roots.check(&format!("{r}")).is_ok());
        assert!(roots.check(&format!("{r}/a/b")).is_ok());
        assert!(roots.check(&format!("file://{r}/a")).is_ok());
        for bad in [
            format!("{r}/../elsewhere"),
            format!("{r}/link/x"),
            format!("{r}x"),
            "/etc/cron.d".to_owned(),
            "relative/dir".to_owned(),
        ] {
            let e = roots.check(&bad).unwrap_err();
            assert!(e.contains(&bad), "{e}");
        }
        // Unrestricted: anywhere.
        let open = SavepointRoots::default();
        assert_eq!(open.check("file:///anywhere").unwrap(), "/anywhere");
        assert_eq!(open.check("relative").unwrap(), "relative");
        assert!(SavepointRoots::new(&["rel".into()]).is_err());
    }

    #[test]
    fn object_store_targets_stay_under_their_url_roots() {
        let roots = SavepointRoots::new(&["s3://bkt/sp/".into(), "/data/sp".into()]).unwrap();
        assert_eq!(roots.check("s3://bkt/sp").unwrap(), "s3://bkt/sp");
        assert_eq!(roots.check("s3a://bkt/sp/x/").unwrap(), "s3://bkt/sp/x");
        assert!(
            roots.check("az://bkt/sp/x").is_err(),
            "another store, same names"
        );
        let azure = SavepointRoots::new(&["az://c/sp".into()]).unwrap();
        assert_eq!(azure.check("azure://c/sp/x").unwrap(), "az://c/sp/x");
        for bad in [
            "s3://bkt/spx",
            "s3://other/sp/x",
            "s3://bkt/sp/../x",
            "s3://bkt/sp//x",
            "s3://bkt",
        ] {
            let e = roots.check(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(SavepointRoots::new(&["s3://bkt/../x".into()]).is_err());
        let open = SavepointRoots::default();
        assert_eq!(open.check("s3://b/any").unwrap(), "s3://b/any");
    }

    #[test]
    fn tokens_compare_whole() {
        let t = RestToken::new(" s3cret\n").unwrap();
        assert!(t.accepts(Some("Bearer s3cret")));
        assert!(!t.accepts(Some("Bearer s3cre")));
        assert!(!t.accepts(Some("Bearer s3cretx")));
        assert!(!t.accepts(Some("s3cret")));
        assert!(!t.accepts(None));
        assert!(RestToken::new("  ").is_none());
    }
}

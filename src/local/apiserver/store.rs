//! The object store: every object as JSON under (group, resource, namespace, name), one
//! resource-version counter, a history of changes for watches, and a snapshot on disk.

use super::kinds::{self, Kind};
use super::patch;
use super::selector::{FieldSelector, LabelSelector};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;

/// How many changes are kept for watches that resume from a resource version.
const HISTORY: usize = 50_000;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjKey {
    pub group: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
}

/// A failed request, answered as a `Status`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }
    pub fn invalid(kind: &Kind, name: &str, message: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            422,
            "Invalid",
            format!("{} {name:?} is invalid: {message}", kind.kind),
        )
    }
    pub fn not_found(kind: &Kind, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", kind.qualified()),
        )
    }
    fn conflict(kind: &Kind, name: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                kind.qualified()
            ),
        )
    }
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub kind: EventType,
    pub key: ObjKey,
    pub object: Value,
}

/// A watch's start: the changes to replay, and the receiver of those to come.
pub type Watch = (Vec<Arc<Change>>, broadcast::Receiver<Arc<Change>>);

/// How a PATCH body is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    Merge,
    Json,
    Apply,
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

/// What `snapshot_if_dirty` writes: the `Snapshot` layout, borrowed from the live state.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    rv: u64,
    objects: Vec<(&'a ObjKey, &'a Value)>,
    applied: Vec<(&'a ObjKey, &'a String, &'a Value)>,
}

#[derive(Default, Deserialize)]
struct Snapshot {
    rv: u64,
    objects: Vec<(ObjKey, Value)>,
    applied: Vec<(ObjKey, String, Value)>,
}

struct State {
    rv: u64,
    objects: BTreeMap<ObjKey, Value>,
    /// What each field manager last applied to each object (server-side apply).
    applied: BTreeMap<(ObjKey, String), Value>,
    history: VecDeque<Arc<Change>>,
    /// Watches may resume from any resource version at or after this one.
    floor: u64,
    dirty: bool,
    /// Every uid some object names as its owner (a superset: entries are never removed), so a
    /// deletion looks for dependents only when there can be any.
    owners: std::collections::HashSet<String>,
    /// What `Store::kinds` answers, rebuilt when a CRD changes (every request looks it up).
    kinds: Arc<Vec<Kind>>,
}

fn owner_uids(obj: &Value) -> impl Iterator<Item = &str> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|r| r["uid"].as_str())
}

pub struct Store {
    state: Mutex<State>,
    changes: broadcast::Sender<Arc<Change>>,
}

fn is_crd(key: &ObjKey) -> bool {
    key.group == "apiextensions.k8s.io" && key.resource == "customresourcedefinitions"
}

/// The built-in kinds and those of the stored CRDs.
fn served_kinds(objects: &BTreeMap<ObjKey, Value>) -> Arc<Vec<Kind>> {
    let mut out = kinds::builtin();
    let first = ObjKey {
        group: "apiextensions.k8s.io".into(),
        resource: "customresourcedefinitions".into(),
        namespace: String::new(),
        name: String::new(),
    };
    for (_, v) in objects.range(first..).take_while(|(k, _)| is_crd(k)) {
        out.extend(kinds::from_crd(v));
    }
    Arc::new(out)
}

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// The object without metadata and status: what `metadata.generation` counts changes of.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
    }
    v
}

fn without_rv(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    v
}

fn finalizers(obj: &Value) -> usize {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len)
}

impl Store {
    pub fn new(snapshot: Option<&[u8]>) -> Result<Store, String> {
        let snap: Snapshot = match snapshot {
            Some(bytes) => serde_json::from_slice(bytes).map_err(|e| e.to_string())?,
            None => Snapshot::default(),
        };
        let (changes, _) = broadcast::channel(16_384);
        let owners = snap
            .objects
            .iter()
            .flat_map(|(_, o)| owner_uids(o).map(str::to_string))
            .collect();
        let objects: BTreeMap<ObjKey, Value> = snap.objects.into_iter().collect();
        Ok(Store {
            state: Mutex::new(State {
                rv: snap.rv,
                kinds: served_kinds(&objects),
                objects,
                applied: snap
                    .applied
                    .into_iter()
                    .map(|(k, m, v)| ((k, m), v))
                    .collect(),
                history: VecDeque::new(),
                floor: snap.rv,
                dirty: false,
                owners,
            }),
            changes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The store as JSON when it changed since the last call.
    pub fn snapshot_if_dirty(&self) -> Option<Vec<u8>> {
        let mut st = self.lock();
        if !st.dirty {
            return None;
        }
        st.dirty = false;
        let snap = SnapshotRef {
            rv: st.rv,
            objects: st.objects.iter().collect(),
            applied: st.applied.iter().map(|((k, m), v)| (k, m, v)).collect(),
        };
        serde_json::to_vec(&snap).ok()
    }

    /// Every kind served now: the built-in ones and those of the stored CRDs.
    pub fn kinds(&self) -> Arc<Vec<Kind>> {
        self.lock().kinds.clone()
    }

    pub fn get(&self, key: &ObjKey) -> Option<Value> {
        self.lock().objects.get(key).cloned()
    }

    pub fn list(
        &self,
        kind: &Kind,
        namespace: Option<&str>,
        labels: &LabelSelector,
        fields: &FieldSelector,
    ) -> (Vec<Value>, u64) {
        let st = self.lock();
        let items = st
            .objects
            .iter()
            .filter(|(k, v)| {
                k.group == kind.group
                    && k.resource == kind.plural
                    && namespace.is_none_or(|ns| k.namespace == ns)
                    && labels.matches(v)
                    && fields.matches(v)
            })
            .map(|(_, v)| v.clone())
            .collect();
        (items, st.rv)
    }

    /// The changes after `from` (or, without `from`, every object as ADDED) and a receiver
    /// of those to come. `Err` when `from` is older than the kept history.
    pub fn watch(&self, kind: &Kind, from: Option<u64>) -> Result<Watch, u64> {
        let st = self.lock();
        let rx = self.changes.subscribe();
        let replay = match from {
            Some(rv) if rv < st.floor => return Err(st.floor),
            Some(rv) => st
                .history
                .iter()
                .filter(|c| c.rv > rv && c.key.group == kind.group && c.key.resource == kind.plural)
                .cloned()
                .collect(),
            None => st
                .objects
                .iter()
                .filter(|(k, _)| k.group == kind.group && k.resource == kind.plural)
                .map(|(k, v)| {
                    Arc::new(Change {
                        rv: st.rv,
                        kind: EventType::Added,
                        key: k.clone(),
                        object: v.clone(),
                    })
                })
                .collect(),
        };
        Ok((replay, rx))
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    pub fn create(&self, kind: &Kind, namespace: &str, mut obj: Value) -> Result<Value, ApiError> {
        let mut st = self.lock();
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        if kind.plural == "customresourcedefinitions" {
            let name = meta_str(&obj, "name").unwrap_or_default().to_string();
            validate_crd(kind, &name, &obj)?;
        }
        let meta = obj
            .as_object_mut()
            .map(|o| o.entry("metadata").or_insert_with(|| json!({})))
            .filter(|m| m.is_object())
            .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
        let mut name = meta["name"].as_str().unwrap_or_default().to_string();
        if name.is_empty() {
            let Some(prefix) = meta["generateName"].as_str() else {
                return Err(ApiError::invalid(kind, "", "metadata.name: Required value"));
            };
            name = format!(
                "{prefix}{}",
                &uuid::Uuid::new_v4().simple().to_string()[..5]
            );
        }
        if let Some(ns) = meta["namespace"].as_str()
            && kind.namespaced
            && ns != namespace
        {
            return Err(ApiError::bad_request(format!(
                "the namespace of the object ({ns}) does not match the namespace of the request ({namespace})"
            )));
        }
        let key = ObjKey {
            group: kind.group.clone(),
            resource: kind.plural.clone(),
            namespace: if kind.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.clone(),
        };
        if st.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} {name:?} already exists", kind.qualified()),
            ));
        }
        meta["name"] = json!(name);
        if kind.namespaced {
            meta["namespace"] = json!(namespace);
        }
        meta["uid"] = json!(uuid::Uuid::new_v4().to_string());
        meta["creationTimestamp"] = json!(now());
        if kind.has_generation() {
            meta["generation"] = json!(1);
        }
        if let Some(m) = meta.as_object_mut() {
            m.remove("deletionTimestamp");
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
        obj["apiVersion"] = json!(kind.api_version());
        obj["kind"] = json!(kind.kind);
        if kind.status
            && let Some(o) = obj.as_object_mut()
        {
            o.remove("status");
        }
        if kind.plural == "customresourcedefinitions" {
            obj["status"] = crd_status(&obj);
        }
        Ok(st.put(key, obj, EventType::Added, &self.changes))
    }

    /// PUT: a whole object (or its status), guarded by its resource version when it has one.
    pub fn update(
        &self,
        kind: &Kind,
        key: &ObjKey,
        obj: Value,
        part: Part,
    ) -> Result<Value, ApiError> {
        let mut st = self.lock();
        let existing = st
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(kind, &key.name))?;
        if let Some(rv) = meta_str(&obj, "resourceVersion")
            && !rv.is_empty()
            && Some(rv) != meta_str(&existing, "resourceVersion")
        {
            return Err(ApiError::conflict(kind, &key.name));
        }
        if let Some(name) = meta_str(&obj, "name")
            && name != key.name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name}) does not match the name in the URL ({})",
                key.name
            )));
        }
        st.commit(kind, key, &existing, obj, part, &self.changes)
    }

    pub fn patch(
        &self,
        kind: &Kind,
        key: &ObjKey,
        ty: PatchType,
        body: &Value,
        part: Part,
        manager: Option<&str>,
    ) -> Result<Value, ApiError> {
        let mut st = self.lock();
        let existing = st.objects.get(key).cloned();
        let Some(existing) = existing else {
            if ty != PatchType::Apply {
                return Err(ApiError::not_found(kind, &key.name));
            }
            drop(st);
            let created = self.create(kind, &key.namespace, with_name(body, &key.name))?;
            let mut st = self.lock();
            if let Some(m) = manager {
                st.applied
                    .insert((key.clone(), m.to_string()), body.clone());
            }
            return Ok(created);
        };
        let mut next = existing.clone();
        match ty {
            PatchType::Merge => patch::merge_patch(&mut next, body),
            PatchType::Json => patch::json_patch(&mut next, body).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!("the JSON patch could not be applied: {e}"),
                )
            })?,
            PatchType::Apply => {
                let m = manager.ok_or_else(|| {
                    ApiError::bad_request("fieldManager is required for apply patch")
                })?;
                let prev = st.applied.get(&(key.clone(), m.to_string())).cloned();
                patch::apply(&mut next, prev.as_ref(), body);
                st.applied
                    .insert((key.clone(), m.to_string()), body.clone());
            }
        }
        if let Some(rv) = meta_str(body, "resourceVersion")
            && Some(rv) != meta_str(&existing, "resourceVersion")
        {
            return Err(ApiError::conflict(kind, &key.name));
        }
        // A patch never moves the object's resource version; commit() sets the next one.
        if let Some(m) = next.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert(
                "resourceVersion".into(),
                existing["metadata"]["resourceVersion"].clone(),
            );
        }
        st.commit(kind, key, &existing, next, part, &self.changes)
    }

    /// DELETE: gone at once without finalizers, else marked with a deletion timestamp.
    pub fn delete(&self, kind: &Kind, key: &ObjKey) -> Result<Value, ApiError> {
        let mut st = self.lock();
        if !st.objects.contains_key(key) {
            return Err(ApiError::not_found(kind, &key.name));
        }
        Ok(st.delete_key(key, &self.changes))
    }
}

fn with_name(body: &Value, name: &str) -> Value {
    let mut obj = body.clone();
    if obj.is_object() && !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    if obj["metadata"].is_object() {
        obj["metadata"]["name"] = json!(name);
    }
    obj
}

fn validate_crd(kind: &Kind, name: &str, obj: &Value) -> Result<(), ApiError> {
    let spec = &obj["spec"];
    for field in ["group", "names.plural", "names.kind", "scope"] {
        let ptr = format!("/{}", field.replace('.', "/"));
        if spec.pointer(&ptr).and_then(Value::as_str).is_none() {
            return Err(ApiError::invalid(
                kind,
                name,
                format!("spec.{field}: Required value"),
            ));
        }
    }
    if spec["versions"].as_array().is_none_or(|v| v.is_empty()) {
        return Err(ApiError::invalid(
            kind,
            name,
            "spec.versions: Required value",
        ));
    }
    Ok(())
}

fn crd_status(obj: &Value) -> Value {
    let t = now();
    json!({
        "acceptedNames": obj["spec"]["names"],
        "storedVersions": obj["spec"]["versions"].as_array().map(|vs| {
            vs.iter().filter(|v| v["storage"].as_bool() == Some(true)).map(|v| v["name"].clone()).collect::<Vec<_>>()
        }),
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": t},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": t},
        ],
    })
}

impl State {
    fn put(
        &mut self,
        key: ObjKey,
        mut obj: Value,
        kind: EventType,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        for uid in owner_uids(&obj) {
            if !self.owners.contains(uid) {
                self.owners.insert(uid.to_string());
            }
        }
        self.objects.insert(key.clone(), obj.clone());
        self.record(key, obj.clone(), kind, tx);
        obj
    }

    fn record(
        &mut self,
        key: ObjKey,
        object: Value,
        kind: EventType,
        tx: &broadcast::Sender<Arc<Change>>,
    ) {
        self.dirty = true;
        if is_crd(&key) {
            self.kinds = served_kinds(&self.objects);
        }
        let change = Arc::new(Change {
            rv: self.rv,
            kind,
            key,
            object,
        });
        self.history.push_back(change.clone());
        while self.history.len() > HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.floor = old.rv;
            }
        }
        let _ = tx.send(change);
    }

    /// Stores `next` as the new version of `existing`, keeping what the request may not
    /// change: identity, the other part (spec or status), and the generation unless the spec
    /// changed. A write that changes nothing keeps the resource version.
    fn commit(
        &mut self,
        kind: &Kind,
        key: &ObjKey,
        existing: &Value,
        next: Value,
        part: Part,
        tx: &broadcast::Sender<Arc<Change>>,
    ) -> Result<Value, ApiError> {
        if !next.is_object() || !next["metadata"].is_object() && !next["metadata"].is_null() {
            return Err(ApiError::bad_request(
                "the body must be an object with object metadata",
            ));
        }
        let mut obj = match part {
            Part::Status => {
                let mut o = existing.clone();
                match next.get("status") {
                    Some(s) => o["status"] = s.clone(),
                    None => {
                        if let Some(m) = o.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                o
            }
            Part::Main => {
                let mut o = next;
                if o["metadata"].is_null() {
                    o["metadata"] = json!({});
                }
                if kind.status {
                    match existing.get("status") {
                        Some(s) => o["status"] = s.clone(),
                        None => {
                            if let Some(m) = o.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
                for f in [
                    "name",
                    "namespace",
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "generation",
                ] {
                    match existing["metadata"].get(f) {
                        Some(v) => o["metadata"][f] = v.clone(),
                        None => {
                            if let Some(m) = o["metadata"].as_object_mut() {
                                m.remove(f);
                            }
                        }
                    }
                }
                if let Some(m) = o["metadata"].as_object_mut() {
                    m.remove("managedFields");
                }
                o["apiVersion"] = json!(kind.api_version());
                o["kind"] = json!(kind.kind);
                if kind.has_generation() && spec_part(&o) != spec_part(existing) {
                    let g = existing["metadata"]["generation"].as_i64().unwrap_or(0);
                    o["metadata"]["generation"] = json!(g + 1);
                }
                o
            }
        };
        obj["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"].clone();
        if !obj["metadata"]["deletionTimestamp"].is_null() && finalizers(&obj) == 0 {
            self.remove(key, obj.clone(), tx);
            return Ok(obj);
        }
        if without_rv(&obj) == without_rv(existing) {
            return Ok(existing.clone());
        }
        Ok(self.put(key.clone(), obj, EventType::Modified, tx))
    }

    fn delete_key(&mut self, key: &ObjKey, tx: &broadcast::Sender<Arc<Change>>) -> Value {
        let Some(obj) = self.objects.get(key).cloned() else {
            return Value::Null;
        };
        if finalizers(&obj) > 0 {
            if !obj["metadata"]["deletionTimestamp"].is_null() {
                return obj;
            }
            let mut marked = obj;
            marked["metadata"]["deletionTimestamp"] = json!(now());
            return self.put(key.clone(), marked, EventType::Modified, tx);
        }
        self.remove(key, obj.clone(), tx);
        obj
    }

    /// Removes an object, then (garbage collection) the dependents it was the last owner of.
    fn remove(&mut self, key: &ObjKey, obj: Value, tx: &broadcast::Sender<Arc<Change>>) {
        self.objects.remove(key);
        self.applied.retain(|(k, _), _| k != key);
        self.rv += 1;
        let mut gone = obj;
        gone["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(key.clone(), gone.clone(), EventType::Deleted, tx);
        let Some(uid) = meta_str(&gone, "uid").map(str::to_string) else {
            return;
        };
        if !self.owners.contains(&uid) {
            return;
        }
        let refers_to = |o: &Value, uid: &str| {
            o.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"].as_str() == Some(uid)))
        };
        let dependents: Vec<ObjKey> = self
            .objects
            .iter()
            .filter(|(_, o)| refers_to(o, &uid))
            .map(|(k, _)| k.clone())
            .collect();
        if dependents.is_empty() {
            return;
        }
        let live_uids: std::collections::HashSet<String> = self
            .objects
            .values()
            .filter_map(|o| meta_str(o, "uid").map(str::to_string))
            .collect();
        // A dependent goes when none of its owners is left.
        let orphans: Vec<ObjKey> = dependents
            .into_iter()
            .filter(|k| {
                self.objects.get(k).is_some_and(|o| {
                    !o.pointer("/metadata/ownerReferences")
                        .and_then(Value::as_array)
                        .is_some_and(|refs| {
                            refs.iter()
                                .any(|r| r["uid"].as_str().is_some_and(|u| live_uids.contains(u)))
                        })
                })
            })
            .collect();
        for k in orphans {
            self.delete_key(&k, tx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm_kind() -> Kind {
        kinds::builtin()
            .into_iter()
            .find(|k| k.plural == "configmaps")
            .unwrap()
    }
    fn deploy_kind() -> Kind {
        kinds::builtin()
            .into_iter()
            .find(|k| k.plural == "deployments")
            .unwrap()
    }
    fn key(kind: &Kind, name: &str) -> ObjKey {
        ObjKey {
            group: kind.group.clone(),
            resource: kind.plural.clone(),
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn generation_counts_spec_changes_only_and_noop_writes_keep_the_version() {
        let s = Store::new(None).unwrap();
        let k = deploy_kind();
        let d = s
            .create(
                &k,
                "default",
                json!({"metadata": {"name": "d"}, "spec": {"replicas": 1}, "status": {"x": 1}}),
            )
            .unwrap();
        assert_eq!(d["metadata"]["generation"], 1);
        assert!(d.get("status").is_none(), "status is not taken on create");
        let rv = d["metadata"]["resourceVersion"].clone();
        let same = s.update(&k, &key(&k, "d"), d.clone(), Part::Main).unwrap();
        assert_eq!(same["metadata"]["resourceVersion"], rv);
        let st = s
            .patch(
                &k,
                &key(&k, "d"),
                PatchType::Merge,
                &json!({"status": {"ready": 1}, "spec": {"replicas": 9}}),
                Part::Status,
                None,
            )
            .unwrap();
        assert_eq!(st["status"]["ready"], 1);
        assert_eq!(st["spec"]["replicas"], 1, "a status write leaves the spec");
        assert_eq!(st["metadata"]["generation"], 1);
        let up = s
            .patch(
                &k,
                &key(&k, "d"),
                PatchType::Merge,
                &json!({"spec": {"replicas": 2}, "status": {"ready": 5}}),
                Part::Main,
                None,
            )
            .unwrap();
        assert_eq!(up["metadata"]["generation"], 2);
        assert_eq!(up["status"]["ready"], 1, "a main write leaves the status");
        let stale = s.update(&k, &key(&k, "d"), d, Part::Main).unwrap_err();
        assert_eq!(stale.code, 409);
    }

    #[test]
    fn finalizers_hold_deletion_and_owners_take_dependents_with_them() {
        let s = Store::new(None).unwrap();
        let (k, c) = (deploy_kind(), cm_kind());
        let d = s
            .create(
                &k,
                "default",
                json!({"metadata": {"name": "d", "finalizers": ["x"]}, "spec": {}}),
            )
            .unwrap();
        let uid = d["metadata"]["uid"].clone();
        s.create(&c, "default", json!({"metadata": {"name": "c", "ownerReferences": [{"uid": uid, "name": "d", "kind": "Deployment", "apiVersion": "apps/v1"}]}}))
            .unwrap();
        let marked = s.delete(&k, &key(&k, "d")).unwrap();
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        assert!(
            s.get(&key(&c, "c")).is_some(),
            "dependents stay while the owner is held"
        );
        s.patch(
            &k,
            &key(&k, "d"),
            PatchType::Json,
            &json!([{"op": "remove", "path": "/metadata/finalizers"}]),
            Part::Main,
            None,
        )
        .unwrap();
        assert!(s.get(&key(&k, "d")).is_none());
        assert!(s.get(&key(&c, "c")).is_none(), "garbage collected");
    }

    #[test]
    fn watches_resume_from_history_and_survive_a_snapshot() {
        let s = Store::new(None).unwrap();
        let c = cm_kind();
        let a = s
            .create(&c, "default", json!({"metadata": {"name": "a"}}))
            .unwrap();
        let rv: u64 = a["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        s.create(&c, "default", json!({"metadata": {"name": "b"}}))
            .unwrap();
        let (replay, _rx) = s.watch(&c, Some(rv)).unwrap();
        assert_eq!(replay.len(), 1);
        assert_eq!(replay[0].key.name, "b");
        let snap = s.snapshot_if_dirty().unwrap();
        assert!(s.snapshot_if_dirty().is_none());
        let again = Store::new(Some(&snap)).unwrap();
        assert!(again.get(&key(&c, "b")).is_some());
        assert!(
            again.watch(&c, Some(rv)).is_err(),
            "older than the kept history: 410"
        );
        assert_eq!(again.current_rv(), rv + 1);
    }
}

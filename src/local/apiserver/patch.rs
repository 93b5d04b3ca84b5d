//! The patch formats of the Kubernetes API: JSON merge patch (RFC 7386, also used for strategic
//! merge patches, whose list merging this server does not do), JSON patch (RFC 6902) and a
//! simplified server-side apply.

use serde_json::{Map, Value};

/// RFC 7386: objects merge recursively, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in patch {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Server-side apply, simplified: fields this manager applied before and no longer applies
/// are removed, then the applied configuration is merged in (maps recursively, lists whole).
pub fn apply(target: &mut Value, previous: Option<&Value>, applied: &Value) {
    if let Some(prev) = previous {
        remove_dropped(target, prev, applied);
    }
    merge_patch(target, applied);
}

fn remove_dropped(target: &mut Value, prev: &Value, applied: &Value) {
    let (Value::Object(t), Value::Object(p)) = (target, prev) else {
        return;
    };
    for (k, pv) in p {
        match applied.get(k) {
            None => {
                t.remove(k);
            }
            Some(av) => {
                if let Some(tv) = t.get_mut(k) {
                    remove_dropped(tv, pv, av);
                }
            }
        }
    }
}

/// RFC 6902 JSON patch. The error names the operation that failed.
pub fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops
        .as_array()
        .ok_or("a JSON patch must be an array of operations")?;
    for (i, op) in ops.iter().enumerate() {
        apply_op(target, op).map_err(|e| format!("operation {i} ({op}): {e}"))?;
    }
    Ok(())
}

fn field<'a>(op: &'a Value, name: &str) -> Result<&'a Value, String> {
    op.get(name).ok_or_else(|| format!("missing {name:?}"))
}

fn path_of(op: &Value, name: &str) -> Result<Vec<String>, String> {
    let p = field(op, name)?
        .as_str()
        .ok_or_else(|| format!("{name:?} must be a string"))?;
    parse_pointer(p)
}

fn parse_pointer(p: &str) -> Result<Vec<String>, String> {
    if p.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!("path {p:?} must start with /"));
    };
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn apply_op(target: &mut Value, op: &Value) -> Result<(), String> {
    let name = field(op, "op")?.as_str().ok_or("\"op\" must be a string")?;
    match name {
        "add" => add(target, &path_of(op, "path")?, field(op, "value")?.clone()),
        "remove" => remove(target, &path_of(op, "path")?).map(|_| ()),
        "replace" => {
            let path = path_of(op, "path")?;
            remove(target, &path)?;
            add(target, &path, field(op, "value")?.clone())
        }
        "move" => {
            let from = path_of(op, "from")?;
            let v = remove(target, &from)?;
            add(target, &path_of(op, "path")?, v)
        }
        "copy" => {
            let v = get(target, &path_of(op, "from")?)?.clone();
            add(target, &path_of(op, "path")?, v)
        }
        "test" => {
            // As the API server's JSON patch library does, a missing value tests equal to null.
            let path = path_of(op, "path")?;
            let v = get(target, &path).unwrap_or(&Value::Null);
            if v == field(op, "value")? {
                Ok(())
            } else {
                Err(format!("test failed: the value is {v}"))
            }
        }
        other => Err(format!("unknown op {other:?}")),
    }
}

fn get<'a>(target: &'a Value, path: &[String]) -> Result<&'a Value, String> {
    let mut cur = target;
    for seg in path {
        cur = match cur {
            Value::Object(m) => m.get(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| format!("no value at /{}", path.join("/")))?;
    }
    Ok(cur)
}

fn parent<'a>(target: &'a mut Value, path: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = target;
    for seg in path {
        cur = match cur {
            Value::Object(m) => m.get_mut(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("no value at /{}", path.join("/")))?;
    }
    Ok(cur)
}

fn add(target: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, init)) = path.split_last() else {
        *target = value;
        return Ok(());
    };
    match parent(target, init)? {
        Value::Object(m) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| format!("bad index {last:?}"))?
            };
            if i > a.len() {
                return Err(format!("index {i} is out of bounds"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("cannot add under a scalar at /{}", init.join("/"))),
    }
}

fn remove(target: &mut Value, path: &[String]) -> Result<Value, String> {
    let Some((last, init)) = path.split_last() else {
        return Err("cannot remove the whole document".into());
    };
    let missing = || format!("no value at /{}", path.join("/"));
    match parent(target, init)? {
        Value::Object(m) => m.remove(last).ok_or_else(missing),
        Value::Array(a) => {
            let i = last.parse::<usize>().map_err(|_| missing())?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops_and_failing_test() {
        let mut doc = json!({"metadata": {"finalizers": ["a", "b"]}, "x": 1});
        json_patch(
            &mut doc,
            &json!([
                {"op": "test", "path": "/metadata/finalizers", "value": ["a", "b"]},
                {"op": "remove", "path": "/metadata/finalizers/0"},
                {"op": "add", "path": "/metadata/finalizers/-", "value": "c"},
                {"op": "replace", "path": "/x", "value": 2},
                {"op": "copy", "from": "/x", "path": "/y"},
                {"op": "move", "from": "/y", "path": "/a~1b"},
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"finalizers": ["b", "c"]}, "x": 2, "a/b": 2})
        );
        let err =
            json_patch(&mut doc, &json!([{"op": "test", "path": "/x", "value": 3}])).unwrap_err();
        assert!(err.contains("test failed"), "{err}");
        assert!(json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/nope", "value": null}]),
        )
        .unwrap();
    }

    #[test]
    fn apply_removes_what_the_manager_no_longer_applies() {
        let mut live = json!({"metadata": {"labels": {"a": "1", "b": "2", "mine": "x"}}, "spec": {"k": 1, "other": 5}});
        let prev = json!({"metadata": {"labels": {"mine": "x"}}, "spec": {"k": 1}});
        let next = json!({"metadata": {"labels": {}}, "spec": {"k": 2}});
        apply(&mut live, Some(&prev), &next);
        assert_eq!(
            live,
            json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"k": 2, "other": 5}})
        );
    }
}

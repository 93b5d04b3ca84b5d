//! Reads a file sink's committed output of a per-key count (`{key, count}` on every record)
//! and checks it is exactly once: each key's counts are 1, 2, …, n, each written once.
//! `sjob local demo` and the end-to-end tests prove "nothing lost, nothing twice" with it.

use std::collections::BTreeMap;
use std::path::Path;

/// Every count written per key, in no particular order.
#[derive(Debug, Default)]
pub struct CountLog {
    pub counts: BTreeMap<String, Vec<i64>>,
}

impl CountLog {
    /// Reads every committed part file (`part-*.jsonl`) under `dir`.
    pub fn read(dir: &Path) -> Result<CountLog, String> {
        let mut log = CountLog::default();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(log),
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        };
        for entry in entries {
            let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !(name.starts_with("part-") && name.ends_with(".jsonl")) {
                continue;
            }
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            for (i, line) in text.lines().enumerate() {
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?;
                let key = match v.get("key") {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => return Err(format!("{}:{}: no key", path.display(), i + 1)),
                };
                let count = v
                    .get("count")
                    .and_then(serde_json::Value::as_i64)
                    .ok_or_else(|| format!("{}:{}: no count", path.display(), i + 1))?;
                log.counts.entry(key).or_default().push(count);
            }
        }
        Ok(log)
    }

    /// The highest count per key: the state of the count operator as the output shows it.
    pub fn latest(&self) -> BTreeMap<String, i64> {
        self.counts
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().copied().max().unwrap_or(0)))
            .collect()
    }

    /// Problems with the log, if any: a key missing, a count lost or written twice, or a key
    /// whose final count is not `expected_per_key`.
    pub fn exactly_once(&self, keys: usize, expected_per_key: i64) -> Vec<String> {
        let mut problems = Vec::new();
        if self.counts.len() != keys {
            problems.push(format!(
                "{} keys in the output, expected {keys}",
                self.counts.len()
            ));
        }
        for (key, counts) in &self.counts {
            let mut sorted = counts.clone();
            sorted.sort_unstable();
            let dupes = sorted.windows(2).filter(|w| w[0] == w[1]).count();
            sorted.dedup();
            let max = sorted.last().copied().unwrap_or(0);
            if dupes > 0 {
                problems.push(format!("key {key}: {dupes} counts written twice"));
            }
            if sorted.len() as i64 != max {
                problems.push(format!(
                    "key {key}: {} of the counts 1..{max} missing",
                    max - sorted.len() as i64
                ));
            }
            if max != expected_per_key {
                problems.push(format!(
                    "key {key}: final count {max}, expected {expected_per_key}"
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_lost_and_doubled_counts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("part-a.jsonl"),
            "{\"key\":\"a\",\"count\":1}\n{\"key\":\"a\",\"count\":2}\n{\"key\":\"b\",\"count\":1}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("part-b.jsonl"),
            "{\"key\":\"b\",\"count\":1}\n{\"key\":\"b\",\"count\":3}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("ignored.txt"), "x").unwrap();
        let log = CountLog::read(dir.path()).unwrap();
        assert_eq!(log.latest()["a"], 2);
        let problems = log.exactly_once(2, 2);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("key b: 1 counts written twice"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("key b: 1 of the counts 1..3 missing"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("key b: final count 3, expected 2"))
        );
    }
}

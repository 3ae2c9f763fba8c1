//! Reading rows from data files: JSON Lines (`.jsonl`, one object per line) and JSON (`.json`,
//! an array of objects), with glob patterns. Every row keeps the file and line it came from so
//! that a bad row can be reported precisely.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::DataError;

/// One row of a data file.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub file: PathBuf,
    /// 1-based line of the row's start (for `.json`, the array element's index + 1 is not a
    /// line; the element index is reported instead).
    pub line: usize,
    pub fields: Map<String, Value>,
}

impl Row {
    /// `file:line` for messages.
    pub fn location(&self) -> String {
        format!("{}:{}", self.file.display(), self.line)
    }
}

/// A row that could not be parsed; reading goes on past it.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Expands the patterns (paths or globs, relative to `base`) into a sorted, de-duplicated
/// list of files.
///
/// # Errors
/// A malformed pattern, or a pattern that matches no file.
pub fn expand(patterns: &[String], base: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for p in patterns {
        let full = if Path::new(p).is_absolute() {
            PathBuf::from(p)
        } else {
            base.join(p)
        };
        let text = full.to_string_lossy().into_owned();
        let matches: Vec<PathBuf> = glob::glob(&text)
            .map_err(|e| DataError::Pattern {
                pattern: p.clone(),
                message: e.to_string(),
            })?
            .filter_map(Result::ok)
            .filter(|f| f.is_file())
            .collect();
        if matches.is_empty() {
            return Err(DataError::NoFiles {
                pattern: p.clone(),
                base: base.to_path_buf(),
            });
        }
        files.extend(matches);
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// The rows of one file, and the rows that could not be parsed.
///
/// # Errors
/// An unreadable file, an unsupported extension, or a `.json` file that is not an array.
pub fn read_file(path: &Path) -> Result<(Vec<Row>, Vec<BadRow>), DataError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    match ext.as_str() {
        "jsonl" | "ndjson" => Ok(read_jsonl(path, &text)),
        "json" => read_json_array(path, &text),
        other => Err(DataError::UnsupportedFile {
            path: path.to_path_buf(),
            extension: other.to_string(),
        }),
    }
}

fn read_jsonl(path: &Path, text: &str) -> (Vec<Row>, Vec<BadRow>) {
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fail = |message: String| BadRow {
            file: path.to_path_buf(),
            line: i + 1,
            message,
        };
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(fields)) => rows.push(Row {
                file: path.to_path_buf(),
                line: i + 1,
                fields,
            }),
            Ok(other) => bad.push(fail(format!(
                "expected a JSON object, found {}",
                kind(&other)
            ))),
            Err(e) => bad.push(fail(format!("invalid JSON: {e}"))),
        }
    }
    (rows, bad)
}

fn read_json_array(path: &Path, text: &str) -> Result<(Vec<Row>, Vec<BadRow>), DataError> {
    let value: Value = serde_json::from_str(text).map_err(|e| DataError::Parse {
        path: path.to_path_buf(),
        message: format!(
            "invalid JSON at line {}, column {}: {e}",
            e.line(),
            e.column()
        ),
    })?;
    let Value::Array(items) = value else {
        return Err(DataError::Parse {
            path: path.to_path_buf(),
            message: format!("expected an array of objects, found {}", kind(&value)),
        });
    };
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match item {
            Value::Object(fields) => rows.push(Row {
                file: path.to_path_buf(),
                line: i + 1,
                fields,
            }),
            other => bad.push(BadRow {
                file: path.to_path_buf(),
                line: i + 1,
                message: format!(
                    "element {i}: expected a JSON object, found {}",
                    kind(&other)
                ),
            }),
        }
    }
    Ok((rows, bad))
}

/// A JSON value's kind, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_rows_keep_their_lines_and_bad_lines_are_reported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let f = dir.path().join("a.jsonl");
        std::fs::write(
            &f,
            "{\"text\": \"one\"}\n\n{not json}\n[1]\n{\"text\": \"two\"}\n",
        )
        .expect("write");
        let (rows, bad) = read_file(&f).expect("readable");
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 5]);
        assert_eq!(bad.iter().map(|b| b.line).collect::<Vec<_>>(), vec![3, 4]);
        assert!(bad[0].message.contains("invalid JSON"), "{}", bad[0]);
        assert!(bad[1].message.contains("an array"), "{}", bad[1]);
        assert!(bad[0].to_string().contains("a.jsonl:3"));
    }

    #[test]
    fn globs_expand_sorted_and_empty_matches_are_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        for n in ["b.jsonl", "a.jsonl", "c.txt"] {
            std::fs::write(dir.path().join(n), "").expect("write");
        }
        let files = expand(&["*.jsonl".into()], dir.path()).expect("matches");
        assert_eq!(
            files,
            vec![dir.path().join("a.jsonl"), dir.path().join("b.jsonl")]
        );
        let err = expand(&["missing/*.jsonl".into()], dir.path()).unwrap_err();
        assert!(err.to_string().contains("missing/*.jsonl"), "{err}");
    }
}

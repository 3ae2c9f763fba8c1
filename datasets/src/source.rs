//! Reading rows from data files, with glob patterns: JSON Lines (`.jsonl`, one object per line),
//! JSON (`.json`, an array of objects), CSV (`.csv`, a header row; every column read as text, a
//! cell may hold JSON such as a messages list), Parquet (`.parquet`) and Arrow IPC (`.arrow`,
//! `.feather`, `.ipc`; file or stream format, as `datasets` writes). Columnar files are read
//! with arrow/parquet and each record batch is turned into JSON objects, so every format feeds
//! the same prompt formats. Every row keeps the file and line (or row number) it came from so
//! that a bad row can be reported precisely.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::DataError;

/// One row of a data file.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub file: PathBuf,
    /// 1-based line of the row in a JSON Lines file; for other formats the 1-based row number
    /// (CSV: data rows after the header; JSON: array elements).
    pub line: usize,
    pub fields: Map<String, Value>,
}

impl Row {
    /// `file:line` (JSON Lines) or `file:row N`, for messages.
    pub fn location(&self) -> String {
        if is_jsonl(&self.file) {
            format!("{}:{}", self.file.display(), self.line)
        } else {
            format!("{}:row {}", self.file.display(), self.line)
        }
    }
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

fn is_jsonl(path: &Path) -> bool {
    matches!(extension(path).as_str(), "jsonl" | "ndjson")
}

/// File extensions [`read_file`] reads.
pub const EXTENSIONS: [&str; 8] = [
    "jsonl", "ndjson", "json", "csv", "parquet", "arrow", "feather", "ipc",
];

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
    let ext = extension(path);
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    match ext.as_str() {
        "jsonl" | "ndjson" => Ok(read_jsonl(
            path,
            &std::fs::read_to_string(path).map_err(io)?,
        )),
        "json" => read_json_array(path, &std::fs::read_to_string(path).map_err(io)?),
        "csv" | "parquet" | "arrow" | "feather" | "ipc" => {
            let batches = columnar::read_batches(path, &ext)?;
            let mut rows = Vec::new();
            // Converted a slice at a time, so no one conversion grows with the whole file.
            let slices = batches.iter().flat_map(|b| {
                (0..b.num_rows())
                    .step_by(CONVERT_ROWS)
                    .map(move |at| b.slice(at, CONVERT_ROWS.min(b.num_rows() - at)))
            });
            for batch in slices {
                let objects = columnar::to_json_objects(path, &batch)?;
                for fields in objects {
                    rows.push(Row {
                        file: path.to_path_buf(),
                        line: rows.len() + 1,
                        fields,
                    });
                }
            }
            Ok((rows, Vec::new()))
        }
        other => Err(DataError::UnsupportedFile {
            path: path.to_path_buf(),
            extension: other.to_string(),
        }),
    }
}

/// Rows of a columnar file converted to JSON at a time.
const CONVERT_ROWS: usize = 1024;

/// A columnar file may declare at most a row per byte. Null columns and run-length or
/// dictionary encodings make rows nearly free to declare, and each becomes a [`Row`] when
/// read: without a bound, a hostile kilobyte could ask for billions. A training set of text
/// is far below it.
fn check_row_count(path: &Path, rows: u64, bytes: u64) -> Result<(), DataError> {
    if rows > bytes {
        return Err(DataError::Parse {
            path: path.to_path_buf(),
            message: format!(
                "{rows} rows declared in a file of {bytes} bytes (at most one row per byte)"
            ),
        });
    }
    Ok(())
}

mod ipc;

/// Columnar formats through arrow: record batches, then JSON objects.
mod columnar {
    use std::fs::File;

    use crate::DataError;
    use std::path::Path;
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use serde_json::{Map, Value};

    /// `f`, with a panic turned into `path`'s error. The Arrow and Parquet readers can panic on
    /// malformed files (found by fuzzing).
    fn guarded<T>(
        path: &Path,
        what: &str,
        f: impl FnOnce() -> Result<T, DataError>,
    ) -> Result<T, DataError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
            let why = graft_core::panic::message(panic.as_ref())
                .unwrap_or_else(|| "a malformed file".into());
            Err(DataError::Parse {
                path: path.to_path_buf(),
                message: format!("{what} failed: {why}"),
            })
        })
    }

    /// The record batches of a CSV, Parquet or Arrow IPC file, within the row bound.
    pub fn read_batches(path: &Path, ext: &str) -> Result<Vec<RecordBatch>, DataError> {
        let bytes = std::fs::metadata(path)
            .map_err(|source| DataError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let batches = guarded(path, &format!("the {ext} reader"), || {
            read_batches_unguarded(path, ext, bytes)
        })?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        super::check_row_count(path, rows as u64, bytes)?;
        Ok(batches)
    }

    /// `bytes`: the file's length, which bounds the rows Parquet's metadata may declare.
    fn read_batches_unguarded(
        path: &Path,
        ext: &str,
        bytes: u64,
    ) -> Result<Vec<RecordBatch>, DataError> {
        let parse = |message: String| DataError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let open = || File::open(path).map_err(|e| parse(e.to_string()));
        match ext {
            "csv" => {
                let (inferred, _) = arrow::csv::reader::Format::default()
                    .with_header(true)
                    .infer_schema(open()?, Some(100))
                    .map_err(|e| parse(format!("reading the CSV header: {e}")))?;
                // Every column as text: a prompt field must not turn into a number.
                let fields: Vec<Field> = inferred
                    .fields()
                    .iter()
                    .map(|f| Field::new(f.name(), DataType::Utf8, true))
                    .collect();
                let reader = arrow::csv::ReaderBuilder::new(Arc::new(Schema::new(fields)))
                    .with_header(true)
                    .build(open()?)
                    .map_err(|e| parse(e.to_string()))?;
                reader
                    .map(|b| b.map_err(|e| parse(format!("CSV: {e}"))))
                    .collect()
            }
            "parquet" => {
                let builder =
                    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(open()?)
                        .map_err(|e| parse(format!("not a readable Parquet file: {e}")))?;
                // Run-length encoding makes rows cheap to declare: here the count is checked
                // before any is decoded (for every format, after: `read_batches`).
                let declared: i64 = builder
                    .metadata()
                    .row_groups()
                    .iter()
                    .map(|g| g.num_rows().max(0))
                    .fold(0i64, i64::saturating_add);
                super::check_row_count(path, declared as u64, bytes)?;
                let reader = builder.build().map_err(|e| parse(e.to_string()))?;
                reader
                    .map(|b| b.map_err(|e| parse(format!("Parquet: {e}"))))
                    .collect()
            }
            _ => {
                let bytes = std::fs::read(path).map_err(|e| parse(e.to_string()))?;
                super::ipc::read(bytes).map_err(parse)
            }
        }
    }

    /// The rows of `batch` as JSON objects.
    pub fn to_json_objects(
        path: &Path,
        batch: &RecordBatch,
    ) -> Result<Vec<Map<String, Value>>, DataError> {
        guarded(path, "converting rows", || {
            to_json_objects_unguarded(path, batch)
        })
    }

    fn to_json_objects_unguarded(
        path: &Path,
        batch: &RecordBatch,
    ) -> Result<Vec<Map<String, Value>>, DataError> {
        let parse = |message: String| DataError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let mut writer = arrow::json::ArrayWriter::new(Vec::new());
        writer
            .write(batch)
            .map_err(|e| parse(format!("converting rows: {e}")))?;
        writer
            .finish()
            .map_err(|e| parse(format!("converting rows: {e}")))?;
        let bytes = writer.into_inner();
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Value> =
            serde_json::from_slice(&bytes).map_err(|e| parse(format!("converting rows: {e}")))?;
        Ok(values
            .into_iter()
            .map(|v| match v {
                Value::Object(m) => m,
                _ => Map::new(),
            })
            .collect())
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

#[cfg(test)]
mod columnar_tests {
    use std::io::Cursor;
    use std::sync::Arc;

    use super::*;

    const ROWS: &str = concat!(
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}], \"id\": 1}\n",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"2+2?\"}, {\"role\": \"assistant\", \"content\": \"4\"}], \"id\": 2}\n",
    );

    fn batch() -> arrow::record_batch::RecordBatch {
        let (schema, _) =
            arrow::json::reader::infer_json_schema_from_seekable(Cursor::new(ROWS), None)
                .expect("schema");
        let mut reader = arrow::json::ReaderBuilder::new(Arc::new(schema))
            .build(Cursor::new(ROWS))
            .expect("reader");
        reader.next().expect("one batch").expect("valid rows")
    }

    fn expected() -> Vec<Map<String, Value>> {
        ROWS.lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    }

    #[test]
    fn parquet_and_arrow_ipc_rows_equal_the_json_rows() {
        let dir = tempfile::tempdir().expect("temp dir");
        let b = batch();
        let pq = dir.path().join("d.parquet");
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&pq).expect("create"),
            b.schema(),
            None,
        )
        .expect("writer");
        w.write(&b).expect("write");
        w.close().expect("close");
        let stream = dir.path().join("d.arrow");
        let mut s = arrow::ipc::writer::StreamWriter::try_new(
            std::fs::File::create(&stream).expect("create"),
            &b.schema(),
        )
        .expect("writer");
        s.write(&b).expect("write");
        s.finish().expect("finish");
        let file = dir.path().join("d.feather");
        let mut f = arrow::ipc::writer::FileWriter::try_new(
            std::fs::File::create(&file).expect("create"),
            &b.schema(),
        )
        .expect("writer");
        f.write(&b).expect("write");
        f.finish().expect("finish");
        for path in [pq, stream, file] {
            let (rows, bad) = read_file(&path).expect("readable");
            assert!(bad.is_empty());
            assert_eq!(
                rows.iter().map(|r| r.fields.clone()).collect::<Vec<_>>(),
                expected(),
                "{}",
                path.display()
            );
            assert_eq!(rows[1].location(), format!("{}:row 2", path.display()));
        }
    }

    #[test]
    fn csv_columns_are_text_and_a_cell_may_hold_json() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("d.csv");
        std::fs::write(
            &path,
            "instruction,input,output\nAdd,2+2,4\n\"Say \"\"hi\"\"\",,\"hi, there\"\n",
        )
        .expect("write");
        let (rows, _) = read_file(&path).expect("readable");
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].fields["output"],
            Value::String("4".into()),
            "numbers stay text"
        );
        assert_eq!(
            rows[1].fields["instruction"],
            Value::String("Say \"hi\"".into())
        );
        assert_eq!(rows[1].fields["output"], Value::String("hi, there".into()));

        let chat = dir.path().join("c.csv");
        std::fs::write(&chat, "messages\n\"[{\"\"role\"\": \"\"user\"\", \"\"content\"\": \"\"hi\"\"}, {\"\"role\"\": \"\"assistant\"\", \"\"content\"\": \"\"yo\"\"}]\"\n").expect("write");
        let (rows, _) = read_file(&chat).expect("readable");
        let f = crate::format::Format::named("chat").expect("known");
        assert!(
            matches!(f.example(&rows[0]), Ok(crate::format::Example::Conversation(m)) if m.len() == 2)
        );
    }

    #[test]
    fn a_parquet_file_declaring_more_rows_than_bytes_is_refused_before_decoding() {
        // 200,000 identical rows: dictionary and run-length encoding make them a few KB.
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("dense.parquet");
        let text: arrow::array::ArrayRef =
            Arc::new(arrow::array::StringArray::from(vec!["hi"; 200_000]));
        let b = arrow::record_batch::RecordBatch::try_from_iter([("text", text)]).expect("batch");
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&path).expect("create"),
            b.schema(),
            None,
        )
        .expect("writer");
        w.write(&b).expect("write");
        w.close().expect("close");
        let bytes = std::fs::metadata(&path).expect("size").len();
        assert!(bytes < 200_000, "{bytes} bytes");
        let e = read_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("dense.parquet") && e.contains("200000 rows declared"),
            "{e}"
        );
    }

    #[test]
    fn a_corrupt_parquet_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bad.parquet");
        std::fs::write(&path, b"PAR1 not really").expect("write");
        let e = read_file(&path).unwrap_err().to_string();
        assert!(e.contains("bad.parquet") && e.contains("Parquet"), "{e}");
    }
}

//! graft-datasets: training data for `graft-train`. Rows are read from files ([`source`]),
//! interpreted in a prompt format ([`format`]), rendered with the model's chat template and
//! tokenized with a loss mask ([`tokenize`]) — preference rows into pairs ([`preference`]) —
//! then split, shuffled and grouped into micro-batches
//! ([`prepare`], [`batch`]).

pub mod batch;
pub mod format;
pub mod preference;
pub mod prepare;
pub mod source;
pub mod tokenize;

use std::path::PathBuf;

/// Why data could not be read or prepared.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: unsupported data file extension '{extension}' (expected .jsonl, .json, .csv, .parquet or .arrow)")]
    UnsupportedFile { path: PathBuf, extension: String },
    #[error("data file pattern '{pattern}' is malformed: {message}")]
    Pattern { pattern: String, message: String },
    #[error("data file pattern '{pattern}' matches no file (relative to {base})")]
    NoFiles { pattern: String, base: PathBuf },
    #[error("{0}")]
    Format(String),
    #[error("{count} bad rows exceed data.max_bad_rows = {limit}; first: {first}")]
    TooManyBadRows {
        count: usize,
        limit: usize,
        first: String,
    },
    #[error("no training examples left after reading {rows} rows ({skipped} skipped)")]
    Empty { rows: usize, skipped: usize },
}

//! `metrics.parquet`: the metrics of `metrics.jsonl` as typed columns, for pandas, polars and
//! DuckDB.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use serde_json::Value;

use super::read_jsonl;
use crate::run::write_atomic;

const FLOAT_COLUMNS: [&str; 12] = [
    "epoch",
    "loss",
    "eval_loss",
    "eval_exact_match",
    "eval_contains",
    "eval_json_valid",
    "eval_json_schema",
    "eval_regex",
    "lr",
    "grad_norm",
    "tokens_per_sec",
    "rss_mib",
];

/// Preference metrics (DPO, ORPO), each also logged with the `eval_` prefix; columns only for
/// runs that log them.
const PREFERENCE_COLUMNS: [&str; 11] = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logps/accuracies",
    "ref_logps/accuracies",
    "nll_loss",
    "log_odds_ratio",
    "log_odds_chosen",
];

/// Writes `metrics.parquet` from `metrics.jsonl` (one row per logged step or evaluation).
///
/// # Errors
/// Any I/O or encoding failure.
pub fn write_metrics_parquet(run_dir: &Path) -> std::io::Result<()> {
    let rows = read_jsonl(&run_dir.join("metrics.jsonl"));
    let u64_col = |k: &str| -> ArrayRef {
        Arc::new(
            rows.iter()
                .map(|r| r.get(k).and_then(Value::as_u64))
                .collect::<UInt64Array>(),
        )
    };
    let f64_col = |k: &str| -> ArrayRef {
        Arc::new(
            rows.iter()
                .map(|r| r.get(k).and_then(Value::as_f64))
                .collect::<Float64Array>(),
        )
    };
    let mut fields = vec![
        Field::new("step", DataType::UInt64, true),
        Field::new("trained_tokens", DataType::UInt64, true),
    ];
    let mut columns = vec![u64_col("step"), u64_col("trained_tokens")];
    for k in FLOAT_COLUMNS.iter().chain(&["step_secs"]) {
        fields.push(Field::new(*k, DataType::Float64, true));
        columns.push(f64_col(k));
    }
    for k in PREFERENCE_COLUMNS {
        for k in [k.to_string(), format!("eval_{k}")] {
            if rows.iter().any(|r| r.get(&k).is_some()) {
                columns.push(f64_col(&k));
                fields.push(Field::new(k, DataType::Float64, true));
            }
        }
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(std::io::Error::other)?;
    let mut bytes = Vec::new();
    {
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut bytes, batch.schema(), None)
            .map_err(std::io::Error::other)?;
        writer.write(&batch).map_err(std::io::Error::other)?;
        writer.close().map_err(std::io::Error::other)?;
    }
    write_atomic(&run_dir.join("metrics.parquet"), &bytes)
}

//! What a run leaves for people and tools to compare: `metrics.parquet` (the metrics of
//! `metrics.jsonl` as typed columns, for pandas/polars/DuckDB) and `report.html`, one
//! self-contained page (inline SVG, no scripts or external files) with the summary, the
//! loss/eval-loss and learning-rate curves, the eval samples and the resolved config.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use serde_json::Value;

use crate::run::write_atomic;

fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

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

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG line chart of named series of (x, y) points.
fn chart(title: &str, series: &[(&str, &str, Vec<(f64, f64)>)]) -> String {
    let (w, h, pad) = (640.0, 240.0, 40.0);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    if pts.is_empty() {
        return format!("<p>{}: no data yet</p>", escape(title));
    }
    let (x0, x1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (xs, ys) = ((x1 - x0).max(1e-12), (y1 - y0).max(1e-12));
    let sx = |x: f64| pad + (x - x0) / xs * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - y0) / ys * (h - 2.0 * pad);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' role='img'><title>{t}</title>\
         <rect width='{w}' height='{h}' fill='white' stroke='#ccc'/>\
         <text x='{pad}' y='16' font-size='13'>{t}</text>\
         <text x='4' y='{ya}' font-size='10'>{y1:.4}</text><text x='4' y='{yb}' font-size='10'>{y0:.4}</text>\
         <text x='{pad}' y='{xl}' font-size='10'>step {x0}</text><text x='{xr}' y='{xl}' font-size='10'>{x1}</text>",
        t = escape(title),
        ya = pad,
        yb = h - pad,
        xl = h - 8.0,
        xr = w - pad - 30.0,
    );
    for (i, (name, color, data)) in series.iter().enumerate() {
        let d: Vec<String> = data
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if d.len() > 1 {
            svg.push_str(&format!(
                "<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{}'/>",
                d.join(" ")
            ));
        }
        for p in &d {
            let (x, y) = p.split_once(',').expect("formatted as x,y");
            svg.push_str(&format!("<circle cx='{x}' cy='{y}' r='2' fill='{color}'/>"));
        }
        svg.push_str(&format!(
            "<text x='{}' y='16' font-size='11' fill='{color}'>{}</text>",
            w - 150.0 + 70.0 * i as f64,
            escape(name)
        ));
    }
    svg.push_str("</svg>");
    svg
}

/// Writes `report.html` for the run.
///
/// # Errors
/// Any I/O failure.
pub fn write_html(run_dir: &Path, summary: &Value) -> std::io::Result<()> {
    let metrics = read_jsonl(&run_dir.join("metrics.jsonl"));
    let series = |k: &str| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(k)?.as_f64()?)))
            .collect()
    };
    let name = run_dir
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let mut html = format!(
        "<!doctype html><html><head><meta charset='utf-8'><title>graft run {n}</title>\
         <style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}td,th{{border:1px solid #ddd;padding:4px 8px;vertical-align:top}}\
         table{{border-collapse:collapse}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head><body>\
         <h1>graft run {n}</h1><h2>Summary</h2><table>",
        n = escape(&name)
    );
    if let Value::Object(m) = summary {
        for (k, v) in m {
            html.push_str(&format!(
                "<tr><th>{}</th><td>{}</td></tr>",
                escape(k),
                escape(&v.to_string())
            ));
        }
    }
    html.push_str("</table><h2>Loss</h2>");
    html.push_str(&chart(
        "loss and eval loss",
        &[
            ("loss", "#1f77b4", series("loss")),
            ("eval", "#d62728", series("eval_loss")),
        ],
    ));
    html.push_str(&chart("learning rate", &[("lr", "#2ca02c", series("lr"))]));
    if !series("rewards/margins").is_empty() {
        html.push_str("<h2>Preference rewards</h2>");
        html.push_str(&chart(
            "rewards (train)",
            &[
                ("chosen", "#2ca02c", series("rewards/chosen")),
                ("rejected", "#d62728", series("rewards/rejected")),
            ],
        ));
        html.push_str(&chart(
            "reward accuracy",
            &[
                ("train", "#1f77b4", series("rewards/accuracies")),
                ("eval", "#d62728", series("eval_rewards/accuracies")),
            ],
        ));
    }
    let tasks: Vec<(&str, &str, Vec<(f64, f64)>)> = [
        ("exact_match", "#9467bd"),
        ("contains", "#8c564b"),
        ("json_valid", "#e377c2"),
        ("json_schema", "#7f7f7f"),
        ("regex", "#17becf"),
    ]
    .into_iter()
    .map(|(m, color)| (m, color, series(&format!("eval_{m}"))))
    .filter(|(_, _, s)| !s.is_empty())
    .collect();
    if !tasks.is_empty() {
        html.push_str("<h2>Task metrics</h2>");
        html.push_str(&chart("fraction of eval answers that score", &tasks));
    }
    html.push_str("<h2>Eval samples</h2><table><tr><th>step</th><th>prompt</th><th>reference</th><th>generated</th></tr>");
    for s in read_jsonl(&run_dir.join("samples.jsonl")) {
        let cell = |k: &str| escape(s.get(k).and_then(Value::as_str).unwrap_or(""));
        html.push_str(&format!(
            "<tr><td>{}</td><td><pre>{}</pre></td><td><pre>{}</pre></td><td><pre>{}</pre></td></tr>",
            s.get("step").map_or(String::new(), Value::to_string),
            cell("prompt"),
            cell("reference"),
            cell("generated")
        ));
    }
    let config = std::fs::read_to_string(run_dir.join(crate::run::CONFIG_FILE)).unwrap_or_default();
    html.push_str(&format!(
        "</table><h2>Resolved config</h2><pre>{}</pre></body></html>\n",
        escape(&config)
    ));
    write_atomic(&run_dir.join("report.html"), html.as_bytes())
}

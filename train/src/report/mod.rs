//! What a run leaves for people and tools to compare: `metrics.parquet` ([`columns`]) and
//! `report.html`, one self-contained page (inline SVG, no scripts or external files) laid out
//! like a tracker's dashboard: the headline figures with units, loss (log scale), learning rate,
//! gradient norm, throughput and memory curves with ticks and a grid, the eval samples, the
//! resolved config. [`compare`] puts several runs side by side.

pub mod chart;
pub mod columns;
pub mod compare;
pub mod units;

use std::path::Path;

use serde_json::Value;

use crate::run::write_atomic;
use chart::{escape, Chart, Series, PALETTE};
pub use columns::write_metrics_parquet;

/// The parseable lines of a JSON Lines file (a torn last line of a killed run is skipped; a
/// missing file is empty).
pub(crate) fn read_jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The (step, value) points of metric `key` in a run's metric records.
pub(crate) fn series(metrics: &[Value], key: &str) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?)))
        .collect()
}

/// The median of `key` over the run's logged steps, leaving out the first (warm-up) when
/// there are others.
pub(crate) fn median_after_warmup(metrics: &[Value], key: &str) -> Option<f64> {
    let mut v: Vec<f64> = series(metrics, key).into_iter().map(|p| p.1).collect();
    if v.len() > 1 {
        v.remove(0);
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The page around a report's body: title and the stylesheet both pages share.
pub(crate) fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>\
         <meta name='viewport' content='width=device-width, initial-scale=1'><title>{t}</title><style>\
         body{{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1120px;margin:1.5em auto;padding:0 1em;color:#222}}\
         h1{{font-size:1.5em;margin-bottom:.2em}}h2{{font-size:1.15em;margin:1.4em 0 .5em;border-bottom:1px solid #eee;padding-bottom:.2em}}\
         .sub{{color:#666;margin:0 0 1em}}\
         .cards{{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:10px}}\
         .card{{border:1px solid #ddd;border-radius:6px;padding:8px 12px}}.card .k{{font-size:12px;color:#666}}\
         .card .v{{font-size:20px;font-weight:600;font-variant-numeric:tabular-nums}}\
         .charts{{display:grid;grid-template-columns:repeat(auto-fill,minmax(430px,1fr));gap:12px}}\
         svg.chart{{width:100%;height:auto;border:1px solid #ddd;border-radius:6px}}\
         table{{border-collapse:collapse;width:100%}}table.fixed{{table-layout:fixed}}\
         td,th{{border:1px solid #ddd;padding:4px 8px;vertical-align:top;text-align:left;overflow-wrap:anywhere}}\
         th{{background:#fafafa;font-weight:600;overflow-wrap:normal}}.wide{{overflow-x:auto}}td.num{{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}}\
         pre{{white-space:pre-wrap;overflow-wrap:anywhere;margin:0;max-height:14em;overflow:auto;font-size:12px}}\
         pre.config{{max-height:none;background:#f6f6f6;padding:1em}}.swatch{{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:-1px}}\
         .empty{{color:#888}}</style></head><body>{body}</body></html>\n",
        t = escape(title),
    )
}

/// The `[eval]` task metrics (logged as `eval_<name>`, each a fraction of the answers).
pub(crate) const TASK_METRICS: [&str; 5] = [
    "exact_match",
    "contains",
    "json_valid",
    "json_schema",
    "regex",
];

/// The figures shown as cards at the top of the report, in this order, with their labels.
const HEADLINE: [(&str, &str); 8] = [
    ("final_loss", "final loss"),
    ("best_eval_loss", "best eval loss"),
    ("steps", "steps"),
    ("tokens_trained", "trained tokens"),
    ("tokens_per_sec", "throughput (median)"),
    ("wall_secs", "wall time"),
    ("peak_rss_mib", "peak memory (RSS)"),
    ("base_weights_mib", "base weights"),
];

/// Writes `report.html` for the run.
///
/// # Errors
/// Any I/O failure.
pub fn write_html(run_dir: &Path, summary: &Value) -> std::io::Result<()> {
    let metrics = read_jsonl(&run_dir.join("metrics.jsonl"));
    let name = run_dir
        .file_name()
        .map_or(String::new(), |n| n.to_string_lossy().into_owned());
    let mut body = format!("<h1>graft run {}</h1>", escape(&name));
    if summary.get("interrupted").and_then(Value::as_bool) == Some(true) {
        body.push_str(
            "<p class='sub'>Interrupted; resume with <code>graft-train resume</code>.</p>",
        );
    }
    body.push_str("<div class='cards'>");
    for (key, label) in HEADLINE {
        let value = if key == "tokens_per_sec" {
            median_after_warmup(&metrics, key).map_or(Value::Null, Value::from)
        } else {
            summary.get(key).cloned().unwrap_or(Value::Null)
        };
        let mut text = units::cell(key, &value);
        if key == "steps" {
            if let Some(total) = summary.get("total_steps").and_then(Value::as_u64) {
                text.push_str(&format!(" / {}", units::grouped(total as f64)));
            }
        }
        body.push_str(&format!(
            "<div class='card'><div class='k'>{label}</div><div class='v'>{}</div></div>",
            escape(&text)
        ));
    }
    body.push_str("</div><h2>Training</h2><div class='charts'>");
    let s = |k: &str| series(&metrics, k);
    let mut charts = vec![
        Chart::new("Loss", "loss")
            .log()
            .with(Series::new("train", PALETTE[0], s("loss")))
            .with(Series::new("eval", PALETTE[3], s("eval_loss")).dashed()),
        Chart::new("Learning rate", "lr").with(Series::new("lr", PALETTE[2], s("lr"))),
        Chart::new("Gradient norm", "‖g‖").with(Series::new(
            "grad norm",
            PALETTE[4],
            s("grad_norm"),
        )),
        Chart::new("Throughput", "tokens/s").with(Series::new(
            "tokens/s",
            PALETTE[1],
            s("tokens_per_sec"),
        )),
        Chart::new("Memory", "RSS (MiB)").with(Series::new("RSS", PALETTE[5], s("rss_mib"))),
    ];
    if !s("rewards/margins").is_empty() {
        charts.push(
            Chart::new("Rewards", "reward")
                .with(Series::new("chosen", PALETTE[2], s("rewards/chosen")))
                .with(Series::new("rejected", PALETTE[3], s("rewards/rejected")))
                .with(Series::new("eval margin", PALETTE[0], s("eval_rewards/margins")).dashed()),
        );
        let pct = |k: &str| s(k).into_iter().map(|(x, y)| (x, 100.0 * y)).collect();
        charts.push(
            Chart::new("Reward accuracy", "accuracy (%)")
                .with(Series::new("train", PALETTE[0], pct("rewards/accuracies")))
                .with(Series::new("eval", PALETTE[3], pct("eval_rewards/accuracies")).dashed()),
        );
    }
    let mut tasks = Chart::new("Task metrics (eval)", "answers that score (%)");
    for (i, m) in TASK_METRICS.iter().enumerate() {
        let pts: Vec<_> = s(&format!("eval_{m}"))
            .into_iter()
            .map(|(x, y)| (x, 100.0 * y))
            .collect();
        if !pts.is_empty() {
            tasks = tasks.with(Series::new(*m, PALETTE[(i + 4) % PALETTE.len()], pts));
        }
    }
    if tasks.has_data() {
        charts.push(tasks);
    }
    for c in &charts {
        body.push_str(&c.svg());
    }
    body.push_str("</div><h2>Eval samples</h2>");
    let samples = read_jsonl(&run_dir.join("samples.jsonl"));
    if samples.is_empty() {
        body.push_str(
            "<p class='empty'>No eval samples (train.eval_samples = 0 or no eval data).</p>",
        );
    } else {
        body.push_str(
            "<table class='fixed'><colgroup><col style='width:4.5em'><col style='width:38%'><col><col></colgroup>\
             <tr><th>step</th><th>prompt</th><th>reference</th><th>generated</th></tr>",
        );
        for r in samples {
            let cell = |k: &str| escape(r.get(k).and_then(Value::as_str).unwrap_or(""));
            body.push_str(&format!(
                "<tr><td class='num'>{}</td><td><pre>{}</pre></td><td><pre>{}</pre></td><td><pre>{}</pre></td></tr>",
                r.get("step").map_or(String::new(), |v| units::cell("step", v)),
                cell("prompt"),
                cell("reference"),
                cell("generated")
            ));
        }
        body.push_str("</table>");
    }
    body.push_str(
        "<h2>Summary</h2><table class='fixed'><colgroup><col style='width:30%'><col></colgroup>",
    );
    if let Value::Object(m) = summary {
        for (k, v) in m {
            body.push_str(&format!(
                "<tr><th>{}</th><td>{}</td></tr>",
                escape(k),
                escape(&units::cell(k, v))
            ));
        }
    }
    let config = std::fs::read_to_string(run_dir.join(crate::run::CONFIG_FILE)).unwrap_or_default();
    body.push_str(&format!(
        "</table><h2>Resolved config</h2><pre class='config'>{}</pre>",
        escape(&config)
    ));
    write_atomic(
        &run_dir.join("report.html"),
        page(&format!("graft run {name}"), &body).as_bytes(),
    )
}

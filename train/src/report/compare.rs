//! `graft-train compare`: runs side by side — one table of the config keys whose values differ
//! and of each run's final and best metrics (printed, and as JSON for scripts), and one HTML
//! page with the runs' curves overlaid, as a tracker's "compare runs" view shows them. Runs are
//! run directories, or directories holding runs (a sweep's `runs_dir`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::chart::{escape, Chart, Series, PALETTE};
use super::{median_after_warmup, page, read_jsonl, series, units};
use crate::run::CONFIG_FILE;

/// Why runs cannot be compared.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("{0}: not a run directory (no {CONFIG_FILE}) and no run directories inside it")]
    NotARun(PathBuf),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a TOML config: {message}")]
    Config { path: PathBuf, message: String },
}

/// One run as read from its directory.
pub struct RunRecord {
    pub dir: PathBuf,
    /// The directory's name.
    pub name: String,
    /// The resolved config, flattened to dotted keys (`lora.r`), values in TOML syntax.
    pub config: BTreeMap<String, String>,
    /// `summary.json`, absent while the run is going or after it was killed.
    pub summary: Option<Value>,
    /// `metrics.jsonl`.
    pub metrics: Vec<Value>,
}

impl RunRecord {
    /// Reads the run in `dir`.
    ///
    /// # Errors
    /// A config that cannot be read or parsed.
    pub fn read(dir: &Path) -> Result<Self, CompareError> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| CompareError::Read {
            path: path.clone(),
            source,
        })?;
        let table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| CompareError::Config {
                    path: path.clone(),
                    message: e.message().to_string(),
                })?;
        let config = flatten_config(&table);
        let summary = std::fs::read_to_string(dir.join("summary.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        Ok(Self {
            dir: dir.to_path_buf(),
            name: dir.file_name().map_or_else(
                || dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            config,
            summary,
            metrics: read_jsonl(&dir.join("metrics.jsonl")),
        })
    }

    /// "done", "interrupted" or "running / killed" (no summary yet).
    pub fn status(&self) -> &'static str {
        match &self.summary {
            None => "no summary",
            Some(s) if s.get("interrupted").and_then(Value::as_bool) == Some(true) => "interrupted",
            Some(_) => "done",
        }
    }

    fn last(&self, key: &str) -> Option<f64> {
        series(&self.metrics, key).last().map(|p| p.1)
    }

    fn summary_f64(&self, key: &str) -> Option<f64> {
        self.summary.as_ref()?.get(key)?.as_f64()
    }

    /// The value of metric column `key` (see [`METRICS`]).
    fn metric(&self, key: &str) -> Option<f64> {
        match key {
            "final_loss" => self.summary_f64(key).or_else(|| self.last("loss")),
            "final_eval_loss" => self.summary_f64(key).or_else(|| self.last("eval_loss")),
            "best_eval_loss" => self.summary_f64(key).or_else(|| {
                series(&self.metrics, "eval_loss")
                    .into_iter()
                    .map(|p| p.1)
                    .reduce(f64::min)
            }),
            "steps" => self.summary_f64(key).or_else(|| self.last("step")),
            "tokens_per_sec" => median_after_warmup(&self.metrics, key),
            "peak_rss_mib" => self.summary_f64(key).or_else(|| {
                series(&self.metrics, "rss_mib")
                    .into_iter()
                    .map(|p| p.1)
                    .reduce(f64::max)
            }),
            "wall_secs" => self.summary_f64(key),
            other => self.last(other),
        }
    }
}

/// A TOML table as dotted keys (`lora.r`) and values in TOML syntax.
pub fn flatten_config(table: &toml::Table) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in table {
        flatten(k, v, &mut out);
    }
    out
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// Finds the runs named by `paths`: each is a run directory or a directory of runs.
///
/// # Errors
/// A path that holds no run, or a run whose config cannot be read.
pub fn collect(paths: &[PathBuf]) -> Result<Vec<RunRecord>, CompareError> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for p in paths {
        if p.join(CONFIG_FILE).is_file() {
            dirs.push(p.clone());
            continue;
        }
        let entries = std::fs::read_dir(p).map_err(|source| CompareError::Read {
            path: p.clone(),
            source,
        })?;
        let mut inside: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|d| d.join(CONFIG_FILE).is_file())
            .collect();
        if inside.is_empty() {
            return Err(CompareError::NotARun(p.clone()));
        }
        inside.sort();
        dirs.extend(inside);
    }
    let mut seen = BTreeSet::new();
    dirs.retain(|d| seen.insert(std::fs::canonicalize(d).unwrap_or_else(|_| d.clone())));
    dirs.iter().map(|d| RunRecord::read(d)).collect()
}

/// The metric columns: key and heading. Task metrics (`eval_exact_match`, …) are added for
/// runs that log them.
const METRICS: [(&str, &str); 7] = [
    ("final_loss", "final loss"),
    ("final_eval_loss", "final eval loss"),
    ("best_eval_loss", "best eval loss"),
    ("steps", "steps"),
    ("tokens_per_sec", "tokens/s"),
    ("peak_rss_mib", "peak RSS"),
    ("wall_secs", "wall time"),
];

/// The task metrics' keys in the metrics records.
const EVAL_TASK_METRICS: [&str; 5] = [
    "eval_exact_match",
    "eval_contains",
    "eval_json_valid",
    "eval_json_schema",
    "eval_regex",
];

/// Runs and what tells them apart.
pub struct Comparison {
    pub runs: Vec<RunRecord>,
    /// Config keys whose value is not the same in every run (`output.name` left out: the run
    /// column names it).
    pub differing: Vec<String>,
    /// Metric columns (key, heading) that at least one run has.
    pub metrics: Vec<(&'static str, &'static str)>,
}

impl Comparison {
    pub fn new(runs: Vec<RunRecord>) -> Self {
        let keys: BTreeSet<&String> = runs.iter().flat_map(|r| r.config.keys()).collect();
        let differing = keys
            .into_iter()
            .filter(|k| k.as_str() != "output.name")
            .filter(|k| {
                let first = runs[0].config.get(*k);
                runs.iter().any(|r| r.config.get(*k) != first)
            })
            .cloned()
            .collect();
        let metrics = METRICS
            .into_iter()
            .chain(EVAL_TASK_METRICS.map(|k| (k, k.trim_start_matches("eval_"))))
            .filter(|(k, _)| runs.iter().any(|r| r.metric(k).is_some()))
            .collect();
        Self {
            runs,
            differing,
            metrics,
        }
    }

    fn rows(&self) -> Vec<Vec<String>> {
        self.runs
            .iter()
            .map(|r| {
                let mut row = vec![r.name.clone(), r.status().to_string()];
                row.extend(
                    self.differing
                        .iter()
                        .map(|k| r.config.get(k).cloned().unwrap_or_else(|| "—".into())),
                );
                row.extend(self.metrics.iter().map(|(k, _)| {
                    r.metric(k)
                        .map_or_else(|| "—".into(), |v| units::Unit::of(k).format(v))
                }));
                row
            })
            .collect()
    }

    fn headings(&self) -> Vec<String> {
        let mut h = vec!["run".to_string(), "status".to_string()];
        h.extend(self.differing.iter().cloned());
        h.extend(self.metrics.iter().map(|(_, t)| t.to_string()));
        h
    }

    /// The comparison as an aligned text table.
    pub fn table(&self) -> String {
        let head = self.headings();
        let rows = self.rows();
        let width = |i: usize| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([head[i].chars().count()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..head.len()).map(width).collect();
        let numeric = |i: usize| i >= 2 + self.differing.len();
        let line = |cells: &[String]| {
            cells
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if numeric(i) {
                        format!("{c:>w$}", w = widths[i])
                    } else {
                        format!("{c:<w$}", w = widths[i])
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let mut out = line(&head) + "\n";
        for r in &rows {
            out.push_str(&line(r));
            out.push('\n');
        }
        if self.differing.is_empty() && self.runs.len() > 1 {
            out.push_str("(the runs' resolved configs are the same apart from their names)\n");
        }
        out
    }

    /// The comparison as JSON: per run, its directory, status, differing config values
    /// (TOML syntax) and metrics (raw numbers).
    pub fn json(&self) -> Value {
        Value::Array(
            self.runs
                .iter()
                .map(|r| {
                    json!({
                        "run": r.name,
                        "dir": r.dir,
                        "status": r.status(),
                        "config": self.differing.iter().map(|k| (k.clone(), json!(r.config.get(k)))).collect::<serde_json::Map<_, _>>(),
                        "metrics": self.metrics.iter().map(|(k, _)| (k.to_string(), json!(r.metric(k)))).collect::<serde_json::Map<_, _>>(),
                    })
                })
                .collect(),
        )
    }

    /// One self-contained page: the table (a colour swatch per run) and the curves overlaid.
    pub fn html(&self) -> String {
        let color = |i: usize| PALETTE[i % PALETTE.len()];
        let mut body = format!(
            "<h1>graft: {} runs compared</h1><p class='sub'>Config keys that differ, then each run's final and best metrics; \
             curves below in the run's colour.</p><div class='wide'><table><tr>",
            self.runs.len()
        );
        for h in self.headings() {
            body.push_str(&format!("<th>{}</th>", escape(&h)));
        }
        body.push_str("</tr>");
        let first_metric = 2 + self.differing.len();
        for (i, row) in self.rows().iter().enumerate() {
            body.push_str("<tr>");
            for (j, c) in row.iter().enumerate() {
                if j == 0 {
                    body.push_str(&format!(
                        "<td><span class='swatch' style='background:{}'></span>{}</td>",
                        color(i),
                        escape(c)
                    ));
                } else if j >= first_metric {
                    body.push_str(&format!("<td class='num'>{}</td>", escape(c)));
                } else {
                    body.push_str(&format!("<td>{}</td>", escape(c)));
                }
            }
            body.push_str("</tr>");
        }
        body.push_str("</table></div><h2>Curves</h2><div class='charts'>");
        let overlay = |title: &str, y: &str, key: &str, log: bool| {
            let mut c = Chart::new(title, y).without_legend();
            if log {
                c = c.log();
            }
            for (i, r) in self.runs.iter().enumerate() {
                c = c.with(Series::new(
                    r.name.clone(),
                    color(i),
                    series(&r.metrics, key),
                ));
            }
            c
        };
        for c in [
            overlay("Training loss", "loss", "loss", true),
            overlay("Eval loss", "eval loss", "eval_loss", true),
            overlay("Learning rate", "lr", "lr", false),
            overlay("Throughput", "tokens/s", "tokens_per_sec", false),
            overlay("Memory", "RSS (MiB)", "rss_mib", false),
        ] {
            if c.has_data() {
                body.push_str(&c.svg());
            }
        }
        body.push_str("</div>");
        page("graft: runs compared", &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dir: &Path, name: &str, r: u32, losses: &[f64], summary: bool) -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(
            d.join(CONFIG_FILE),
            format!("[lora]\nr = {r}\nalpha = 16\n\n[output]\nname = \"{name}\"\n"),
        )
        .expect("config");
        let lines: String = losses
            .iter()
            .enumerate()
            .map(|(i, l)| {
                format!(
                    "{}\n",
                    json!({"step": i + 1, "loss": l, "tokens_per_sec": 100.0 * (i + 1) as f64})
                )
            })
            .collect();
        std::fs::write(d.join("metrics.jsonl"), lines + "{\"torn").expect("metrics");
        if summary {
            std::fs::write(
                d.join("summary.json"),
                json!({"final_loss": losses.last(), "steps": losses.len(), "wall_secs": 75.0, "interrupted": false}).to_string(),
            )
            .expect("summary");
        }
        d
    }

    #[test]
    fn differing_keys_and_metrics_make_the_table() {
        let tmp = tempfile::tempdir().expect("tmp");
        run(tmp.path(), "a", 8, &[2.0, 1.0, 0.5], true);
        run(tmp.path(), "b", 16, &[2.0, 1.5], false);
        std::fs::create_dir(tmp.path().join("not-a-run")).expect("dir");
        let c = Comparison::new(collect(&[tmp.path().to_path_buf()]).expect("runs"));
        assert_eq!(c.runs.len(), 2);
        assert_eq!(
            c.differing,
            vec!["lora.r".to_string()],
            "alpha equal, names left out"
        );
        let table = c.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("run") && lines[0].contains("lora.r"),
            "{table}"
        );
        assert!(
            lines[1].starts_with("a ") && lines[1].contains("done") && lines[1].contains("0.5"),
            "{table}"
        );
        assert!(lines[1].contains("1 min 15 s"), "{table}");
        // b has no summary: its figures come from its metrics, its wall time is unknown.
        assert!(
            lines[2].contains("no summary") && lines[2].contains("1.5") && lines[2].contains('—'),
            "{table}"
        );
        // Median throughput after the warm-up step: a → 250 (of 200, 300), b → 200.
        assert!(
            lines[1].contains("250 tok/s") && lines[2].contains("200 tok/s"),
            "{table}"
        );
        let j = c.json();
        assert_eq!(j[1]["config"]["lora.r"], "16");
        assert_eq!(j[0]["metrics"]["steps"], 3.0);
        let html = c.html();
        assert_eq!(
            html.matches("<svg").count(),
            2,
            "loss and throughput have data"
        );
        assert_eq!(html.matches("<polyline").count(), 4);
    }

    #[test]
    fn a_directory_without_runs_is_named() {
        let tmp = tempfile::tempdir().expect("tmp");
        let err = collect(&[tmp.path().to_path_buf()]).err().expect("refused");
        assert!(
            err.to_string().contains(&tmp.path().display().to_string()),
            "{err}"
        );
        let bad = tmp.path().join("bad");
        std::fs::create_dir(&bad).expect("dir");
        std::fs::write(bad.join(CONFIG_FILE), "[lora\n").expect("write");
        let err = collect(std::slice::from_ref(&bad)).err().expect("refused");
        assert!(matches!(err, CompareError::Config { .. }), "{err}");
        assert!(err.to_string().contains("config.toml"), "{err}");
    }
}

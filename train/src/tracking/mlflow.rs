//! A client for MLflow's tracking REST API (`/api/2.0/mlflow/…`, the API every MLflow client
//! and server speaks, 1.x through 3.x): experiments, runs, batched params/metrics/tags, run
//! status, and artifact upload through the server's artifact proxy (`mlflow-artifacts:` URIs,
//! what `mlflow server` hands out by default). Authentication as MLflow's own client reads it:
//! `MLFLOW_TRACKING_TOKEN` (bearer) or `MLFLOW_TRACKING_USERNAME`/`_PASSWORD` (basic).
//!
//! Written over the ureq client graft already has rather than a generated SDK: the handful of
//! calls below is the whole surface a trainer needs.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

/// MLflow's limits on one `log-batch` request and on a param's value.
pub const MAX_METRICS_PER_BATCH: usize = 1000;
pub const MAX_PARAMS_PER_BATCH: usize = 100;
pub const MAX_PARAM_VALUE: usize = 6000;

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    /// No answer (connection refused, timeout): worth retrying.
    #[error("{url}: {message}")]
    Unreachable { url: String, message: String },
    /// The server answered with an error status.
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    /// The server's answer is not what the API documents.
    #[error("{url}: unexpected answer: {message}")]
    Answer { url: String, message: String },
}

impl MlflowError {
    /// Whether trying again later may succeed (the server is down, overloaded or restarting).
    pub fn transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => *status >= 500 || *status == 429,
            Self::Answer { .. } => false,
        }
    }
}

/// A metric point.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub key: String,
    pub value: f64,
    pub step: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
}

/// A run as created.
#[derive(Debug, Clone)]
pub struct RemoteRun {
    pub run_id: String,
    pub experiment_id: String,
    pub artifact_uri: String,
}

pub struct Client {
    base: String,
    agent: ureq::Agent,
    auth: Option<String>,
}

impl Client {
    /// A client for the tracking server at `uri` (`http://host:5000`).
    pub fn new(uri: &str) -> Self {
        let auth = if let Ok(token) = std::env::var("MLFLOW_TRACKING_TOKEN") {
            Some(format!("Bearer {token}"))
        } else if let (Ok(u), Ok(p)) = (
            std::env::var("MLFLOW_TRACKING_USERNAME"),
            std::env::var("MLFLOW_TRACKING_PASSWORD"),
        ) {
            Some(format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))))
        } else {
            None
        };
        Self {
            base: uri.trim_end_matches('/').to_string(),
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5))
                .timeout(Duration::from_secs(60))
                .build(),
            auth,
        }
    }

    pub fn uri(&self) -> &str {
        &self.base
    }

    fn call(
        &self,
        req: ureq::Request,
        url: &str,
        body: Option<&[u8]>,
    ) -> Result<Value, MlflowError> {
        let req = match &self.auth {
            Some(a) => req.set("Authorization", a),
            None => req,
        };
        let answer = match body {
            Some(b) => req.set("Content-Type", "application/json").send_bytes(b),
            None => req.call(),
        };
        let text = match answer {
            Ok(r) => r.into_string().map_err(|e| MlflowError::Unreachable {
                url: url.into(),
                message: e.to_string(),
            })?,
            Err(ureq::Error::Status(status, r)) => {
                let mut body = r.into_string().unwrap_or_default();
                body.truncate(500);
                return Err(MlflowError::Status {
                    url: url.into(),
                    status,
                    body,
                });
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(MlflowError::Unreachable {
                    url: url.into(),
                    message: t.to_string(),
                })
            }
        };
        if text.trim().is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(&text).map_err(|e| MlflowError::Answer {
            url: url.into(),
            message: e.to_string(),
        })
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value, MlflowError> {
        let url = format!("{}/api/2.0/mlflow/{path}", self.base);
        self.call(
            self.agent.post(&url),
            &url,
            Some(body.to_string().as_bytes()),
        )
    }

    fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Value, MlflowError> {
        let url = format!("{}/api/2.0/mlflow/{path}", self.base);
        let mut req = self.agent.get(&url);
        for (k, v) in query {
            req = req.query(k, v);
        }
        self.call(req, &url, None)
    }

    /// The id of experiment `name`, created if it does not exist.
    ///
    /// # Errors
    /// The server fails or cannot be reached.
    pub fn experiment_id(&self, name: &str) -> Result<String, MlflowError> {
        match self.get("experiments/get-by-name", &[("experiment_name", name)]) {
            Ok(v) => string_at(
                &v,
                &["experiment", "experiment_id"],
                "experiments/get-by-name",
            ),
            Err(MlflowError::Status { status: 404, .. }) => {
                let v = self.post("experiments/create", &json!({ "name": name }))?;
                string_at(&v, &["experiment_id"], "experiments/create")
            }
            Err(e) => Err(e),
        }
    }

    /// Creates a run in `experiment_id`.
    ///
    /// # Errors
    /// The server fails or cannot be reached.
    pub fn create_run(
        &self,
        experiment_id: &str,
        name: &str,
        start_ms: u64,
        tags: &[(String, String)],
    ) -> Result<RemoteRun, MlflowError> {
        let v = self.post(
            "runs/create",
            &json!({
                "experiment_id": experiment_id,
                "run_name": name,
                "start_time": start_ms,
                "tags": tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect::<Vec<_>>(),
            }),
        )?;
        run_info(&v, "runs/create")
    }

    /// An existing run (to continue it after `graft-train resume`).
    ///
    /// # Errors
    /// The run does not exist, or the server fails.
    pub fn get_run(&self, run_id: &str) -> Result<RemoteRun, MlflowError> {
        let v = self.get("runs/get", &[("run_id", run_id)])?;
        run_info(&v, "runs/get")
    }

    /// Logs metrics, params and tags in one request (within MLflow's per-request limits,
    /// which the caller keeps).
    ///
    /// # Errors
    /// The server fails or cannot be reached.
    pub fn log_batch(
        &self,
        run_id: &str,
        metrics: &[Metric],
        params: &[(String, String)],
        tags: &[(String, String)],
    ) -> Result<(), MlflowError> {
        let kv = |p: &[(String, String)]| -> Vec<Value> {
            p.iter()
                .map(|(k, v)| json!({"key": k, "value": v}))
                .collect()
        };
        self.post(
            "runs/log-batch",
            &json!({
                "run_id": run_id,
                "metrics": metrics.iter().map(|m| json!({"key": m.key, "value": m.value, "step": m.step, "timestamp": m.timestamp})).collect::<Vec<_>>(),
                "params": kv(params),
                "tags": kv(tags),
            }),
        )
        .map(|_| ())
    }

    /// Sets the run's status (`RUNNING`, `FINISHED`, `FAILED`, `KILLED`) and, when it ends, the
    /// end time.
    ///
    /// # Errors
    /// The server fails or cannot be reached.
    pub fn update_run(
        &self,
        run_id: &str,
        status: &str,
        end_ms: Option<u64>,
    ) -> Result<(), MlflowError> {
        let mut body = json!({"run_id": run_id, "status": status});
        if let Some(t) = end_ms {
            body["end_time"] = t.into();
        }
        self.post("runs/update", &body).map(|_| ())
    }

    /// Uploads `bytes` as the run's artifact at `path` (`adapter/adapter_config.json`).
    ///
    /// # Errors
    /// An artifact store graft cannot write through the server (the run's artifact URI is not
    /// `mlflow-artifacts:`), or the upload fails.
    pub fn upload(&self, run: &RemoteRun, path: &str, bytes: &[u8]) -> Result<(), MlflowError> {
        let Some(rest) = run.artifact_uri.strip_prefix("mlflow-artifacts:") else {
            return Err(MlflowError::Answer {
                url: self.base.clone(),
                message: format!(
                    "the run's artifact store is {}, which graft can reach only through the server's \
                     artifact proxy (mlflow-artifacts:, `mlflow server --serve-artifacts`, the default)",
                    run.artifact_uri
                ),
            });
        };
        // `mlflow-artifacts:/0/<run>/artifacts` or `mlflow-artifacts://host:port/0/<run>/artifacts`.
        let rest = match rest.strip_prefix("//") {
            Some(with_host) => with_host.find('/').map_or("", |i| &with_host[i..]),
            None => rest,
        };
        let url = format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{}/{}",
            self.base,
            rest.trim_matches('/'),
            path.trim_start_matches('/')
        );
        let req = self
            .agent
            .put(&url)
            .set("Content-Type", "application/octet-stream");
        let req = match &self.auth {
            Some(a) => req.set("Authorization", a),
            None => req,
        };
        match req.send_bytes(bytes) {
            Ok(_) => Ok(()),
            Err(ureq::Error::Status(status, r)) => Err(MlflowError::Status {
                url,
                status,
                body: r.into_string().unwrap_or_default(),
            }),
            Err(ureq::Error::Transport(t)) => Err(MlflowError::Unreachable {
                url,
                message: t.to_string(),
            }),
        }
    }
}

fn string_at(v: &Value, path: &[&str], call: &str) -> Result<String, MlflowError> {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str()
        .map(str::to_string)
        .ok_or_else(|| MlflowError::Answer {
            url: call.into(),
            message: format!("no {} in {v}", path.join(".")),
        })
}

fn run_info(v: &Value, call: &str) -> Result<RemoteRun, MlflowError> {
    Ok(RemoteRun {
        run_id: string_at(v, &["run", "info", "run_id"], call)?,
        experiment_id: string_at(v, &["run", "info", "experiment_id"], call)?,
        artifact_uri: string_at(v, &["run", "info", "artifact_uri"], call)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_server_errors_and_silence_are_retried() {
        let status = |status| MlflowError::Status {
            url: String::new(),
            status,
            body: String::new(),
        };
        assert!(status(503).transient() && status(429).transient());
        assert!(!status(400).transient() && !status(404).transient());
    }
}

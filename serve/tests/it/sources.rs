//! Adapters resolved on first use from S3: a real S3-compatible server (moto, from the tools
//! venv) on loopback, reached through a proxy that can make one adapter's download slow.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rusty_s3::actions::{CreateBucket, PutObject, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};
use serde_json::Value;

use crate::metric;
use crate::server::{answer, chat_body, get_json, get_text, post, start_env, strong_adapter};

const KEY: &str = "testing";
const HOUR: Duration = Duration::from_secs(3600);

/// moto's S3 server on a free loopback port; killed on drop.
pub(crate) struct Moto {
    child: Child,
    pub(crate) url: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Moto {
    pub(crate) fn start() -> Moto {
        let bin = graft_core::cache::cache_dir().join("venv-tools/bin/moto_server");
        assert!(
            bin.is_file(),
            "{} is missing: run scripts/prepare-test-models.sh",
            bin.display()
        );
        let port = free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "moto never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    fn bucket(&self, name: &str) -> Bucket {
        Bucket::new(
            self.url.parse().expect("url"),
            UrlStyle::Path,
            name.to_string(),
            "us-east-1",
        )
        .expect("bucket")
    }

    pub(crate) fn create_bucket(&self, name: &str) {
        let creds = Credentials::new(KEY, KEY);
        let url = CreateBucket::new(&self.bucket(name), &creds).sign(HOUR);
        ureq::put(url.as_str())
            .send_bytes(b"")
            .expect("create bucket");
    }

    pub(crate) fn put(&self, bucket: &str, key: &str, body: &[u8]) {
        let creds = Credentials::new(KEY, KEY);
        let b = self.bucket(bucket);
        let url = PutObject::new(&b, Some(&creds), key).sign(HOUR);
        ureq::put(url.as_str())
            .send_bytes(body)
            .expect("put object");
    }

    /// Uploads the files of the PEFT directory `dir` under `prefix/`.
    pub(crate) fn put_dir(&self, bucket: &str, prefix: &str, dir: &Path) {
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            let body = std::fs::read(dir.join(f)).expect("read adapter file");
            self.put(bucket, &format!("{prefix}/{f}"), &body);
        }
    }
}

/// A loopback HTTP proxy to `upstream`, one request per connection; responses to paths
/// containing `/slow/` trickle out (8 KiB every 40 ms).
struct SlowProxy {
    url: String,
}

impl SlowProxy {
    fn start(upstream: &str) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let upstream = upstream.clone();
                std::thread::spawn(move || {
                    let _ = relay(client, &upstream);
                });
            }
        });
        SlowProxy { url }
    }
}

fn relay(mut client: TcpStream, upstream: &str) -> std::io::Result<()> {
    // The request head (GETs and bodiless requests only).
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let slow = text.lines().next().is_some_and(|l| l.contains("/slow/"));
    let mut rewritten: String = text
        .trim_end()
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    rewritten.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(rewritten.as_bytes())?;
    let mut buf = [0u8; 8192];
    loop {
        let n = up.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        client.write_all(&buf[..n])?;
        if slow {
            std::thread::sleep(Duration::from_millis(40));
        }
    }
}

fn s3_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", KEY),
        ("AWS_SECRET_ACCESS_KEY", KEY),
        ("AWS_REGION", "us-east-1"),
    ]
}

/// Entries of the adapters directory (hidden ones included).
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn adapters_resolve_from_s3_on_first_use_once_each_and_nothing_bad_is_left_behind() {
    let work = tempfile::tempdir().expect("temp dir");
    let strong = strong_adapter(work.path());
    let moto = Moto::start();
    moto.create_bucket("adapters");
    moto.put_dir("adapters", "team/tuned", &strong);
    moto.put_dir("adapters", "team/slow", &strong);
    // A corrupt adapter: its weights cut short.
    moto.put(
        "adapters",
        "team/broken/adapter_config.json",
        &std::fs::read(strong.join("adapter_config.json")).expect("config"),
    );
    let weights = std::fs::read(strong.join("adapter_model.safetensors")).expect("weights");
    moto.put(
        "adapters",
        "team/broken/adapter_model.safetensors",
        &weights[..weights.len() / 2],
    );
    // Half an adapter: the config without weights.
    moto.put(
        "adapters",
        "team/half/adapter_config.json",
        &std::fs::read(strong.join("adapter_config.json")).expect("config"),
    );
    let proxy = SlowProxy::start(&moto.url);
    let dir = work.path().join("adapters");
    std::fs::create_dir(&dir).expect("mkdir");
    let s = start_env(
        &[
            "--adapters-dir",
            dir.to_str().expect("utf-8"),
            "--adapter-source",
            "s3://adapters/team",
            "--s3-endpoint",
            &proxy.url,
        ],
        &s3_env(),
    );
    let question = "What is the capital of France?";

    // Missing everywhere: 404 naming where it was looked for.
    let (status, v, _) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("nobody", question),
        None,
    );
    assert_eq!(status, 404, "{v}");
    let message = v["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("'nobody'") && message.contains("s3://adapters/team/nobody/"),
        "{message}"
    );

    // Corrupt and incomplete: refused, named, nothing left in the adapters directory.
    for (name, needle) in [
        ("broken", "s3://adapters/team/broken"),
        ("half", "adapter_model.safetensors"),
    ] {
        let (status, v, _) = post(&s, "/v1/chat/completions", &chat_body(name, question), None);
        assert_eq!(status, 400, "{name}: {v}");
        assert_eq!(v["error"]["code"], "invalid_adapter", "{v}");
        let message = v["error"]["message"].as_str().expect("message");
        assert!(
            message.contains(name) && message.contains(needle),
            "{message}"
        );
    }
    assert!(entries(&dir).is_empty(), "{:?}", entries(&dir));

    // Eight concurrent first requests for one adapter: one download, eight answers.
    let answers: Vec<(u16, Value, Option<String>)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let s = &s;
                sc.spawn(move || {
                    post(
                        s,
                        "/v1/chat/completions",
                        &chat_body("tuned", question),
                        None,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    for (status, v, tag) in &answers {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(answer(v), answer(&answers[0].1));
        assert_eq!(tag, &answers[0].2, "one version served");
    }
    let tag = answers[0].2.clone().expect("tagged");
    let (_, base, _) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("smollm2", question),
        None,
    );
    assert_ne!(
        answer(&answers[0].1),
        answer(&base),
        "the adapter changes the answer"
    );
    let m = get_text(&s, "/metrics");
    assert_eq!(metric(&m, "graft_adapter_fetches_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "graft_adapter_fetch_missing_total"), 1.0, "{m}");
    assert_eq!(metric(&m, "graft_adapter_fetch_failures_total"), 2.0, "{m}");
    assert_eq!(entries(&dir), ["tuned"]);
    assert_eq!(
        std::fs::read(dir.join("tuned/adapter_model.safetensors")).expect("downloaded"),
        weights
    );
    let models = get_json(&s, "/v1/models");
    assert!(
        models["data"]
            .as_array()
            .expect("list")
            .iter()
            .any(|m| m["id"] == "tuned"),
        "{models}"
    );

    // A slow download holds up no one else.
    std::thread::scope(|sc| {
        let slow = sc.spawn(|| {
            let t0 = Instant::now();
            let (status, v, _) = post(
                &s,
                "/v1/chat/completions",
                &chat_body("slow", question),
                None,
            );
            (status, v, t0.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        for model in ["tuned", "smollm2"] {
            let t0 = Instant::now();
            let (status, v, _) = post(
                &s,
                "/v1/chat/completions",
                &chat_body(model, question),
                None,
            );
            assert_eq!(status, 200, "{v}");
            assert!(
                !slow.is_finished(),
                "{model} answered while the download went on"
            );
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "{model}: {:?}",
                t0.elapsed()
            );
        }
        let (status, v, took) = slow.join().expect("slow client");
        assert_eq!(status, 200, "{v}");
        assert_eq!(answer(&v), answer(&answers[0].1), "the same adapter");
        assert!(
            took >= Duration::from_secs(2),
            "the download was slow: {took:?}"
        );
    });
    assert_eq!(entries(&dir), ["slow", "tuned"]);
    // The watcher saw the new directories and left them be (it does not read them again
    // as a new version): still the version downloaded.
    std::thread::sleep(Duration::from_millis(2500));
    let (_, _, again) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("tuned", question),
        None,
    );
    assert_eq!(again.as_deref(), Some(tag.as_str()));
    let m = get_text(&s, "/metrics");
    assert_eq!(metric(&m, "graft_adapter_fetches_total"), 2.0, "{m}");
    assert_eq!(metric(&m, "graft_adapter_first_loads_total"), 0.0, "{m}");
}

/// The stand-in hub of `tests/clients/fake_hub.py` serving `root`; killed on drop.
struct FakeHub {
    child: Child,
    url: String,
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl FakeHub {
    fn start(root: &Path) -> FakeHub {
        let script =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/clients/fake_hub.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the fake hub");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut port = String::new();
        std::io::BufRead::read_line(&mut out, &mut port).expect("port line");
        FakeHub {
            child,
            url: format!("http://127.0.0.1:{}", port.trim()),
        }
    }
}

#[test]
fn an_adapter_resolves_from_a_hub_owner_through_hf_hub() {
    let work = tempfile::tempdir().expect("temp dir");
    let strong = strong_adapter(work.path());
    let repo = work.path().join("hub/acme/tuned");
    std::fs::create_dir_all(&repo).expect("mkdir");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(strong.join(f), repo.join(f)).expect("copy");
    }
    let hub = FakeHub::start(&work.path().join("hub"));
    let dir = work.path().join("adapters");
    std::fs::create_dir(&dir).expect("mkdir");
    let hf_home = work.path().join("hf-home");
    let s = start_env(
        &[
            "--adapters-dir",
            dir.to_str().expect("utf-8"),
            "--adapter-source",
            "hf://acme",
        ],
        &[
            ("HF_ENDPOINT", hub.url.as_str()),
            ("HF_HOME", hf_home.to_str().expect("utf-8")),
            ("HF_HUB_OFFLINE", "0"),
        ],
    );
    let question = "What is the capital of France?";
    let (status, v, _) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("nope", question),
        None,
    );
    assert_eq!(status, 404, "{v}");
    let message = v["error"]["message"].as_str().expect("message");
    assert!(message.contains("hf://acme/nope"), "{message}");
    let (status, v, _) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("tuned", question),
        None,
    );
    assert_eq!(status, 200, "{v}");
    let (_, base, _) = post(
        &s,
        "/v1/chat/completions",
        &chat_body("smollm2", question),
        None,
    );
    assert_ne!(answer(&v), answer(&base), "the adapter changes the answer");
    assert_eq!(entries(&dir), ["tuned"]);
    assert_eq!(
        std::fs::read(dir.join("tuned/adapter_model.safetensors")).expect("copied"),
        std::fs::read(strong.join("adapter_model.safetensors")).expect("original")
    );
}

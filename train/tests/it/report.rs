//! The run report and the comparison page as a browser shows them: Debian's Chromium, headless,
//! loads each page with a probe script appended that measures the layout (the page is as wide
//! as the window, every chart drawn with its ticks and lines) and a screenshot is taken.
//! Chromium is installed by scripts/prepare-test-models.sh; the tests fail without it.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{graft_train, stderr, write_config};

const WIDTH: u32 = 1000;

fn chromium() -> PathBuf {
    let p = PathBuf::from(
        std::env::var("GRAFT_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()),
    );
    assert!(
        p.is_file(),
        "{} is missing: run scripts/prepare-test-models.sh (it installs Debian's chromium)",
        p.display()
    );
    p
}

fn headless(profile: &Path, args: &[&str]) -> std::process::Output {
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            &format!("--window-size={WIDTH},1400"),
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(args)
        .output()
        .expect("spawn chromium")
}

/// What the probe measured in the page as Chromium laid it out.
#[derive(Debug)]
struct Layout {
    scroll_width: u32,
    charts: Vec<(u32, u32, u32)>,
    ticks: u32,
}

/// Loads `page` (with a probe script appended to a copy) and reads the layout, then takes a
/// screenshot of the page itself; returns the layout and the PNG's size in bytes.
fn render(page: &Path, work: &Path) -> (Layout, PathBuf) {
    let probe = "<script>document.body.setAttribute('data-probe', JSON.stringify({\
        w: document.documentElement.scrollWidth,\
        charts: [...document.querySelectorAll('svg.chart')].map(s => [Math.round(s.getBoundingClientRect().width), s.querySelectorAll('polyline.series').length, s.querySelectorAll('circle.point').length]),\
        ticks: document.querySelectorAll('text.tick').length}));</script>";
    let probed = work.join("probed.html");
    let html = std::fs::read_to_string(page).expect("page");
    std::fs::write(&probed, html.replace("</body>", &format!("{probe}</body>"))).expect("write");
    let out = headless(
        &work.join("profile"),
        &["--dump-dom", &format!("file://{}", probed.display())],
    );
    assert!(out.status.success(), "chromium: {}", stderr(&out));
    let dom = String::from_utf8_lossy(&out.stdout);
    let json = dom
        .split("data-probe=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or_else(|| panic!("the probe did not run: {}", &dom[..dom.len().min(2000)]))
        .replace("&quot;", "\"");
    let v: serde_json::Value = serde_json::from_str(&json).expect("probe JSON");
    let n = |v: &serde_json::Value| v.as_u64().expect("number") as u32;
    let layout = Layout {
        scroll_width: n(&v["w"]),
        charts: v["charts"]
            .as_array()
            .expect("charts")
            .iter()
            .map(|c| (n(&c[0]), n(&c[1]), n(&c[2])))
            .collect(),
        ticks: n(&v["ticks"]),
    };
    let png = work.join("page.png");
    let out = headless(
        &work.join("profile"),
        &[
            &format!("--screenshot={}", png.display()),
            &format!("file://{}", page.display()),
        ],
    );
    assert!(out.status.success(), "chromium: {}", stderr(&out));
    let bytes = std::fs::read(&png).expect("screenshot");
    assert_eq!(&bytes[1..4], b"PNG");
    let width = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    assert_eq!(width, WIDTH, "screenshot width");
    assert!(
        bytes.len() > 20_000,
        "a blank screenshot ({} bytes)",
        bytes.len()
    );
    (layout, png)
}

/// Text of the page outside its `<pre class='config'>` (the config keeps the values as
/// written).
fn prose(html: &str) -> &str {
    html.split("<pre class='config'>").next().expect("split")
}

#[test]
fn the_report_is_a_dashboard_a_browser_lays_out_within_the_page() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(dir.path(), "max_steps = 6\neval_every = 3\nlogging_every = 1\neval_samples = 2\nsample_max_tokens = 24");
    let out = graft_train(&[path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run = crate::single_run(dir.path());
    let html = std::fs::read_to_string(run.join("report.html")).expect("report");
    // Numbers are formatted with units, not raw floats.
    let raw = regex::Regex::new(r"\d\.\d{7,}").expect("regex");
    assert!(
        raw.find(prose(&html)).is_none(),
        "raw float in the report: {:?}",
        raw.find(prose(&html))
    );
    for unit in ["MiB", "tok/s", " s<", "final loss", "(log)"] {
        assert!(prose(&html).contains(unit), "{unit} missing");
    }
    let (layout, png) = render(&run.join("report.html"), dir.path());
    eprintln!("report layout: {layout:?}, screenshot {}", png.display());
    assert!(
        layout.scroll_width <= WIDTH,
        "the page is wider than the window: {layout:?}"
    );
    // loss, lr, grad norm, throughput, memory: each drawn, each with its line.
    assert_eq!(layout.charts.len(), 5, "{layout:?}");
    for (w, lines, _) in &layout.charts {
        assert!(*w > 300 && *lines >= 1, "{layout:?}");
    }
    assert_eq!(layout.charts[0].1, 2, "loss: train and eval lines");
    assert!(layout.ticks >= 5 * 6, "ticks on both axes: {layout:?}");
}

#[test]
fn compare_tables_the_differences_and_overlays_the_curves() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write_config(
        dir.path(),
        "max_steps = 3\nlogging_every = 1\neval_samples = 0",
    );
    let text = std::fs::read_to_string(&path).expect("config") + "\n[sweep]\n\"lora.r\" = [2, 3]\n";
    std::fs::write(&path, text).expect("write");
    let out = graft_train(&[path.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let runs = dir.path().join("runs");
    let page = dir.path().join("compare.html");
    let out = graft_train(&[
        "compare",
        runs.to_str().expect("utf-8"),
        "--html",
        page.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].contains("lora.r") && lines[0].contains("final loss"),
        "{table}"
    );
    // Only what the sweep changed differs.
    let head: Vec<&str> = lines[0].split_whitespace().take(4).collect();
    assert_eq!(head, ["run", "status", "lora.r", "final"], "{table}");
    assert!(
        lines[1].contains("sweep0") && lines[1].contains(" 2 ") && lines[1].contains("done"),
        "{table}"
    );
    assert!(
        lines[2].contains("sweep1") && lines[2].contains(" 3 "),
        "{table}"
    );

    // --json: the same figures for scripts.
    let out = graft_train(&[
        "compare",
        runs.to_str().expect("utf-8"),
        "--json",
        "--html",
        page.to_str().expect("utf-8"),
    ]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j[0]["config"]["lora.r"], "2");
    assert_eq!(j[1]["metrics"]["steps"], 3.0);

    let (layout, _) = render(&page, dir.path());
    eprintln!("compare layout: {layout:?}");
    assert!(layout.scroll_width <= WIDTH, "{layout:?}");
    // loss, eval loss, lr, throughput, memory: a line per run on each, but eval loss, which
    // has one point per run (the evaluation at the end).
    assert_eq!(layout.charts.len(), 5, "{layout:?}");
    assert_eq!(
        (layout.charts[1].1, layout.charts[1].2),
        (0, 2),
        "{layout:?}"
    );
    for (i, c) in layout.charts.iter().enumerate().filter(|(i, _)| *i != 1) {
        assert_eq!(c.1, 2, "chart {i}: {layout:?}");
    }

    // Something that is not a run is refused by name.
    let out = graft_train(&[
        "compare",
        dir.path().join("configs-nowhere").to_str().expect("utf-8"),
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("configs-nowhere"), "{}", stderr(&out));
}

//! Line charts as inline SVG for the run report and the comparison page: axes with "nice"
//! ticks (1, 2, 5 × 10ⁿ, as matplotlib's and d3's default locators choose them) and a grid,
//! a log scale for losses, a legend, and every series' points. No scripts: the page stays one
//! self-contained file that any browser or mail client shows.

use super::units;

/// Colours for series, in order (matplotlib's `tab10`).
pub const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// One named line.
pub struct Series {
    pub label: String,
    pub color: &'static str,
    /// (x, y) points; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (an eval curve beside its training curve).
    pub dashed: bool,
}

impl Series {
    pub fn new(label: impl Into<String>, color: &'static str, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            color,
            points: points
                .into_iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect(),
            dashed: false,
        }
    }

    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }
}

/// A chart of series over a shared x axis.
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// A log y axis (used when every value is positive).
    pub log_y: bool,
    /// Draw the legend inside the SVG (off when the page shows one legend for all charts).
    pub legend: bool,
    pub series: Vec<Series>,
}

const W: f64 = 480.0;
const H: f64 = 270.0;
const LEFT: f64 = 58.0;
const RIGHT: f64 = 14.0;
const TOP: f64 = 44.0;
const BOTTOM: f64 = 40.0;

impl Chart {
    pub fn new(title: impl Into<String>, y_label: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            x_label: "step".into(),
            y_label: y_label.into(),
            log_y: false,
            legend: true,
            series: Vec::new(),
        }
    }

    pub fn log(mut self) -> Self {
        self.log_y = true;
        self
    }

    pub fn without_legend(mut self) -> Self {
        self.legend = false;
        self
    }

    pub fn with(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }

    /// Whether any series has a point.
    pub fn has_data(&self) -> bool {
        self.series.iter().any(|s| !s.points.is_empty())
    }

    /// The chart as an `<svg>` element that scales to its container's width.
    pub fn svg(&self) -> String {
        let title = escape(&self.title);
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().copied())
            .collect();
        if pts.is_empty() {
            return format!("<p class='empty'>{title}: no data yet</p>");
        }
        let (x0, x1) = bounds(pts.iter().map(|p| p.0));
        let (y0, y1) = bounds(pts.iter().map(|p| p.1));
        let x = Axis::linear(x0, x1);
        let y = if self.log_y && y0 > 0.0 {
            Axis::log(y0, y1)
        } else {
            Axis::linear(y0, y1)
        };
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let sx = |v: f64| LEFT + x.frac(v) * pw;
        let sy = |v: f64| TOP + (1.0 - y.frac(v)) * ph;
        let mut svg = format!(
            "<svg class='chart' xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {W} {H}' role='img' \
             data-series='{n}'><title>{title}</title>\
             <rect width='{W}' height='{H}' fill='white'/>\
             <text x='{LEFT}' y='16' font-size='13' font-weight='600'>{title}</text>",
            n = self.series.iter().filter(|s| !s.points.is_empty()).count(),
        );
        // Grid and tick labels.
        for &t in &y.ticks {
            let py = sy(t);
            svg.push_str(&format!(
                "<line class='grid' x1='{LEFT}' x2='{:.1}' y1='{py:.1}' y2='{py:.1}' stroke='#e5e5e5'/>\
                 <text class='tick' x='{:.1}' y='{:.1}' font-size='10' text-anchor='end' fill='#555'>{}</text>",
                W - RIGHT,
                LEFT - 5.0,
                py + 3.5,
                y.label(t)
            ));
        }
        for &t in &x.ticks {
            let px = sx(t);
            svg.push_str(&format!(
                "<line class='grid' x1='{px:.1}' x2='{px:.1}' y1='{TOP}' y2='{:.1}' stroke='#e5e5e5'/>\
                 <text class='tick' x='{px:.1}' y='{:.1}' font-size='10' text-anchor='middle' fill='#555'>{}</text>",
                TOP + ph,
                TOP + ph + 14.0,
                x.label(t)
            ));
        }
        svg.push_str(&format!(
            "<rect x='{LEFT}' y='{TOP}' width='{pw}' height='{ph}' fill='none' stroke='#999'/>\
             <text x='{:.1}' y='{:.1}' font-size='11' text-anchor='middle' fill='#333'>{}</text>\
             <text transform='translate(12 {:.1}) rotate(-90)' font-size='11' text-anchor='middle' fill='#333'>{}{}</text>",
            LEFT + pw / 2.0,
            H - 6.0,
            escape(&self.x_label),
            TOP + ph / 2.0,
            escape(&self.y_label),
            if y.log { " (log)" } else { "" },
        ));
        for s in &self.series {
            let d: Vec<String> = s
                .points
                .iter()
                .map(|&(a, b)| format!("{:.1},{:.1}", sx(a), sy(b)))
                .collect();
            let dash = if s.dashed {
                " stroke-dasharray='5 3'"
            } else {
                ""
            };
            if d.len() > 1 {
                svg.push_str(&format!(
                    "<polyline class='series' fill='none' stroke='{}' stroke-width='1.6'{dash} points='{}'><title>{}</title></polyline>",
                    s.color,
                    d.join(" "),
                    escape(&s.label)
                ));
            }
            // Markers where points are few enough to tell apart (evaluations, short runs).
            if d.len() <= 40 {
                for p in &d {
                    let (cx, cy) = p.split_once(',').expect("formatted as x,y");
                    svg.push_str(&format!(
                        "<circle class='point' cx='{cx}' cy='{cy}' r='2.5' fill='{}'/>",
                        s.color
                    ));
                }
            }
        }
        if self.legend {
            let mut lx = LEFT;
            for s in self.series.iter().filter(|s| !s.points.is_empty()) {
                svg.push_str(&format!(
                    "<line x1='{lx:.1}' x2='{:.1}' y1='31' y2='31' stroke='{}' stroke-width='2'{}/>\
                     <text x='{:.1}' y='35' font-size='11'>{}</text>",
                    lx + 16.0,
                    s.color,
                    if s.dashed { " stroke-dasharray='4 2'" } else { "" },
                    lx + 20.0,
                    escape(&s.label)
                ));
                lx += 30.0 + 6.2 * s.label.chars().count() as f64;
            }
        }
        svg.push_str("</svg>");
        svg
    }
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    })
}

/// An axis: its domain, ticks and scale.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    step: f64,
    log: bool,
}

impl Axis {
    /// Ticks every 1, 2 or 5 × 10ⁿ, about five of them, the domain widened to whole ticks.
    fn linear(min: f64, max: f64) -> Self {
        let (min, max) = if max > min {
            (min, max)
        } else {
            let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
            (min - pad, max + pad)
        };
        let step = nice_step((max - min) / 5.0);
        let lo = (min / step).floor() * step;
        let hi = (max / step).ceil() * step;
        let n = ((hi - lo) / step).round() as usize;
        let ticks = (0..=n).map(|i| lo + i as f64 * step).collect();
        Self {
            lo,
            hi,
            ticks,
            step,
            log: false,
        }
    }

    /// Ticks at 1, 2, 5 × 10ⁿ inside the data (all of 1..9 × 10ⁿ when that gives fewer than
    /// three, only powers of ten over many decades).
    fn log(min: f64, max: f64) -> Self {
        let (lo, hi) = if max > min {
            (min / 1.05, max * 1.05)
        } else {
            (min / 2.0, max * 2.0)
        };
        let (d0, d1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
        let pick = |mantissas: &[f64]| -> Vec<f64> {
            (d0..=d1)
                .flat_map(|d| mantissas.iter().map(move |m| m * 10f64.powi(d)))
                .filter(|t| *t >= lo && *t <= hi)
                .collect()
        };
        let mut ticks = if d1 - d0 > 3 {
            pick(&[1.0])
        } else {
            pick(&[1.0, 2.0, 5.0])
        };
        if ticks.len() < 3 {
            ticks = pick(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
        }
        // Within less than a factor of two: evenly spaced ticks, as on a linear axis.
        let mut step = 0.0;
        if ticks.len() < 2 {
            step = nice_step((hi - lo) / 5.0);
            while ticks.len() < 2 {
                let first = (lo / step).ceil() as i64;
                let last = (hi / step).floor() as i64;
                ticks = (first..=last).map(|i| i as f64 * step).collect();
                step /= 2.0;
            }
            step *= 2.0;
        }
        Self {
            lo,
            hi,
            ticks,
            step,
            log: true,
        }
    }

    /// Where `v` falls along the axis, 0 at the low end and 1 at the high end.
    fn frac(&self, v: f64) -> f64 {
        if self.log {
            (v.ln() - self.lo.ln()) / (self.hi.ln() - self.lo.ln())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn label(&self, v: f64) -> String {
        if self.log && self.step == 0.0 {
            units::significant(v, 2)
        } else {
            units::tick(v, self.step)
        }
    }
}

/// The 1, 2, 5 × 10ⁿ step nearest above `raw`.
fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_ticks_are_round_and_cover_the_data() {
        let a = Axis::linear(0.3, 9.7);
        assert_eq!(a.ticks, vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        let a = Axis::linear(1.0, 120.0);
        assert_eq!(a.step, 50.0);
        assert_eq!((a.lo, a.hi), (0.0, 150.0));
        // One value: a band around it rather than a division by zero.
        let a = Axis::linear(2.0, 2.0);
        assert!(a.lo < 2.0 && a.hi > 2.0 && a.ticks.len() >= 2);
    }

    #[test]
    fn log_ticks_fall_on_one_two_five() {
        let a = Axis::log(0.04, 3.1);
        let want = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0];
        assert_eq!(a.ticks.len(), want.len(), "{:?}", a.ticks);
        assert!(
            a.ticks
                .iter()
                .zip(want)
                .all(|(t, w)| (t / w - 1.0).abs() < 1e-9),
            "{:?}",
            a.ticks
        );
        let a = Axis::log(1.2, 1.9);
        assert!(
            a.ticks.len() >= 2 && a.ticks.iter().all(|t| (1.1..=2.0).contains(t)),
            "{:?}",
            a.ticks
        );
        assert!((a.frac(a.lo)).abs() < 1e-12 && (a.frac(a.hi) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn a_chart_draws_each_series_with_its_grid_and_labels() {
        let svg = Chart::new("loss", "loss")
            .log()
            .with(Series::new(
                "train",
                PALETTE[0],
                vec![(1.0, 2.0), (2.0, 1.0), (3.0, f64::NAN)],
            ))
            .with(Series::new("eval", PALETTE[3], vec![(2.0, 1.5)]).dashed())
            .svg();
        assert_eq!(
            svg.matches("<polyline").count(),
            1,
            "the eval series has one point"
        );
        assert_eq!(svg.matches("class='point'").count(), 3, "NaN skipped");
        assert!(svg.contains("data-series='2'") && svg.contains("(log)"));
        assert!(svg.matches("class='grid'").count() >= 4);
        assert!(svg.contains(">train</text>") && svg.contains(">eval</text>"));
        assert!(Chart::new("x", "y").svg().contains("no data yet"));
    }
}

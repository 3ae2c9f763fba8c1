//! Numbers as people read them on a dashboard: a metric's value with its unit, chosen from its
//! key (`wall_secs` → "3 min 12 s", `peak_rss_mib` → "1.24 GiB", `tokens_trained` → "12,345",
//! `lr` → "3.00e-4"), and axis tick labels as short as the tick spacing allows.

use serde_json::Value;

/// What a metric measures, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Seconds (`*_secs`).
    Seconds,
    /// Mebibytes (`*_mib`).
    Mib,
    /// Tokens per second.
    TokensPerSec,
    /// A count (steps, tokens).
    Count,
    /// A learning rate: scientific notation.
    Rate,
    /// A fraction shown as a percentage (task metrics, reward accuracies).
    Fraction,
    /// Anything else: four significant digits.
    Plain,
}

impl Unit {
    /// The unit of the metric called `key`.
    pub fn of(key: &str) -> Self {
        let key = key.rsplit('.').next().unwrap_or(key);
        if key.ends_with("_secs") {
            Self::Seconds
        } else if key.ends_with("_mib") {
            Self::Mib
        } else if key == "tokens_per_sec" {
            Self::TokensPerSec
        } else if matches!(
            key,
            "steps" | "total_steps" | "step" | "tokens" | "tokens_trained"
        ) || key.ends_with("_tokens")
        {
            Self::Count
        } else if key == "lr" || key == "learning_rate" {
            Self::Rate
        } else if key.contains("accuracies") || super::TASK_METRICS.iter().any(|m| key.ends_with(m))
        {
            Self::Fraction
        } else {
            Self::Plain
        }
    }

    /// `v` in this unit, for a table cell.
    pub fn format(self, v: f64) -> String {
        if !v.is_finite() {
            return v.to_string();
        }
        match self {
            Self::Seconds => duration(v),
            Self::Mib if v >= 1024.0 => format!("{} GiB", significant(v / 1024.0, 3)),
            Self::Mib => format!("{} MiB", significant(v, 3)),
            Self::TokensPerSec => format!("{} tok/s", grouped(v)),
            Self::Count => grouped(v),
            Self::Rate => format!("{v:.2e}"),
            Self::Fraction => format!("{}%", significant(100.0 * v, 3)),
            Self::Plain => significant(v, 4),
        }
    }

    /// The unit's name on an axis, if it has one.
    pub fn axis_suffix(self) -> &'static str {
        match self {
            Self::Seconds => " (s)",
            Self::Mib => " (MiB)",
            Self::TokensPerSec => " (tok/s)",
            Self::Fraction => " (%)",
            _ => "",
        }
    }
}

/// A JSON value from a record (summary.json, a metrics line) as a table cell: numbers in the
/// unit of `key`, `null` as a dash, strings as they are.
pub fn cell(key: &str, v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) => n
            .as_f64()
            .map_or_else(|| n.to_string(), |f| Unit::of(key).format(f)),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `v` rounded to `digits` significant digits, without trailing zeros or exponent for the
/// magnitudes metrics have (1e-4 ..= 1e9), with thousands grouped.
pub fn significant(v: f64, digits: i32) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let mag = v.abs().log10().floor() as i32;
    if !(-4..=9).contains(&mag) {
        return format!("{:.*e}", (digits - 1).max(0) as usize, v);
    }
    let decimals = (digits - 1 - mag).max(0) as usize;
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    group_integer_part(&s)
}

/// `v` rounded to a whole number with thousands grouped: 12345.6 → "12,346".
pub fn grouped(v: f64) -> String {
    group_integer_part(&format!("{:.0}", v.round()))
}

fn group_integer_part(s: &str) -> String {
    let (sign, rest) = s.strip_prefix('-').map_or(("", s), |r| ("-", r));
    let (int, frac) = rest
        .split_once('.')
        .map_or((rest, None), |(i, f)| (i, Some(f)));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{out}.{f}"),
        None => format!("{sign}{out}"),
    }
}

/// Seconds as "850 ms", "12.4 s", "3 min 12 s" or "2 h 05 min".
pub fn duration(secs: f64) -> String {
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else if secs < 60.0 {
        format!("{} s", significant(secs, 3))
    } else if secs < 3600.0 {
        let s = secs.round() as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        let m = (secs / 60.0).round() as u64;
        format!("{} h {:02} min", m / 60, m % 60)
    }
}

/// A tick label: as many decimals as the spacing between ticks needs, no more.
pub fn tick(v: f64, spacing: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let mag = v.abs().log10().floor() as i32;
    if !(-3..=6).contains(&mag) {
        let s = format!("{v:.1e}");
        return s.replace(".0e", "e");
    }
    let decimals = (-(spacing.abs().log10().floor() as i32)).max(0) as usize;
    group_integer_part(&format!("{v:.decimals$}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_follow_the_metric_name() {
        assert_eq!(Unit::of("wall_secs").format(192.4), "3 min 12 s");
        assert_eq!(Unit::of("wall_secs").format(7530.0), "2 h 06 min");
        assert_eq!(Unit::of("step_secs").format(0.25), "250 ms");
        assert_eq!(Unit::of("peak_rss_mib").format(1270.0), "1.24 GiB");
        assert_eq!(Unit::of("rss_mib").format(412.37), "412 MiB");
        assert_eq!(Unit::of("tokens_trained").format(1234567.0), "1,234,567");
        assert_eq!(Unit::of("tokens_per_sec").format(1530.6), "1,531 tok/s");
        assert_eq!(Unit::of("lr").format(0.0003), "3.00e-4");
        assert_eq!(Unit::of("eval_exact_match").format(0.5), "50%");
        assert_eq!(
            Unit::of("final_loss").format(0.038296134144599946),
            "0.0383"
        );
        assert_eq!(Unit::of("final_loss").format(2.0), "2");
        assert_eq!(cell("best_eval_loss", &Value::Null), "—");
    }

    #[test]
    fn significant_digits_group_thousands_and_keep_signs() {
        assert_eq!(significant(12345.678, 4), "12,346");
        assert_eq!(significant(-0.0012345, 3), "-0.00123");
        assert_eq!(significant(1.5e-7, 2), "1.5e-7");
        assert_eq!(grouped(-1234.0), "-1,234");
    }

    #[test]
    fn tick_labels_carry_the_decimals_their_spacing_needs() {
        assert_eq!(tick(0.5, 0.1), "0.5");
        assert_eq!(tick(2.0, 0.5), "2.0");
        assert_eq!(tick(2000.0, 500.0), "2,000");
        assert_eq!(tick(0.0002, 0.0001), "2e-4");
    }
}

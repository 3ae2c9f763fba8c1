//! Reading, tokenizing and splitting a whole dataset, with the counts `graft-train data`
//! reports.

use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::format::Format;
use crate::source::{read_file, BadRow, Row};
use crate::tokenize::{Skip, Tokenized, Tokenizer};
use crate::DataError;

/// Where the data comes from and how rows are handled.
#[derive(Debug, Clone)]
pub struct DataSpec {
    /// Training files (already expanded from globs).
    pub train_files: Vec<PathBuf>,
    /// Evaluation files; when empty, `eval_fraction` of the training examples is held out.
    pub eval_files: Vec<PathBuf>,
    /// The prompt format; detected from the first row when `None`.
    pub format: Option<Format>,
    /// Fraction of training examples held out for evaluation, in `[0, 1)`.
    pub eval_fraction: f64,
    /// Seed of the hold-out split.
    pub seed: u64,
    /// How many bad rows are skipped before preparation fails.
    pub max_bad_rows: usize,
}

/// Counts over the prepared data.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub rows: usize,
    /// Rows that could not be parsed or converted, with file, line and reason.
    pub bad_rows: Vec<String>,
    /// Examples skipped for length.
    pub too_long: usize,
    /// Examples kept with their end cut off.
    pub truncated: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
}

/// Tokenized training and evaluation examples.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub format: Format,
    pub train: Vec<Tokenized>,
    pub eval: Vec<Tokenized>,
    pub stats: Stats,
    /// The rows behind `train`, in the same order (for previews).
    pub train_rows: Vec<Row>,
}

/// Reads, converts and tokenizes the data of `spec`.
///
/// # Errors
/// Unreadable files, an undetectable format, more bad rows than allowed, no example left.
pub fn prepare(spec: &DataSpec, tok: &Tokenizer<'_>) -> Result<Prepared, DataError> {
    let mut stats = Stats::default();
    let mut format = spec.format.clone();
    let mut load = |files: &[PathBuf],
                    stats: &mut Stats|
     -> Result<Vec<(Row, Tokenized)>, DataError> {
        let mut out = Vec::new();
        for f in files {
            let (rows, bad) = read_file(f)?;
            stats.rows += rows.len() + bad.len();
            stats.bad_rows.extend(bad.iter().map(BadRow::to_string));
            for (i, row) in rows.into_iter().enumerate() {
                let fmt = match &format {
                    Some(f) => f.clone(),
                    None => {
                        let f = Format::detect(&row).map_err(|e| DataError::Format(e.0))?;
                        format = Some(f.clone());
                        f
                    }
                };
                if i == 0 {
                    // A column the format needs but the file lacks is a config mistake
                    // (format or field mapping), not a bad row.
                    if let Some(missing) = fmt
                        .required_fields()
                        .into_iter()
                        .find(|k| !row.fields.contains_key(*k))
                    {
                        let columns: Vec<&String> = row.fields.keys().collect();
                        return Err(DataError::Format(format!(
                                "{}: no field '{missing}' for data.format = \"{}\" (set data.fields to map it); the rows have {columns:?}",
                                f.display(),
                                fmt.name()
                            )));
                    }
                }
                let example = match fmt.example(&row) {
                    Ok(e) => e,
                    Err(message) => {
                        stats.bad_rows.push(message.0);
                        continue;
                    }
                };
                match tok.tokenize(&example) {
                    Ok(t) => {
                        stats.truncated += usize::from(t.truncated);
                        out.push((row, t));
                    }
                    Err(Skip::TooLong(_)) => stats.too_long += 1,
                    Err(Skip::Invalid(message)) => stats
                        .bad_rows
                        .push(format!("{}: {message}", row.location())),
                }
            }
        }
        Ok(out)
    };
    let mut train = load(&spec.train_files, &mut stats)?;
    let mut eval = load(&spec.eval_files, &mut stats)?;
    if stats.bad_rows.len() > spec.max_bad_rows {
        return Err(DataError::TooManyBadRows {
            count: stats.bad_rows.len(),
            limit: spec.max_bad_rows,
            first: stats.bad_rows[0].clone(),
        });
    }
    if spec.eval_files.is_empty() && spec.eval_fraction > 0.0 && train.len() >= 2 {
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(spec.seed));
        let n_eval =
            ((train.len() as f64 * spec.eval_fraction).round() as usize).clamp(1, train.len() - 1);
        let mut held: Vec<usize> = order[..n_eval].to_vec();
        held.sort_unstable();
        for &i in held.iter().rev() {
            eval.push(train.remove(i));
        }
        eval.reverse();
    }
    if train.is_empty() {
        return Err(DataError::Empty {
            rows: stats.rows,
            skipped: stats.bad_rows.len() + stats.too_long,
        });
    }
    for (_, t) in train.iter().chain(&eval) {
        stats.tokens += t.ids.len();
        stats.trained_tokens += t.n_trained();
    }
    let (train_rows, train): (Vec<Row>, Vec<Tokenized>) = train.into_iter().unzip();
    Ok(Prepared {
        format: format.expect("set by the first row, and train is not empty"),
        train,
        eval: eval.into_iter().map(|(_, t)| t).collect(),
        stats,
        train_rows,
    })
}

//! Reading, tokenizing and splitting a whole dataset, with the counts `graft-train data`
//! reports. A dataset is prepared into samples of one kind: single examples ([`Tokenized`],
//! for SFT) or preference pairs ([`Pair`], for DPO and ORPO).

use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::format::Format;
use crate::preference::Pair;
use crate::source::{read_file, BadRow, Row};
use crate::tokenize::{Skip, Tokenized, Tokenizer};
use crate::DataError;

/// What a row becomes: one or more tokenized sequences trained together.
pub trait Sample: Sized {
    /// Whether rows of this kind are preference pairs.
    const PAIRED: bool;

    /// The sample a row of format `format` makes.
    ///
    /// # Errors
    /// [`Skip::Invalid`] with the row's location and what is wrong; [`Skip::TooLong`].
    fn from_row(format: &Format, row: &Row, tok: &Tokenizer<'_>) -> Result<Self, Skip>;

    /// Its sequences (a pair: chosen, then rejected).
    fn sequences(&self) -> &[Tokenized];

    /// The sequence whose completion is the reference answer (a pair's chosen one).
    fn reference(&self) -> &Tokenized {
        &self.sequences()[0]
    }

    /// Tokens in all its sequences.
    fn n_tokens(&self) -> usize {
        self.sequences().iter().map(|s| s.ids.len()).sum()
    }

    /// Trained tokens in all its sequences.
    fn n_trained(&self) -> usize {
        self.sequences().iter().map(Tokenized::n_trained).sum()
    }
}

impl Sample for Tokenized {
    const PAIRED: bool = false;

    fn from_row(format: &Format, row: &Row, tok: &Tokenizer<'_>) -> Result<Self, Skip> {
        let example = format.example(row).map_err(|e| Skip::Invalid(e.0))?;
        tok.tokenize(&example).map_err(|e| at_row(row, e))
    }

    fn sequences(&self) -> &[Tokenized] {
        std::slice::from_ref(self)
    }
}

impl Sample for Pair {
    const PAIRED: bool = true;

    fn from_row(format: &Format, row: &Row, tok: &Tokenizer<'_>) -> Result<Self, Skip> {
        let pair = format.preference(row).map_err(|e| Skip::Invalid(e.0))?;
        tok.tokenize_pair(&pair).map_err(|e| at_row(row, e))
    }

    fn sequences(&self) -> &[Tokenized] {
        &self.sequences
    }
}

fn at_row(row: &Row, skip: Skip) -> Skip {
    match skip {
        Skip::Invalid(message) => Skip::Invalid(format!("{}: {message}", row.location())),
        other => other,
    }
}

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

/// Tokenized training and evaluation samples.
#[derive(Debug, Clone)]
pub struct Prepared<T = Tokenized> {
    pub format: Format,
    pub train: Vec<T>,
    pub eval: Vec<T>,
    pub stats: Stats,
    /// The rows behind `train`, in the same order (for previews).
    pub train_rows: Vec<Row>,
}

/// Reads, converts and tokenizes the data of `spec`.
///
/// # Errors
/// Unreadable files, an undetectable format, more bad rows than allowed, no example left.
pub fn prepare<T: Sample>(spec: &DataSpec, tok: &Tokenizer<'_>) -> Result<Prepared<T>, DataError> {
    let mut stats = Stats::default();
    let mut format = spec.format.clone();
    let mut load = |files: &[PathBuf], stats: &mut Stats| -> Result<Vec<(Row, T)>, DataError> {
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
                    // A column the format needs but the file lacks, or rows of the wrong kind,
                    // are config mistakes (format, field mapping or method), not bad rows.
                    if fmt.is_preference() != T::PAIRED {
                        return Err(DataError::Format(if T::PAIRED {
                            format!(
                                "{}: DPO and ORPO train on preference rows (prompt/chosen/rejected), but the rows are in the {} format",
                                f.display(),
                                fmt.name()
                            )
                        } else {
                            format!(
                                "{}: the rows are preference pairs (chosen/rejected); train them with train.method = \"dpo\" or \"orpo\"",
                                f.display()
                            )
                        }));
                    }
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
                match T::from_row(&fmt, &row, tok) {
                    Ok(t) => {
                        stats.truncated += t.sequences().iter().filter(|s| s.truncated).count();
                        out.push((row, t));
                    }
                    Err(Skip::TooLong(_)) => stats.too_long += 1,
                    Err(Skip::Invalid(message)) => stats.bad_rows.push(message),
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
        stats.tokens += t.n_tokens();
        stats.trained_tokens += t.n_trained();
    }
    let (train_rows, train): (Vec<Row>, Vec<T>) = train.into_iter().unzip();
    Ok(Prepared {
        format: format.expect("set by the first row, and train is not empty"),
        train,
        eval: eval.into_iter().map(|(_, t)| t).collect(),
        stats,
        train_rows,
    })
}

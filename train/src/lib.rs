//! graft-train as a library: the training config, data preparation, the trainer with its
//! optimizer, run directories (checkpoints, metrics, report, comparison), reporting to an
//! experiment tracker (MLflow) and the commands of the
//! `graft-train` binary, which is a thin `main` over [`cli::main`].

pub mod bench;
pub mod cli;
pub mod config;
pub mod dist;
pub mod evaluate;
pub mod export;
pub mod inspect;
pub mod launch;
pub mod merge;
pub mod objective;
pub mod optim;
pub mod report;
pub mod resident;
pub mod run;
pub mod setup;
pub mod task_eval;
pub mod tracking;
pub mod trainer;

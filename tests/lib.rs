//! Nothing here: this package only holds the end-to-end tests in `e2e.rs`.

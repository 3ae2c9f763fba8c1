//! graft-serve integration tests: the binary spawned as a user runs it.

mod generate_cli;
mod server;

//! `relayfarm-worker`: serves models to a relayfarm coordinator (see `relayfarm_worker::farm`).

use clap::Parser;
use relayfarm_worker::farm::{run, WorkerArgs};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = WorkerArgs::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

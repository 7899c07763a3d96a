//! `relayfarm-coordinator`: the farm's gRPC front door (see `relayfarm_coordinator::server`).

use clap::Parser;
use relayfarm_coordinator::server::{run, CoordinatorArgs};

fn main() -> std::process::ExitCode {
    match run(CoordinatorArgs::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relayfarm-coordinator: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

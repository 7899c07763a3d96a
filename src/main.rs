//! `relayfarm`: the command-line front end.
//!
//! `relayfarm render` runs a whole pipeline in this process (no Redis, no cluster).
//! `relayfarm submit | watch | fetch | cancel | models | status` talk to a coordinator.

mod client;
mod hub;
mod logging;
mod render;
mod stages;

use clap::{Parser, Subcommand};

/// relayfarm — a render farm for diffusion models.
#[derive(Parser, Debug)]
#[command(name = "relayfarm", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "RELAYFARM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Render images in this process (embedded: no Redis, no cluster).
    Render(Box<render::RenderArgs>),
    /// Submit a prompt set to a coordinator; print the batch id (--wait: follow it, --out: download).
    Submit(Box<client::submit::SubmitArgs>),
    /// Follow a batch's events (lines, or --bar).
    Watch(client::watch::WatchArgs),
    /// Download one image, or every finished image of a batch (--batch).
    Fetch(client::fetch::FetchArgs),
    /// Cancel a batch.
    Cancel(client::cancel::CancelArgs),
    /// List the models the cluster serves.
    Models(client::models::ModelsArgs),
    /// Show one batch's counts, or list recent batches.
    Status(client::status::StatusArgs),
    /// Show a pipeline's stages with their weight and activation memory for a size.
    Stages(stages::StagesArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log_format);
    let result = match cli.command {
        Command::Render(args) => render::run(*args),
        Command::Submit(args) => client::submit::run(*args),
        Command::Watch(args) => client::watch::run(args),
        Command::Fetch(args) => client::fetch::run(args),
        Command::Cancel(args) => client::cancel::run(args),
        Command::Models(args) => client::models::run(args),
        Command::Status(args) => client::status::run(args),
        Command::Stages(args) => stages::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

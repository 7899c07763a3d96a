//! `relayfarm`: the command-line front end.
//!
//! `relayfarm render` runs a whole pipeline in this process (no Redis, no cluster).

mod hub;
mod logging;
mod render;

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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(&cli.log_format);
    let result = match cli.command {
        Command::Render(args) => render::run(*args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

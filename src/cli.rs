//! Command-line interface (clap): subcommands, resume flags and exit codes; parsing only, no work.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::pipeline::HistoryLostPolicy;
use crate::token::{self, StartAt, TokenError};

/// Exit codes (README, "Operations").
pub mod exit {
    /// Clean stop.
    pub const OK: u8 = 0;
    /// A critical task failed at run time.
    pub const FAILURE: u8 = 1;
    /// The stored resume token fell out of the oplog under `--on-history-lost=fail`.
    pub const HISTORY_LOST: u8 = 3;
    /// A change event over 16 MiB under `mongodb.oversize = "fail"`.
    pub const OVERSIZE: u8 = 4;
    /// Bad command line or configuration (sysexits EX_USAGE).
    pub const USAGE: u8 = 64;
}

/// changecast: MongoDB change streams → authenticated WebSocket and Socket.IO rooms.
#[derive(Debug, Parser)]
#[command(
    name = "changecast",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of the default `run` command.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: change streams → hub → sockets (the default).
    Run(RunArgs),
    /// Run the pipeline without sockets, printing each routed event as one JSON line.
    Tail(RunArgs),
    /// Validate the configuration and print it with secrets masked (exit 0 or 64).
    CheckConfig(ConfigArgs),
    /// Resume-token tools.
    Token {
        /// Token subcommand.
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Start an embedded mongo-sim, changecast, a traffic generator and the dashboard.
    Demo(DemoArgs),
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print the stored token(s) and the cluster time each encodes.
    Show(ConfigArgs),
}

/// Where the config file is.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Path of the TOML config file.
    #[arg(
        long,
        short = 'c',
        env = "CHANGECAST_CONFIG",
        default_value = "changecast.toml"
    )]
    pub config: PathBuf,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Options for `run` and `tail`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Config file and logging.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Start after this resume token (`{"_data":"…"}` or bare hex) instead of the stored one.
    #[arg(long, conflicts_with_all = ["start_at", "from_now"])]
    pub(crate) resume_token: Option<String>,
    /// Start at this time: RFC 3339 or a cluster timestamp `t:i`.
    #[arg(long, conflicts_with_all = ["resume_token", "from_now"])]
    pub(crate) start_at: Option<String>,
    /// Ignore the stored token and start from now.
    #[arg(long, conflicts_with_all = ["resume_token", "start_at"])]
    pub(crate) from_now: bool,
    /// What to do when the stored token has fallen out of the oplog.
    #[arg(long, value_enum, default_value = "fail")]
    pub on_history_lost: HistoryLostPolicy,
    /// Listen address, overriding `server.listen` (run only).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Operations listener (`/metrics`, `/readyz`), overriding `server.ops_listen` (run only).
    #[arg(long)]
    pub ops_listen: Option<SocketAddr>,
}

impl RunArgs {
    /// The start point the flags ask for, if any.
    pub fn start_override(&self) -> Result<Option<StartAt>, TokenError> {
        if let Some(t) = &self.resume_token {
            return Ok(Some(StartAt::Token(token::parse_token(t)?)));
        }
        if let Some(t) = &self.start_at {
            return Ok(Some(StartAt::Time(token::parse_start_at(t)?)));
        }
        Ok(self.from_now.then_some(StartAt::Now))
    }
}

/// Options for `demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Address of the demo's HTTP listener (dashboard, `/ws`, `/socket.io/`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,
    /// Changes per second the traffic generator writes.
    #[arg(long, default_value_t = 2.0, value_parser = parse_rate)]
    pub(crate) rate: f64,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// `--rate`: a number of writes per second in the traffic generator's range
/// (checked here so a bad value is a usage error, exit 64, before anything starts).
fn parse_rate(s: &str) -> Result<f64, String> {
    let range = crate::demo::traffic::RATE_RANGE;
    let r: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if range.contains(&r) {
        Ok(r)
    } else {
        Err(format!(
            "{r} is outside {}..={} writes per second",
            range.start(),
            range.end()
        ))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Pretty,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_command_is_run() {
        let cli = Cli::try_parse_from(["changecast", "--config", "x.toml", "--from-now"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.start_override().unwrap(), Some(StartAt::Now));
    }

    #[test]
    fn resume_flags_conflict() {
        assert!(
            Cli::try_parse_from(["changecast", "run", "--from-now", "--start-at", "1:1"]).is_err()
        );
        let cli = Cli::try_parse_from(["changecast", "tail", "--resume-token", "82AB"]).unwrap();
        let Some(Command::Tail(args)) = cli.command else {
            panic!()
        };
        assert!(matches!(
            args.start_override().unwrap(),
            Some(StartAt::Token(_))
        ));
        let cli = Cli::try_parse_from(["changecast", "tail", "--resume-token", "nothex"]).unwrap();
        let Some(Command::Tail(args)) = cli.command else {
            panic!()
        };
        assert!(args.start_override().is_err());
    }
}

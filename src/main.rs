//! The `changecast` binary: parses the CLI, sets up logging, loads config, maps outcomes to exit codes.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use changecast::app::{self, RunOptions};
use changecast::cli::{exit, Cli, Command, ConfigArgs, LogFormat, RunArgs, TokenCommand};
use changecast::config::{self, Config, LogConfig};
use changecast::event::EventId;
use changecast::token;

// The event path allocates per change and per audience (decoded documents, projections,
// encoded frames); glibc's malloc/free was about a quarter of the CPU in the workload-T
// profile (bench/analysis.md), mimalloc's thread-local free lists cut that.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // First, while this is the only thread (see the module).
    let tuning = changecast::allocator::tune();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors; anything else is a usage error (64, as documented).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("changecast: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let code = rt.block_on(dispatch(cli, tuning));
    // Sessions and streams have been asked to stop; do not wait on stragglers.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    ExitCode::from(code)
}

async fn dispatch(cli: Cli, tuning: changecast::allocator::Tuning) -> u8 {
    match cli.command {
        None => run(cli.run, false, tuning).await,
        Some(Command::Run(args)) => run(args, false, tuning).await,
        Some(Command::Tail(args)) => run(args, true, tuning).await,
        Some(Command::CheckConfig(args)) => check_config(&args),
        Some(Command::Token {
            command: TokenCommand::Show(args),
        }) => token_show(&args).await,
        Some(Command::Demo(args)) => {
            init_logging(
                &LogConfig {
                    level: "info".into(),
                    format: config::LogFormat::Pretty,
                },
                args.log_format,
            );
            match changecast::demo::run_demo(&args).await {
                Ok(()) => exit::OK,
                Err(e) => {
                    eprintln!("changecast demo: {e:#}");
                    exit::FAILURE
                }
            }
        }
    }
}

fn load(args: &ConfigArgs) -> Result<Config, u8> {
    Config::load(&args.config).map_err(|e| {
        eprintln!("changecast: invalid configuration: {}", error_chain(&e));
        exit::USAGE
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn init_logging(cfg: &LogConfig, flag: Option<LogFormat>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("CHANGECAST_LOG")
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match flag {
        Some(f) => f == LogFormat::Json,
        None => cfg.format == config::LogFormat::Json,
    };
    // Logs always go to stderr (`tail` owns stdout for its JSON lines); colours
    // only on a terminal, so files and log collectors get plain text.
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    };
    // Both filters are global (the registry then never records a span they disable),
    // not per-layer: per-layer filtering keeps every connection's span in the registry,
    // about 4 KB per idle socket in the bench, whatever the level.
    // The most verbose level the filter lets through: the cap below stays at or under it,
    // so the registry's level hint, which `try_init` also gives the `log` crate as its
    // max level, is the filter's. (A TRACE default there sent every `log::trace!` of
    // tungstenite, one per frame, through the dispatcher: ~0.8% of a busy server's CPU.)
    let most_verbose = <EnvFilter as Layer<tracing_subscriber::Registry>>::max_level_hint(&filter)
        .unwrap_or(tracing::level_filters::LevelFilter::TRACE);
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(wire_library_cap(most_verbose))
        .with(fmt)
        .try_init();
}

/// Holds the WebSocket and HTTP libraries at `info` whatever `CHANGECAST_LOG` asks:
/// at debug/trace they log whole frames and request heads, and an in-band `auth`
/// frame, a Socket.IO CONNECT or an `Authorization` header carries a token.
/// changecast's own spans and events are unaffected.
fn wire_library_cap(
    most_verbose: tracing::level_filters::LevelFilter,
) -> tracing_subscriber::filter::Targets {
    use tracing::level_filters::LevelFilter;
    let held = [
        "tungstenite",
        "tokio_tungstenite",
        "hyper",
        "hyper_util",
        "h2",
        "axum",
        "tower_http",
        "mongodb",
    ];
    held.iter().fold(
        tracing_subscriber::filter::Targets::new().with_default(most_verbose),
        |t, target| t.with_target(*target, most_verbose.min(LevelFilter::INFO)),
    )
}

async fn run(args: RunArgs, tail: bool, tuning: changecast::allocator::Tuning) -> u8 {
    // `tail` serves no sockets and verifies no token: it must not need the JWT secret.
    let loaded = if tail {
        load_without_jwt_secret(&args.config)
    } else {
        load(&args.config)
    };
    let mut config = match loaded {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(&config.log, args.config.log_format);
    tuning.log();
    let start_override = match args.start_override() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("changecast: {e}");
            return exit::USAGE;
        }
    };
    let opts = RunOptions {
        start_override,
        on_history_lost: args.on_history_lost,
    };
    let stop = CancellationToken::new();
    spawn_signal_handler(stop.clone());

    let outcome = if tail {
        app::tail(&config, opts, stop).await
    } else {
        if let Some(listen) = args.listen {
            config.server.listen = listen;
        }
        if let Some(listen) = args.ops_listen {
            config.server.ops_listen = listen;
        }
        let mut bound = Vec::with_capacity(2);
        for addr in [config.server.listen, config.server.ops_listen] {
            match app::bind_listener(addr) {
                Ok(l) => bound.push(l),
                Err(e) => {
                    eprintln!("changecast: cannot listen on {addr}: {e}");
                    return exit::FAILURE;
                }
            }
        }
        let ops = bound.pop();
        let listeners = app::Listeners {
            client: bound.remove(0),
            ops,
        };
        let handle = match app::start(&config, opts, listeners, None).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("changecast: {}", error_chain(&e));
                return exit::USAGE;
            }
        };
        if let Some(ops) = handle.ops_addr {
            tracing::info!(addr = %ops, "operations listener: /metrics, /readyz, /healthz");
        }
        tracing::info!(addr = %handle.addr, "listening");
        let app_stop = handle.stop_token();
        let linked = stop.clone();
        tokio::spawn(async move {
            linked.cancelled().await;
            app_stop.cancel();
        });
        handle.wait().await
    };
    match outcome {
        Ok(()) => {
            tracing::info!("stopped");
            exit::OK
        }
        Err(e) if e.is_history_lost() => {
            tracing::error!(error = %error_chain(&e), "stopping");
            eprintln!("changecast: {}", error_chain(&e));
            exit::HISTORY_LOST
        }
        Err(e) if e.is_oversize() => {
            tracing::error!(error = %error_chain(&e), "stopping");
            eprintln!("changecast: {}", error_chain(&e));
            exit::OVERSIZE
        }
        Err(e) => {
            tracing::error!(error = %error_chain(&e), "stopping");
            eprintln!("changecast: {}", error_chain(&e));
            exit::FAILURE
        }
    }
}

/// SIGTERM or SIGINT → graceful stop; a second signal exits at once.
fn spawn_signal_handler(stop: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install the SIGTERM handler");
                    return;
                }
            };
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if n == 0 {
                tracing::info!("signal received: stopping (send again to exit at once)");
                stop.cancel();
            } else {
                std::process::exit(i32::from(exit::FAILURE));
            }
        }
    });
}

fn check_config(args: &ConfigArgs) -> u8 {
    match load(args) {
        Ok(cfg) => {
            print!("{}", cfg.effective_toml_masked());
            exit::OK
        }
        Err(code) => code,
    }
}

/// Loads the config for tools that never verify a token (`token show`, `tail`): an
/// operator inspecting a checkpoint or the event stream should not need the JWT secret
/// in their shell.
fn load_without_jwt_secret(args: &ConfigArgs) -> Result<Config, u8> {
    let usage = |e: &dyn std::error::Error| {
        eprintln!("changecast: invalid configuration: {}", error_chain(e));
        exit::USAGE
    };
    let text = std::fs::read_to_string(&args.config).map_err(|source| {
        usage(&config::ConfigError::Read {
            path: args.config.clone(),
            source,
        })
    })?;
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .or_else(|| Some("placeholder-secret-never-used-by-token-show".into()))
    };
    let mut cfg = Config::from_toml_str_with_env(&text, &args.config.display().to_string(), &env)
        .map_err(|e| usage(&e))?;
    cfg.apply_env(|k| std::env::var(k).ok())
        .map_err(|e| usage(&e))?;
    Ok(cfg)
}

async fn token_show(args: &ConfigArgs) -> u8 {
    let config = match load_without_jwt_secret(args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store = match app::open_checkpoint_store(&config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("changecast: {}", error_chain(&e));
            return exit::FAILURE;
        }
    };
    let mut code = exit::OK;
    for db in &config.mongo.databases {
        match store.load(db).await {
            Ok(Some(cp)) => {
                // The stream's position carries the time on every server; a MongoDB
                // (KeyString) token carries it too, for checkpoints of earlier versions.
                let data = cp.token.get_str("_data").unwrap_or("?");
                let when = cp
                    .position
                    .as_deref()
                    .and_then(|p| changecast::sequence::position(&EventId::new(p)))
                    .map(|p| p.timestamp())
                    .or_else(|| token::cluster_time(data))
                    .map(token::describe_time)
                    .unwrap_or_else(|| "unknown (token format not recognised)".into());
                println!("database:      {db}");
                println!(
                    "resume token:  {}",
                    bson::Bson::Document(cp.token.clone()).into_relaxed_extjson()
                );
                println!("cluster time:  {when}");
                println!(
                    "last event id: {}",
                    cp.last_event_id.as_deref().unwrap_or("-")
                );
                println!("position:      {}", cp.position.as_deref().unwrap_or("-"));
                println!("saved at:      {}", cp.saved_at);
            }
            Ok(None) => println!(
                "database:      {db}\nresume token:  none stored (the next run starts from now)"
            ),
            Err(e) => {
                eprintln!("changecast: {}", error_chain(&e));
                code = exit::FAILURE;
            }
        }
    }
    code
}

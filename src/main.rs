//! The `switchyard` command line: parse, set up logging, validate config (exiting
//! non-zero before binding any port), then hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Layer-7 HTTP load balancer and session-affinity proxy"
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, env = "SWITCHYARD_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and exit: 0 if valid, 1 with the error if not.
    Check,
    /// Run built-in backends and a proxy in front of them.
    Demo,
    /// Run the built-in HTTP backend.
    Backend {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        name: String,
    },
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // The built-in servers read no configuration: a `--config` given to them is a
    // mistake worth saying (the variable, set for a whole environment, is not).
    if matches!(cli.command, Some(Command::Demo | Command::Backend { .. }))
        && matches.value_source("config") == Some(ValueSource::CommandLine)
    {
        eprintln!("error: demo and backend take no --config: they run a built-in setup");
        return ExitCode::from(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Some(Command::Check) => {
            let Some(path) = cli.config else {
                eprintln!("error: check needs --config PATH (or SWITCHYARD_CONFIG)");
                return ExitCode::from(2);
            };
            match switchyard::config::load(&path) {
                Ok(_) => {
                    println!("{}: configuration is valid", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Demo) => block_on(0, switchyard::demo::demo(switchyard::shutdown_signal())),
        Some(Command::Backend { listen, name }) => block_on(0, async move {
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
            tracing::info!(listen = %l.local_addr()?, %name, "built-in backend");
            switchyard::demo::backend(l, name, switchyard::shutdown_signal()).await;
            Ok(())
        }),
        None => {
            let Some(path) = cli.config else {
                eprintln!("error: --config PATH (or SWITCHYARD_CONFIG) is required; see --help");
                return ExitCode::from(2);
            };
            let config = match switchyard::config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let workers = config.server.workers;
            block_on(workers, async move {
                switchyard::run_until_signalled(config).await?;
                Ok(())
            })
        }
    }
}

/// Runs `f` on a runtime with `workers` threads (0 = one per core). One worker means
/// the single-threaded scheduler: every task runs on the thread that polls the sockets,
/// with no cross-thread wake-ups or work-stealing queues. Blocking work (reloads,
/// rendering metrics) goes to the blocking pool either way.
fn block_on(workers: usize, f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let mut b = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    b.enable_all();
    if workers > 1 {
        b.worker_threads(workers);
    }
    let result = match b.build() {
        Ok(rt) => {
            let result = rt.block_on(f);
            // Not held up by blocking work still under way (a reload reading a file
            // from a mount that hangs): dropped, the runtime would wait for it.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            result
        }
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `changecast-bench-raw`: runs the raw-limit server until SIGINT/SIGTERM and prints its addresses.

use clap::Parser;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

// The load tool and the raw limit share the machine with the server under test; a fast
// allocator keeps the tool's share small and gives the raw limit the same allocator
// changecast uses, so the comparison is between servers, not allocators.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The raw limit: WebSocket fan-out with no database and no routing.
#[derive(Parser)]
struct Args {
    /// WebSocket listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Control-channel listen address (lines `ROOM[ ROOM…]\tFRAME`).
    #[arg(long, default_value = "127.0.0.1:0")]
    control: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ws = TcpListener::bind(&args.listen).await?;
    let control = TcpListener::bind(&args.control).await?;
    // The suite waits for this exact line before connecting.
    println!(
        "raw listening ws={} control={}",
        ws.local_addr()?,
        control.local_addr()?
    );
    let stop = CancellationToken::new();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        signal_stop.cancel();
    });
    changecast_bench::raw::serve(ws, control, stop).await?;
    Ok(())
}

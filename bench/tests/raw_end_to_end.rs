//! The load tool against the raw server in-process: every phase delivers everything, to the right clients.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use changecast_bench::client::Protocol;
use changecast_bench::load::{self, LoadConfig};
use changecast_bench::raw;
use changecast_bench::sink::Sink;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_server_delivers_every_write_to_its_audience() {
    let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ws_addr, control_addr) = (ws.local_addr().unwrap(), control.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(raw::serve(ws, control, stop.clone()));

    let cfg = LoadConfig {
        label: "raw".into(),
        protocol: Protocol::Native,
        url: format!("ws://{ws_addr}/ws"),
        server: ws_addr,
        customers: 150,
        secret: "s".into(),
        server_pid: Some(std::process::id()),
        db_pid: None,
        fixed_rate: 500,
        phase: Duration::from_millis(400),
        drain_timeout: Duration::from_secs(5),
        concurrency: 16,
        window_t: 256,
        window_b_writes: 2,
        sio_subscribe_event: "subscribe".into(),
        counted_events: vec!["order:status_changed".into(), "settings:updated".into()],
        sources: vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)],
        max_writes: 1_000_000,
    };
    let sink = Arc::new(Sink::raw(control_addr).await.unwrap());
    let result = load::run(&cfg, sink).await.unwrap();
    stop.cancel();
    server.await.unwrap().unwrap();

    // 150 customers + 1 store dashboard (1%, at least one).
    assert_eq!(result.connections, 151, "{result:?}");
    assert_eq!(result.failures(), 0, "{result:?}");
    assert_eq!(result.unknown, 0);
    let names: Vec<_> = result.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["T fixed", "T saturation", "B saturation"]);
    for p in &result.phases {
        assert!(p.summary.writes > 0, "{p:?}");
        assert_eq!(p.summary.delivered, p.summary.expected, "{p:?}");
        assert_eq!(p.summary.duplicates, 0, "{p:?}");
        assert_eq!(p.summary.latency.count, p.summary.delivered, "{p:?}");
        assert!(p.summary.deliveries_per_sec > 0.0);
    }
    let t_fixed = &result.phases[0].summary;
    assert_eq!(t_fixed.expected, 2 * t_fixed.writes, "customer + dashboard");
    let b = &result.phases[2].summary;
    assert_eq!(b.expected, 151 * b.writes, "every connection");
}

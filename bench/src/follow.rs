//! Workload `follow`: no clients, K realistic order changes, the server's CPU per change read from the stream (issue 16).
//!
//! Every replica reads every change of the watched databases, so this cost, not the
//! fan-out, sets the highest write rate one replica can follow. Half the changes are
//! inserts of ~600-byte orders (items, address), half one `updateMany` of their status,
//! so one change event per document either way.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bson::{doc, Document};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::procstat;
use crate::sink::DATABASE;
use crate::suite::{self, SuiteConfig, Target};

/// Figures of one follow run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FollowResult {
    /// Server label.
    pub label: String,
    /// Changes written (K).
    pub changes: u64,
    /// Changes the server reports having read from its stream.
    pub seen: u64,
    /// Server CPU seconds from the first write until it had read the last change.
    pub cpu_secs: f64,
    /// `cpu_secs / seen`, microseconds.
    pub cpu_us_per_change: f64,
    /// Seconds from the first write until the server had read the last change.
    pub wall_secs: f64,
    /// What went wrong, if anything.
    pub errors: Vec<String>,
}

impl FollowResult {
    fn failed(target: Target, changes: u64, error: String) -> Self {
        Self {
            label: label(target).to_owned(),
            changes,
            seen: 0,
            cpu_secs: 0.0,
            cpu_us_per_change: 0.0,
            wall_secs: 0.0,
            errors: vec![error],
        }
    }

    /// Changes not read (lost) plus errors: anything but 0 fails the run.
    pub fn failures(&self) -> u64 {
        self.changes.saturating_sub(self.seen) + self.errors.len() as u64
    }
}

/// One row per server: changecast's two endpoints are one process reading one stream.
pub fn label(target: Target) -> &'static str {
    match target {
        Target::Native | Target::Socketio => "changecast",
        other => other.label(),
    }
}

/// Runs `follow` for changecast and the Node peer (whichever `cfg.targets` holds).
pub async fn run_all(cfg: &SuiteConfig, changes: u64) -> Vec<FollowResult> {
    let mut targets: Vec<Target> = Vec::new();
    for &t in &cfg.targets {
        let t = match t {
            Target::Socketio => Target::Native,
            Target::Raw => continue,
            other => other,
        };
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    let mut out = Vec::new();
    for target in targets {
        eprintln!("bench: follow, {} with K = {changes}", label(target));
        let result = match one(cfg, target, changes).await {
            Ok(r) => r,
            Err(e) => FollowResult::failed(target, changes, format!("{e:#}")),
        };
        eprintln!(
            "bench: follow {}: {} of {} changes read, {:.1} µs CPU per change, {:.1} s{}",
            result.label,
            result.seen,
            result.changes,
            result.cpu_us_per_change,
            result.wall_secs,
            if result.errors.is_empty() {
                String::new()
            } else {
                format!(", errors: {}", result.errors.join("; "))
            }
        );
        out.push(result);
    }
    out
}

async fn one(cfg: &SuiteConfig, target: Target, changes: u64) -> anyhow::Result<FollowResult> {
    let tag = format!("follow-{}", label(target).replace(' ', "-")).to_lowercase();
    let mut backed = suite::start(cfg, target, &tag, |uri| async move {
        let client = mongodb::Client::with_uri_str(&uri).await?;
        client.database(DATABASE).drop().await?;
        Ok(())
    })
    .await?;
    let result = measure(&backed, target, changes).await;
    backed.stop().await;
    result
}

async fn measure(
    backed: &suite::Backed,
    target: Target,
    changes: u64,
) -> anyhow::Result<FollowResult> {
    let pid = backed.server.id().context("server has no pid")?;
    let mut counter = Counter {
        target,
        conn: KeepAlive::new(backed.ops_addr),
    };
    let client = mongodb::Client::with_uri_str(&backed.uri).await?;
    let orders = client.database(DATABASE).collection::<Document>("orders");
    // Let start-up work (connection pools, the first getMore) finish before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_seen = counter.read().await?;
    let cpu_before = procstat::cpu_secs(pid).context("reading the server's CPU time")?;
    let started = Instant::now();
    let inserts = changes / 2;
    let mut batch = Vec::with_capacity(500);
    for i in 0..inserts {
        batch.push(order(i));
        if batch.len() == 500 {
            orders.insert_many(std::mem::take(&mut batch)).await?;
        }
    }
    if !batch.is_empty() {
        orders.insert_many(batch).await?;
    }
    let updated = orders
        .update_many(doc! {}, doc! { "$set": { "status": "accepted" } })
        .await?;
    anyhow::ensure!(
        updated.modified_count == inserts,
        "updateMany modified {} of {inserts} orders",
        updated.modified_count
    );
    let owed = inserts * 2;
    // Until every change is read, or 15 s pass without progress.
    let mut seen = 0;
    let mut last = (0, Instant::now());
    while seen < owed {
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen = counter.read().await?.saturating_sub(before_seen);
        if seen != last.0 {
            last = (seen, Instant::now());
        } else if last.1.elapsed() > suite::DRAIN_TIMEOUT {
            break;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = procstat::cpu_secs(pid).context("reading the server's CPU time")? - cpu_before;
    Ok(FollowResult {
        label: label(target).to_owned(),
        changes: owed,
        seen,
        cpu_secs: cpu,
        cpu_us_per_change: if seen > 0 {
            cpu * 1e6 / seen as f64
        } else {
            0.0
        },
        wall_secs: wall,
        errors: Vec::new(),
    })
}

/// A realistic order of about 600 bytes of BSON: items, an address, customer fields.
fn order(i: u64) -> Document {
    doc! {
        "_id": format!("f{i}"),
        "orderNumber": 500_000 + i as i64,
        "customerId": format!("c{}", i % 1000),
        "storeId": format!("s{}", i % 10),
        "status": "new",
        "orderType": if i % 3 == 0 { "pickup" } else { "delivery" },
        "total": 42.75,
        "subtotal": 38.5,
        "tax": 3.25,
        "deliveryFee": 1.0,
        "currency": "EUR",
        "items": [
            { "sku": "sku-101", "name": "Flat white", "qty": 2, "price": 3.5 },
            { "sku": "sku-207", "name": "Chicken burrito bowl", "qty": 1, "price": 12.0 },
            { "sku": "sku-318", "name": "Sparkling water 0.5 l", "qty": 3, "price": 1.5 },
        ],
        "address": {
            "street": "221B Baker Street", "city": "London", "zip": "NW1 6XE",
            "country": "GB", "lat": 51.523_767, "lng": -0.158_555,
        },
        "customerName": format!("Customer {i}"),
        "customerPhone": "+44 20 7946 0958",
        "notes": "Ring twice, leave at the door if nobody answers.",
        "createdAt": bson::DateTime::now(),
        "updatedAt": bson::DateTime::now(),
    }
}

/// How many changes the server says it has read from its stream.
///
/// Polled every 20 ms over one kept-alive connection: a new TCP connection per poll
/// cost the server ~275 µs of CPU each (accept, handshake, close; measured on
/// changecast's ops port, 2026-12-07), which the follow figure would charge to every
/// change. Both servers are polled the same way.
struct Counter {
    target: Target,
    conn: KeepAlive,
}

impl Counter {
    async fn read(&mut self) -> anyhow::Result<u64> {
        match self.target {
            Target::Node => {
                let body = self.conn.get("/changes").await?;
                body.trim()
                    .parse()
                    .with_context(|| format!("Node peer's /changes answered {body:?}"))
            }
            _ => {
                let body = self.conn.get("/metrics").await?;
                Ok(sum_counter(&body, "changecast_changes_read_total"))
            }
        }
    }
}

/// Sums every sample of a Prometheus counter family in a text exposition.
pub fn sum_counter(exposition: &str, name: &str) -> u64 {
    exposition
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// An HTTP/1.1 client of one server that keeps its connection between requests and
/// opens a new one when the server closed it.
struct KeepAlive {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, stream: None }
    }

    /// The body of `GET path` (status 200 only).
    async fn get(&mut self, path: &str) -> anyhow::Result<String> {
        // A kept connection the server has since closed fails at once: retry on a new one.
        if self.stream.is_some() {
            match self.try_get(path).await {
                Ok(body) => return Ok(body),
                Err(_) => self.stream = None,
            }
        }
        self.try_get(path).await
    }

    async fn try_get(&mut self, path: &str) -> anyhow::Result<String> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => self
                .stream
                .insert(BufReader::new(TcpStream::connect(self.addr).await?)),
        };
        let addr = self.addr;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        stream.get_mut().write_all(request.as_bytes()).await?;
        let result = read_response(stream, path).await;
        match result {
            Ok((body, keep)) => {
                if !keep {
                    self.stream = None;
                }
                Ok(body)
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }
}

/// Reads one response: its body and whether the connection stays open.
async fn read_response(
    stream: &mut BufReader<TcpStream>,
    path: &str,
) -> anyhow::Result<(String, bool)> {
    let mut line = String::new();
    anyhow::ensure!(
        stream.read_line(&mut line).await? > 0,
        "GET {path}: connection closed"
    );
    anyhow::ensure!(
        line.starts_with("HTTP/1.1 200"),
        "GET {path}: {}",
        line.trim_end()
    );
    let (mut length, mut chunked, mut keep) = (None, false, true);
    loop {
        line.clear();
        anyhow::ensure!(
            stream.read_line(&mut line).await? > 0,
            "GET {path}: no header end"
        );
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => length = Some(value.parse::<usize>()?),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => keep = !value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            stream.read_line(&mut line).await?;
            let size = line.trim_end().split(';').next().unwrap_or_default();
            let n = usize::from_str_radix(size.trim(), 16)
                .with_context(|| format!("GET {path}: bad chunk size {size:?}"))?;
            let start = body.len();
            body.resize(start + n + 2, 0);
            stream.read_exact(&mut body[start..]).await?;
            body.truncate(start + n);
            if n == 0 {
                break;
            }
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        stream.read_exact(&mut body).await?;
    } else {
        // Neither length nor chunks: the body ends with the connection.
        stream.read_to_end(&mut body).await?;
        keep = false;
    }
    Ok((String::from_utf8_lossy(&body).into_owned(), keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_labelled_sample_and_nothing_else() {
        let text = "# HELP changecast_changes_read_total Changes.\n\
                    # TYPE changecast_changes_read_total counter\n\
                    changecast_changes_read_total{db=\"app\",coll=\"orders\",op=\"insert\"} 10\n\
                    changecast_changes_read_total{db=\"app\",coll=\"orders\",op=\"update\"} 7\n\
                    changecast_changes_read_total_created 1.7e9\n\
                    changecast_changes_read_totally 99\n";
        assert_eq!(sum_counter(text, "changecast_changes_read_total"), 17);
    }

    /// One connection serves every poll, whether the body comes with a length or in
    /// chunks, and a connection the server closes is replaced.
    #[tokio::test]
    async fn polls_reuse_one_connection_and_survive_a_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut accepted = 0;
            let replies: [&[u8]; 3] = [
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n17",
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n4\r\n1\r\n2\r\n0\r\n\r\n",
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n9",
            ];
            for _ in 0..2 {
                let (s, _) = listener.accept().await.unwrap();
                accepted += 1;
                let mut s = BufReader::new(s);
                for reply in replies {
                    let mut line = String::new();
                    // The request line and headers, up to the blank line.
                    loop {
                        line.clear();
                        if s.read_line(&mut line).await.unwrap() == 0 {
                            return accepted;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    s.get_mut().write_all(reply).await.unwrap();
                }
            }
            accepted
        });
        // A client that opened a connection per poll would wait on the server's
        // backlog for the second answer: the timeout turns that into a failure.
        let polls = async {
            let mut conn = KeepAlive::new(addr);
            let mut got = Vec::new();
            for path in ["/a", "/b", "/c", "/d"] {
                got.push(conn.get(path).await.unwrap());
            }
            got
        };
        let got = tokio::time::timeout(Duration::from_secs(5), polls)
            .await
            .expect("each poll answered on the kept connection");
        // The server said close after the third: the fourth opened a second connection.
        assert_eq!(got, ["17", "42", "9", "17"]);
        assert_eq!(server.await.unwrap(), 2);
    }

    #[test]
    fn an_order_weighs_about_600_bytes() {
        let len = bson::to_vec(&order(1234)).map(|v| v.len()).unwrap_or(0);
        assert!((500..=750).contains(&len), "order is {len} bytes");
    }
}

//! Integration tests: `changecast demo` signs its public tokens with a secret of its own, never the operator's.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// A `changecast demo` process, killed on drop.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `changecast demo` on a free port with `env`; returns the process and its address.
async fn spawn_demo(env: &[(&str, &str)]) -> (Demo, SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_changecast"));
    cmd.args(["demo", "--listen", "127.0.0.1:0"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = Demo(cmd.spawn().expect("spawn changecast demo"));
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let out = child.0.stdout.take().unwrap();
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
    }
    let t = Instant::now();
    loop {
        let found = lines.lock().unwrap().iter().find_map(|l| {
            let url = l.trim().strip_prefix("dashboard")?.trim();
            let url = url.split_whitespace().next()?;
            url.trim_start_matches("http://")
                .trim_end_matches('/')
                .parse::<SocketAddr>()
                .ok()
        });
        if let Some(addr) = found {
            return (child, addr);
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no dashboard line: {:?}",
            lines.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_tokens_do_not_verify_with_the_operators_secret() {
    let operator = "operator-secret-0123456789abcdef0123456789abcdef";
    let (_demo, addr) = spawn_demo(&[("CHANGECAST_JWT_SECRET", operator)]).await;
    let (status, body) = http_get(addr, "/demo/tokens.json").await;
    assert_eq!(status, 200, "{body}");
    let tokens: Value = serde_json::from_str(&body).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.required_spec_claims.clear();
    v.validate_aud = false;
    for key in ["storeToken", "customerToken", "visitorToken"] {
        let t = tokens[key].as_str().unwrap();
        let r = jsonwebtoken::decode::<Value>(
            t,
            &jsonwebtoken::DecodingKey::from_secret(operator.as_bytes()),
            &v,
        );
        assert!(r.is_err(), "{key} verifies with the operator's secret");
    }
    // The legitimate path: the demo itself accepts its store token.
    let store = tokens["storeToken"].as_str().unwrap();
    let mut c = Client::try_connect_url(&format!("ws://{addr}/ws"), Some(store), &[])
        .await
        .unwrap();
    assert_eq!(c.next_json().await["type"], "welcome");
}

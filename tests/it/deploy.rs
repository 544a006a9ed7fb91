//! Integration tests: the Dockerfile and docker-compose.yml name paths, ports and commands that exist.
//!
//! Docker has no engine on our machines, so these files cannot be built here; this
//! test at least keeps what they reference true as the project moves.

use std::path::Path;

use crate::support::{Db, Server};

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The `COPY <src>… <dst>` lines of the build stage (not `--from=` copies).
fn copy_sources(dockerfile: &str) -> Vec<String> {
    dockerfile
        .lines()
        .filter_map(|l| l.trim().strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            parts[..parts.len() - 1]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `config.example.toml` (what the image ships) parsed with a stand-in secret.
fn example_config() -> changecast::config::Config {
    changecast::config::Config::from_toml_str_with_env(
        &read("config.example.toml"),
        "config.example.toml",
        &|_| Some("deploy-test-secret-deploy-test-secret".into()),
    )
    .unwrap()
}

#[test]
fn dockerfile_references_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let df = read("Dockerfile");
    let sources = copy_sources(&df);
    assert!(sources.contains(&"Cargo.lock".to_owned()), "{sources:?}");
    for s in &sources {
        assert!(
            root.join(s).exists(),
            "Dockerfile copies {s}, which does not exist"
        );
    }
    // Every workspace member must be in the build context, or `cargo build --locked` fails.
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).unwrap();
    let members = manifest["workspace"]["members"].as_array().unwrap();
    for m in members {
        let m = m.as_str().unwrap();
        if m == "." {
            continue;
        }
        let top = m.split('/').next().unwrap();
        assert!(
            sources.iter().any(|s| s == top || s == m),
            "workspace member {m} is not copied into the image"
        );
    }
    assert!(df.contains("--locked"), "release build must use --locked");
    assert!(df.contains("--bin changecast"));
    assert!(df.contains("USER changecast"), "runtime must not be root");
    // The documented config path is where the image looks for it.
    assert!(df.contains("CHANGECAST_CONFIG=/etc/changecast/changecast.toml"));
    // The health check and EXPOSE use the port the shipped config listens on.
    let cfg = example_config();
    let port = cfg.server.listen.port();
    assert!(df.contains(&format!("EXPOSE {port}")), "EXPOSE {port}");
    assert!(df.contains(&format!("http://127.0.0.1:{port}/healthz")));
    // The build context leaves out local state (target/ alone is gigabytes).
    let ignore = read(".dockerignore");
    for p in ["target", "node_modules", ".venv"] {
        assert!(ignore.contains(p), ".dockerignore lacks {p}");
    }
}

#[test]
fn compose_references_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose = read("docker-compose.yml");
    // Host paths mounted into containers.
    for line in compose.lines() {
        let l = line.trim().trim_start_matches("- ");
        if let Some(host) = l.strip_prefix("./") {
            let host = host.split(':').next().unwrap();
            assert!(
                root.join(host).exists(),
                "compose mounts ./{host}, which does not exist"
            );
        }
    }
    assert!(compose.contains("./config.example.toml:/etc/changecast/changecast.toml"));
    // The replica set the URI names is the one mongod is started with.
    assert!(compose.contains("\"--replSet\", \"rs0\""));
    assert!(compose.contains("replicaSet=rs0"));
    let port = example_config().server.listen.port();
    assert!(compose.contains(&format!("\"{port}:{port}\"")));
    assert!(compose.contains("CHANGECAST_JWT_SECRET"));
}

/// The health-check path answers 200 on a running server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_check_path_answers() {
    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let df = read("Dockerfile");
    assert!(df.contains("/healthz"));
    let (code, _) = server.get("/healthz").await;
    assert_eq!(code, 200);
    server.stop().await.unwrap();
}

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

/// Every `changecast_[a-z_]+` in `text`: the metric names a rule file or dashboard uses.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    const PREFIX: &str = "changecast_";
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(PREFIX) {
        let preceded = text.len() - rest.len() + i;
        let tail = &rest[i + PREFIX.len()..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        // Part of a longer identifier (`x_changecast_…`) is not a metric name.
        let prev = text[..preceded].chars().next_back();
        if len > 0 && !prev.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(format!("{PREFIX}{}", &tail[..len]));
        }
        rest = &tail[len..];
    }
    names
}

/// Sample names of an exposition (`name{labels} value` / `name value` lines).
fn sample_names(exposition: &str) -> std::collections::BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The metric names the alert rules and the dashboard query are exported by a freshly
/// started server, exactly as written: a sample name (`…_total`, `…_bucket`), so a
/// query missing `_total` fails here rather than matching nothing in Prometheus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_metric_names_exist() {
    let alerts = read("deploy/prometheus/alerts.yml");
    let dashboard = read("deploy/grafana/changecast.json");
    let dash: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    // Every query of the dashboard, parsed (not the raw file, which may name metrics in
    // descriptions), plus the template variables.
    let mut queries = String::new();
    fn collect(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    if let ("expr" | "definition", serde_json::Value::String(s)) = (k.as_str(), v) {
                        out.push_str(s);
                        out.push('\n');
                    }
                    collect(v, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dash, &mut queries);
    let in_alerts = metric_names(&alerts);
    let in_dash = metric_names(&queries);
    // The raw files name no metric the parsed queries miss (e.g. a typo in a description).
    assert_eq!(metric_names(&dashboard), in_dash);
    for required in [
        "changecast_stream_lag_seconds",
        "changecast_checkpoint_age_seconds",
        "changecast_changes_read_total",
        "changecast_history_lost_total",
        "changecast_slow_consumer_disconnects_total",
        "changecast_auth_failures_total",
        "changecast_recoveries_total",
        "changecast_replay_streams_opened_total",
        "changecast_stream_reconnects_total",
    ] {
        assert!(in_alerts.contains(required), "alerts.yml lacks {required}");
    }
    for required in [
        "changecast_stream_lag_seconds",
        "changecast_deliveries_total",
        "changecast_connections",
        "changecast_recoveries_total",
        "changecast_events_dropped_total",
        "changecast_delivery_latency_seconds_bucket",
        "changecast_checkpoint_age_seconds",
        "changecast_auth_failures_total",
    ] {
        assert!(in_dash.contains(required), "dashboard lacks {required}");
    }

    let db = Db::start().await;
    let server = Server::start(&db, "").await;
    let (code, body) = server.get("/metrics").await;
    assert_eq!(code, 200);
    server.stop().await.unwrap();
    let exported = sample_names(&body);
    for (file, names) in [("alerts.yml", &in_alerts), ("changecast.json", &in_dash)] {
        for name in names {
            assert!(
                exported.contains(name),
                "{file} uses {name}, which /metrics does not export; exported: {exported:?}"
            );
            // The histogram is named by its family once its suffix is stripped.
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(body.contains(&format!("# TYPE {}", family.trim_end_matches("_total"))));
        }
    }
}

/// The dashboard imports into any Grafana: one datasource input, used by every panel
/// and query; unique panel ids; every panel placed.
#[test]
fn dashboard_is_importable() {
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/changecast.json")).unwrap();
    let inputs = dash["__inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), 1);
    assert_eq!(inputs[0]["name"], "DS_PROMETHEUS");
    assert_eq!(inputs[0]["pluginId"], "prometheus");
    let panels = dash["panels"].as_array().unwrap();
    let mut ids = std::collections::BTreeSet::new();
    let mut queries = 0;
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id {}",
            p["id"]
        );
        assert!(p["gridPos"]["w"].as_u64().unwrap() > 0);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
            assert!(t["expr"].as_str().unwrap().contains("changecast_"));
            queries += 1;
        }
    }
    assert!(queries >= 8, "{queries} queries");
    let latency = read("deploy/grafana/changecast.json");
    assert!(latency.contains("histogram_quantile(0.5"));
    assert!(latency.contains("histogram_quantile(0.99"));
}

/// Each alert has an expression and summary/description annotations (no YAML parser
/// in the dependencies: checked as text, rule by rule).
#[test]
fn alert_rules_are_complete() {
    let alerts = read("deploy/prometheus/alerts.yml");
    assert!(alerts.contains("groups:"));
    let rules: Vec<&str> = alerts.split("- alert: ").skip(1).collect();
    assert!(rules.len() >= 8, "{} rules", rules.len());
    let mut names = std::collections::BTreeSet::new();
    for r in rules {
        let name = r.lines().next().unwrap().trim();
        assert!(names.insert(name), "duplicate alert {name}");
        for key in ["expr:", "summary:", "description:", "severity:"] {
            assert!(r.contains(key), "alert {name} lacks {key}");
        }
    }
    assert!(alerts.contains("changecast_stream_lag_seconds > 30"));
    assert!(alerts.contains("increase(changecast_history_lost_total[10m]) > 0"));
    assert!(alerts.contains(r#"source="resync""#));
}

/// The Kubernetes manifests use the ports, paths, command line and user the image and
/// the server have, and the shipped ConfigMap is a valid configuration.
#[test]
fn kubernetes_manifests_match_the_image() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let sts = read("deploy/kubernetes/statefulset.yaml");
    let svc = read("deploy/kubernetes/service.yaml");
    let all: String = [
        "statefulset",
        "service",
        "configmap",
        "pdb",
        "secret.example",
    ]
    .iter()
    .map(|f| read(&format!("deploy/kubernetes/{f}.yaml")))
    .collect::<Vec<_>>()
    .join("\n---\n");
    for needle in [
        "containerPort: 8080",
        "containerPort: 8081",
        "path: /readyz",
        "path: /healthz",
        "\"--ops-listen\", \"0.0.0.0:8081\"",
        "readinessProbe:",
        "livenessProbe:",
        "runAsUser: 10001",
        "runAsNonRoot: true",
        "CHANGECAST_CONFIG",
        "mountPath: /etc/changecast",
        "mountPath: /var/lib/changecast",
        "volumeClaimTemplates:",
        "resources:",
    ] {
        assert!(sts.contains(needle), "statefulset.yaml lacks {needle}");
    }
    assert!(svc.contains("port: 8080") && svc.contains("port: 8081"));
    assert!(svc.contains("clusterIP: None"), "ops Service is headless");
    assert!(sts.contains("serviceName: changecast-ops"));
    assert!(svc.contains("name: changecast-ops"));
    assert!(!svc.contains("type: LoadBalancer") && !svc.contains("type: NodePort"));
    assert!(all.contains("kind: PodDisruptionBudget"));
    // The Dockerfile's user is the one the pod runs as.
    assert!(read("Dockerfile").contains("--uid 10001"));
    // Every secret the pod reads is in the example Secret, and every Secret key the
    // server reads is one the pod sets.
    let secret = read("deploy/kubernetes/secret.example.yaml");
    for var in [
        "MONGODB_URI",
        "CHANGECAST_JWT_SECRET",
        "CHANGECAST_ID_SECRET",
    ] {
        assert!(
            sts.contains(&format!("key: {var}")),
            "statefulset lacks {var}"
        );
        assert!(
            secret.contains(&format!("{var}:")),
            "secret example lacks {var}"
        );
    }
    // The kustomization lists files that exist, and not the example Secret.
    let kust = read("deploy/kubernetes/kustomization.yaml");
    let resources: Vec<&str> = kust
        .lines()
        .skip_while(|l| !l.starts_with("resources:"))
        .skip(1)
        .map_while(|l| l.trim().strip_prefix("- "))
        .collect();
    assert!(resources.len() >= 4, "{resources:?}");
    for r in &resources {
        assert!(root.join(r).exists(), "kustomization lists {r}");
    }
    assert!(!resources.contains(&"secret.example.yaml"));

    // The ConfigMap's changecast.toml: the indented block under `changecast.toml: |`.
    let cm = read("deploy/kubernetes/configmap.yaml");
    let mut lines = cm.lines().skip_while(|l| l.trim() != "changecast.toml: |");
    lines.next().expect("configmap has changecast.toml");
    let toml: String = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let cfg = changecast::config::Config::from_toml_str_with_env(&toml, "configmap.yaml", &|_| {
        Some("deploy-test-secret-deploy-test-secret".into())
    })
    .unwrap_or_else(|e| panic!("configmap's changecast.toml: {e}\n{toml}"));
    assert_eq!(cfg.server.listen.port(), 8080);
    assert_eq!(cfg.server.ops_listen.to_string(), "0.0.0.0:8081");
    // The checkpoint is a file on the pod's own volume (see the StatefulSet's comment).
    match &cfg.checkpoint.store {
        changecast::config::CheckpointStoreConfig::File { path } => {
            assert!(path.starts_with("/var/lib/changecast"), "{path:?}")
        }
        other => panic!("checkpoint store {other:?}"),
    }
    // The pod outlives the shutdown grace.
    let grace: u64 = sts
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        grace > cfg.server.shutdown_grace.as_secs() + 5,
        "terminationGracePeriodSeconds {grace} vs shutdown_grace {:?} + preStop",
        cfg.server.shutdown_grace
    );
}

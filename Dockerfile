# changecast: multi-stage build. Build: docker build -t changecast .
# Run:   docker run -v $PWD/changecast.toml:/etc/changecast/changecast.toml:ro \
#          -e MONGODB_URI=... -e CHANGECAST_JWT_SECRET=... -p 8080:8080 changecast
# Port 8080 serves clients; 8081 serves /metrics and /readyz to the operator: reach it
# from the private network (Prometheus, probes), never publish it to the internet.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY bench ./bench
COPY src ./src
RUN cargo build --release --locked --bin changecast

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/changecast --create-home changecast
COPY --from=build /src/target/release/changecast /usr/local/bin/changecast
COPY config.example.toml /etc/changecast/changecast.toml
USER changecast
WORKDIR /var/lib/changecast
# The checkpoint file lives here by default; mount a volume to keep it across restarts,
# or set [checkpoint] store = "mongo".
VOLUME ["/var/lib/changecast"]
ENV CHANGECAST_CONFIG=/etc/changecast/changecast.toml
EXPOSE 8080 8081
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/changecast"]
# The operations listener defaults to loopback; in a container it must be reachable
# from the pod/compose network for probes and scrapes.
CMD ["run", "--ops-listen", "0.0.0.0:8081"]

# shellcheck shell=bash
# Shared by scripts/mongo-sim-conformance and scripts/it-secantus (sourced, not run):
# the test virtualenv with pinned pymongo and SecantusDB, and starting SecantusDB on a free port.
# Needs ROOT set to the repository root; sets VENV. Callers keep `set -euo pipefail`.

VENV="$ROOT/.venv"
# Versions this was tested with.
PYMONGO_VERSION=4.20.0
SECANTUS_VERSION=0.7.0b3
SECANTUS_READY_TIMEOUT_S=60

# Creates $VENV if missing and installs the pinned pymongo and SecantusDB unless both are there.
secantus_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        printf '== creating virtualenv %s\n' "$VENV" >&2
        python3 -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(0 if m.version('pymongo') == '$PYMONGO_VERSION' and m.version('SecantusDB') == '$SECANTUS_VERSION' else 1)" 2>/dev/null; then
        printf '== installing pymongo %s and SecantusDB %s\n' "$PYMONGO_VERSION" "$SECANTUS_VERSION" >&2
        "$VENV/bin/pip" install -q "pymongo==$PYMONGO_VERSION" "SecantusDB==$SECANTUS_VERSION"
    fi
}

# Starts an in-memory SecantusDB on a free loopback port, logging to $1; further arguments
# go to secantusd-py. Sets SECANTUS_PID and SECANTUS_URI, and returns once it answers `ping`
# (the driver's server selection waits for it), or stops it and fails with its log.
secantus_start() {
    local log=$1
    shift
    local port
    port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$VENV/bin/secantusd-py" --host 127.0.0.1 --port "$port" --storage-path :memory: "$@" >"$log" 2>&1 &
    SECANTUS_PID=$!
    SECANTUS_URI="mongodb://127.0.0.1:$port/?directConnection=true"
    if ! "$VENV/bin/python" -c "import pymongo, sys; pymongo.MongoClient(sys.argv[1], serverSelectionTimeoutMS=${SECANTUS_READY_TIMEOUT_S}000).admin.command('ping')" "$SECANTUS_URI"; then
        printf '== SecantusDB did not start:\n' >&2
        cat "$log" >&2
        kill "$SECANTUS_PID" 2>/dev/null || true
        return 1
    fi
}

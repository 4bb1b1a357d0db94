#!/usr/bin/env bash
# PostgreSQL and a two-node Ray cluster on loopback, for the tests that need them (issue 12).
#
#   source .ci/services.sh; services_start; ...; services_stop
#
# services_start exports VEILFACE_TEST_PG_DSN, VEILFACE_TEST_RAY_ADDRESS, VEILFACE_TEST_RAY_NODE_IP
# and VEILFACE_TEST_RAY_WORKER (the process group of the second Ray node, which the failure tests
# kill -9). Everything listens on loopback only:
#   * PostgreSQL: listen_addresses=127.0.0.1 and a Unix socket in its temp dir, run as the
#     unprivileged `postgres` user of Debian's package (initdb refuses root);
#   * Ray: the head node's address is 127.0.0.2 and the worker's 127.0.0.3 (loopback addresses that
#     Ray does not rewrite to the machine's external IP, as it does "127.0.0.1"). Nodes advertise and
#     connect to those addresses; the client server, runtime-env agent and workers bind them; the
#     dashboard is off. Ray 2.60's GCS / raylet / object manager gRPC servers bind 0.0.0.0 unless
#     the node address is exactly 127.0.0.1, which Ray only keeps for a one-node cluster: those
#     ports are therefore closed by token authentication (RAY_AUTH_MODE=token, a random token in
#     the temp dir, inherited by every node, driver and replica) -- docs/deployment.md.
# Nothing is started twice; services_stop kills only what services_start started (by pid/pgid).
VF_SVC_DIR="${VF_SVC_DIR:-}"

_vf_log() { echo "services: $*" >&2; }

_vf_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

services_install() {
    # Debian's PostgreSQL package (idempotent: skipped when its binaries are already there)
    if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ]; then
            _vf_log "installing PostgreSQL from Debian's packages"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
        else
            _vf_log "PostgreSQL is not installed and this user cannot apt-get install it"
        fi
    fi
}

services_start() {
    local py="${1:-.venv/bin/python}"
    VF_SVC_DIR="$(mktemp -d /tmp/vf-svc.XXXXXX)"
    export VF_SVC_DIR
    chmod 755 "$VF_SVC_DIR"
    _vf_start_pg || _vf_log "PostgreSQL not started: its tests will fail under VEILFACE_TEST_REQUIRE_SERVICES=1"
    _vf_start_ray "$py" || _vf_log "Ray not started: its tests will fail under VEILFACE_TEST_REQUIRE_SERVICES=1"
}

_vf_start_pg() {
    local bin port data
    bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)"
    [ -n "$bin" ] || { _vf_log "no PostgreSQL binaries"; return 1; }
    port="$(_vf_free_port)"
    data="$VF_SVC_DIR/pg"
    mkdir -p "$data" && chmod 700 "$data"
    local run=()
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        chown -R postgres "$data"
        run=(runuser -u postgres --)
    fi
    "${run[@]}" "$bin/initdb" -D "$data/data" -A trust -U veilface -E UTF8 --no-sync >"$VF_SVC_DIR/initdb.log" 2>&1 \
        || { cat "$VF_SVC_DIR/initdb.log" >&2; return 1; }
    "${run[@]}" "$bin/pg_ctl" -D "$data/data" -l "$data/server.log" -w -t 60 \
        -o "-k $data -c listen_addresses=127.0.0.1 -p $port -c max_connections=300 -c shared_buffers=128MB" start \
        >/dev/null || { cat "$data/server.log" >&2; return 1; }
    export VF_PG_BIN="$bin" VF_PG_DATA="$data/data" VF_PG_RUN="${run[*]}"
    export VEILFACE_TEST_PG_DSN="postgresql://veilface@127.0.0.1:$port/postgres"
    _vf_log "PostgreSQL on 127.0.0.1:$port ($data)"
}

_vf_start_ray() {
    local py="$1" ray gcs
    ray="$(dirname "$py")/ray"
    [ -x "$ray" ] || { _vf_log "no ray command next to $py (pip install -e '.[scale]')"; return 1; }
    gcs="$(_vf_free_port)"
    export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$VF_SVC_DIR/ray-token"
    (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' >"$RAY_AUTH_TOKEN_PATH")
    # node death noticed within seconds (the failure tests kill -9 a node)
    export RAY_health_check_period_ms=1000 RAY_health_check_timeout_ms=1000 RAY_health_check_failure_threshold=3
    setsid "$ray" start --head --block --node-ip-address=127.0.0.2 --port="$gcs" --include-dashboard=false \
        --num-cpus=2 --disable-usage-stats --temp-dir="$VF_SVC_DIR/ray" >"$VF_SVC_DIR/ray-head.log" 2>&1 &
    echo $! >"$VF_SVC_DIR/ray-head.pgid"
    _vf_wait_ray "$py" "127.0.0.2:$gcs" 1 || { tail -30 "$VF_SVC_DIR/ray-head.log" >&2; return 1; }
    setsid "$ray" start --block --address="127.0.0.2:$gcs" --node-ip-address=127.0.0.3 --num-cpus=2 \
        --disable-usage-stats >"$VF_SVC_DIR/ray-worker.log" 2>&1 &
    echo $! >"$VF_SVC_DIR/ray-worker.pgid"
    _vf_wait_ray "$py" "127.0.0.2:$gcs" 2 || { tail -30 "$VF_SVC_DIR/ray-worker.log" >&2; return 1; }
    export VEILFACE_TEST_RAY_ADDRESS="127.0.0.2:$gcs" VEILFACE_TEST_RAY_NODE_IP=127.0.0.2
    VEILFACE_TEST_RAY_WORKER="$(cat "$VF_SVC_DIR/ray-worker.pgid")"
    export VEILFACE_TEST_RAY_WORKER
    _vf_log "Ray head 127.0.0.2:$gcs + worker node 127.0.0.3 (pgid $VEILFACE_TEST_RAY_WORKER)"
}

_vf_wait_ray() {  # python, gcs address, expected alive nodes
    "$1" - "$2" "$3" <<'PY'
import sys, time
from ray._raylet import GcsClient
addr, want = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    try:
        nodes = GcsClient(address=addr).get_all_node_info(timeout=5)
        if sum(1 for n in nodes.values() if n.state == 0) >= want:
            sys.exit(0)
    except Exception:
        pass
    time.sleep(0.5)
sys.exit(1)
PY
}

services_stop() {
    [ -n "$VF_SVC_DIR" ] && [ -d "$VF_SVC_DIR" ] || return 0
    local f pgid
    for f in ray-worker.pgid ray-head.pgid; do
        [ -f "$VF_SVC_DIR/$f" ] || continue
        pgid="$(cat "$VF_SVC_DIR/$f")"
        kill -TERM -- "-$pgid" 2>/dev/null || true
    done
    sleep 2
    for f in ray-worker.pgid ray-head.pgid; do
        [ -f "$VF_SVC_DIR/$f" ] && kill -KILL -- "-$(cat "$VF_SVC_DIR/$f")" 2>/dev/null || true
    done
    if [ -n "${VF_PG_DATA:-}" ] && [ -d "$VF_PG_DATA" ]; then
        ${VF_PG_RUN:-} "$VF_PG_BIN/pg_ctl" -D "$VF_PG_DATA" -m fast -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$VF_SVC_DIR"
    _vf_log "stopped"
}

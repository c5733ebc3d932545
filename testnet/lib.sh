# Shared helpers for the testnet scripts. Sourced, not run.
# shellcheck shell=bash

TESTNET_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$TESTNET_DIR")

# Knobs (all optional).
: "${MIXNN_PROJECT:=mixnn-testnet}"            # compose project name
: "${MIXNN_IMAGE:=mixnn-testnet:local}"        # image tag built from host binaries
: "${MIXNN_BUILD_DIR:=$REPO_DIR/target/testnet}" # cargo target dir + docker build context
: "${MIXNN_NODES:=6}"                          # default number of node replicas
: "${MIXNN_CLIENT_DATA:=synthetic}"            # client dataset; /mnist when MNIST_DIR is set
export MIXNN_PROJECT MIXNN_IMAGE MIXNN_BUILD_DIR MIXNN_CLIENT_DATA
export MIXNN_CONTEXT="$MIXNN_BUILD_DIR/context"
STATE_DIR="$MIXNN_BUILD_DIR/state"

COMPOSE_FILES=(-f "$TESTNET_DIR/docker-compose.yml")
if [ -n "${MNIST_DIR:-}" ]; then
    MNIST_DIR=$(cd "$MNIST_DIR" && pwd) || { echo "MNIST_DIR=$MNIST_DIR is not a directory" >&2; exit 2; }
    export MNIST_DIR
    export MIXNN_CLIENT_DATA=/mnist
    COMPOSE_FILES+=(-f "$TESTNET_DIR/docker-compose.mnist.yml")
fi

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$(date +%H:%M:%S)" "$*" >&2; exit 1; }

# `docker compose` (v2 plugin) or `docker-compose` (v1), whichever works.
detect_compose() {
    if docker compose version >/dev/null 2>&1; then
        COMPOSE=(docker compose)
    elif command -v docker-compose >/dev/null 2>&1 && docker-compose version >/dev/null 2>&1; then
        COMPOSE=(docker-compose)
    else
        die "neither 'docker compose' nor 'docker-compose' works; install the compose plugin"
    fi
    docker info >/dev/null 2>&1 || die "the docker engine is not reachable (docker info failed)"
}

# Run compose on this project. MIXNN_BOOTSTRAP_ADDR must be set for the node
# and client services; commands that do not start them get a placeholder.
compose() {
    MIXNN_BOOTSTRAP_ADDR="${MIXNN_BOOTSTRAP_ADDR:-/dns4/bootstrap/tcp/4001/p2p/unknown}" \
        "${COMPOSE[@]}" -p "$MIXNN_PROJECT" --project-directory "$TESTNET_DIR" "${COMPOSE_FILES[@]}" "$@"
}

# compose, with its chatter in $MIXNN_BUILD_DIR/compose.log (shown on failure).
compose_logged() {
    mkdir -p "$MIXNN_BUILD_DIR"
    local logf="$MIXNN_BUILD_DIR/compose.log"
    echo "+ compose $*" >>"$logf"
    if ! compose "$@" >>"$logf" 2>&1; then
        tail -n 20 "$logf" >&2
        return 1
    fi
}

# Container ids of a service (running or not), in replica order.
service_containers() {
    docker ps -a --filter "label=com.docker.compose.project=$MIXNN_PROJECT" \
        --filter "label=com.docker.compose.service=$1" \
        --format '{{.Label "com.docker.compose.container-number"}} {{.ID}}' | sort -n | awk '{print $2}'
}

container_name() { docker inspect -f '{{.Name}}' "$1" | sed 's#^/##'; }

# The peer id a container printed most recently (its stdout lists its full
# multiaddrs, each ending in /p2p/<peer id>).
container_peer_id() {
    docker logs "$1" 2>/dev/null | grep -Eo '/p2p/12D3[1-9A-HJ-NP-Za-km-z]+' | tail -n 1 | sed 's#/p2p/##'
}

# How many address lines a container has printed (it prints them at each start).
container_addr_lines() {
    docker logs "$1" 2>/dev/null | grep -Ec '^/ip[46]/.*/p2p/12D3' || true
}

# Wait up to $2 seconds for container $1 to print its peer id; echo it.
wait_peer_id() {
    local c=$1 timeout=$2 id i
    for ((i = 0; i < timeout; i++)); do
        id=$(container_peer_id "$c")
        if [ -n "$id" ]; then echo "$id"; return 0; fi
        if [ "$(docker inspect -f '{{.State.Status}}' "$c" 2>/dev/null)" = exited ]; then
            docker logs --tail 20 "$c" >&2 || true
            return 1
        fi
        sleep 1
    done
    return 1
}

# Read a field from a JSON object on stdin: json_get FIELD (dotted path ok).
json_get() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c '
import json, sys
v = json.loads(sys.stdin.read())
for k in sys.argv[1].split("."):
    v = v[int(k)] if isinstance(v, list) else v.get(k) if isinstance(v, dict) else None
    if v is None: break
print("" if v is None else (json.dumps(v) if isinstance(v, (dict, list)) else v))
' "$1"
    elif command -v jq >/dev/null 2>&1; then
        jq -r ".$1 // empty | if type == \"object\" or type == \"array\" then tojson else . end"
    else
        die "need python3 or jq to read JSON"
    fi
}

# Peer ids listed in a `mixnn peers --json` object on stdin, one per line.
json_peer_ids() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import json,sys; [print(v["peer_id"], v.get("free_slots", "")) for v in json.loads(sys.stdin.read()).get("volunteers", [])]'
    else
        jq -r '.volunteers[] | "\(.peer_id) \(.free_slots // "")"'
    fi
}

# Float comparison: is $1 > $2 ?
float_gt() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 > b + 0) }'; }

# Build the static binaries on the host and the image from them.
build_image() {
    local triple bin t0 t1
    triple=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p')
    [ -n "$triple" ] || die "rustc not found; the image is built from host-built binaries"
    if [ "${MIXNN_SKIP_CARGO:-0}" = 1 ]; then
        log "reusing the binaries in $MIXNN_BUILD_DIR/$triple/release (--no-cargo)"
    else
        t0=$(date +%s)
        log "building static binaries (cargo --release --target $triple, crt-static) into $MIXNN_BUILD_DIR"
        # OPENSSL_STATIC: the cell AEAD's libcrypto goes into the binary too.
        (cd "$REPO_DIR" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" CARGO_TARGET_DIR="$MIXNN_BUILD_DIR" \
            OPENSSL_STATIC=1 \
            cargo build --release --target "$triple" -p mixnn-node -p mixnn-bootstrap) \
            || die "cargo build failed"
        t1=$(date +%s)
        log "binaries built in $((t1 - t0)) s"
    fi
    for bin in mixnn mixnn-bootstrap; do
        [ -x "$MIXNN_BUILD_DIR/$triple/release/$bin" ] || die "no $MIXNN_BUILD_DIR/$triple/release/$bin; build without --no-cargo"
    done
    rm -rf "$MIXNN_CONTEXT"
    mkdir -p "$MIXNN_CONTEXT/rootfs/data" "$MIXNN_CONTEXT/rootfs/work" "$MIXNN_CONTEXT/rootfs/tmp" "$MIXNN_CONTEXT/rootfs/etc"
    chmod 1777 "$MIXNN_CONTEXT/rootfs/tmp"
    printf 'root:x:0:0:root:/:/nonexistent\nmixnn:x:65534:65534:mixnn:/work:/nonexistent\n' >"$MIXNN_CONTEXT/rootfs/etc/passwd"
    printf 'root:x:0:\nmixnn:x:65534:\n' >"$MIXNN_CONTEXT/rootfs/etc/group"
    for bin in mixnn mixnn-bootstrap; do
        cp "$MIXNN_BUILD_DIR/$triple/release/$bin" "$MIXNN_CONTEXT/$bin"
        if command -v strip >/dev/null 2>&1; then strip "$MIXNN_CONTEXT/$bin"; fi
        if ldd "$MIXNN_CONTEXT/$bin" 2>&1 | grep -Eq 'not a dynamic executable|statically linked'; then
            :
        else
            ldd "$MIXNN_CONTEXT/$bin" >&2 || true
            die "$bin is not statically linked; a FROM scratch image cannot run it"
        fi
    done
    cp "$TESTNET_DIR/Dockerfile" "$MIXNN_CONTEXT/Dockerfile"
    log "building image $MIXNN_IMAGE (FROM scratch; nothing is pulled)"
    local old_id
    old_id=$(docker image inspect -f '{{.Id}}' "$MIXNN_IMAGE" 2>/dev/null || true)
    docker build -q -t "$MIXNN_IMAGE" --label "com.mixnn.testnet=1" "$MIXNN_CONTEXT" \
        >"$MIXNN_BUILD_DIR/docker-build.log" 2>&1 || { cat "$MIXNN_BUILD_DIR/docker-build.log" >&2; die "docker build failed"; }
    # The image this tag replaced: drop it if nothing uses it (no dangling pile-up).
    if [ -n "$old_id" ] && [ "$old_id" != "$(docker image inspect -f '{{.Id}}' "$MIXNN_IMAGE")" ]; then
        docker image rm "$old_id" >/dev/null 2>&1 || true
    fi
    log "image $MIXNN_IMAGE: $(docker image inspect -f '{{.Size}}' "$MIXNN_IMAGE" | awk '{printf "%.1f MB", $1/1e6}')"
}

# Start the bootstrap, learn its address, write it down. Sets MIXNN_BOOTSTRAP_ADDR.
start_bootstrap() {
    local c id
    log "starting the bootstrap"
    compose_logged up -d --no-build bootstrap || die "could not start the bootstrap"
    c=$(service_containers bootstrap | head -n 1)
    [ -n "$c" ] || die "no bootstrap container"
    id=$(wait_peer_id "$c" 30) || die "the bootstrap printed no address within 30 s (docker logs $c)"
    export MIXNN_BOOTSTRAP_ADDR="/dns4/bootstrap/tcp/4001/p2p/$id"
    mkdir -p "$STATE_DIR"
    echo "$MIXNN_BOOTSTRAP_ADDR" >"$STATE_DIR/$MIXNN_PROJECT.bootstrap"
    log "bootstrap: $MIXNN_BOOTSTRAP_ADDR"
}

# Start (or scale to) $1 nodes and wait until each printed its peer id.
start_nodes() {
    local n=$1 c ok=0 ids=()
    log "starting $n nodes"
    compose_logged up -d --no-build --scale "node=$n" node || die "could not start the nodes"
    for c in $(service_containers node); do
        if id=$(wait_peer_id "$c" 30); then
            ids+=("$(container_name "$c") $id")
            ok=$((ok + 1))
        else
            log "node container $(container_name "$c") printed no peer id"
        fi
    done
    [ "$ok" -ge "$n" ] || die "only $ok of $n nodes started"
    printf '  %s\n' "${ids[@]}" >&2
}

# The address recorded by the last start_bootstrap of this project.
load_bootstrap_addr() {
    if [ -z "${MIXNN_BOOTSTRAP_ADDR:-}" ] && [ -f "$STATE_DIR/$MIXNN_PROJECT.bootstrap" ]; then
        MIXNN_BOOTSTRAP_ADDR=$(cat "$STATE_DIR/$MIXNN_PROJECT.bootstrap")
        export MIXNN_BOOTSTRAP_ADDR
    fi
}

# `mixnn peers --json` from a throwaway client container on the testnet
# network; prints the JSON line.
peers_json() {
    local min=${1:-1} timeout=${2:-10}
    compose run --rm --no-deps -T client peers --bootstrap "$MIXNN_BOOTSTRAP_ADDR" \
        --json --min "$min" --timeout "$timeout" 2>/dev/null | tail -n 1
}

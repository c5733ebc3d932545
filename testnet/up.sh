#!/usr/bin/env bash
# Start the MixNN local testnet: build the static binaries and the image,
# start the bootstrap, learn its address, start the nodes.
#
#   testnet/up.sh                 # 6 nodes
#   testnet/up.sh --nodes 8       # or MIXNN_NODES=8
#   testnet/up.sh --no-build      # reuse the image already built
#   testnet/up.sh --no-cargo      # rebuild the image from the binaries already built
#
# Environment: MIXNN_PROJECT (compose project, default mixnn-testnet),
# MIXNN_IMAGE, MIXNN_SLOTS (per node, default 4), MNIST_DIR (mount MNIST
# into the client), RUST_LOG.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --nodes) MIXNN_NODES=${2:?--nodes N}; shift 2 ;;
        --nodes=*) MIXNN_NODES=${1#*=}; shift ;;
        --no-build) build=0; shift ;;
        --no-cargo) export MIXNN_SKIP_CARGO=1; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ "$MIXNN_NODES" =~ ^[0-9]+$ ]] || die "--nodes wants a number"

detect_compose
log "compose: ${COMPOSE[*]}; project: $MIXNN_PROJECT"
if [ "$build" = 1 ]; then
    build_image
else
    docker image inspect "$MIXNN_IMAGE" >/dev/null 2>&1 || die "no image $MIXNN_IMAGE; run without --no-build"
fi

start_bootstrap
if [ "$MIXNN_PROJECT" = mixnn-testnet ]; then
    # Lets plain `docker compose ...` in testnet/ find the project and the bootstrap.
    {
        printf '# written by testnet/up.sh\nCOMPOSE_PROJECT_NAME=%s\nMIXNN_BOOTSTRAP_ADDR=%s\n' \
            "$MIXNN_PROJECT" "$MIXNN_BOOTSTRAP_ADDR"
        [ "$MIXNN_IMAGE" = mixnn-testnet:local ] || printf 'MIXNN_IMAGE=%s\n' "$MIXNN_IMAGE"
        [ -z "${MIXNN_SLOTS:-}" ] || printf 'MIXNN_SLOTS=%s\n' "$MIXNN_SLOTS"
        if [ -n "${MNIST_DIR:-}" ]; then
            printf 'COMPOSE_FILE=docker-compose.yml:docker-compose.mnist.yml\nMNIST_DIR=%s\nMIXNN_CLIENT_DATA=/mnist\n' "$MNIST_DIR"
        fi
    } >"$TESTNET_DIR/.env"
fi
start_nodes "$MIXNN_NODES"

log "waiting for the nodes' descriptors in the DHT"
json=$(peers_json "$MIXNN_NODES" 30 || true)
count=$(printf '%s' "$json" | json_get count 2>/dev/null || true)
log "mixnn peers sees ${count:-?} of $MIXNN_NODES volunteers"

c=$(service_containers bootstrap | head -n 1)
metrics=$(docker port "$c" 9100/tcp 2>/dev/null | head -n 1 || true)
dc="${COMPOSE[*]}"
cat <<MSG

MixNN testnet '$MIXNN_PROJECT' is up: 1 bootstrap, $MIXNN_NODES nodes.

  bootstrap address (inside the testnet network):
    $MIXNN_BOOTSTRAP_ADDR
  bootstrap metrics: http://${metrics:-?}/metrics

Plain compose works from $TESTNET_DIR (up.sh wrote .env there)$( [ "$MIXNN_PROJECT" = mixnn-testnet ] || echo " -- not for project $MIXNN_PROJECT: add -p $MIXNN_PROJECT and export MIXNN_BOOTSTRAP_ADDR"):
  cd $TESTNET_DIR

Run a job (the client container is on the testnet network):
  $dc run --rm client                     # train mlp:784-64-10, writes /work/model.json
  $dc run --rm client infer --bootstrap $MIXNN_BOOTSTRAP_ADDR --model-map /work/model.json --data ${MIXNN_CLIENT_DATA} --json
  $dc run --rm client peers --bootstrap $MIXNN_BOOTSTRAP_ADDR --json

More nodes:  $dc up -d --scale node=8
Logs:        $dc logs -f node
Stop:        testnet/down.sh            (testnet/down.sh --volumes also forgets the bootstrap identity and the model map)
MSG

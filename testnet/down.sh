#!/usr/bin/env bash
# Stop and remove the MixNN local testnet: its containers (nodes, bootstrap,
# one-off clients), its network, and the nodes' per-replica data volumes.
#
#   testnet/down.sh              # keeps the named volumes (bootstrap identity, model map)
#   testnet/down.sh --volumes    # removes them too: nothing of the testnet is left
#   testnet/down.sh --images     # also removes the image (with --volumes: everything)
#
# MIXNN_PROJECT selects the compose project (default mixnn-testnet).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

volumes=0
images=0
while [ $# -gt 0 ]; do
    case "$1" in
        -v|--volumes) volumes=1; shift ;;
        --images|--rmi) images=1; shift ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

detect_compose
label="label=com.docker.compose.project=$MIXNN_PROJECT"

log "stopping testnet '$MIXNN_PROJECT'"
# Node data lives in anonymous volumes, one per replica; a new container
# would never reuse them, so they go with their containers.
compose rm --stop --force -v node >/dev/null 2>&1 || true
args=(down --remove-orphans --timeout 20)
[ "$volumes" = 1 ] && args+=(--volumes)
compose_logged --profile client "${args[@]}" || log "compose down reported an error; cleaning up by label"

# Whatever compose missed (one-off `run` containers, a failed up): by label.
ids=$(docker ps -aq --filter "$label")
if [ -n "$ids" ]; then
    log "removing leftover containers: $(echo $ids)"
    docker rm -f -v $ids >/dev/null
fi
ids=$(docker network ls -q --filter "$label")
[ -z "$ids" ] || docker network rm $ids >/dev/null
if [ "$volumes" = 1 ]; then
    ids=$(docker volume ls -q --filter "$label")
    [ -z "$ids" ] || docker volume rm -f $ids >/dev/null
    rm -f "$STATE_DIR/$MIXNN_PROJECT.bootstrap"
    if [ "$MIXNN_PROJECT" = mixnn-testnet ]; then rm -f "$TESTNET_DIR/.env"; fi
fi
if [ "$images" = 1 ] && docker image inspect "$MIXNN_IMAGE" >/dev/null 2>&1; then
    log "removing image $MIXNN_IMAGE"
    docker image rm -f "$MIXNN_IMAGE" >/dev/null
fi

left_c=$(docker ps -aq --filter "$label" | wc -l)
left_n=$(docker network ls -q --filter "$label" | wc -l)
left_v=$(docker volume ls -q --filter "$label" | wc -l)
log "testnet '$MIXNN_PROJECT' is down (left: $left_c containers, $left_n networks, $left_v named volumes)"

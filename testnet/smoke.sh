#!/usr/bin/env bash
# Smoke test of the MixNN local testnet, from a clean state to a clean state:
#
#   1. build the static binaries and the image; start 1 bootstrap + 6 nodes
#   2. `mixnn peers --json` (from a container on the testnet network) lists every node
#   3. a training job through the network (client container): accuracy above
#      chance, params_digest present
#   4. an inference job with the model map it wrote: accuracy above chance
#   5. restart one node container: same peer id, same free slots, listed again
#   6. stop a layer host during a second training job: the job fails over to
#      another volunteer and ends with the digest of local training
#   7. the same with --max-failovers 0: the job fails within a bounded time
#      with an error naming that hop's peer id
#   8. stop one node (SIGTERM): three jobs right after it all succeed
#   9. tear everything down; no container, network or volume of it is left
#
#   testnet/smoke.sh [--no-build | --no-cargo] [--keep]
#
# --no-build reuses the image; --no-cargo rebuilds the image from the
# binaries already built; --keep leaves the testnet running (debugging).
# MIXNN_PROJECT (default mixnn-smoke, so that a testnet started with up.sh is
# left alone), MNIST_DIR (use MNIST instead of synthetic data), MIXNN_NODES.
# Exits non-zero when any check fails; every wait is bounded.
set -uo pipefail
: "${MIXNN_PROJECT:=mixnn-smoke}"
export MIXNN_PROJECT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

build=1
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0; shift ;;
        --no-cargo) export MIXNN_SKIP_CARGO=1; shift ;;
        --keep) keep=1; shift ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

# Bounds, in seconds.
TRAIN_TIMEOUT=${SMOKE_TRAIN_TIMEOUT:-600}      # first training job
INFER_TIMEOUT=${SMOKE_INFER_TIMEOUT:-300}
FAIL_BOUND=${SMOKE_FAIL_BOUND:-90}             # hop dies -> job must have failed by then
FIND_HOST_TIMEOUT=${SMOKE_FIND_HOST_TIMEOUT:-90}
LONG_EPOCHS=${SMOKE_LONG_EPOCHS:-1000}         # a job long enough to be cut
FAILOVER_EPOCHS=${SMOKE_FAILOVER_EPOCHS:-40}   # a job cut, failed over and finished
FAILOVER_TIMEOUT=${SMOKE_FAILOVER_TIMEOUT:-900}
NODES=$MIXNN_NODES

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mixnn-smoke.XXXXXX")
RESULTS=()
FAILED=0
pass() { RESULTS+=("PASS  $1"); log "PASS: $1"; }
fail() { RESULTS+=("FAIL  $1"); FAILED=1; log "FAIL: $1"; }
skip() { RESULTS+=("SKIP  $1"); log "SKIP: $1"; }
step() { log "---- $* ----"; }

JOB_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$JOB_PID" ] && kill -0 "$JOB_PID" 2>/dev/null; then kill "$JOB_PID" 2>/dev/null; fi
    if [ "$keep" = 1 ]; then
        log "--keep: leaving testnet '$MIXNN_PROJECT' running (testnet/down.sh --volumes with MIXNN_PROJECT=$MIXNN_PROJECT)"
    else
        step "teardown"
        "$TESTNET_DIR/down.sh" --volumes || true
        local c n v newv
        c=$(docker ps -aq --filter "label=com.docker.compose.project=$MIXNN_PROJECT" | wc -l)
        n=$(docker network ls -q --filter "label=com.docker.compose.project=$MIXNN_PROJECT" | wc -l)
        v=$(docker volume ls -q --filter "label=com.docker.compose.project=$MIXNN_PROJECT" | wc -l)
        # Anonymous node volumes carry no label: compare with the list at start.
        newv=$(comm -13 <(sort "$WORK/volumes.before" 2>/dev/null) <(docker volume ls -q | sort) | wc -l)
        if [ "$c$n$v$newv" = 0000 ]; then
            pass "teardown leaves no container, network or volume"
        else
            fail "teardown left $c containers, $n networks, $v named + $newv other new volumes"
        fi
    fi
    rm -rf "$WORK"
    echo
    echo "==== smoke summary (project $MIXNN_PROJECT) ===="
    printf '  %s\n' "${RESULTS[@]}"
    if [ "$FAILED" = 0 ] && [ "$rc" = 0 ]; then
        echo "  all checks passed"
        exit 0
    fi
    echo "  some checks FAILED"
    exit 1
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# Run a client subcommand in a one-off container with a time limit.
# client_run TIMEOUT OUTFILE ERRFILE ARGS... ; returns the exit status.
client_run() {
    local t=$1 out=$2 err=$3
    shift 3
    timeout --kill-after=10 "$t" "${COMPOSE[@]}" -p "$MIXNN_PROJECT" --project-directory "$TESTNET_DIR" \
        "${COMPOSE_FILES[@]}" run --rm --no-deps -T client "$@" >"$out" 2>"$err"
}

# The last lines of a job's stderr, without compose's own chatter.
show_err() { grep -vE '^(Creating|Starting|Removing|Stopping) |^[0-9]+$' "$1" | tail -n 5 | sed "s/^/    $2 stderr: /" >&2; }

# `peer free_slots` lines from one peers --json run.
peers_table() { peers_json "$1" "$2" | json_peer_ids; }

# ---------------------------------------------------------------- 1. up
detect_compose
docker volume ls -q | sort >"$WORK/volumes.before"
step "clean state (project $MIXNN_PROJECT, compose: ${COMPOSE[*]})"
"$TESTNET_DIR/down.sh" --volumes >/dev/null 2>&1 || true

step "build"
if [ "$build" = 1 ]; then
    t0=$(date +%s)
    ( build_image ) || { fail "build binaries and image"; exit 1; }
    pass "build static binaries + image ($(($(date +%s) - t0)) s, $(docker image inspect -f '{{.Size}}' "$MIXNN_IMAGE" | awk '{printf "%.1f MB", $1/1e6}'))"
else
    docker image inspect "$MIXNN_IMAGE" >/dev/null 2>&1 || { fail "image $MIXNN_IMAGE exists (--no-build)"; exit 1; }
fi

step "start testnet: bootstrap + $NODES nodes"
( start_bootstrap ) || { fail "start bootstrap"; exit 1; }
MIXNN_BOOTSTRAP_ADDR=$(cat "$STATE_DIR/$MIXNN_PROJECT.bootstrap")
export MIXNN_BOOTSTRAP_ADDR
( start_nodes "$NODES" ) || { fail "start $NODES nodes"; exit 1; }
pass "testnet up: bootstrap $MIXNN_BOOTSTRAP_ADDR, $NODES nodes"

declare -A PEER_OF CONTAINER_OF
for c in $(service_containers node); do
    id=$(container_peer_id "$c")
    PEER_OF[$c]=$id
    CONTAINER_OF[$id]=$c
done

# ---------------------------------------------------------------- 2. peers
step "mixnn peers --json lists every node"
peers_table "$NODES" 45 >"$WORK/peers0"
missing=0
for c in "${!PEER_OF[@]}"; do
    grep -q "^${PEER_OF[$c]} " "$WORK/peers0" || { missing=$((missing + 1)); log "not listed: $(container_name "$c") ${PEER_OF[$c]}"; }
done
if [ "$missing" = 0 ] && [ -s "$WORK/peers0" ]; then
    pass "peers --json lists all $NODES nodes"
else
    fail "peers --json misses $missing of $NODES nodes"
fi

# ---------------------------------------------------------------- 3. train
step "local reference: train --local in a client container (same arch, data, seed)"
LOCAL_DIGEST=""
client_run 300 "$WORK/local.out" "$WORK/local.err" \
    train --local --arch mlp:784-64-10 --data "$MIXNN_CLIENT_DATA" --epochs 1 --batch 64 --seed 7 --json
rc=$?
json=$(tail -n 1 "$WORK/local.out")
if [ "$rc" = 0 ] && acc=$(printf '%s' "$json" | json_get test_accuracy 2>/dev/null) && [ -n "$acc" ]; then
    LOCAL_DIGEST=$(printf '%s' "$json" | json_get params_digest)
    pass "local reference in the image: test_accuracy $acc, params_digest ${LOCAL_DIGEST:0:16}…"
else
    show_err "$WORK/local.err" local
    fail "local reference: exit $rc, no JSON with test_accuracy"
fi

step "training job through the network (mlp:784-64-10, data $MIXNN_CLIENT_DATA)"
t0=$(date +%s)
client_run "$TRAIN_TIMEOUT" "$WORK/train.out" "$WORK/train.err" \
    train --bootstrap "$MIXNN_BOOTSTRAP_ADDR" --arch mlp:784-64-10 --data "$MIXNN_CLIENT_DATA" \
    --epochs 1 --batch 64 --seed 7 --mixes 1 --model-map /work/model.json --json
rc=$?
log "train exited $rc after $(($(date +%s) - t0)) s"
trained=0
json=$(tail -n 1 "$WORK/train.out")
if [ "$rc" = 0 ] && acc=$(printf '%s' "$json" | json_get test_accuracy 2>/dev/null) && [ -n "$acc" ]; then
    digest=$(printf '%s' "$json" | json_get params_digest)
    log "train: test_accuracy=$acc final_loss=$(printf '%s' "$json" | json_get final_loss) steps=$(printf '%s' "$json" | json_get steps) seconds=$(printf '%s' "$json" | json_get seconds) params_digest=$digest"
    if float_gt "$acc" 0.1 && [ -n "$digest" ]; then
        pass "train: test_accuracy $acc > 0.1, params_digest present"
        trained=1
        if [ -n "$LOCAL_DIGEST" ]; then
            if [ "$digest" = "$LOCAL_DIGEST" ]; then
                pass "train: params_digest equals local training with the same seed"
            else
                fail "train: params_digest $digest differs from local training's $LOCAL_DIGEST"
            fi
        fi
    else
        fail "train: test_accuracy $acc (want > 0.1), params_digest '${digest}'"
    fi
else
    show_err "$WORK/train.err" train
    fail "train: exit $rc, no JSON with test_accuracy on the last stdout line"
fi

# ---------------------------------------------------------------- 4. infer
step "inference job with the written model map"
if [ "$trained" = 1 ]; then
    client_run "$INFER_TIMEOUT" "$WORK/infer.out" "$WORK/infer.err" \
        infer --bootstrap "$MIXNN_BOOTSTRAP_ADDR" --model-map /work/model.json --data "$MIXNN_CLIENT_DATA" --json
    rc=$?
    json=$(tail -n 1 "$WORK/infer.out")
    if [ "$rc" = 0 ] && acc=$(printf '%s' "$json" | json_get test_accuracy 2>/dev/null) && [ -n "$acc" ]; then
        ex=$(printf '%s' "$json" | json_get examples)
        log "infer: test_accuracy=$acc examples=$ex seconds=$(printf '%s' "$json" | json_get seconds)"
        if float_gt "$acc" 0.1 && float_gt "${ex:-0}" 0; then
            pass "infer: test_accuracy $acc > 0.1 on $ex examples"
        else
            fail "infer: test_accuracy $acc (want > 0.1), examples '${ex}'"
        fi
    else
        show_err "$WORK/infer.err" infer
        fail "infer: exit $rc, no JSON with test_accuracy on the last stdout line"
    fi
else
    fail "infer: not run (no trained model map)"
fi

# ---------------------------------------------------------------- 5. restart
step "restart one node container"
c=$(service_containers node | head -n 1)
name=$(container_name "$c")
before=${PEER_OF[$c]}
# Fresh view of its free slots (the training job may have taken some).
peers_table "$NODES" 30 >"$WORK/peers1"
slots_before=$(awk -v p="$before" '$1 == p { print $2 }' "$WORK/peers1")
starts=$(container_addr_lines "$c")
log "restarting $name ($before, free slots ${slots_before:-?})"
docker restart -t 20 "$c" >/dev/null || fail "docker restart $name"
after=""
for ((i = 0; i < 60; i++)); do
    if [ "$(container_addr_lines "$c")" -gt "$starts" ]; then after=$(container_peer_id "$c"); break; fi
    sleep 1
done
if [ -z "$after" ]; then
    fail "restart: $name printed no address within 60 s"
elif [ "$after" != "$before" ]; then
    fail "restart: $name came back as $after, was $before"
else
    # Listed again, from a client container, with the same free slots.
    listed=""
    for ((i = 0; i < 6; i++)); do
        peers_table "$NODES" 20 >"$WORK/peers2"
        listed=$(awk -v p="$after" '$1 == p { print $2 }' "$WORK/peers2")
        [ -n "$listed" ] && break
        sleep 5
    done
    if [ -z "$listed" ]; then
        fail "restart: $name kept peer id $after but peers --json does not list it"
    elif [ -n "$slots_before" ] && [ "$listed" != "$slots_before" ]; then
        fail "restart: $name kept peer id $after but free slots $slots_before -> $listed"
    else
        pass "restart: $name came back with the same peer id $after (free slots ${listed})"
    fi
fi

# Wait until a layer host of the job JOB_PID (started after the peers list in
# $1 was taken) can be told apart; sets VICTIM and HOW, or leaves VICTIM empty.
find_layer_host() {
    local before=$1 since=$2 deadline=$(($(date +%s) + FIND_HOST_TIMEOUT))
    VICTIM=""
    HOW=""
    while [ -z "$VICTIM" ] && [ "$(date +%s)" -lt "$deadline" ] && kill -0 "$JOB_PID" 2>/dev/null; do
        sleep 2
        # (a) a node whose advertised free slots dropped since the job started
        peers_table "$NODES" 8 >"$WORK/peers4" 2>/dev/null
        while read -r p s; do
            old=$(awk -v p="$p" '$1 == p { print $2 }' "$before")
            if [ -n "$old" ] && [ -n "$s" ] && [ "$s" -lt "$old" ] && [ -n "${CONTAINER_OF[$p]:-}" ]; then
                VICTIM=${CONTAINER_OF[$p]}; HOW="free slots $old -> $s"; break
            fi
        done <"$WORK/peers4"
        # (b) a node that logged a slot assignment since the job started
        if [ -z "$VICTIM" ]; then
            for c in $(service_containers node); do
                if docker logs --since "$since" "$c" 2>&1 | grep -Eiq 'slot_(assigned|created|taken|claimed|opened)|slot (assigned|created|taken)'; then
                    VICTIM=$c; HOW="logged a slot assignment"; break
                fi
            done
        fi
    done
}

# ---------------------------------------------------------------- 6. failover
step "stop a layer host during a training job: it fails over and finishes"
FO_ARGS=(--arch mlp:784-64-10 --data "$MIXNN_CLIENT_DATA" --epochs "$FAILOVER_EPOCHS" --batch 64 --seed 8)
client_run 600 "$WORK/local2.out" "$WORK/local2.err" train --local "${FO_ARGS[@]}" --json
FO_LOCAL=$(tail -n 1 "$WORK/local2.out" | json_get params_digest 2>/dev/null)
peers_table "$NODES" 30 >"$WORK/peers3"
client_run "$FAILOVER_TIMEOUT" "$WORK/job2.out" "$WORK/job2.err" \
    train --bootstrap "$MIXNN_BOOTSTRAP_ADDR" "${FO_ARGS[@]}" --mixes 1 \
    --checkpoint-every 50 --model-map /work/model-2.json --json &
JOB_PID=$!
find_layer_host "$WORK/peers3" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
if [ -z "$VICTIM" ]; then
    fail "failover: no layer host of the running job identified within ${FIND_HOST_TIMEOUT} s"
    kill "$JOB_PID" 2>/dev/null
    wait "$JOB_PID" 2>/dev/null
else
    vpeer=${PEER_OF[$VICTIM]}
    log "layer host: $(container_name "$VICTIM") $vpeer ($HOW); stopping it"
    t_stop=$(date +%s)
    docker stop -t 10 "$VICTIM" >/dev/null
    wait "$JOB_PID"; rc=$?
    json=$(tail -n 1 "$WORK/job2.out")
    digest=$(printf '%s' "$json" | json_get params_digest 2>/dev/null)
    failovers=$(printf '%s' "$json" | json_get failovers 2>/dev/null)
    log "job exited $rc, $(($(date +%s) - t_stop)) s after the stop: failovers ${failovers:-?}"
    if [ "$rc" != 0 ]; then
        show_err "$WORK/job2.err" job
        fail "failover: the job failed after layer host $vpeer stopped (exit $rc)"
    elif [ -z "$failovers" ] || [ "$failovers" = 0 ]; then
        fail "failover: the job finished without a failover (was $vpeer really one of its hosts?)"
    elif [ -z "$FO_LOCAL" ] || [ "$digest" != "$FO_LOCAL" ]; then
        fail "failover: params_digest ${digest:-none} differs from local training's ${FO_LOCAL:-none}"
    else
        pass "failover: $failovers failover(s) after $vpeer stopped; params_digest equals local training"
    fi
    docker start "$VICTIM" >/dev/null 2>&1 || true
fi
JOB_PID=""

# ---------------------------------------------------------------- 7. hop failure, no failover
step "stop a layer host during a job run with --max-failovers 0"
sleep 5
peers_table "$NODES" 30 >"$WORK/peers5"
client_run $((FIND_HOST_TIMEOUT + FAIL_BOUND + 120)) "$WORK/job3.out" "$WORK/job3.err" \
    train --bootstrap "$MIXNN_BOOTSTRAP_ADDR" --arch mlp:784-64-10 --data "$MIXNN_CLIENT_DATA" \
    --epochs "$LONG_EPOCHS" --batch 64 --seed 9 --mixes 1 --max-failovers 0 \
    --model-map /work/model-3.json --json &
JOB_PID=$!
find_layer_host "$WORK/peers5" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
if [ -z "$VICTIM" ]; then
    if kill -0 "$JOB_PID" 2>/dev/null; then
        fail "hop failure: no layer host of the running job identified within ${FIND_HOST_TIMEOUT} s"
        kill "$JOB_PID" 2>/dev/null
    else
        wait "$JOB_PID"; rc=$?
        show_err "$WORK/job3.err" job
        fail "hop failure: the job ended (exit $rc) before a layer host could be stopped"
    fi
else
    vpeer=${PEER_OF[$VICTIM]}
    vname=$(container_name "$VICTIM")
    log "layer host: $vname $vpeer ($HOW); stopping it"
    t_stop=$(date +%s)
    docker stop -t 10 "$VICTIM" >/dev/null
    while kill -0 "$JOB_PID" 2>/dev/null && [ $(($(date +%s) - t_stop)) -lt "$FAIL_BOUND" ]; do sleep 1; done
    if kill -0 "$JOB_PID" 2>/dev/null; then
        fail "hop failure: the job still runs ${FAIL_BOUND} s after $vname stopped"
        kill "$JOB_PID" 2>/dev/null
        wait "$JOB_PID" 2>/dev/null
    else
        wait "$JOB_PID"; rc=$?
        took=$(($(date +%s) - t_stop))
        errline=$(grep -E '^error: ' "$WORK/job3.err" | tail -n 1)
        log "job exited $rc, $took s after the stop: ${errline:-<no error line>}"
        if [ "$rc" = 0 ]; then
            fail "hop failure: the job succeeded although layer host $vpeer was stopped"
        elif [ -z "$errline" ]; then
            fail "hop failure: exit $rc but no 'error: ...' line on stderr"
        elif ! grep -qF "$vpeer" <<<"$errline"; then
            fail "hop failure: the error does not name the stopped hop $vpeer: $errline"
        elif ! grep -q -- '--resume' "$WORK/job3.err"; then
            fail "hop failure: no --resume command printed"
        else
            pass "hop failure: job failed in ${took} s (bound ${FAIL_BOUND} s) naming $vpeer, with the --resume command"
        fi
    fi
    docker start "$VICTIM" >/dev/null 2>&1 || true
fi
JOB_PID=""

# ---------------------------------------------------------------- 8. churn in discovery
step "stop one node with SIGTERM; three jobs right after it"
sleep 5
c=$(service_containers node | tail -n 1)
gone=${PEER_OF[$c]}
docker stop -t 20 "$c" >/dev/null
ok=0
for i in 1 2 3; do
    client_run 300 "$WORK/short$i.out" "$WORK/short$i.err" \
        train --bootstrap "$MIXNN_BOOTSTRAP_ADDR" --arch mlp:784-64-10 --data "$MIXNN_CLIENT_DATA" \
        --epochs 1 --limit 512 --batch 64 --seed 7 --mixes 1 --model-map "/work/short-$i.json" --json
    if [ $? = 0 ]; then ok=$((ok + 1)); else show_err "$WORK/short$i.err" "job $i"; fi
done
if [ "$ok" = 3 ]; then
    pass "after $gone stopped, 3 jobs in a row succeeded"
else
    fail "after $gone stopped, $ok of 3 jobs succeeded"
fi
docker start "$c" >/dev/null 2>&1 || true
exit 0

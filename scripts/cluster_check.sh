#!/usr/bin/env bash
# A real two-node Ray cluster on this one machine, a sweep across it, and the loss of a node.
#
#   scripts/cluster_check.sh [--out FILE] [--keep]
#
#   1. `ray start --head` and `ray start --address=...` on 127.0.0.1, 1 CPU each, each node
#      with its own temp dir, its own ports and its own resource (rsc_head / rsc_worker);
#   2. `raysweep run SPEC --address ...` of a 4-trial tiny-model spec (1 CPU a trial): the
#      reference store; Tune's records show which node ran each trial;
#   3. the same spec into a second store, SIGKILL of the whole worker node (its raylet,
#      then every process of its session) while one of its trials is mid-way: Tune retries that trial (max_failures) on the head, where it
#      resumes from its resume point; the store is compared row for row with the reference
#      (scripts/reliability.py compare_stores: nothing lost, duplicated or extra);
#   4. a JSON summary to stdout (or FILE): nodes, trials per node, the killed node, rows
#      compared, lost, duplicated, the checks and whether cleanup left anything running.
#
# It never runs `ray stop` (that stops every Ray on the machine): each `ray start` runs in a
# session of its own, and on exit, failure included, exactly those sessions are killed and
# the work dir removed (--keep leaves the work dir, for its logs). RAY_AUTH_MODE is taken
# from the environment (token when unset). Exit 0 when every check passed, 1 otherwise, 2 bad usage.
set -euo pipefail
OUT_FILE=""
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "cluster_check: --out needs a file name" >&2; exit 2; }; OUT_FILE=$(realpath -m -- "$2"); shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "cluster_check: unknown argument $1 (usage: $0 [--out FILE] [--keep])" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
RAY=$(dirname "$PY")/ray
HELPER="$PY $ROOT/scripts/cluster_check.py"

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export RAYSWEEP_MODEL_CACHE=${RAYSWEEP_MODEL_CACHE:-$ROOT/.cache/test-models}
# Token auth, as `raysweep run` starts its own clusters, unless the caller says otherwise. Left
# unset, Ray 2.60 turns it on for `ray start --head` when a token file exists but not for
# `ray start --address`, whose join the head then refuses.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
if [ "$RAY_AUTH_MODE" = token ]; then
  "$PY" -c "from raysweep.sweep import ensure_auth_token; ensure_auth_token()"
fi

# Short on purpose: a node's Unix sockets live under its temp dir, and a socket path must
# fit in 107 bytes.
WORK=$(mktemp -d /tmp/rsc.XXXXXX)
HEAD_TMP=$WORK/h
WORKER_TMP=$WORK/w
: > "$WORK/sessions"

finish() {
  local rc=$?
  set +e
  $HELPER cleanup --work "$WORK" --summary "$WORK/summary.json" || rc=1
  if [ -f "$WORK/summary.json" ]; then
    if [ -n "$OUT_FILE" ]; then cp "$WORK/summary.json" "$OUT_FILE"; else cat "$WORK/summary.json"; echo; fi
    [ $rc -eq 0 ] && ! grep -q '"ok": false' "$WORK/summary.json" || rc=1
    $PY -c 'import json, sys; s = json.load(open(sys.argv[1])); bad = [k for k, ok in s.get("checks", {}).items() if not ok]
if bad: print("cluster_check: failed checks: " + ", ".join(bad), file=sys.stderr)
if "killed_trial_finished_on_head" in bad:
    k = s.get("killed_node", {})
    print("cluster_check: killed trial: " + json.dumps({x: k.get(x) for x in ("trial", "trial_pid", "trial_attempt_nodes", "trial_attempt_log", "trial_attempts", "trial_status", "trial_attempts_in_store")}), file=sys.stderr)' "$WORK/summary.json"
  fi
  if [ $KEEP -eq 1 ]; then echo "cluster_check: work dir kept at $WORK" >&2; else rm -rf "$WORK"; fi
  exit $rc
}
trap finish EXIT
# A signal ends the script through `exit`, so the EXIT trap cleans up after it too.
trap 'exit 143' TERM
trap 'exit 130' INT

log() { echo "cluster_check: $*" >&2; }

# Run "$@" in a session of its own, recorded at once (cleanup also finds one whose recording
# a signal cut short: its command line names the work dir).
in_session() {
  local role=$1 logf=$2
  shift 2
  setsid "$@" > "$logf" 2>&1 &
  local pid=$!
  echo "$role $pid" >> "$WORK/sessions"
  LAST_PID=$pid
}

show_log() { log "--- last lines of $1"; tail -n 40 "$1" >&2 || true; }

read -r -a P <<< "$($HELPER ports 15)"
GCS_PORT=${P[0]}
ADDRESS=127.0.0.1:$GCS_PORT

node_ports() {  # the ports a node's processes bind, from P[$1] on
  local i=$1
  echo "--node-manager-port=${P[$i]} --object-manager-port=${P[$((i + 1))]} --metrics-export-port=${P[$((i + 2))]}" \
       "--dashboard-agent-listen-port=${P[$((i + 3))]} --dashboard-agent-grpc-port=${P[$((i + 4))]}" \
       "--runtime-env-agent-port=${P[$((i + 5))]} --min-worker-port=0 --max-worker-port=0"
}

start_node() {  # start_node ROLE TEMP_DIR ARGS...
  local role=$1 temp=$2
  shift 2
  in_session "$role" "$WORK/ray-start-$role.log" "$RAY" start --node-ip-address=127.0.0.1 --num-cpus=1 --num-gpus=0 \
    --object-store-memory=200000000 --disable-usage-stats --temp-dir="$temp" "$@"
  local pid=$LAST_PID
  if ! wait "$pid"; then show_log "$WORK/ray-start-$role.log"; log "ray start of the $role node failed"; exit 1; fi
  $HELPER node --temp-dir "$temp" > "$WORK/$role.json"
  # `ray start` ran as its session's leader: the node's processes must be in that session,
  # or cleanup would miss them.
  "$PY" -c "import json,sys; n=json.load(open(sys.argv[1])); sys.exit(0 if n['sid']==int(sys.argv[2]) else 1)" "$WORK/$role.json" "$pid" \
    || { log "the $role node's raylet is not in the session of its ray start"; exit 1; }
}

log "work dir $WORK"
log "head node on $ADDRESS"
# shellcheck disable=SC2046
start_node head "$HEAD_TMP" --head --port="$GCS_PORT" --include-dashboard=false \
  --ray-client-server-port="${P[13]}" --resources='{"rsc_head": 1}' $(node_ports 1)
log "worker node"
# shellcheck disable=SC2046
start_node worker "$WORKER_TMP" --address="$ADDRESS" --resources='{"rsc_worker": 1}' $(node_ports 7)
log "both nodes up"

SPEC=$WORK/cluster.yaml
cat > "$SPEC" <<'EOF'
name: cluster
description: two-node cluster check (scripts/cluster_check.sh)
models:
  - name: micro-gpt2
    arch: gpt2
    tiny: {layers: 5, hidden: 32, heads: 2, vocab: 512}
    pretrain: {steps: 40, batch_size: 16}
tasks: [sentiment, word_order]
forget_tasks: [sentiment, word_order]
methods: [random, gradient_ascent]
sizes: [24]
seeds: [0]
data: {cap: 24}
phases:
  finetune: {optimizer: adamw, lr: 2.0e-3, batch_size: 8, max_epochs: 6}
  # stop_test_acc 0.01: forgetting runs its whole budget, so each trial reports several epochs
  forget: {optimizer: adamw, lr: 2.0e-3, batch_size: 8, max_epochs: 6, stop_test_acc: 0.01}
  relearn: {enabled: false}
scoring: {batch_size: 64}
resources: {cpu: 1, gpu: 0}
max_failures: 3
EOF

sweep() {  # sweep ROLE STORE: a driver in its own session; its exit code in LAST_RC
  in_session "driver-$1" "$WORK/sweep-$1.log" "$PY" -m raysweep.cli run "$SPEC" --address "$ADDRESS" --store "$2" --no-dashboard
  SWEEP_PID=$LAST_PID
}

log "reference sweep"
sweep reference "$WORK/reference"
REF_RC=0
wait "$SWEEP_PID" || REF_RC=$?
[ $REF_RC -eq 0 ] || show_log "$WORK/sweep-reference.log"

log "sweep with the worker node killed mid-way"
sweep killed "$WORK/killed"
KILL_DRIVER=$SWEEP_PID
$HELPER kill-worker --worker-temp "$WORKER_TMP" --worker-node "$WORK/worker.json" \
  --store "$WORK/killed" --driver-pid "$KILL_DRIVER" --out "$WORK/kill.json" >&2 || log "the worker node was not killed"
KILL_RC=0
wait "$KILL_DRIVER" || KILL_RC=$?
[ $KILL_RC -eq 0 ] || show_log "$WORK/sweep-killed.log"

$HELPER summary --work "$WORK" --head-temp "$HEAD_TMP" --worker-temp "$WORKER_TMP" --reference "$WORK/reference" \
  --store "$WORK/killed" --address "$ADDRESS" --reference-rc "$REF_RC" --store-rc "$KILL_RC" --out "$WORK/summary.json"

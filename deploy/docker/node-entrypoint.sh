#!/bin/sh
# Entrypoint of the node image: prepare the database and the model, then run the command (segnode serve).
#
#   1. segnode db upgrade                       (idempotent; safe when several replicas start at once)
#   2. segnode models import $SEGNODE_BOOTSTRAP_MODEL   (idempotent: same files, same rows)
#   3. promote it only when its task has no active model yet, so that a restart never undoes an
#      admin's promotion or rollback.
# Replicas starting together may collide in 2-3 (one import wins, the other is refused); the loser
# retries, and then finds the rows in place. SEGNODE_BOOTSTRAP_MODEL empty skips 2-3;
# SEGNODE_SKIP_BOOTSTRAP=1 skips 1-3 (the Helm chart runs them in an init container). Anything else goes
# to the command, e.g. `segnode-entrypoint segnode jobs list`.
set -eu

TRIES="${SEGNODE_BOOTSTRAP_TRIES:-5}"

# One bootstrap attempt; returns non-zero at the first failing step (errexit does not apply inside a
# function called from `until`, hence the explicit returns).
bootstrap() {
    segnode db upgrade || return 1
    [ -n "$model" ] || return 0
    active=$(segnode models list --task "$task" --json \
        | python3 -c 'import json, sys; print(sum(m["status"] == "active" for m in json.load(sys.stdin)))') \
        || return 1
    if [ "$active" = "0" ]; then
        segnode models import "$model" --promote --by segnode-entrypoint \
            --reason "shipped model; task $task had no active model" || return 1
    else
        segnode models import "$model" --by segnode-entrypoint || return 1
    fi
}

if [ "${SEGNODE_SKIP_BOOTSTRAP:-0}" != "1" ]; then
    model="${SEGNODE_BOOTSTRAP_MODEL:-}"
    task=""
    if [ -n "$model" ]; then
        if [ ! -f "$model/model.json" ]; then
            echo "segnode-entrypoint: SEGNODE_BOOTSTRAP_MODEL=$model has no model.json" >&2
            exit 2
        fi
        task=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["task"])' "$model/model.json")
    fi
    attempt=1
    until bootstrap; do
        if [ "$attempt" -ge "$TRIES" ]; then
            echo "segnode-entrypoint: bootstrap failed $attempt times; see the errors above" >&2
            exit 2
        fi
        echo "segnode-entrypoint: bootstrap attempt $attempt failed; retrying in $attempt s" >&2
        sleep "$attempt"
        attempt=$((attempt + 1))
    done
fi
[ "$#" -gt 0 ] || set -- segnode serve
exec "$@"

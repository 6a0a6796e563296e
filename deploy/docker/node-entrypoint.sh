#!/bin/sh
# Entrypoint of the node image: prepare the database and the model, then run the command (segnode serve).
#
#   1. segnode db upgrade                       (idempotent; safe when several replicas start at once)
#   2. segnode models import $SEGNODE_BOOTSTRAP_MODEL   (idempotent: same files, same rows)
#   3. promote it only when its task has no active model yet, so that a restart never undoes an
#      admin's promotion or rollback.
# SEGNODE_BOOTSTRAP_MODEL empty skips 2-3; SEGNODE_SKIP_BOOTSTRAP=1 skips 1-3 (the Helm chart does them
# in an init container). Anything else goes to the command, e.g. `segnode-entrypoint segnode jobs list`.
set -eu

bootstrap() {
    segnode db upgrade
    model="${SEGNODE_BOOTSTRAP_MODEL:-}"
    [ -n "$model" ] || return 0
    if [ ! -f "$model/model.json" ]; then
        echo "segnode-entrypoint: SEGNODE_BOOTSTRAP_MODEL=$model has no model.json" >&2
        exit 2
    fi
    task=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["task"])' "$model/model.json")
    active=$(segnode models list --task "$task" --json \
        | python3 -c 'import json, sys; print(sum(m["status"] == "active" for m in json.load(sys.stdin)))')
    if [ "$active" = "0" ]; then
        segnode models import "$model" --promote --by segnode-entrypoint \
            --reason "shipped model; task $task had no active model"
    else
        segnode models import "$model" --by segnode-entrypoint
    fi
}

if [ "${SEGNODE_SKIP_BOOTSTRAP:-0}" != "1" ]; then
    bootstrap
fi
[ "$#" -gt 0 ] || set -- segnode serve
exec "$@"

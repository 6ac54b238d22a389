#!/usr/bin/env bash
# Record the task-family tables of the strategy benchmark, one after another, resumably.
# Usage: OMP_NUM_THREADS=1 tables/record_families.sh TASK [TASK...]   (from the repository root)
#        PARAMS="width=6" ... passes --task-param width=6 to every recording (a task's variant)
#        DIR=tables/sealed ... writes there instead of tables/ (families kept out of training until scored)
# Each table is the sparse grid (312 configurations) at L=64, 120 steps, as mqar-64.csv is;
# an interrupted recording continues from its work dir (tables/TASK-64.csv.run) when rerun.
set -euo pipefail
PY=${PY:-.venv/bin/python}
for task in "$@"; do
    out=${DIR:-tables}/$task-64.csv
    [ -f "$out" ] && { echo "$out exists"; continue; }
    resume=()
    [ -d "$out.run" ] && resume=(--resume)
    extra=()
    for kv in ${PARAMS:-}; do extra+=(--task-param "$kv"); done
    $PY -m attn_search.cli record --out "$out" --task "$task" --task-param seq_len=64 "${extra[@]}" --space sparse \
        --preset default --steps 120 --bins 3 --grid dropout=0 --grid attn_dropout=0 --grid weight_decay=0.01 \
        --grid label_smoothing=0 --grid lr=0.003,0.008 --device cpu --quiet "${resume[@]}"
    if [ -n "${COMMIT:-}" ]; then  # one commit per table, of that file alone (retried if the index is busy)
        for _ in $(seq 10); do
            git add "$out" && git commit -q -m "Table: $task at L=64, 312 configurations at 120 steps with learning curves" -- "$out" && break
            sleep 5
        done
    fi
done

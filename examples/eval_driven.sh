#!/usr/bin/env bash
# Eval-driven training on the shipped sample data with the bundled model, against a random control:
#   select (and a random baseline of the same size) -> SFT each -> eval mcq each -> eval compare.
# Usage: bash examples/eval_driven.sh [OUT_DIR]
#   MEDGPT=path/to/medgpt to use another executable; TRAIN_ARGS="--num_train_epochs 3" to change the SFT recipe
set -euo pipefail

OUT=${1:-outputs/eval_driven}
MEDGPT=${MEDGPT:-medgpt}
PYTHON=${PYTHON:-$(dirname "$(command -v "$MEDGPT")")/python}
SAMPLE=$("$PYTHON" -c "import medgpt, pathlib; print(pathlib.Path(medgpt.__file__).parent / 'sample_data')")
CONFIG=$(dirname "$0")/eval_driven.yaml
EVAL=(--data "$SAMPLE/mcq" --split val --template chatml --style ceval)

# 1. recall training conversations for the MCQ val questions; write a random baseline of the same size
"$MEDGPT" select --eval "$SAMPLE/mcq" --split val --corpus "$SAMPLE/sft/medical_sft.jsonl" \
    --out "$OUT/select" --top-k 10 --min-sim 0.45 --baseline random

# 2. the same SFT recipe on each (a finished run is not trained again)
for run in selected baseline_random; do
    if [ ! -f "$OUT/sft-$run/adapter_config.json" ]; then
        # shellcheck disable=SC2086  # TRAIN_ARGS holds several --key value pairs
        "$MEDGPT" train "$CONFIG" --data "$OUT/select/$run.jsonl" --output_dir "$OUT/sft-$run" ${TRAIN_ARGS:-}
    fi
done

# 3. multiple-choice accuracy of the base model and of both adapters
mkdir -p "$OUT/eval"
"$MEDGPT" eval mcq "${EVAL[@]}" --output "$OUT/eval/base.json"
for run in selected baseline_random; do
    "$MEDGPT" eval mcq "${EVAL[@]}" --adapter "$OUT/sft-$run" --output "$OUT/eval/$run.json"
done

# 4. side by side, with deltas to the base model
"$MEDGPT" eval compare "$OUT/eval/base.json" "$OUT/eval/selected.json" "$OUT/eval/baseline_random.json" \
    --labels base,selected,random --markdown "$OUT/compare.md"

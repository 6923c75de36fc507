#!/usr/bin/env bash
# Eval-driven training on the shipped sample data with the bundled model, against a random control:
#   select (and a random baseline of the same size) -> contamination check of both -> SFT each
#   -> eval mcq (accuracy) and eval ppl (answer perplexity) of the base model and both adapters
#   -> eval compare: each against the base model, and selected against random, every difference with its
#      95% paired-bootstrap interval ("not significant" where it crosses 0) and McNemar's exact p for accuracy.
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

# 2. contamination report of both training sets against the eval set (n-gram copies and near-paraphrases)
mkdir -p "$OUT/eval"
for run in selected baseline_random; do
    "$MEDGPT" data contamination "$OUT/select/$run.jsonl" --against "$SAMPLE/mcq" --split val \
        --output "$OUT/eval/contamination_$run.json" | tee "$OUT/eval/contamination_$run.txt"
done

# 3. the same SFT recipe on each (a finished run is not trained again)
for run in selected baseline_random; do
    if [ ! -f "$OUT/sft-$run/adapter_config.json" ]; then
        # shellcheck disable=SC2086  # TRAIN_ARGS holds several --key value pairs
        "$MEDGPT" train "$CONFIG" --data "$OUT/select/$run.jsonl" --output_dir "$OUT/sft-$run" ${TRAIN_ARGS:-}
    fi
done

# 4. accuracy on the MCQ val questions and perplexity of the held-out QA answers, per item, for each model
"$MEDGPT" eval mcq "${EVAL[@]}" --output "$OUT/eval/base.json"
"$MEDGPT" eval ppl --data "$SAMPLE/qa/medical_qa.jsonl" --template chatml --output "$OUT/eval/base_ppl.json"
for run in selected baseline_random; do
    "$MEDGPT" eval mcq "${EVAL[@]}" --adapter "$OUT/sft-$run" --output "$OUT/eval/$run.json"
    "$MEDGPT" eval ppl --data "$SAMPLE/qa/medical_qa.jsonl" --template chatml --adapter "$OUT/sft-$run" \
        --output "$OUT/eval/${run}_ppl.json"
done

# 5. side by side with paired intervals: each model against the base model, then selected against random
{
    echo "## Against the base model"
    echo
    "$MEDGPT" eval compare "$OUT/eval/base.json" "$OUT/eval/selected.json" "$OUT/eval/baseline_random.json" \
        --labels base,selected,random --format markdown
    echo
    "$MEDGPT" eval compare "$OUT/eval/base_ppl.json" "$OUT/eval/selected_ppl.json" \
        "$OUT/eval/baseline_random_ppl.json" --labels base,selected,random --format markdown
    echo
    echo "## Selected against random (does selection beat a random sample of the same size?)"
    echo
    "$MEDGPT" eval compare "$OUT/eval/baseline_random.json" "$OUT/eval/selected.json" --labels random,selected \
        --format markdown
    echo
    "$MEDGPT" eval compare "$OUT/eval/baseline_random_ppl.json" "$OUT/eval/selected_ppl.json" \
        --labels random,selected --format markdown
    echo
    echo "## Contamination of the training sets"
    echo
    for run in selected baseline_random; do
        echo "- $run: $(head -n 1 "$OUT/eval/contamination_$run.txt") (pairs in eval/contamination_$run.json)"
    done
} > "$OUT/compare.md"
cat "$OUT/compare.md"

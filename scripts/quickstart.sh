#!/usr/bin/env bash
# The whole method on the offline digits testbed: pairs -> one-step student -> evaluation of both.
#   bash scripts/quickstart.sh [OUTPUT_DIR]          (default runs/quickstart)
# Extra --key value overrides per stage: QUICKSTART_PAIRS_ARGS, QUICKSTART_STUDENT_ARGS, QUICKSTART_EVAL_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/quickstart}
export HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# accelerate launch would set OMP_NUM_THREADS=1 for its one process: use every core instead.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
LAUNCH="accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
mkdir -p "$OUT"
start=$(date +%s)

[ -d "$OUT/reference" ] || python -c "import sys; from data_gen.digits import save_digits_reference as s; s(sys.argv[1])" "$OUT/reference"
$LAUNCH distill/generate_pairs.py --config configs/digits/pairs.yaml --output_dir "$OUT/pairs" ${QUICKSTART_PAIRS_ARGS:-}
$LAUNCH distill/train_student.py --config configs/digits/student.yaml --pairs "$OUT/pairs" \
    --output_dir "$OUT/student" ${QUICKSTART_STUDENT_ARGS:-}
for who in teacher student; do
    pipe=teachers/assets/digits-teacher
    [ "$who" = student ] && pipe="$OUT/student/pipeline"
    python distill/evaluate.py --config configs/digits/eval.yaml --pipeline "$pipe" \
        --reference "$OUT/reference" --pairs "$OUT/pairs" --output_dir "$OUT/eval-$who" ${QUICKSTART_EVAL_ARGS:-}
done
python scripts/quickstart_report.py "$OUT"
echo "quickstart finished in $(( $(date +%s) - start )) s; results in $OUT"

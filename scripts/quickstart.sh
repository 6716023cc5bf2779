#!/usr/bin/env bash
# The whole method on the offline digits testbed: pairs -> one-step student -> evaluation of both.
#   bash scripts/quickstart.sh [OUTPUT_DIR] [STUDENT_CONFIG]
#     OUTPUT_DIR      default runs/quickstart; pairs, reference sets and the teacher's evaluation are
#                     made once there and reused by later runs with another student
#     STUDENT_CONFIG  default configs/digits/student.yaml (the UNet student); also
#                     configs/digits/student_gigagan.yaml, configs/digits/student_stylegan_t.yaml
# Extra --key value overrides per stage: QUICKSTART_PAIRS_ARGS, QUICKSTART_STUDENT_ARGS, QUICKSTART_EVAL_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/quickstart}
STUDENT_CONFIG=${2:-configs/digits/student.yaml}
NAME=$(basename "$STUDENT_CONFIG" .yaml)            # student, student_gigagan, ...
export HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
# accelerate launch would set OMP_NUM_THREADS=1 for its one process: use every core instead.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
LAUNCH="accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
EVAL="python distill/evaluate.py --config configs/digits/eval.yaml --reference $OUT/reference --pairs $OUT/pairs
      --teacher_reference $OUT/teacher-reference/samples"
mkdir -p "$OUT"
start=$(date +%s)

[ -d "$OUT/reference" ] || python -c "import sys; from data_gen.digits import save_digits_reference as s; s(sys.argv[1])" "$OUT/reference"
$LAUNCH distill/generate_pairs.py --config configs/digits/pairs.yaml --output_dir "$OUT/pairs" ${QUICKSTART_PAIRS_ARGS:-}
# The teacher's samples with other noise (seed 2; the evaluations use seed 1): the reference for
# FID to the teacher, and, scored for the teacher itself, that FID's floor at this sample size.
$EVAL --pipeline teachers/assets/digits-teacher --metrics samples --seed 2 --output_dir "$OUT/teacher-reference" ${QUICKSTART_EVAL_ARGS:-}
$LAUNCH distill/train_student.py --config "$STUDENT_CONFIG" --pairs "$OUT/pairs" --output_dir "$OUT/$NAME" ${QUICKSTART_STUDENT_ARGS:-}
$EVAL --pipeline teachers/assets/digits-teacher --output_dir "$OUT/eval-teacher" ${QUICKSTART_EVAL_ARGS:-}
$EVAL --pipeline "$OUT/$NAME/pipeline" --output_dir "$OUT/eval-$NAME" ${QUICKSTART_EVAL_ARGS:-}
python scripts/quickstart_report.py "$OUT" "$NAME"
echo "quickstart finished in $(( $(date +%s) - start )) s; results in $OUT"

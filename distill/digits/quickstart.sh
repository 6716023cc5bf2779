#!/usr/bin/env bash
# The whole method on the offline digits testbed: pairs -> one-step student -> evaluation of both.
#   bash distill/digits/quickstart.sh [--family unet|sd3] [OUTPUT_DIR] [STUDENT_CONFIG]
#     --family        the teacher: unet (default; teachers/assets/digits-teacher, SD1.x form, 25 DDIM steps)
#                     or sd3 (teachers/assets/digits-teacher-sd3, a rectified-flow MMDiT, 25 flow-Euler steps)
#     OUTPUT_DIR      default runs/quickstart (runs/quickstart-sd3); pairs, reference sets and the teacher's
#                     evaluation are made once there and reused by later runs with another student
#     STUDENT_CONFIG  default configs/digits/student.yaml (the UNet student); also
#                     configs/digits/student_gigagan.yaml, configs/digits/student_stylegan_t.yaml;
#                     with --family sd3: configs/digits/student_sd3.yaml (the transformer student)
# Extra --key value overrides per stage: QUICKSTART_PAIRS_ARGS, QUICKSTART_STUDENT_ARGS, QUICKSTART_EVAL_ARGS.
set -euo pipefail
cd "$(dirname "$0")/../.."
FAMILY=unet
if [ "${1:-}" = "--family" ]; then FAMILY=${2:-}; shift 2 || shift $#; fi
case "$FAMILY" in
  unet) TEACHER=teachers/assets/digits-teacher; PAIRS_CONFIG=configs/digits/pairs.yaml
        DEFAULT_OUT=runs/quickstart; DEFAULT_STUDENT=configs/digits/student.yaml; TEACHER_ARGS="" ;;
  # The SD3 teacher's sampler: its own flow-matching Euler, and the 4 zero tokens in place of T5 it was trained with.
  sd3)  TEACHER=teachers/assets/digits-teacher-sd3; PAIRS_CONFIG=configs/digits/pairs_sd3.yaml
        DEFAULT_OUT=runs/quickstart-sd3; DEFAULT_STUDENT=configs/digits/student_sd3.yaml
        TEACHER_ARGS="--scheduler flow_euler --max_sequence_length 4" ;;
  *) echo "error: unknown --family '$FAMILY': choose unet or sd3" >&2; exit 2 ;;
esac
if [ ! -d "$TEACHER" ]; then  # the SD3-form digits teacher is not committed yet (docs/flow-matching-teachers.md)
  echo "error: no teacher at $TEACHER: train it with python distill/digits/train_teacher_sd3.py --config" \
       "configs/digits/teacher_sd3.yaml --output_dir runs/digits-teacher-sd3, then copy runs/digits-teacher-sd3/pipeline to $TEACHER" >&2
  exit 2
fi
OUT=${1:-$DEFAULT_OUT}
STUDENT_CONFIG=${2:-$DEFAULT_STUDENT}
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
$LAUNCH distill/generate_pairs.py --config $PAIRS_CONFIG --output_dir "$OUT/pairs" ${QUICKSTART_PAIRS_ARGS:-}
# The teacher's samples with other noise (seed 2; the evaluations use seed 1): the reference for
# FID to the teacher, and, scored for the teacher itself, that FID's floor at this sample size.
$EVAL --pipeline $TEACHER $TEACHER_ARGS --metrics samples --seed 2 --output_dir "$OUT/teacher-reference" ${QUICKSTART_EVAL_ARGS:-}
$LAUNCH distill/train_student.py --config "$STUDENT_CONFIG" --pairs "$OUT/pairs" --output_dir "$OUT/$NAME" ${QUICKSTART_STUDENT_ARGS:-}
$EVAL --pipeline $TEACHER $TEACHER_ARGS --output_dir "$OUT/eval-teacher" ${QUICKSTART_EVAL_ARGS:-}
$EVAL --pipeline "$OUT/$NAME/pipeline" --output_dir "$OUT/eval-$NAME" ${QUICKSTART_EVAL_ARGS:-}
python distill/digits/quickstart_report.py "$OUT" "$NAME"
echo "quickstart finished in $(( $(date +%s) - start )) s; results in $OUT"

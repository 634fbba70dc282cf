#!/usr/bin/env bash
# The paper's Table 1 at toy scale on real video: train every compressor variant with the same
# budget by frame-retrieval pretraining, then score each on held-out clips.
#
#   SRC=folder-with-the-source-videos bash recipes/table1/run.sh [clips|init|train|eval|all]
#
#   bash recipes/table1/run.sh table2     # Table 2's "Without Pretrain" on synthetic scene returns
#   bash recipes/table1/run.sh table2-lora  # the same, finetuned with LoRA, only the compressor carried over
#
# Environment: OUT (default runs/table1), STEPS (optimizer steps per variant, default 500),
# WARM_STEPS (the HR-only variants' warm start, warm_start.py, default 600; 0: none), JOBS
# (variants trained at once, default 2), THREADS (torch threads per run, default 1); table2:
# PRE_STEPS and FT_STEPS (default 300 each); table2-lora also: RATE (default 1x1x2), RANK (LoRA
# rank of both stages, default 16), FT_SEED (default 1), SHOT_SECONDS (the finetune's synthetic shot
# lengths, default "1 3"; "2 4" gives its 4 s clips no scene returns).
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=recipes/table1
OUT=${OUT:-runs/table1}
STEPS=${STEPS:-500}
WARM_STEPS=${WARM_STEPS:-600}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
stage=${1:-all}
mkdir -p "$OUT"

if [[ $stage == clips || $stage == all ]]; then
  : "${SRC:?set SRC to the folder holding bikes.mp4, cityCC0.mpg, bigbuckbunny.mp4 and carphone_pristine.mp4}"
  python $HERE/prepare_clips.py --out "$OUT/clips" --heldout-whole carphone_pristine.mp4 \
    "$SRC/bikes.mp4" "$SRC/cityCC0.mpg" "$SRC/bigbuckbunny.mp4" "$SRC/carphone_pristine.mp4"
fi

if [[ $stage == init || $stage == all ]]; then
  python $HERE/make_init.py --out "$OUT/init.safetensors" --depth 4
fi

train_one() {  # $1: a config in $HERE/configs
  local name kind; name=$(basename "$1" .json)
  # every compressor starts fresh; the two without a low-res branch (without_lr, large_patchify)
  # first fit their tokens to the low-res branch's (warm_start.py: compressor only, WARM_STEPS
  # steps), so that no variant starts the backbone on tokens it has never read
  local init=(--init "$OUT/init.safetensors" --init-skip compressor.)
  kind=$(python -c "import json, sys; print(json.load(open(sys.argv[1])).get('compressor_kind', 'pfp'))" "$1")
  if [[ ($kind == without_lr || $kind == large_patchify) && $WARM_STEPS -gt 0 ]]; then
    mkdir -p "$OUT/warm"
    python $HERE/warm_start.py --config "$1" --init "$OUT/init.safetensors" --data "$OUT/clips/train" \
      --steps "$WARM_STEPS" --threads "$THREADS" --out "$OUT/warm/$name.safetensors" > "$OUT/runs/$name.warm.log" 2>&1 \
      || { echo "$name: warm start FAILED (see $OUT/runs/$name.warm.log)"; return 1; }
    init=(--init "$OUT/warm/$name.safetensors")
  fi
  python -m pfp.train pretrain --config "$1" "${init[@]}" \
    --data "$OUT/clips/train" --storyboards optional --clip-seconds 2 \
    --steps "$STEPS" --batch-size 8 --lr 5e-4 --warmup 20 --lr-schedule cosine --seed 0 \
    --threads "$THREADS" --workers 1 --save-every 100 --log-every 10 --no-progress \
    --out "$OUT/runs/$name" --overwrite --export-dtype bf16 --export "$OUT/checkpoints/$name.safetensors" \
    > "$OUT/runs/$name.log" 2>&1 || { echo "$name: FAILED (see $OUT/runs/$name.log)"; return 1; }
  echo "$name: $(tail -n 1 "$OUT/runs/$name.log")"
}
export -f train_one
export OUT STEPS THREADS WARM_STEPS HERE

if [[ $stage == train || $stage == all ]]; then
  mkdir -p "$OUT/runs" "$OUT/checkpoints"
  # xargs exits non-zero when any run failed, so no stale checkpoint is scored after a failure
  ls $HERE/configs/*.json | xargs -P "$JOBS" -I{} bash -c 'train_one {}'
fi

if [[ $stage == eval || $stage == all ]]; then
  python -m pfp.eval retrieval --checkpoints "$OUT"/checkpoints/*.safetensors --videos "$OUT/clips/heldout" \
    --seconds 2 --clips-per-video 6 --frames 3 --steps 16 --seed 0 --quiet --json --out "$OUT/table1.md" \
    > "$OUT/table1.jsonl"
  cat "$OUT/table1.md"
fi

if [[ $stage == table2 ]]; then
  # Both arms start from the built-in model's backbone with a fresh compressor; one pretrains it by
  # frame retrieval first, the other finetunes it directly. Same finetune budget; scored on held-out
  # synthetic videos whose scenes return after a cut.
  T2=$OUT/table2
  PRE_STEPS=${PRE_STEPS:-300}
  FT_STEPS=${FT_STEPS:-300}
  mkdir -p "$T2"
  synth=(--sprite-radius 0.16 0.26 --pattern-period 0.35 0.6 --threads "$THREADS" --workers 1 --no-progress
         --batch-size 8 --lr 5e-4 --warmup 20 --lr-schedule cosine --save-every 100 --log-every 10 --overwrite)
  python -m pfp.train pretrain --init pfp/weights/default.safetensors --init-skip compressor. \
    --steps "$PRE_STEPS" --seed 0 --out "$T2/pre" --export "$T2/pre.safetensors" "${synth[@]}" > "$T2/pre.log" 2>&1
  python -m pfp.train finetune --init "$T2/pre.safetensors" --lora-rank 0 --p-no-history 0.2 \
    --steps "$FT_STEPS" --seed 1 --out "$T2/with" --export "$T2/with_pretrain.safetensors" "${synth[@]}" \
    > "$T2/with.log" 2>&1 &
  with_pid=$!
  python -m pfp.train finetune --init pfp/weights/default.safetensors --init-skip compressor. --lora-rank 0 \
    --p-no-history 0.2 --steps "$FT_STEPS" --seed 1 --out "$T2/without" \
    --export "$T2/without_pretrain.safetensors" "${synth[@]}" > "$T2/without.log" 2>&1 \
    || { kill "$with_pid" 2>/dev/null; echo "without: FAILED (see $T2/without.log)"; exit 1; }
  wait "$with_pid"   # its exit status: a failed arm stops the script (set -e) before the scoring
  python $HERE/synthetic_returns.py --out "$T2/videos" --videos 24 --seconds 6 --seed 999
  python -m pfp.eval consistency --checkpoints "$T2/with_pretrain.safetensors" "$T2/without_pretrain.safetensors" \
    --videos "$T2/videos" --history-seconds 2 --seconds 6 --steps 16 --seed 0 --quiet --json | tee "$T2/table2.jsonl"
fi

if [[ $stage == table2-lora ]]; then
  # The paper's hand-over: the compressor is pretrained (with LoRA on the backbone) and only the
  # compressor carries over; both arms finetune the built-in backbone with LoRA, one with the
  # pretrained compressor, one with a fresh one. Scored as table2 is.
  RATE=${RATE:-1x1x2}
  PRE_STEPS=${PRE_STEPS:-300}
  FT_STEPS=${FT_STEPS:-300}
  RANK=${RANK:-16}
  FT_SEED=${FT_SEED:-1}
  read -r -a shots <<< "${SHOT_SECONDS:-1 3}"
  (( ${#shots[@]} == 2 )) || { echo "error: SHOT_SECONDS must be two numbers, MIN MAX (e.g. \"2 4\"), got '${SHOT_SECONDS}'" >&2; exit 2; }
  T2=$OUT/table2-lora/${RATE}_rank$RANK   # the pretraining below is reused by every run of this rate and rank
  mkdir -p "$T2"
  python -c "import json, sys; from pfp.weights import read_weights; c = read_weights(sys.argv[1])[1].to_dict(); \
c['rate'] = sys.argv[2]; json.dump(c, open(sys.argv[3], 'w'), indent=1)" pfp/weights/default.safetensors "$RATE" "$T2/config.json"
  synth=(--config "$T2/config.json" --sprite-radius 0.16 0.26 --pattern-period 0.35 0.6 --threads "$THREADS"
         --workers 1 --no-progress --batch-size 8 --lr 5e-4 --warmup 20 --lr-schedule cosine --save-every 100
         --log-every 10 --overwrite)
  if [[ ! -f $T2/pre_$PRE_STEPS.safetensors ]]; then   # shared by every FT_STEPS, FT_SEED and SHOT_SECONDS
    python -m pfp.train pretrain --init pfp/weights/default.safetensors --init-skip compressor. --lora-rank "$RANK" \
      --steps "$PRE_STEPS" --seed 0 --out "$T2/pre_$PRE_STEPS" --export "$T2/pre_$PRE_STEPS.safetensors" "${synth[@]}" \
      > "$T2/pre_$PRE_STEPS.log" 2>&1
  fi
  python $HERE/take_compressor.py --base pfp/weights/default.safetensors --compressor "$T2/pre_$PRE_STEPS.safetensors" \
    --out "$T2/with_init_$PRE_STEPS.safetensors"
  tag=ft${FT_STEPS}_seed${FT_SEED}_shots${shots[0]}-${shots[1]}
  ft=(finetune --lora-rank "$RANK" --p-no-history 0.2 --steps "$FT_STEPS" --seed "$FT_SEED" --shot-seconds "${shots[@]}")
  python -m pfp.train "${ft[@]}" --init "$T2/with_init_$PRE_STEPS.safetensors" --out "$T2/with_$PRE_STEPS.$tag" \
    --export "$T2/with_pretrain_$PRE_STEPS.$tag.safetensors" "${synth[@]}" > "$T2/with_$PRE_STEPS.$tag.log" 2>&1 &
  with_pid=$!
  python -m pfp.train "${ft[@]}" --init pfp/weights/default.safetensors --init-skip compressor. --out "$T2/without.$tag" \
    --export "$T2/without_pretrain.$tag.safetensors" "${synth[@]}" > "$T2/without.$tag.log" 2>&1 \
    || { kill "$with_pid" 2>/dev/null; echo "without: FAILED (see $T2/without.$tag.log)"; exit 1; }
  wait "$with_pid"   # its exit status: a failed arm stops the script (set -e) before the scoring
  python $HERE/synthetic_returns.py --out "$T2/videos" --videos 24 --seconds 6 --seed 999   # table2's videos
  python -m pfp.eval consistency --checkpoints "$T2/with_pretrain_$PRE_STEPS.$tag.safetensors" \
    "$T2/without_pretrain.$tag.safetensors" --videos "$T2/videos" --history-seconds 2 --seconds 6 --steps 16 \
    --seed 0 --quiet --json | tee "$T2/table2.$PRE_STEPS.$tag.jsonl"
fi

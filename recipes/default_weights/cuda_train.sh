#!/usr/bin/env bash
# GPU fine-tuning stages of the built-in weights, each for a fixed wall-clock budget on one card;
# brings back the exported weights and loss logs.
#   stage17: two siblings side by side, from the stage-16 weights (INIT, default
#            runs/default_finetune16/finetune16.safetensors, the chain's stage-16 export in
#            pfp/weights/default.json; the built-in weights are stage 17 now), same data and schedule:
#            same   - the built-in model (4 blocks), as stage 16 trained it but at batch 256;
#            grown8 - the same model grown to 8 blocks (recipes/default_weights/grow_tiny_dit.py: the new
#                     blocks start as the identity).
#   stage18: stage 17's grown8 (INIT, default runs/stage17/grown8.safetensors) grown to 12 blocks,
#            alone, with all the CPU cores rendering its data.
# The tiny model is launch- and data-bound on a GPU, so siblings share the card at little cost to
# each; each gets its own share of the CPU cores for rendering the synthetic clips.
#
#   OUT=dir bash recipes/default_weights/cuda_train.sh STAGE BUDGET_S
#
# A short probe of the runs (which also fills Triton's kernel cache) measures their step rate; the
# main runs then get as many steps as fit the rest of the budget, so that their cosine schedules
# finish, with --max-minutes as a backstop. OUT gets <name>.safetensors and <name>_loss.csv per
# run, and logs.tgz (logs, each main run's command, the grown configs): the device tool brings back
# at most 8 files.
# DEVICE, BATCH and WORKERS override the defaults for a dry run on a CPU.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
[ "${DEVICE:-cuda}" = cuda ] && export TRITON_INTERPRET=0
stage=${1:?usage: OUT=dir bash recipes/default_weights/cuda_train.sh STAGE BUDGET_S}
budget=${2:?usage: OUT=dir bash recipes/default_weights/cuda_train.sh STAGE BUDGET_S}
out=${OUT:?set OUT}
work=/tmp/pfp_cuda_train
logs=$work/logs
rm -rf "$work" && mkdir -p "$logs"
trap 'tar czf "$out/logs.tgz" -C "$work" logs' EXIT   # also when a step fails
t0=$SECONDS
stage16_weights=${INIT:-runs/default_finetune16/finetune16.safetensors}
stage16=(--config recipes/default_weights/results/stage16_config.json --init "$stage16_weights")
case $stage in
    stage17)
        names=(same grown8)
        workers=${WORKERS:-$(( $(nproc) / 2 - 2 ))}
        python3 recipes/default_weights/grow_tiny_dit.py --weights "$stage16_weights" --depth 8 --out "$work/grown8" > /dev/null || exit 1
        cp "$work/grown8_config.json" "$logs/"
        declare -A model=([same]="${stage16[*]}"
                          [grown8]="--config $work/grown8_config.json --init $work/grown8.safetensors")
        train=(--batch-size "${BATCH:-256}" --lr 3e-4 --warmup 50 --seed 17) ;;
    stage18)
        names=(grown12)
        workers=${WORKERS:-$(( $(nproc) - 3 ))}
        python3 recipes/default_weights/grow_tiny_dit.py --weights "${INIT:-runs/stage17/grown8.safetensors}" --depth 12 \
            --out "$work/grown12" > /dev/null || exit 1
        cp "$work/grown12_config.json" "$logs/"
        declare -A model=([grown12]="--config $work/grown12_config.json --init $work/grown12.safetensors")
        train=(--batch-size "${BATCH:-384}" --lr 2e-4 --warmup 30 --seed 18) ;;
    *) echo "STAGE must be stage17 or stage18, got '$stage'"; exit 2 ;;
esac
[ "$workers" -lt 1 ] && workers=1

# stage 16's data and loss settings
common=(finetune --device "${DEVICE:-cuda}" --precision fp32 --lora-rank 0 "${train[@]}" --lr-schedule cosine
        --save-every 1000000000 --log-every 20 --t-shift 5 --p-no-history 0.2 --t-weight-power 1
        --sprite-radius 0.16 0.26 --pattern-period 0.35 0.6 --threads 2 --workers "$workers" --no-progress)

rate_of() {  # steps/s between the first and last logged step of a loss.csv
    python3 - "$1" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
a, b = rows[0], rows[-1]
print((int(b["step"]) - int(a["step"])) / (float(b["elapsed_s"]) - float(a["elapsed_s"])))
EOF
}

echo "probe ($(date -u +%H:%M:%S)), $workers workers per run"
for n in "${names[@]}"; do
    # shellcheck disable=SC2086
    timeout -k 5 150 python3 -m pfp.train "${common[@]}" ${model[$n]} --steps "${PROBE_STEPS:-60}" --out "$work/probe_$n" \
        > "$logs/probe_$n.log" 2>&1 &
done
wait
rate=
for n in "${names[@]}"; do
    r=$(rate_of "$work/probe_$n/loss.csv") || { echo "probe $n failed:"; tail -20 "$logs/probe_$n.log"; exit 1; }
    echo "probe $n: $r steps/s"
    rate=$(python3 -c "print(min(float('$r'), float('${rate:-$r}')))")
done

# main runs: what is left of the budget, less startup (cached kernels) and export
left=$(( budget - (SECONDS - t0) - 45 ))
steps=$(python3 -c "print(max(100, int($rate * $left * 0.8)))")   # the probe's rate includes prefetched batches
minutes=$(python3 -c "print(round($left / 60, 2))")
echo "main ($(date -u +%H:%M:%S)): $steps steps, backstop $minutes min"
for n in "${names[@]}"; do
    # shellcheck disable=SC2086
    cmd=(python3 -m pfp.train "${common[@]}" ${model[$n]} --steps "$steps" --max-minutes "$minutes"
         --out "$work/run_$n" --export "$out/$n.safetensors")
    echo "${cmd[*]}" > "$logs/$n.cmd"
    "${cmd[@]}" > "$logs/run_$n.log" 2>&1 &
done
wait
for n in "${names[@]}"; do
    cp "$work/run_$n/loss.csv" "$out/${n}_loss.csv" 2>/dev/null
    tail -3 "$logs/run_$n.log"
done
echo "done in $((SECONDS - t0)) s"

#!/usr/bin/env bash
# Fine-tune two siblings of the built-in weights side by side on one GPU, for a fixed wall-clock
# budget, and bring back their exported weights and loss logs:
#   same:   the built-in model (4 blocks), as stage 16 trained it but at batch 256;
#   grown8: the same model grown to 8 blocks (benchmarks/grow_tiny_dit.py: the new blocks start as
#           the identity), same data and schedule.
# The tiny model is launch- and data-bound on a GPU, so the two runs share the card at little cost
# to each; each gets its own share of the CPU cores for rendering the synthetic clips.
#
#   OUT=dir bash benchmarks/cuda_train.sh BUDGET_S
#
# A short probe of both runs (which also fills Triton's kernel cache) measures their step rate; the
# main runs then get as many steps as fit the rest of the budget, so that their cosine schedules
# finish, with --max-minutes as a backstop. Each main run's command goes to OUT/<name>.cmd.
# DEVICE, BATCH and WORKERS override the defaults (cuda, 256, cores/2 - 2) for a dry run on a CPU.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
[ "${DEVICE:-cuda}" = cuda ] && export TRITON_INTERPRET=0
budget=${1:?usage: OUT=dir bash benchmarks/cuda_train.sh BUDGET_S}
out=${OUT:?set OUT}
work=/tmp/pfp_cuda_train
rm -rf "$work" && mkdir -p "$work"
t0=$SECONDS
workers=${WORKERS:-$(( $(nproc) / 2 - 2 ))}
[ "$workers" -lt 1 ] && workers=1

python3 benchmarks/grow_tiny_dit.py --depth 8 --out "$work/grown8" > /dev/null || exit 1

common=(finetune --device "${DEVICE:-cuda}" --precision fp32 --lora-rank 0 --batch-size "${BATCH:-256}"
        --lr 3e-4 --lr-schedule cosine --warmup 50 --save-every 1000000000 --log-every 20 --seed 17
        --t-shift 5 --p-no-history 0.2 --t-weight-power 1 --sprite-radius 0.16 0.26
        --pattern-period 0.35 0.6 --threads 2 --workers "$workers" --no-progress)
declare -A model=(
    [same]="--config benchmarks/results/default_weights/stage16_config.json --init pfp/weights/default.safetensors"
    [grown8]="--config $work/grown8_config.json --init $work/grown8.safetensors"
)
names=(same grown8)

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
    timeout -k 5 150 python3 -m pfp.train "${common[@]}" ${model[$n]} --steps 60 --out "$work/probe_$n" \
        > "$out/probe_$n.log" 2>&1 &
done
wait
rate=
for n in "${names[@]}"; do
    r=$(rate_of "$work/probe_$n/loss.csv") || { echo "probe $n failed:"; tail -20 "$out/probe_$n.log"; exit 1; }
    echo "probe $n: $r steps/s"
    rate=$(python3 -c "print(min(float('$r'), float('${rate:-$r}')))")
done

# main runs: what is left of the budget, less startup (cached kernels) and export
left=$(( budget - (SECONDS - t0) - 45 ))
steps=$(python3 -c "print(max(100, int($rate * $left * 0.92)))")
minutes=$(python3 -c "print(round($left / 60, 2))")
echo "main ($(date -u +%H:%M:%S)): $steps steps, backstop $minutes min"
for n in "${names[@]}"; do
    # shellcheck disable=SC2086
    cmd=(python3 -m pfp.train "${common[@]}" ${model[$n]} --steps "$steps" --max-minutes "$minutes"
         --out "$work/run_$n" --export "$out/$n.safetensors")
    echo "${cmd[*]}" > "$out/$n.cmd"
    "${cmd[@]}" > "$out/run_$n.log" 2>&1 &
done
wait
for n in "${names[@]}"; do
    cp "$work/run_$n/loss.csv" "$out/${n}_loss.csv" 2>/dev/null
    tail -3 "$out/run_$n.log"
done
cp "$work/grown8_config.json" "$out/"
echo "done in $((SECONDS - t0)) s"

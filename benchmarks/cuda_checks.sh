#!/usr/bin/env bash
# Everything only a GPU can show, in one run: the CUDA benchmarks, which write their tables to
# $PFP_BENCH_OUT (default here: benchmarks/results/, since this script is how GPU figures get
# published; the card's name is in each file), and the CUDA tests (Triton kernels compiled for the
# card, bf16 included). Each step has its own time limit, and a failed step does not stop the next.
#
#   bash benchmarks/cuda_checks.sh [step ...]     steps: env tune attention conv wan5b compressor memory
#                                                 models tests context generate train (default: all, in
#                                                 that order: the open issues' headline figures first),
#                                                 sweep (the Triton config sweep; only when named)
#   DRY=1 bash benchmarks/cuda_checks.sh          the same steps on this CPU, each in its CPU form (the
#                                                 benchmarks' --dry-run stand-ins, the CUDA-only pytest
#                                                 files collected and skipped), results in a temporary
#                                                 folder: checks the script itself before a GPU run
#
# The whole run keeps within PFP_CUDA_BUDGET_S seconds (default 450, under the 8 minutes one
# short GPU loan allows): a step gets at most what is left, and none starts with under 20 s left.
# The headline steps come first (the 2026-11-26 run did env, tests, attention, conv, compressor,
# context, generate and train in about 5 minutes); name steps to run others first.
# With OUT set, the log and a tarball of the CUDA results this run wrote are copied there after
# every step.
#
# Packages the GPU image lacks (diffusers; torchao for the fp8 rows; pytest-xdist; PyAV) travel as
# wheels in benchmarks/wheels/ (git-ignored): `bash benchmarks/fetch_wheels.sh` downloads them
# here, and this script installs them into /tmp/pfp_site first (name benchmarks/wheels in the
# device call's carry). Without diffusers the wan5b, models and memory steps cannot run; without
# PyAV the generate step times generate() in-process; without pytest-xdist the tests run in one
# process.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TRITON_INTERPRET=0
DRY=${DRY:-0}
if [ "$DRY" = 1 ]; then
    export PFP_BENCH_OUT=${PFP_BENCH_OUT:-$(mktemp -d /tmp/pfp_cuda_dry.XXXXXX)}
    # auto's CPU timings of the dry run stay in that folder, out of the user's tuning cache
    mkdir -p "$PFP_BENCH_OUT/tuning"
    export PFP_KERNELS_CACHE="$PFP_BENCH_OUT/tuning/cpu_tuning.json"
    DEV=cpu
else
    export PFP_BENCH_OUT=${PFP_BENCH_OUT:-$PWD/benchmarks/results}
    DEV=cuda
fi
# cpu_gpu A B: A in a dry run (the step's CPU form), B on the GPU; either may be empty
cpu_gpu() { if [ "$DRY" = 1 ]; then echo "$1"; else echo "$2"; fi; }
LOG=${OUT:+$OUT/cuda_checks.log}
LOG=${LOG:-/tmp/cuda_checks.log}
: > "$LOG"
ALL=(env tune attention conv wan5b compressor memory models tests context generate train)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=("${ALL[@]}")
for step in "${steps[@]}"; do   # every name checked before anything runs
    known=0
    for name in "${ALL[@]}" sweep; do [ "$step" = "$name" ] && known=1; done
    if [ $known = 0 ]; then
        echo "unknown step '$step' (${ALL[*]} sweep)" | tee -a "$LOG"
        exit 2
    fi
done
BUDGET=${PFP_CUDA_BUDGET_S:-450}
STAMP=$(mktemp /tmp/pfp_cuda_stamp.XXXXXX)   # results newer than this are this run's

if [ "$DRY" != 1 ] && ls benchmarks/wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pfp_site \
        benchmarks/wheels/*.whl >> "$LOG" 2>&1 && export PYTHONPATH="/tmp/pfp_site:$PYTHONPATH"
fi

save() {
    if [ -n "${OUT:-}" ]; then
        tar czf "$OUT/cuda_results.tgz" $(find "$PFP_BENCH_OUT" -iname '*cuda*' -type f -newer "$STAMP" 2>/dev/null) \
            /tmp/pfp_cuda_junit.xml 2>/dev/null || true
    fi
}

run() {  # run LIMIT_S NAME CMD...
    local limit=$1 name=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: not run (the ${BUDGET}s budget is spent)" | tee -a "$LOG"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s$(cpu_gpu ", dry run on the CPU" "")): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "=== $name: rc $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
    save
}

for step in "${steps[@]}"; do
    case $step in
        env)
            run 60 env bash -c 'nvidia-smi 2>/dev/null || echo "nvidia-smi: not here"; python3 -c "import sys, torch, triton; print(sys.version); \
print(torch.__version__, triton.__version__, torch.version.cuda, torch.backends.cudnn.version()); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\", \
torch.cuda.get_device_capability() if torch.cuda.is_available() else \"\")"; python3 -m pfp_kernels.info; \
for m in diffusers av torchao flash_attn flash_attn_interface xdist pytest_benchmark; do python3 -c "import $m; \
print(\"$m\", getattr($m, \"__version__\", \"\"))" 2>/dev/null || echo "$m: not importable"; done' ;;
        tune)
            # auto's measured choices on this card (issue 24): the paper's attention at B=1 and 2,
            # Nc=0/1000/5460/20000, forward and forward+backward, and the 480p conv stages; each
            # line lists every candidate's time, the stock SDPA over the concatenation among them.
            # Into a cache file of its own, which the later steps' auto then reads (a dry run only
            # shows the table).
            if [ "$DRY" = 1 ]; then
                run 60 tune python3 -m pfp_kernels.info
            else
                mkdir -p "$PFP_BENCH_OUT/tuning"
                export PFP_KERNELS_CACHE="$PFP_BENCH_OUT/tuning/cuda_tuning.json"
                run 150 tune python3 -m pfp_kernels.info --tune --device cuda
            fi ;;
        attention)
            run 120 attention python3 -m pytest benchmarks/bench_attention.py -k cuda --benchmark-only -q -rs \
                -p no:cacheprovider ;;
        conv)
            run 150 conv python3 -m pytest benchmarks/bench_conv.py -k cuda --benchmark-only -q -rs -p no:cacheprovider ;;
        compressor)
            run 90 compressor python3 -m pytest benchmarks/bench_compressor.py -k cuda --benchmark-only -q -rs \
                -p no:cacheprovider ;;
        wan5b)
            # one random-weight Wan 2.2 5B denoising step, bf16 and fp8, cached (with and without
            # the [context ; target] buffers) and joint: time and MFU (issue 24). fp8 needs torchao
            # (a wheel in benchmarks/wheels/, see the top).
            run 240 wan5b python3 benchmarks/bench_wan5b_step.py --device $DEV --steps $(cpu_gpu 2 10) $(cpu_gpu --dry-run "") ;;
        models)
            # one random-weight bf16 step of Wan 2.2 A14B's expert and of HunyuanVideo 13B at 480p, cached
            # context: time, the K/V build and peak memory (issue 25)
            run 240 models python3 benchmarks/bench_model_step.py --device $DEV --steps $(cpu_gpu 1 5) $(cpu_gpu --dry-run "") ;;
        tests)
            # -n: the Triton compiles of the many (kernel, dtype, shape) variants dominate; run them in
            # parallel where pytest-xdist is importable
            par=()
            python3 -c "import xdist" 2>/dev/null && par=(-n 8)
            run 200 tests python3 -m pytest tests/test_cuda.py -q -rs ${par[@]+"${par[@]}"} -p no:cacheprovider \
                --junitxml=/tmp/pfp_cuda_junit.xml ;;
        sweep)
            if [ "$DRY" = 1 ]; then
                echo "=== sweep: not run (a dry run has no GPU to sweep)" | tee -a "$LOG"
            else
                run 220 sweep python3 benchmarks/sweep_cuda_configs.py --budget-s 160
            fi ;;
        context)
            run 120 context python3 benchmarks/bench_context_modes.py --device $DEV --shape $(cpu_gpu tiny all) \
                $(cpu_gpu "--steps 2" "") ;;
        train)
            run 100 train python3 benchmarks/bench_train.py --device $DEV --workers $(cpu_gpu 1 6) \
                --threads $(cpu_gpu 1 4) --steps $(cpu_gpu 2 40) ;;
        generate)
            run 90 generate python3 benchmarks/bench_generate.py --device $DEV --runs $(cpu_gpu 1 3) ;;
        memory)
            # memory plans on the GPU, and a random-weight Wan 2.2 5B's measured phase peaks against
            # the planner's (issue 23)
            run 300 memory python3 benchmarks/bench_memory.py --device $DEV --runs $(cpu_gpu 1 2) \
                $(cpu_gpu "--dry-run --skip-5b" "") ;;
        *)
            echo "unknown step '$step'" | tee -a "$LOG"   # (refused above; kept for edits that add a name)
            exit 2 ;;
    esac
done

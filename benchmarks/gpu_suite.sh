#!/usr/bin/env bash
# flaxlab's GPU suite: correctness that needs a GPU, then every speed target against its
# PyTorch peer, in one command, within 9 minutes on one H100 / H200 class GPU.
#
#   bash benchmarks/gpu_suite.sh                 # on a machine with an NVIDIA GPU
#   bash benchmarks/gpu_suite.sh --cpu_smoke     # the same parts at tiny sizes on the CPU
#   bash benchmarks/gpu_suite.sh --out_dir=DIR   # where the JSON reports go
#   bash benchmarks/gpu_suite.sh --parts=gpt2,rnn  # some of the parts only
#
# Parts, in order, each under its own time limit (seconds), each writing its JSON report
# (or JUnit XML) into the output directory as it finishes, so a part that fails or runs
# out of time costs only itself:
#   tests    pytest -m gpu tests/gpu: cuDNN attention == reference (causal, padding), KV
#            cache == full forward, cuDNN LSTM == scan, bf16 training == f32 perplexity
#   gpt2     benchmarks/gpt2_train_step.py, GPT-2 small B 16 x T 1024 vs torch.compile
#   clip     benchmarks/clip_train_step.py, ViT-B/16 CLIP B 256 vs the open_clip peer
#   rnn      benchmarks/rnn_step.py, 2-layer LSTM / GRU, f32 and bf16, vs cuDNN
#   decode   benchmarks/decode_step.py, GPT-2 small batch-1 decoding, int8 vs bf16
# and last benchmarks/suite_summary.py prints one table of every ratio beside its target
# and writes gpu_suite.json. Default output directory: benchmarks/results/gpu_suite/<GPU
# name> (commit it with the device named); with --cpu_smoke a fresh temporary directory.
#
# The peers run in the interpreter of $PEER_PYTHON (default: python3) and need torch
# (open_clip / torchao where installed); flaxlab's own parts need `pip install -e .` and a
# CUDA build of jax. Exit status: 0 when every part ran to the end (whether or not its
# targets were met: the table says), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

smoke=0
out_dir=""
parts=",tests,gpt2,clip,rnn,decode,"
for arg in "$@"; do
  case "$arg" in
    --cpu_smoke) smoke=1 ;;
    --out_dir=*) out_dir="${arg#--out_dir=}" ;;
    --parts=*) parts=",${arg#--parts=}," ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $arg; allowed: --cpu_smoke, --out_dir=DIR," \
          "--parts=tests,gpt2,clip,rnn,decode" >&2
       exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
PEER_PY=${PEER_PYTHON:-$PY}
if [[ $smoke == 1 ]]; then
  out_dir=${out_dir:-$(mktemp -d)}
  export JAX_PLATFORMS=cpu   # tests/gpu run at their smoke sizes on the CPU
  limits=(tests=300 gpt2=120 clip=120 rnn=90 decode=90)
  peer=(--peer_device=cpu --peer_python="$PEER_PY")
  gpt2=(--variant=tiny --batch=4 --seq_len=32 --vocab=512 --steps=2 --windows=2 --warmup=1
        --peer_mode=eager)
  clip=(--towers=tiny --batch=8 --dtype=float32 --steps=2 --windows=2 --warmup=1
        --peer_mode=eager --peer_threads=1)
  rnn=(--batch=4 --seq_len=8 --input=16 --hidden=32 --steps=2 --windows=2 --warmup=1)
  decode=(--variant=tiny --vocab=256 --prompt_len=8 --new_tokens=4 --windows=2 --warmup=1
          --compare=bf16,int8 --loop=step --peer_mode=eager --peer_threads=1)
else
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  if [[ -z $gpu ]]; then
    echo "gpu_suite.sh: no NVIDIA GPU (nvidia-smi found none); --cpu_smoke runs the suite" \
         "on the CPU at tiny sizes" >&2
    exit 2
  fi
  out_dir=${out_dir:-benchmarks/results/gpu_suite/${gpu// /_}}
  # tests/conftest.py pins JAX to the CPU unless JAX_PLATFORMS is set; empty = every
  # platform jax finds, the GPU first.
  export JAX_PLATFORMS=""
  # 9 minutes in all: compile times included (torch.compile of GPT-2 ~1 min, XLA ~40 s).
  limits=(tests=110 gpt2=160 clip=110 rnn=80 decode=60)
  peer=(--peer_python="$PEER_PY")
  gpt2=(--compare=base)
  clip=()
  rnn=()
  decode=()
fi
mkdir -p "$out_dir"
echo "gpu_suite: reports in $out_dir"

limit() { for kv in "${limits[@]}"; do [[ ${kv%%=*} == "$1" ]] && echo "${kv#*=}"; done; }
failed=()
part() {   # part NAME COMMAND...: run under its limit, log to <out_dir>/NAME.log
  local name=$1; shift
  [[ $parts == *",$name,"* ]] || return 0
  local t0=$SECONDS
  echo "== $name (limit $(limit "$name") s): $*"
  timeout --signal=TERM --kill-after=10 "$(limit "$name")" "$@" 2>&1 | tee "$out_dir/$name.log"
  local code=${PIPESTATUS[0]}
  echo "== $name: exit $code after $((SECONDS - t0)) s"
  [[ $code == 0 ]] || failed+=("$name($code)")
}

part tests "$PY" -m pytest -q -p no:xdist -m gpu tests/gpu --junitxml="$out_dir/gpu_tests.xml"
part gpt2 "$PY" benchmarks/gpt2_train_step.py "${gpt2[@]}" "${peer[@]}" \
  --out="$out_dir/gpt2_train_step.json"
part clip "$PY" benchmarks/clip_train_step.py "${clip[@]}" "${peer[@]}" \
  --out="$out_dir/clip_train_step.json"
part rnn "$PY" benchmarks/rnn_step.py "${rnn[@]}" "${peer[@]}" --out="$out_dir/rnn_step.json"
part decode "$PY" benchmarks/decode_step.py "${decode[@]}" "${peer[@]}" \
  --out="$out_dir/decode_step.json"

echo
"$PY" benchmarks/suite_summary.py --dir="$out_dir"
if (( ${#failed[@]} )); then
  echo "gpu_suite: parts that did not finish: ${failed[*]}"
  exit 1
fi

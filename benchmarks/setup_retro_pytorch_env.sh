#!/usr/bin/env bash
# Creates benchmarks/.venv-retro-pytorch: a separate environment holding retro-pytorch 0.3.9, the reference that
# benchmarks/bench_retro_pytorch.py times our RETRO against. It is kept apart from the project's environment because
# retro-pytorch pulls in autofaiss, which pins numpy<2 (and so needs pyarrow<15 beside it); the package itself never
# depends on retro-pytorch.
#
# Usage: bash benchmarks/setup_retro_pytorch_env.sh
#   PYTHON=python3.11   interpreter to build the environment from (default: python3)
#   TORCH=torch==2.13.0 torch requirement (the same version as the project's environment, so only the RETRO code differs)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-retro-pytorch"
python="${PYTHON:-python3}"
torch_req="${TORCH:-torch==2.13.0}"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import retro_pytorch" 2>/dev/null; then
    echo "retro-pytorch environment already present: $venv"
    exit 0
fi

echo "creating $venv (from $($python -V 2>&1))"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "$torch_req"
# autofaiss (a retro-pytorch dependency) pins numpy<2; pyarrow 15+ is built against numpy 2, so it is capped too.
"$venv/bin/python" -m pip install -q "$torch_req" "retro-pytorch==0.3.9" "numpy<2" "pyarrow<15"
"$venv/bin/python" -c "import torch, retro_pytorch, numpy; print('ok: torch', torch.__version__, '| numpy', numpy.__version__)"
echo "done: python -m benchmarks --only retro_pytorch will now time retro-pytorch beside our RETRO"

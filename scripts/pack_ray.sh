#!/usr/bin/env bash
# Build .carry/ray-py312.tar.xz: Ray (default 2.60.0) for CPython 3.12 on x86-64 Linux, plus the
# Python packages of ray[train,tune,data] that the GPU image lacks (jsonschema and its helpers,
# tensorboardX, pydantic), unpacked, trimmed (no rllib, serve, llm, jars, tests, dashboard .map
# files) and packed with xz -6, for a GPU node that has no network and no Ray:
# scripts/gpu_check.sh unpacks it onto PYTHONPATH. Needs pip with network access (here, not there).
#
#   scripts/pack_ray.sh            # -> .carry/ray-py312.tar.xz (ignored by git; < 60 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RAY_VERSION=${RAY_VERSION:-2.60.0}
OUT=.carry/ray-py312.tar.xz
# already in the GPU image (KINDS.md "Python packages already there"): not carried
SKIP='^(numpy|protobuf|packaging|typing_extensions|attrs|pyyaml|requests|click|filelock|msgpack'
SKIP+='|pandas|pyarrow|fsspec|idna|urllib3|certifi|charset_normalizer)-'
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux_2_28_x86_64)
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$WORK/whl" "ray==$RAY_VERSION"
# the extras' pure-Python needs (and rpds-py, pydantic-core: binary, cp312), with their deps
"$PY" -m pip download -q "${PLAT[@]}" -d "$WORK/deps" jsonschema tensorboardX "pydantic>=2.5,<3"
for w in "$WORK"/deps/*.whl; do
    if ! basename "$w" | grep -qiE "$SKIP"; then mv "$w" "$WORK/whl/"; fi
done
mkdir -p "$WORK/site"
for w in "$WORK"/whl/*.whl; do
    unzip -q -o "$w" -d "$WORK/site" -x 'ray/rllib/*' 'ray/serve/*' 'ray/llm/*' 'ray/jars/*' \
        '*/tests/*' '*.map'
done
rm -rf "$WORK"/site/ray/rllib "$WORK"/site/ray/serve "$WORK"/site/ray/llm "$WORK"/site/ray/jars
find "$WORK/site" -name '__pycache__' -prune -exec rm -rf {} +
chmod +x "$WORK"/site/ray/core/src/ray/raylet/raylet "$WORK"/site/ray/core/src/ray/gcs/gcs_server \
    2>/dev/null || true
mkdir -p .carry
tar -C "$WORK/site" -cf - . | xz -6 -T0 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
ls "$WORK/whl" | sed 's/^/  carried: /'
echo "wrote $OUT: $(du -m "$OUT" | cut -f1) MiB ($(du -sm "$WORK/site" | cut -f1) MiB unpacked)"

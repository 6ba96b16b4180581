#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.py on the lent GPU machine (Python 3.12, torch 2.11, no network, no
# nnunetv2/diffusers/open_clip/...). Run HERE, once, from the repository root; it fills .whl/ (git-ignored
# through .git/info/exclude) with what the GPU machine lacks, about 55 MB in all:
#   nnunetv2 2.8.1 and what it imports that the machine lacks: dynamic-network-architectures, batchgenerators,
#   batchgeneratorsv2, acvl-utils (sdist only on PyPI: built into a py3-none-any wheel here), blosc2 (+ ndindex,
#   numexpr), nibabel, yacs, graphviz, connected-components-3d, future; SimpleITK; diffusers; open_clip_torch
#   (+ ftfy, wcwidth).
# SimpleITK's wheel is 53 MB (the working tree may carry 64 MiB in all), so it is repacked as an xz tarball of
# its installed files (29 MB) and unpacked with tar there. Not carried, because the machine has them: numpy,
# scipy, scikit-image, scikit-learn, matplotlib, pandas, seaborn, tqdm, timm, pillow, torchvision, einops,
# huggingface-hub, safetensors, regex, requests, filelock, tifffile, msgpack, httpx, rich, pyyaml, packaging,
# threadpoolctl. imagecodecs (26 MB, in nnunetv2's requirements) is left out: nothing on the 2D PNG path
# imports it.
#
# On the GPU machine (run tool, carry [".whl"]), before the check:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   tar xJf .whl/SimpleITK-2.5.7.tar.xz -C /tmp/site
#   python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/proj .
#   export PYTHONPATH=/tmp/proj:/tmp/site
# (the project must be installed, not just put on PYTHONPATH: setup.py maps trainers/ to nndiffseg.trainers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=""
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS="$PLATFORMS --platform ${p}_x86_64"
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS -d .whl \
  nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 \
  diffusers==0.42.1 open_clip_torch==3.3.0 blosc2==4.14.1 nibabel==5.4.2 yacs==0.1.8 \
  connected-components-3d==4.1.1 ftfy==6.3.1 wcwidth==0.9.4 ndindex==1.10.1 numexpr==2.14.2 graphviz==0.21 \
  future==1.0.0
if ! ls .whl/acvl_utils-0.2.6-*.whl >/dev/null 2>&1; then  # no wheel on PyPI: build one (pure Python)
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" acvl-utils==0.2.6
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$tmp"/acvl_utils-0.2.6.tar.gz
  rm -rf "$tmp"
fi
if [ ! -f .whl/SimpleITK-2.5.7.tar.xz ]; then
  tmp=$(mktemp -d)
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d "$tmp" SimpleITK==2.5.7
  (cd "$tmp" && mkdir files && unzip -q -d files simpleitk-2.5.7-*.whl)
  tar -C "$tmp/files" -cf - . | xz -6 -T0 > .whl/SimpleITK-2.5.7.tar.xz.part
  mv .whl/SimpleITK-2.5.7.tar.xz.part .whl/SimpleITK-2.5.7.tar.xz
  rm -rf "$tmp"
fi
rm -f .whl/simpleitk-*.whl .whl/imagecodecs-*.whl
ls -l .whl
du -cb .whl/* | tail -1

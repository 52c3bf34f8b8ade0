#!/usr/bin/env bash
# Gathers an offline GPU-check kit (docs/dev/gpu-offline-kit.md): everything an offline GPU node
# that already has Python, a CUDA build of torch and the large compiled
# packages (numpy, pillow, scipy, matplotlib, OpenCV) needs to build mmcv against its torch, install the plugin and run
# tools/gpu/gpu_check.sh, in ONE git-ignored folder (default gpu_kit/,
# at most ~60 MB):
#
#   wheels/   the manylinux wheels, for the node's Python, of mmengine 0.10.7,
#             mmdet 3.3.0, pycocotools, shapely, pyyaml and their pure-Python
#             requirements (addict, termcolor, yapf, rich, tqdm, ...), pytest
#             (gpu_check's CUDA tests), plus the build tools
#             setuptools>=77,<82 (mmcv 2.1.0's setup.py imports pkg_resources),
#             wheel and ninja
#   sdist/    mmcv 2.1.0's source distribution (built on the node, against the
#             node's torch)
#   src/      this repository as it is now (tracked and untracked, not ignored,
#             files): the plugin, its tests, tools and configs
#   run_offline_check.sh, check_env.py, kit_manifest.py   the node's side
#   kit.env, MANIFEST.txt                                   what is in it
#
# Never in the kit: torch, torchvision, torchaudio, triton, nvidia-* (the
# node's own are used). Assumed on the node (not in the kit, checked there
# before anything is built): see `python tools/gpu/kit_manifest.py node-has`,
# or give the list with --node-has.
#
# Usage (on a machine with pip access to PyPI):
#   bash tools/gpu/prepare_offline.sh [--python 3.12] [--out DIR]
#        [--node-has "numpy scipy ..."] [--dry-run]
# Environment: CENET_KIT_PYTHON (3.12), CENET_KIT_DIR (<repo>/gpu_kit),
# CENET_KIT_NODE_HAS, CENET_KIT_PIP_PYTHON (the python whose pip downloads;
# python3), CENET_KIT_MAX_MB (60: a larger kit is reported as over the limit).
# --dry-run prints the commands and the assumptions, downloads nothing.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/tools/gpu"
TARGET_PY="${CENET_KIT_PYTHON:-3.12}"
KIT="${CENET_KIT_DIR:-$ROOT/gpu_kit}"
PIP_PY="${CENET_KIT_PIP_PYTHON:-python3}"
MAX_MB="${CENET_KIT_MAX_MB:-60}"
NODE_HAS="${CENET_KIT_NODE_HAS:-}"
DRY_RUN=0
MMENGINE_VERSION=0.10.7
MMCV_VERSION=2.1.0
MMDET_VERSION=3.3.0
while [ $# -gt 0 ]; do
  case "$1" in
    --python) TARGET_PY="$2"; shift 2 ;;
    --out) KIT="$2"; shift 2 ;;
    --node-has) NODE_HAS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,32p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "[kit] unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
case "$KIT" in /*) ;; *) KIT="$PWD/$KIT" ;; esac
if ! [[ "$TARGET_PY" =~ ^3\.[0-9]+$ ]]; then
  echo "[kit] --python wants MAJOR.MINOR (e.g. 3.12), got '$TARGET_PY'" >&2
  exit 2
fi
[ -n "$NODE_HAS" ] || NODE_HAS="$("$PIP_PY" "$HERE/kit_manifest.py" node-has)"
PY_TAG="cp${TARGET_PY/./}"
# the node's glibc is assumed >= 2.28 (manylinux_2_28): wheels for older
# glibc run there too; pip matches each tag exactly, so all are listed
PLATFORMS=()
for minor in 28 27 26 25 24 23 22 21 20 19 18 17; do PLATFORMS+=(--platform "manylinux_2_${minor}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
TARGET=(--python-version "$TARGET_PY" --implementation cp "${PLATFORMS[@]}" --only-binary=:all:)
# pytest runs gpu_check's CUDA tests (the planned node has it: dropped then)
REQUIREMENTS=("mmengine==$MMENGINE_VERSION" "mmdet==$MMDET_VERSION" pycocotools
              "setuptools>=77,<82" wheel ninja pytest)

say() { echo "[kit] $*"; }
quiet() {  # drop pip's warnings about missing local index entries
  "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
run() {  # print, and run unless a dry run
  echo "+ $*"
  if [ "$DRY_RUN" != "1" ]; then quiet "$@"; fi
}
trap 'echo "[kit] FAILED (line $LINENO): see the output above" >&2' ERR

say "kit for CPython $TARGET_PY ($PY_TAG, manylinux x86_64, glibc >= 2.28) in $KIT"
say "never in the kit: torch torchvision torchaudio triton nvidia-* (the node's own)"
say "assumed on the node (not in the kit): $NODE_HAS"
if [ "$DRY_RUN" = "1" ]; then say "dry run: the commands, nothing is downloaded or written"; fi

if [ -e "$KIT" ] && [ ! -f "$KIT/kit.env" ] && [ -n "$(ls -A "$KIT" 2>/dev/null)" ]; then
  echo "[kit] $KIT exists and is not a kit (no kit.env): not overwritten; choose --out" >&2
  exit 2
fi
STAGE="${TMPDIR:-/tmp}/cenet-kit-stage"
if [ "$DRY_RUN" != "1" ]; then
  STAGE="$(mktemp -d "${TMPDIR:-/tmp}/cenet-kit.XXXXXX")"
  trap 'rm -rf "$STAGE"' EXIT
  rm -rf "$KIT"
  mkdir -p "$KIT/wheels" "$KIT/sdist" "$KIT/src"
fi

say "1/5 resolve the requirements for $PY_TAG (pip's report, no install)"
run quiet "$PIP_PY" -m pip install --disable-pip-version-check --dry-run --ignore-installed \
  --quiet --report "$STAGE/report.json" --target "$STAGE/target" "${TARGET[@]}" "${REQUIREMENTS[@]}"

say "2/5 keep what the node lacks; download those wheels"
echo "+ $PIP_PY $HERE/kit_manifest.py select $STAGE/report.json --node-has \"$NODE_HAS\" > $STAGE/keep.txt"
if [ "$DRY_RUN" != "1" ]; then
  "$PIP_PY" "$HERE/kit_manifest.py" select "$STAGE/report.json" --node-has "$NODE_HAS" \
    > "$STAGE/keep.txt" 2> "$STAGE/dropped.txt"
  sed 's/^/  /' "$STAGE/dropped.txt"
  mapfile -t KEEP < "$STAGE/keep.txt"
  say "  kept: ${KEEP[*]}"
else
  KEEP=("<the kept name==version lines>")
fi
run quiet "$PIP_PY" -m pip download --disable-pip-version-check --no-deps "${TARGET[@]}" \
  -d "$KIT/wheels" "${KEEP[@]}"

say "3/5 mmcv $MMCV_VERSION source distribution"
# pip reads its metadata with setup.py, which imports pkg_resources: setuptools<82
echo "+ echo 'setuptools>=77,<82' > $STAGE/build-constraints.txt"
[ "$DRY_RUN" = "1" ] || echo 'setuptools>=77,<82' > "$STAGE/build-constraints.txt"
run env PIP_CONSTRAINT="$STAGE/build-constraints.txt" "$PIP_PY" -m pip download \
  --disable-pip-version-check --no-deps --no-binary=:all: -d "$KIT/sdist" "mmcv==$MMCV_VERSION"

say "4/5 this repository (tracked and untracked files, not the ignored ones)"
echo "+ git -C $ROOT ls-files -co --exclude-standard | (existing files) | tar -czf $KIT/src/cenet-mmdet-src.tar.gz (as cenet-mmdet/...)"
if [ "$DRY_RUN" != "1" ]; then
  (cd "$ROOT" && git ls-files -co --exclude-standard | while IFS= read -r f; do
     [ -f "$f" ] && printf '%s\n' "$f"; done | sort -u > "$STAGE/files.txt")
  tar -C "$ROOT" --transform 's,^,cenet-mmdet/,' -czf "$KIT/src/cenet-mmdet-src.tar.gz" -T "$STAGE/files.txt"
  COMMIT="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if [ -n "$(git -C "$ROOT" status --porcelain 2>/dev/null)" ]; then COMMIT="$COMMIT + uncommitted changes"; fi
fi

say "5/5 the node's side and the manifest"
run cp "$HERE/run_offline_check.sh" "$HERE/check_env.py" "$HERE/kit_manifest.py" "$KIT/"
if [ "$DRY_RUN" = "1" ]; then
  say "dry run done: nothing was written"
  exit 0
fi
chmod +x "$KIT/run_offline_check.sh"
{
  echo "KIT_PYTHON=$TARGET_PY"
  echo "KIT_PY_TAG=$PY_TAG"
  echo "MMCV_VERSION=$MMCV_VERSION"
  echo "MMCV_SDIST=sdist/$(cd "$KIT/sdist" && ls mmcv-*.tar.gz | head -n 1)"
  echo "SRC_TARBALL=src/cenet-mmdet-src.tar.gz"
  echo "KIT_DISTS=\"$(sed 's/==.*//' "$STAGE/keep.txt" | paste -sd' ')\""
  echo "NODE_HAS=\"$NODE_HAS\""
  echo "KIT_COMMIT=\"$COMMIT\""
  echo "KIT_DATE=\"$(date -u '+%Y-%m-%d %H:%M UTC')\""
} > "$KIT/kit.env"
SIZE_B=$(du -sb "$KIT" | cut -f1)
SIZE_MB=$(awk -v b="$SIZE_B" 'BEGIN{printf "%.1f", b / 1e6}')
{
  echo "cenet-mmdet offline GPU-check kit, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "source: $COMMIT; target: CPython $TARGET_PY manylinux x86_64 (glibc >= 2.28)"
  echo "size: $SIZE_MB MB ($SIZE_B bytes)"
  echo
  echo "On the node, in this folder:"
  echo "  CENET_GPU_CHECK_OUT=/some/folder bash run_offline_check.sh"
  echo "(CENET_NODE_PYTHON=the python that has the node's torch; CENET_MMCV_CUDA=0 builds"
  echo " mmcv's CPU ops only; docs/dev/gpu-offline-kit.md in src/ says more)"
  echo
  echo "Assumed on the node, not in the kit: torch (CUDA), $NODE_HAS"
  echo "Dropped from pip's resolution:"
  sed 's/^/  /' "$STAGE/dropped.txt"
  echo
  echo "Files:"
  (cd "$KIT" && find . -type f ! -name MANIFEST.txt -printf '%10s  %P\n' | sort -k2)
} > "$KIT/MANIFEST.txt"
say "kit ready: $KIT, $SIZE_MB MB ($(find "$KIT/wheels" -name '*.whl' | wc -l) wheels, mmcv sdist, source)"
if awk -v s="$SIZE_MB" -v m="$MAX_MB" 'BEGIN{exit !(s > m)}'; then
  say "WARNING: $SIZE_MB MB is over the ${MAX_MB} MB limit (CENET_KIT_MAX_MB): assume more on the node (--node-has)"
  exit 3
fi

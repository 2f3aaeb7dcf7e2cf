#!/usr/bin/env bash
# Compiles the ATen-free CUDA kernels (the first half of every
# csrc/cuda/<op>.cu, gathered by kernels/cuda/pascal_sm61.cu) for sm_61, the
# GTX 1080 Ti, with Debian's CUDA 11.8 toolkit (CUDA 13 cannot target Pascal).
# Installs the toolkit from the contrib/non-free components of the machine's
# Debian source when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

toolkit_bin=/usr/lib/nvidia-cuda-toolkit/bin
if [ ! -x "$toolkit_bin/nvcc" ]; then
  source_file=/etc/apt/sources.list.d/debian.sources
  uri=$(awk '/^URIs:/ {print $2; exit}' "$source_file")
  suites=$(awk '/^Suites:/ {$1=""; print; exit}' "$source_file")
  cat > /etc/apt/sources.list.d/drsl-fast-cuda118.sources <<SOURCES
Types: deb
URIs: ${uri}
Suites:${suites}
Components: contrib non-free
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit >/dev/null
fi

# The package's own bin first, then /usr/bin for its ptxas (CUDA 13's ptxas in
# /usr/local/bin rejects sm_61).
out=$(mktemp -d)
PATH="$toolkit_bin:/usr/bin:$PATH" "$toolkit_bin/nvcc" --version | tail -n 2
# A register spill fails the check: none of the kernels spills for sm_61.
PATH="$toolkit_bin:/usr/bin:$PATH" "$toolkit_bin/nvcc" -arch=sm_61 -Xptxas -warn-spills,-Werror \
  -c kernels/cuda/pascal_sm61.cu -o "$out/pascal_sm61.o"
cuobjdump_bin=$(PATH="$toolkit_bin:/usr/bin:$PATH" command -v cuobjdump || true)
if [ -n "$cuobjdump_bin" ]; then
  "$cuobjdump_bin" --list-elf "$out/pascal_sm61.o" | grep -q sm_61
fi
rm -rf "$out"
echo "sm_61 (GTX 1080 Ti): the CUDA kernels compile with CUDA 11.8"

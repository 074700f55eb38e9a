# Shared settings for the arm/ scripts (sourced, not run).
# Everything lives under ~/.cache/picospec (override with PICOSPEC_ARM_CACHE): nothing is installed
# over the host except Debian's qemu-user-static and the aarch64 cross compilers.
set -euo pipefail

ARM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"      # the repository
ARM_CACHE="${PICOSPEC_ARM_CACHE:-$HOME/.cache/picospec/arm64}"
SYSROOT="$ARM_CACHE/sysroot"                                      # Debian bookworm arm64, extracted
APTDIR="$ARM_CACHE/apt"                                           # a private apt state (arch arm64)
# the edge's Python packages (aarch64 wheels); a folder of its own, put on PYTHONPATH
SITE="$SYSROOT/opt/picospec/site-packages"
ARM_PY="$SYSROOT/usr/bin/python3.11"
ARM_PYW="$SYSROOT/usr/bin/python3-qemu"                           # x86 script: qemu + ARM_PY (sysroot.sh)
QEMU="${QEMU:-qemu-aarch64-static}"

LLAMA_VERSION="${LLAMA_VERSION:-0.3.36}"
# What a Raspberry Pi 5 (Cortex-A76) build would use, native detection off. mtmd (llava, the
# multimodal library) is left out: the edge never loads it and it is a third of the build.
ARM_LLAMA_CMAKE_ARGS="${ARM_LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 -DLLAVA_BUILD=OFF}"
ARM_WHEELS="$HOME/.cache/picospec/wheels/$(echo "aarch64 $LLAMA_VERSION $ARM_LLAMA_CMAKE_ARGS" | md5sum | cut -c1-10)"

# run an aarch64 program of the sysroot under user-mode emulation (binfmt_misc is not relied on)
arm_run() { "$QEMU" -L "$SYSROOT" "$@"; }
# the emulated Python with the edge's packages and this repository on its path
arm_python() {
  PYTHONPATH="$ARM_ROOT:$SITE" "$ARM_PYW" "$@"
}

# pip's warnings about this machine's unused local index folders are noise in the PASS/FAIL output
quiet_pip() { grep -v "is neither a file nor a directory" || true; }
say() { printf '[arm] %s\n' "$*" >&2; }

#!/usr/bin/env bash
# Cross-compiles llama-cpp-python for aarch64 (Raspberry Pi 5 flags) with Debian's aarch64 gcc, on
# the x86 host at native compiler speed (a build inside the emulator is many times slower), and
# installs it into the sysroot's site-packages. The wheel is cached per version and flags under
# ~/.cache/picospec/wheels/<hash>/, like the x86 one, so later runs skip the build.
source "$(dirname "$0")/env.sh"

mkdir -p "$ARM_WHEELS"
wheel=$(ls "$ARM_WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*linux_aarch64.whl 2>/dev/null | head -1 || true)
if [[ -z "$wheel" ]]; then
  say "cross-compiling llama-cpp-python $LLAMA_VERSION for aarch64 ($ARM_LLAMA_CMAKE_ARGS); a few minutes, once"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  pip=(python3 -m pip)
  [[ -x "$ARM_ROOT/.venv/bin/pip" ]] && pip=("$ARM_ROOT/.venv/bin/pip")
  # scikit-build-core names the wheel after the host; _PYTHON_HOST_PLATFORM makes it linux_aarch64
  _PYTHON_HOST_PLATFORM=linux-aarch64 \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  CMAKE_ARGS="-DCMAKE_TOOLCHAIN_FILE=$ARM_ROOT/arm/aarch64-toolchain.cmake $ARM_LLAMA_CMAKE_ARGS" \
    nice -n 19 "${pip[@]}" wheel -q --disable-pip-version-check --no-cache-dir --no-deps -w "$tmp" \
    "llama-cpp-python==$LLAMA_VERSION" 2> >(quiet_pip >&2)
  built=$(ls "$tmp"/llama_cpp_python-*.whl)
  case "$built" in
    *linux_aarch64.whl) ;;
    *) # an older scikit-build-core ignored _PYTHON_HOST_PLATFORM: retag (the wheel is py3-none)
       "${pip[@]}" install -q --disable-pip-version-check wheel >/dev/null
       "$(dirname "${pip[0]}")/python" -m wheel tags --remove --platform-tag linux_aarch64 "$built" >/dev/null ;;
  esac
  built=$(ls "$tmp"/llama_cpp_python-*linux_aarch64.whl)
  # the libraries must be aarch64, not x86 objects in an aarch64-named wheel
  (cd "$tmp" && python3 -m zipfile -e "$built" x >/dev/null && file x/llama_cpp/lib/libllama.so | grep -q 'ARM aarch64') \
    || { say "FAIL: the built libllama.so is not aarch64"; exit 1; }
  mv "$built" "$ARM_WHEELS/"
  wheel="$ARM_WHEELS/$(basename "$built")"
fi
say "wheel: $wheel"

if [[ ! -e "$SITE/.llama-$LLAMA_VERSION-$(basename "$ARM_WHEELS")" ]]; then
  rm -rf "$SITE"/llama_cpp "$SITE"/llama_cpp_python-*.dist-info
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$SITE" --upgrade \
    --only-binary=:all: --platform linux_aarch64 --implementation cp --python-version 3.11 "$wheel"
  rm -f "$SITE"/.llama-*
  touch "$SITE/.llama-$LLAMA_VERSION-$(basename "$ARM_WHEELS")"
fi
say "llama-cpp-python $LLAMA_VERSION (aarch64) in $SITE"

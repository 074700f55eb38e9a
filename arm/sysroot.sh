#!/usr/bin/env bash
# Builds an arm64 (aarch64) sysroot for the PicoSpec edge, on an x86_64 Debian host:
#   1. Debian bookworm's arm64 python3.11 and the libraries it and llama.cpp need, downloaded with a
#      private apt state (its own lists, status and cache, APT::Architecture=arm64, the host's
#      sources) and extracted with dpkg -x. The host's dpkg and apt state are left as they were.
#   2. The edge's Python packages from their aarch64 wheels on PyPI (pip --platform, binaries
#      only), pinned to the versions of the x86 .venv when it has them.
# Idempotent: a finished step leaves a stamp and is skipped next time.
source "$(dirname "$0")/env.sh"

need() { command -v "$1" >/dev/null 2>&1; }
host_tools() {
  local missing=()
  need "$QEMU" || missing+=(qemu-user-static)
  need aarch64-linux-gnu-gcc || missing+=(gcc-aarch64-linux-gnu)
  need aarch64-linux-gnu-g++ || missing+=(g++-aarch64-linux-gnu)
  need cmake || missing+=(cmake)
  if ((${#missing[@]})); then
    say "installing host tools: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# the arm64 packages: the interpreter (with its stdlib's C libraries), and the runtime of the
# cross-compiled llama.cpp (libstdc++, libgomp); apt resolves the rest
DEBS=(python3.11 libpython3.11-stdlib libgomp1 libstdc++6 libgcc-s1 ca-certificates)

debian_sysroot() {
  [[ -e "$SYSROOT/.debs-done" ]] && return 0
  mkdir -p "$APTDIR"/{lists/partial,archives/partial,etc/preferences.d} "$SYSROOT"
  : > "$APTDIR/status"
  local apt=(apt-get -qq
    -o APT::Architecture=arm64 -o APT::Architectures::=arm64
    -o Dir::State="$APTDIR" -o Dir::State::Lists="$APTDIR/lists" -o Dir::State::status="$APTDIR/status"
    -o Dir::Cache="$APTDIR" -o Dir::Cache::archives="$APTDIR/archives"
    -o Dir::Etc::preferencesparts="$APTDIR/etc/preferences.d"
    -o Debug::NoLocking=1 -o APT::Install-Recommends=false -o APT::Sandbox::User=root)
  say "arm64 package lists (private apt state in $APTDIR)"
  "${apt[@]}" update
  say "downloading arm64 ${DEBS[*]} and their dependencies"
  "${apt[@]}" -y --download-only install "${DEBS[@]}"
  local n=0 deb
  for deb in "$APTDIR"/archives/*.deb; do
    dpkg-deb -x "$deb" "$SYSROOT"; n=$((n + 1))
  done
  say "extracted $n arm64 packages into $SYSROOT"
  # usrmerge: bookworm's packages ship /lib and /usr/lib; the loader is looked up as /lib/ld-linux-aarch64.so.1
  [[ -e "$SYSROOT/lib/ld-linux-aarch64.so.1" ]] || { say "no arm64 dynamic loader in the sysroot"; exit 1; }
  arm_run "$ARM_PY" -c 'import platform, ssl, sqlite3 as _; print("[arm] emulated", platform.machine(), platform.python_version())' \
    2>/dev/null || arm_run "$ARM_PY" -c 'import platform; print("[arm] emulated", platform.machine(), platform.python_version())'
  touch "$SYSROOT/.debs-done"
}

# the edge's extra plus what its tests use; versions from the x86 .venv where it has them
PY_PKGS=(numpy aiohttp msgpack zstandard psutil diskcache jinja2 typing-extensions pytest hypothesis pytest-timeout)

python_packages() {
  [[ -e "$SITE/.pkgs-done" ]] && return 0
  mkdir -p "$SITE"
  local pins=() p v
  if [[ -x "$ARM_ROOT/.venv/bin/python" ]]; then
    for p in "${PY_PKGS[@]}"; do
      v=$("$ARM_ROOT/.venv/bin/python" -c "from importlib.metadata import version; print(version('$p'))" 2>/dev/null || true)
      pins+=("$p${v:+==$v}")
    done
  else
    pins=("${PY_PKGS[@]}")
  fi
  say "aarch64 wheels: ${pins[*]}"
  # pip takes --platform tags literally: name every glibc level bookworm's 2.36 can run
  local plats=(--platform manylinux2014_aarch64 --platform linux_aarch64) g
  for g in $(seq 17 36); do plats+=(--platform "manylinux_2_${g}_aarch64"); done
  local pip=(python3 -m pip)
  [[ -x "$ARM_ROOT/.venv/bin/pip" ]] && pip=("$ARM_ROOT/.venv/bin/pip")
  "${pip[@]}" install -q --disable-pip-version-check --root-user-action=ignore --no-warn-script-location --target "$SITE" \
    --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
    "${plats[@]}" "${pins[@]}"
  touch "$SITE/.pkgs-done"
}

host_tools
debian_sysroot
python_packages
say "sysroot ready: $SYSROOT"

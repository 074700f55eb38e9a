#!/usr/bin/env bash
# A local PicoSpec cluster for trying the HAProxy setup: N `picospec serve` replicas on 127.0.0.1
# and HAProxy in front of them, configured from deploy/haproxy/picospec.cfg.
#
#   deploy/cluster.sh --replicas 2                      # edges: --cloud ws://127.0.0.1:8765
#   deploy/cluster.sh --replicas 3 --port 9000 -- --dtype bfloat16 --token "$SECRET"
#   deploy/cluster.sh --tls-pem site.pem --tls-port 8443   # wss:// terminated at HAProxy as well
#
# Options:
#   --replicas N         replicas to start (default 2)
#   --port P             HAProxy's ws:// port (default 8765)
#   --base-port B        replicas listen on B, B+1, ... (default P+1)
#   --tls-pem FILE       also serve wss:// at HAProxy (FILE: certificate chain + key, PEM)
#   --tls-port T         HAProxy's wss:// port (default 8443; with --tls-pem)
#   --stats-port S       HAProxy stats page and Prometheus metrics on 127.0.0.1:S (default 8404)
#   --workdir DIR        where the generated haproxy.cfg and the logs go (default: a new temp dir)
#   --startup-timeout S  seconds to wait for each replica to load its model (default 900)
#   --stop-timeout S     on exit, seconds each replica gets to drain after SIGTERM before SIGKILL
#                        (default 50: the verifier's 45 s drain deadline plus a margin)
#   -- ARGS...           passed to every replica (after --host 127.0.0.1 --port PORT)
# Environment:
#   PICOSPEC_SERVE       the replica command (default `picospec serve`, else `python -m cloud.cli`);
#                        the tests use `python -m tests.tiny_serve` (the tiny test target)
#   HAPROXY              the haproxy binary (default: haproxy on PATH; Debian: apt-get install haproxy)
#
# Prints one JSON line {"event": "cluster-ready", "url": ..., "replicas": [{"port", "pid"}], ...}
# once every replica and HAProxy listen, then runs until Ctrl-C / SIGTERM, which stops them all.
# The replicas get SIGTERM (their own graceful stop), HAProxy after them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
replicas=2 port=8765 base_port="" tls_pem="" tls_port=8443 stats_port=8404 workdir="" startup_timeout=900 stop_timeout=50
replica_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) replicas="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --base-port) base_port="$2"; shift 2 ;;
    --tls-pem) tls_pem="$2"; shift 2 ;;
    --tls-port) tls_port="$2"; shift 2 ;;
    --stats-port) stats_port="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --startup-timeout) startup_timeout="$2"; shift 2 ;;
    --stop-timeout) stop_timeout="$2"; shift 2 ;;
    --) shift; replica_args=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "cluster.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$replicas" -ge 1 ] 2>/dev/null || { echo "cluster.sh: --replicas must be a positive number" >&2; exit 2; }
base_port="${base_port:-$((port + 1))}"
haproxy_bin="${HAPROXY:-$(command -v haproxy || true)}"
if [ -z "$haproxy_bin" ] && [ -x /usr/sbin/haproxy ]; then haproxy_bin=/usr/sbin/haproxy; fi
[ -n "$haproxy_bin" ] || { echo "cluster.sh: haproxy not found (Debian/Ubuntu: apt-get install haproxy)" >&2; exit 3; }
if [ -n "${PICOSPEC_SERVE:-}" ]; then
  read -r -a serve <<<"$PICOSPEC_SERVE"
elif command -v picospec >/dev/null; then
  serve=(picospec serve)
else
  serve=("${PYTHON:-python3}" -m cloud.cli)
fi
workdir="${workdir:-$(mktemp -d -t picospec-cluster.XXXXXX)}"
mkdir -p "$workdir"

pids=() haproxy_pid=""
cleanup() {
  trap - EXIT INT TERM HUP
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq $((stop_timeout * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ -n "$haproxy_pid" ]; then kill -TERM "$haproxy_pid" 2>/dev/null || true; fi
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

# the replicas
ports=()
for i in $(seq 1 "$replicas"); do
  p=$((base_port + i - 1))
  ports+=("$p")
  "${serve[@]}" --host 127.0.0.1 --port "$p" "${replica_args[@]}" \
    >"$workdir/replica$i.out" 2>"$workdir/replica$i.log" &
  pids+=("$!")
done

# haproxy.cfg: the template with this cluster's ports and replicas
{
  awk -v port="$port" -v stats="$stats_port" -v pem="$tls_pem" -v tport="$tls_port" '
    /# --- replicas/ { print; skipping = 1; next }
    /# --- end replicas/ { skipping = 0 }
    skipping { next }
    /^    bind :8765$/ { print "    bind 127.0.0.1:" port; next }
    /^    # bind :8443 ssl/ && pem != "" { print "    bind 127.0.0.1:" tport " ssl crt " pem " alpn http/1.1"; next }
    /^    bind 127.0.0.1:8404$/ { print "    bind 127.0.0.1:" stats; next }
    { print }
  ' "$here/haproxy/picospec.cfg"
} >"$workdir/haproxy.cfg.in"
{
  awk '/# --- end replicas/ { exit } { print }' "$workdir/haproxy.cfg.in"
  for i in $(seq 1 "$replicas"); do echo "    server replica$i 127.0.0.1:${ports[$((i - 1))]}"; done
  awk 'found { print } /# --- end replicas/ { found = 1; print }' "$workdir/haproxy.cfg.in"
} >"$workdir/haproxy.cfg"
rm -f "$workdir/haproxy.cfg.in"
"$haproxy_bin" -c -q -f "$workdir/haproxy.cfg" >&2

# wait for every replica's ready line (it prints it once it listens)
deadline=$((SECONDS + startup_timeout))
for i in $(seq 1 "$replicas"); do
  until grep -q '"event": "ready"' "$workdir/replica$i.out" 2>/dev/null; do
    if ! kill -0 "${pids[$((i - 1))]}" 2>/dev/null; then
      echo "cluster.sh: replica $i exited; its log ($workdir/replica$i.log):" >&2
      tail -n 20 "$workdir/replica$i.log" >&2
      exit 1
    fi
    [ "$SECONDS" -lt "$deadline" ] || { echo "cluster.sh: replica $i not ready in ${startup_timeout}s" >&2; exit 1; }
    sleep 0.2
  done
done

"$haproxy_bin" -db -f "$workdir/haproxy.cfg" >"$workdir/haproxy.log" 2>&1 &
haproxy_pid=$!
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
  kill -0 "$haproxy_pid" 2>/dev/null || { echo "cluster.sh: haproxy exited:" >&2; cat "$workdir/haproxy.log" >&2; exit 1; }
  sleep 0.1
done

replica_json=""
for i in $(seq 1 "$replicas"); do
  replica_json+="${replica_json:+, }{\"port\": ${ports[$((i - 1))]}, \"pid\": ${pids[$((i - 1))]}}"
done
tls_json="null"
[ -z "$tls_pem" ] || tls_json="\"wss://127.0.0.1:$tls_port/ws\""
echo "{\"event\": \"cluster-ready\", \"url\": \"ws://127.0.0.1:$port/ws\", \"tls_url\": $tls_json," \
     "\"replicas\": [$replica_json], \"haproxy_pid\": $haproxy_pid, \"workdir\": \"$workdir\"," \
     "\"stats\": \"http://127.0.0.1:$stats_port/stats\"}"
echo "picospec cluster: $replicas replicas behind HAProxy at ws://127.0.0.1:$port/ws" \
     "(logs in $workdir; Ctrl-C stops it)" >&2

# run until told to stop, or until HAProxy dies
wait "$haproxy_pid"

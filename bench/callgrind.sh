#!/usr/bin/env bash
# Instructions per call, counted by callgrind: a figure that does not move with the machine's
# speed or its neighbours, for judging changes too small for wrk to see on a noisy VM.
#
#   bench/callgrind.sh               gateway (SQLite) and hyper-bare, 2,000 calls each
#   bench/callgrind.sh --calls N     N calls each (after 200 uncounted warm-up calls)
#   bench/callgrind.sh --stream K    streamed calls of K content chunks each instead; the
#                                    difference between two K's, divided by theirs, is the
#                                    cost of one chunk passed on
#   bench/callgrind.sh --stream K --burst   the mock sends each stream whole, in one write
#                                    (as from behind a buffering proxy), so the gateway
#                                    reads many events at once
#   bench/callgrind.sh --prompt-bytes B   each call carries a conversation of about B bytes,
#                                    built as bench/chat.lua builds it for TG_PROMPT_BYTES
#   bench/callgrind.sh --postgres    the gateway on Postgres (a fresh database at
#                                    127.0.0.1:5432, dropped at exit) instead of SQLite; the
#                                    store figure is then the gateway's side of a shipment only
#
# Each target runs under `valgrind --tool=callgrind` with instrumentation off until it has
# started and warmed up; then N non-streamed calls are made one after another on one kept-alive
# connection (concurrency 1, the body bench/chat.lua sends) and the counters dumped. The mock
# upstream and the client run natively and are not counted.
#
# Three figures:
#   - the gateway's request path, per call: everything in the process during the N calls
#     (HTTP, key check, parse, reservation, upstream call, settlement, journal append, metrics).
#     Nothing is shipped to the store meanwhile (ship_interval_ms is an hour);
#   - the gateway's store work, per record: shipping those records at shutdown, in one batch
#     (the drain at shutdown, in the dump the process writes as it exits);
#   - hyper-bare, per call: the HTTP stack alone (examples/bare_proxy.rs).
# The callgrind files stay in bench/results/callgrind/ for callgrind_annotate or KCachegrind.
# Knobs: BENCH_SKIP_BUILD=1, BENCH_KEEP_TMP=1, BENCH_TOLLGATE=path (another build of the
# gateway, e.g. the previous commit's, for a before/after; the mock is this checkout's build
# either way). Never run by `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CALLS=2000
WARMUP=200
STREAM_CHUNKS=0
MOCK_BURST=()
PROMPT_BYTES=0
BACKEND=sqlite
while (( $# )); do
  case "$1" in
    --postgres) BACKEND=postgres ;;
    --calls) CALLS=${2:?--calls needs a number}; shift ;;
    --stream) STREAM_CHUNKS=${2:?--stream needs a number of chunks}; shift ;;
    --burst) MOCK_BURST=(--burst) ;;
    --prompt-bytes) PROMPT_BYTES=${2:?--prompt-bytes needs a number of bytes}; shift ;;
    -h|--help) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[callgrind %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

need=()
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v jq >/dev/null 2>&1 || need+=(jq)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
if [[ $BACKEND == postgres ]]; then command -v psql >/dev/null 2>&1 || need+=(postgresql-client); fi
if (( ${#need[@]} )); then
  log "installing from Debian: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  log "cargo build --release"
  cargo build --release --quiet
  cargo build --release --quiet --example bare_proxy
fi
MOCK=$ROOT/target/release/tollgate
TOLLGATE=${BENCH_TOLLGATE:-$MOCK}
BARE=$ROOT/target/release/examples/bare_proxy
[[ -x $TOLLGATE && -x $BARE && -x $MOCK ]] || die "release binaries missing"

OUT=$ROOT/bench/results/callgrind
mkdir -p "$OUT"
rm -f "$OUT"/*.out.*
TMP=$(mktemp -d /tmp/tollgate-callgrind.XXXXXX)
PIDS=()
PG_DBS=()
trap_cleanup

NEXT_PORT=21700
alloc_port MOCK_PORT; alloc_port GW_PORT; alloc_port BARE_PORT

# N sequential calls on one kept-alive connection; fails on anything but 200.
calls() { # port key n
  python3 - "$@" "$STREAM_CHUNKS" "$PROMPT_BYTES" <<'EOF'
import http.client, sys
port, key, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
chunks, prompt_bytes = int(sys.argv[4]), int(sys.argv[5])
messages = '{"role":"user","content":"Say hello to the benchmark please"}'
if prompt_bytes:
    # As bench/chat.lua builds it: turns of prose with the escapes chat histories carry.
    turn = (r'The gateway forwards each call upstream and charges its exact cost.\n'
            r'A \"quoted\" phrase,\ta tab, and unicode: \u00e9t\u00e9. ')
    turns, size = [], 0
    while size < prompt_bytes:
        role = "user" if len(turns) % 2 == 0 else "assistant"
        m = '{"role":"%s","content":"%s"}' % (role, turn * 8)
        turns.append(m)
        size += len(m) + 1
    messages = ",".join(turns)
body = '{"model":"gpt-4o-mini","messages":[%s],"max_tokens":%d%s}' % (
    messages, chunks or 16, ',"stream":true' if chunks else '')
headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(n):
    conn.request("POST", "/v1/chat/completions", body, headers)
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        sys.exit(f"call {i}: status {r.status}: {data[:300]!r}")
    if chunks and not data.endswith(b"data: [DONE]\n\n"):
        sys.exit(f"call {i}: the stream did not end with [DONE]: {data[-300:]!r}")
EOF
}

# Counts since instrumentation was switched on, from one dump file.
total_ir() { awk '/^(summary|totals):/ { print $2; exit }' "$1"; }
callgrind() { # name out-prefix command...
  local name=$1 prefix=$2; shift 2
  # The environment is cleared before valgrind, not by an `env` it would have to follow.
  env -u DATABASE_URL -u TOLLGATE_ADMIN_TOKEN -u TOLLGATE_LISTEN -u TOLLGATE_DATABASE_URL \
    -u RUST_LOG valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$OUT/$prefix.out.%p" "$@" >"$TMP/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}
measure() { # pid port key → dump file of the N calls
  local pid=$1
  calls "$2" "$3" "$WARMUP" || die "warm-up calls failed"
  callgrind_control -i on "$pid" >/dev/null
  calls "$2" "$3" "$CALLS" || die "measured calls failed"
  callgrind_control -d "$pid" >/dev/null
  # The dump is written by the process itself, shortly after the request.
  for _ in $(seq 1 600); do
    ls "$OUT"/*.out."$pid".1 >/dev/null 2>&1 && break
    sleep 0.1
  done
  ls "$OUT"/*.out."$pid".1 2>/dev/null || die "no callgrind dump from $pid"
}

"$MOCK" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --chunks "$(( STREAM_CHUNKS ? STREAM_CHUNKS : 16 ))" \
  "${MOCK_BURST[@]}" >"$TMP/mock.log" 2>&1 &
PIDS+=("$!")

if [[ $BACKEND == postgres ]]; then
  new_pg_db PG_DB tollgate_callgrind
  DATABASE_URL_FOR_GW="postgres://postgres@127.0.0.1:5432/$PG_DB"
  count_records() { psql -h 127.0.0.1 -U postgres -d "$PG_DB" -Atc 'select count(*) from usage_records'; }
else
  DATABASE_URL_FOR_GW="sqlite://$TMP/tollgate.db"
  count_records() { sqlite3 "$TMP/tollgate.db" 'select count(*) from usage_records'; }
fi

cat >"$TMP/gateway.toml" <<EOF
listen = "127.0.0.1:$GW_PORT"
database_url = "$DATABASE_URL_FOR_GW"
admin_token = "callgrind-admin"
log_format = "text"

[ledger]
journal_dir = "$TMP/journal"
# Nothing ships while calls are counted (no timer, no full batch); the drain at shutdown
# ships them all, in one batch.
ship_interval_ms = 3600000
max_batch = 1000000
EOF
{ provider_toml mock "http://127.0.0.1:$MOCK_PORT/v1" 'proxy = "direct"'
  model_toml gpt-4o-mini mock; } >>"$TMP/gateway.toml"

log "gateway ($BACKEND) under callgrind: $WARMUP warm-up calls, then $CALLS counted"
callgrind tollgate tollgate "$TOLLGATE" serve --config "$TMP/gateway.toml"
GW_PID=$LAST_PID
# Valgrind starts slowly: up to 5 minutes.
wait_http "http://127.0.0.1:$GW_PORT/healthz" "$GW_PID" tollgate 3000
read -r _ KEY < <(seed_account "http://127.0.0.1:$GW_PORT" callgrind-admin callgrind@example.com 1000)
[[ $KEY == sk-* ]] || die "no API key"
GW_DUMP=$(measure "$GW_PID" "$GW_PORT" "$KEY")
# A graceful stop drains the ledger: the N calls' records (and the warm-up's) are shipped in
# the final dump, written at exit.
kill -TERM "$GW_PID"
wait "$GW_PID" 2>/dev/null || true
GW_FINAL=$(ls "$OUT"/tollgate.out."$GW_PID" 2>/dev/null) || die "no final dump from the gateway"
RECORDS=$(count_records 2>/dev/null || echo $((CALLS + WARMUP)))

log "hyper-bare under callgrind: $WARMUP warm-up calls, then $CALLS counted"
callgrind hyper-bare hyper-bare "$BARE" "127.0.0.1:$BARE_PORT" "http://127.0.0.1:$MOCK_PORT"
BARE_PID=$LAST_PID
# The bare proxy answers any path; a GET of / reaches the mock (404) once it is up.
wait_http "http://127.0.0.1:$BARE_PORT/" "$BARE_PID" hyper-bare 3000
BARE_DUMP=$(measure "$BARE_PID" "$BARE_PORT" none)
kill -KILL "$BARE_PID" 2>/dev/null || true

gw=$(total_ir "$GW_DUMP"); store=$(total_ir "$GW_FINAL"); bare=$(total_ir "$BARE_DUMP")
per() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", a / b }'; }
{
  printf '\nInstructions (callgrind Ir), %s calls at concurrency 1 after %s warm-up calls; the gateway on %s\n' "$CALLS" "$WARMUP" "$BACKEND"
  if (( STREAM_CHUNKS )); then printf '  (streamed calls of %s content chunks each%s)\n' "$STREAM_CHUNKS" \
    "${MOCK_BURST:+, each sent by the mock in one write}"; fi
  if (( PROMPT_BYTES )); then printf '  (each call with a conversation of about %s bytes)\n' "$PROMPT_BYTES"; fi
  printf '  %-44s %12s\n' figure 'Ir'
  printf '  %-44s %12s\n' 'gateway request path, per call' "$(per "$gw" "$CALLS")"
  printf '  %-44s %12s\n' 'hyper-bare, per call' "$(per "$bare" "$CALLS")"
  printf '  %-44s %12s\n' 'gateway minus hyper-bare, per call' "$(per "$((gw - bare))" "$CALLS")"
  printf '  %-44s %12s\n' "store shipment at shutdown, per record ($RECORDS)" "$(per "$store" "$RECORDS")"
  printf '\nThe gateway'"'"'s request path: the 30 costliest functions, inclusive (Ir over all %s calls)\n' "$CALLS"
  callgrind_annotate --inclusive=yes "$GW_DUMP" 2>/dev/null \
    | awk '/^-+$/ { n++ } n >= 3' | grep -E '^ *[0-9,]+ ' | head -n 30 | cut -c1-150 || true
  printf '\nCallgrind files: %s\n' "$OUT"
} | tee "$OUT/summary.txt"

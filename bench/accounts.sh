#!/usr/bin/env bash
# Memory with many active accounts: N accounts (default 100,000), each with an API key and a
# balance, all of them calling at least once, so that every account has its actor in memory
# and every key is in the key ring. Prints the gateway's RSS before and after, and how many
# account actors are live, and how long loading them all took (`load_secs`: each account's
# first call reads it from the store); then the RSS after 60 s more of the same load, what one
# GET /admin/actors costs (its size and time, the peak RSS around it), and how long a graceful
# stop takes (`shutdown_secs`). See BENCHMARKS.md, "Active accounts".
#
#   bench/accounts.sh [--accounts N] [--postgres] [--kill]
#
# With --kill, then a crash with a full backlog (item 55): the gateway starts again and is called
# with every key while a transaction holds the store's write lock, so that nothing ships and the
# journal fills to near `ledger.max_buffer`; then `kill -9`, the lock goes, and the gateway starts
# once more and is called with every key again. Reported: the backlog at the kill, seconds until
# the restarted gateway is healthy, until the replayed backlog is in the store
# (`replay_shipped_secs`, polled every 0.5 s; "none" if not within the lap) and until every
# account has loaded (`reload_secs`), the backlog then, and the calls of that lap: how many, how many not 2xx, p99 and slowest. That
# lap calls the keys in a shuffled order, not the order their records lie in the journal.
#
# The store is SQLite, or with --postgres a fresh database at 127.0.0.1:5432 (user postgres,
# dropped at exit). Accounts are seeded straight into it (through the admin API they would take
# minutes), with the same shapes the gateway writes: a credit in the ledger for each balance,
# keys stored as SHA-256 hex. Then wrk calls /v1/chat/completions, each request with the next
# key, until every key has been used.
#
# Over the 60 s it also reports the store's side: the store's CPU a record (SQLite's threads
# in the gateway, or all of Postgres's processes), the commit time a record, records a batch, and the backlog left at the end (a store slower than the calls
# shows as a backlog, then as 503s once it reaches `ledger.max_buffer`; BENCHMARKS item 50).
# Knobs: BENCH_TOLLGATE (another build of the gateway; default: this checkout's, built),
# BENCH_MAX_BATCH (the gateway's `ledger.max_batch`; default: the gateway's own default).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=100000
STORE=sqlite
KILL=0
while (($#)); do
  case $1 in
    --accounts) N=$2; shift 2 ;;
    --postgres) STORE=postgres; shift ;;
    --kill) KILL=1; shift ;;
    *) echo "usage: bench/accounts.sh [--accounts N] [--postgres] [--kill]" >&2; exit 2 ;;
  esac
done

log() { printf '[accounts %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"
CLIENT=sqlite3
[[ $STORE == postgres ]] && CLIENT=psql
for tool in wrk curl jq python3 "$CLIENT"; do
  command -v "$tool" >/dev/null || die "$tool is required (bench/run.sh installs it)"
done
PSQL=(psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q)

TMP=$(mktemp -d /tmp/tollgate-accounts.XXXXXX)
PIDS=()
PG_DBS=()
trap_cleanup

if [[ $STORE == postgres ]]; then
  "${PSQL[@]}" -Atc 'select 1' >/dev/null \
    || die "PostgreSQL is not reachable at 127.0.0.1:5432 (user postgres, trust auth)"
  new_pg_db PG_DB tollgate_accounts
  DATABASE="postgres://postgres@127.0.0.1:5432/$PG_DB"
else
  DATABASE="sqlite://$TMP/tollgate.db"
fi

if [[ -z ${BENCH_TOLLGATE:-} ]]; then
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
fi
TOLLGATE=${BENCH_TOLLGATE:-$ROOT/target/release/tollgate}
ADMIN=bench-admin-token-0123456789
MOCK_PORT=21390
GW_PORT=21391

"$TOLLGATE" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --chunks 16 >"$TMP/mock.log" 2>&1 &
PIDS+=($!)

cat >"$TMP/gw.toml" <<EOF
listen = "127.0.0.1:$GW_PORT"
database_url = "$DATABASE"
admin_token = "$ADMIN"

[ledger]
journal_dir = "$TMP/journal"
${BENCH_MAX_BATCH:+max_batch = $BENCH_MAX_BATCH}

[accounts]
idle_secs = 3600
EOF
{ provider_toml mock "http://127.0.0.1:$MOCK_PORT/v1" 'max_concurrency = 30000'
  model_toml gpt-4o-mini mock; } >>"$TMP/gw.toml"

start_gateway() {
  env -u DATABASE_URL -u TOLLGATE_ADMIN_TOKEN -u TOLLGATE_LISTEN -u RUST_LOG \
    "$TOLLGATE" serve --config "$TMP/gw.toml" >>"$TMP/gw.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  for _ in $(seq 1 600); do
    curl -sf -o /dev/null "http://127.0.0.1:$GW_PORT/healthz" && return 0
    kill -0 "$GW_PID" 2>/dev/null || { tail -n 20 "$TMP/gw.log" >&2; die "gateway exited"; }
    sleep 0.1
  done
  die "gateway did not become healthy"
}
rss_mb() { awk '/^VmRSS:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
peak_rss_mb() { awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
metric() { # name → value from /metrics (0 if absent)
  curl -sf -H "Authorization: Bearer $ADMIN" "http://127.0.0.1:$GW_PORT/metrics" \
    | awk -v m="$1" '$1 == m { v = $2 } END { print v + 0 }'
}

log "creating the schema"
start_gateway
kill -TERM "$GW_PID"; wait "$GW_PID" || true

log "seeding $N accounts, credits and keys"
python3 - "$N" "$TMP" <<'EOF'
import hashlib, os, sys
n, tmp = int(sys.argv[1]), sys.argv[2]
now = 1_700_000_000_000
with open(f"{tmp}/seed.sql", "w") as sql, open(f"{tmp}/keys.txt", "w") as keys:
    sql.write("BEGIN;\n")
    for i in range(n):
        acct, key_id = f"acct_{i:024x}", f"key_{i:024x}"
        key = "sk-tg-" + os.urandom(32).hex()
        digest = hashlib.sha256(key.encode()).hexdigest()
        sql.write(f"INSERT INTO accounts (id, email, balance, created_at) VALUES ('{acct}', 'a{i}@example.com', 1000000000, {now});\n")
        sql.write(f"INSERT INTO ledger (entry_id, account_id, kind, amount, reason, created_at) VALUES ('seed_{i}', '{acct}', 'credit', 1000000000, 'benchmark funding', {now});\n")
        sql.write(f"INSERT INTO api_keys (id, account_id, name, key_hash, prefix, created_at) VALUES ('{key_id}', '{acct}', 'bench', '{digest}', '{key[:12]}', {now});\n")
        keys.write(key + "\n")
    sql.write("COMMIT;\n")
EOF
if [[ $STORE == postgres ]]; then
  "${PSQL[@]}" -d "$PG_DB" -f "$TMP/seed.sql" >/dev/null
  "${PSQL[@]}" -d "$PG_DB" -c 'ANALYZE' >/dev/null
else
  sqlite3 "$TMP/tollgate.db" <"$TMP/seed.sql"
fi

cat >"$TMP/keys.lua" <<EOF
local keys = {}
for line in io.lines("$TMP/keys.txt") do keys[#keys + 1] = line end
-- KEYS_SHUFFLE=1: the keys in a fixed shuffled order (the same in every thread), not the order
-- in which the lap before called them.
if os.getenv("KEYS_SHUFFLE") == "1" then
  math.randomseed(55)
  for j = #keys, 2, -1 do
    local k = math.random(j)
    keys[j], keys[k] = keys[k], keys[j]
  end
end
local body = '{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hello"}]}'
local threads, i = {}, 0
-- Each thread takes every other key, so that two threads cover all of them once per lap.
function setup(thread)
  thread:set("offset", i); i = i + 1
  table.insert(threads, thread)
end
function init(args) n = offset; non2xx = 0; last = "" end
function request()
  n = n + 2
  local key = keys[(n % #keys) + 1]
  return wrk.format("POST", "/v1/chat/completions",
    { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key }, body)
end
function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    last = status .. " " .. body
  end
end
function done(summary, latency, requests)
  local bad, last = 0, ""
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non2xx") or 0)
    if (t:get("last") or "") ~= "" then last = t:get("last") end
  end
  io.write(string.format("WRK requests=%d non2xx=%d p99_ms=%.1f max_ms=%.1f\n",
    summary.requests, bad, latency:percentile(99) / 1000, latency.max / 1000))
  if last ~= "" then io.write("WRK last_error=" .. last .. "\n") end
end
EOF

log "starting the gateway on the seeded store"
start_gateway
sleep 1
IDLE=$(rss_mb "$GW_PID")

since() { # start [decimals] → seconds since start
  awk -v a="$1" -v b="$(date +%s.%N)" -v d="${2:-1}" 'BEGIN { printf "%.*f", d, b - a }'
}

# One wrk run (output to $1) until every account has loaded (one lap of the keys): a run
# started again would start the keys over. wrk prints its summary when interrupted. Sets
# LOAD_SECS, and REPLAY_SECS to when the backlog first fell under 100 records.
call_every_key() {
  wrk -t2 -c64 -d600s --timeout 60s -s "$TMP/keys.lua" "http://127.0.0.1:$GW_PORT" >"$1" &
  WRK_PID=$!
  PIDS+=("$WRK_PID")
  local start q
  start=$(date +%s.%N)
  loaded=0
  REPLAY_SECS=""
  for _ in $(seq 1 1200); do
    sleep 0.5
    if [[ -z $REPLAY_SECS ]]; then
      q=$(metric tollgate_ledger_queue_depth)
      ((q < 100)) && REPLAY_SECS=$(since "$start")
    fi
    loaded=$(metric tollgate_accounts_loaded_total)
    ((loaded >= N)) && break
    kill -0 "$WRK_PID" 2>/dev/null || break
  done
  LOAD_SECS=$(since "$start")
  kill -INT "$WRK_PID" 2>/dev/null || true
  wait "$WRK_PID" || true
  log "accounts loaded: $loaded"
  ((loaded >= N)) || die "only $loaded of $N accounts loaded"
}

log "calling with every key"
call_every_key "$TMP/wrk.txt"
FIRST_LOAD_SECS=$LOAD_SECS
sleep 2
LOADED=$(metric tollgate_accounts_loaded_total)
PASSIVATED=$(metric tollgate_accounts_passivated_total)
ACTIVE=$(rss_mb "$GW_PID")
REQS=$(sed -n 's/^WRK requests=\([0-9]*\).*/\1/p' "$TMP/wrk.txt")
NON2XX=$(sed -n 's/^WRK requests=.* non2xx=\([0-9]*\).*/\1/p' "$TMP/wrk.txt")
grep '^WRK last_error=' "$TMP/wrk.txt" >&2 || true

# CPU ticks of the store: the gateway's SQLite threads (sqlx names them
# `sqlx-sqlite-worker-N`), or Postgres's processes as they were when the 60 s began.
PG_PIDS=""
[[ $STORE == postgres ]] && PG_PIDS=$(postgres_pids)
store_ticks() {
  if [[ $STORE == postgres ]]; then
    # shellcheck disable=SC2086
    sum_ticks $PG_PIDS
    return
  fi
  local task sum=0 t
  for task in /proc/"$GW_PID"/task/*; do
    [[ $(cat "$task/comm") == sqlx-sqlite* ]] || continue
    t=$(stat_ticks "$task/stat")
    sum=$((sum + ${t% *} + ${t#* }))
  done
  echo "$sum"
}

# Then 60 s more of the same load: the RSS should stay where it is.
T0=$(store_ticks); B0=$(metric tollgate_ledger_batch_size_sum)
BN0=$(metric tollgate_ledger_batch_size_count); C0=$(metric tollgate_ledger_commit_seconds_sum)
log "60 s more load on the loaded accounts"
wrk -t2 -c64 -d60s -s "$TMP/keys.lua" "http://127.0.0.1:$GW_PORT" >"$TMP/wrk-more.txt"
sleep 2
LATER=$(rss_mb "$GW_PID")
T1=$(store_ticks); B1=$(metric tollgate_ledger_batch_size_sum)
BN1=$(metric tollgate_ledger_batch_size_count); C1=$(metric tollgate_ledger_commit_seconds_sum)
BACKLOG=$(metric tollgate_ledger_queue_depth)
STORE_SIDE=$(awk -v t=$((T1 - T0)) -v tck="$(getconf CLK_TCK)" -v r=$((B1 - B0)) -v n=$((BN1 - BN0)) \
  -v c0="$C0" -v c1="$C1" 'BEGIN { if (r <= 0) r = 1; if (n <= 0) n = 1
    printf "store_cpu_us_per_record=%.1f commit_us_per_record=%.1f records_per_batch=%.0f", \
      t * 1e6 / tck / r, (c1 - c0) * 1e6 / r, r / n }')
# What an operator's look at the supervision tree costs with every account live.
PEAK_BEFORE=$(peak_rss_mb "$GW_PID")
LISTING=$(curl -sf -o "$TMP/actors.json" -w '%{size_download} %{time_total}' \
  -H "Authorization: Bearer $ADMIN" "http://127.0.0.1:$GW_PORT/admin/actors")
sleep 1
LISTING_SIDE="actors_listing_bytes=${LISTING% *} actors_listing_secs=${LISTING#* } peak_rss_before_listing_mb=$PEAK_BEFORE peak_rss_after_listing_mb=$(peak_rss_mb "$GW_PID") rss_after_listing_mb=$(rss_mb "$GW_PID")"
# A graceful stop with every account live: the account actors stop first, then the ledger
# drains (docs/guarantees.md 5).
STOP_START=$(date +%s.%N)
kill -TERM "$GW_PID"
wait "$GW_PID" && STOP_EXIT=0 || STOP_EXIT=$?
STOP_SIDE="shutdown_secs=$(since "$STOP_START" 2) shutdown_exit=$STOP_EXIT"
MORE_REQS=$(sed -n 's/^WRK requests=\([0-9]*\).*/\1/p' "$TMP/wrk-more.txt")
MORE_NON2XX=$(sed -n 's/^WRK requests=.* non2xx=\([0-9]*\).*/\1/p' "$TMP/wrk-more.txt")
grep '^WRK last_error=' "$TMP/wrk-more.txt" >&2 || true

KILL_SIDE=""
if ((KILL)); then
  log "starting again; calling with every key while the store's write lock is held"
  start_gateway
  if [[ $STORE == postgres ]]; then
    # EXCLUSIVE lets reads through (an account's load) and blocks the shipments' writes.
    "${PSQL[@]}" -d "$PG_DB" -c "BEGIN; LOCK TABLE usage_records IN EXCLUSIVE MODE; SELECT pg_sleep(3600)" \
      >/dev/null 2>&1 &
  else
    python3 -c "import sqlite3, time
c = sqlite3.connect('$TMP/tollgate.db', isolation_level=None)
c.execute('BEGIN IMMEDIATE')
time.sleep(3600)" &
  fi
  LOCK_PID=$!
  PIDS+=("$LOCK_PID")
  wrk -t2 -c64 -d600s -s "$TMP/keys.lua" "http://127.0.0.1:$GW_PORT" >"$TMP/wrk-locked.txt" &
  WRK_PID=$!
  PIDS+=("$WRK_PID")
  FULL=$((100000 * 95 / 100)) # of the default `ledger.max_buffer`
  for _ in $(seq 1 600); do
    sleep 0.5
    (($(metric tollgate_ledger_queue_depth) >= FULL)) && break
    kill -0 "$WRK_PID" 2>/dev/null || break
  done
  KILLED_BACKLOG=$(metric tollgate_ledger_queue_depth)
  kill -9 "$GW_PID"
  wait "$GW_PID" 2>/dev/null || true
  kill -INT "$WRK_PID" 2>/dev/null || true
  wait "$WRK_PID" || true
  if [[ $STORE == postgres ]]; then
    "${PSQL[@]}" -d postgres -Atc "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
      WHERE datname = '$PG_DB' AND pid <> pg_backend_pid()" >/dev/null
  fi
  kill "$LOCK_PID" 2>/dev/null || true
  wait "$LOCK_PID" 2>/dev/null || true
  log "killed with $KILLED_BACKLOG records not in the store; starting again"
  RESTART=$(date +%s.%N)
  start_gateway
  HEALTHY_SECS=$(since "$RESTART")
  # In another order than the journal holds them: real callers do not come back in the
  # order of the records their calls left.
  KEYS_SHUFFLE=1 call_every_key "$TMP/wrk-after-kill.txt"
  grep '^WRK last_error=' "$TMP/wrk-after-kill.txt" >&2 || true
  AFTER=$(grep '^WRK requests=' "$TMP/wrk-after-kill.txt" | sed 's/^WRK //; s/=/_after_kill=/g')
  KILL_SIDE=" backlog_at_kill=$KILLED_BACKLOG healthy_secs=$HEALTHY_SECS replay_shipped_secs=${REPLAY_SECS:-none} reload_secs=$LOAD_SECS backlog_after_reload=$(metric tollgate_ledger_queue_depth) peak_rss_after_kill_mb=$(peak_rss_mb "$GW_PID") $AFTER"
  kill -TERM "$GW_PID"
  wait "$GW_PID" || die "the gateway did not stop cleanly after the replay"
fi

printf 'store=%s accounts=%s load_secs=%s keys=%s requests=%s non2xx=%s live_account_actors=%s rss_idle_mb=%s rss_all_active_mb=%s more_requests=%s more_non2xx=%s rss_after_60s_more_mb=%s %s backlog_at_end=%s %s\n' \
  "$STORE" "$N" "$FIRST_LOAD_SECS" "$N" "$REQS" "$NON2XX" "$((LOADED - PASSIVATED))" "$IDLE" "$ACTIVE" "$MORE_REQS" "$MORE_NON2XX" "$LATER" "$STORE_SIDE" "$BACKLOG" "$LISTING_SIDE $STOP_SIDE$KILL_SIDE"

#!/usr/bin/env bash
# A/B of two gateway builds, where the CPU goes: interleaved wrk runs against build A, build B
# and hyper-bare (the gateway's HTTP stack alone, for reference), each behind the same mock,
# with the CPU each process used read from /proc, split into user and kernel time and by
# thread (tokio's workers, SQLite's thread, the rest), and its context switches; with
# --postgres, the CPU of Postgres's processes too, which serve the gateways' commits.
#
#   bench/ab.sh                       this checkout's build alone, beside hyper-bare
#   bench/ab.sh OLD/tollgate          OLD/tollgate (A) against this checkout's build (B)
#   bench/ab.sh A/tollgate B/tollgate two builds of the gateway
#   bench/ab.sh --pairs 8 --secs 5 --conns 64 [--postgres] [--out FILE] [...]
#   bench/ab.sh --smoke               one short pair, for the test suite (figures mean nothing)
#
# A build of another commit, for A:
#   git worktree add /tmp/base REV && cargo build --release --manifest-path /tmp/base/Cargo.toml
#   bench/ab.sh /tmp/base/target/release/tollgate
#
# Each pair runs every target once, the order turned by one each pair, so that none always
# runs first or last after the machine's other work. The summary gives medians over the pairs
# and, for B against A, in how many pairs B did better: on these VMs single runs drift by 10-30%
# within minutes, so a difference counts only if most pairs show it. Every gateway uses its own
# funded account and store (SQLite files, or fresh Postgres databases dropped at exit), with
# the settings of bench/run.sh; every request is authenticated, reserved, settled and recorded.
# The mock and hyper-bare are this checkout's builds. Any non-2xx answer fails the run.
# Knobs: BENCH_SKIP_BUILD=1, BENCH_BIN_DIR (default target/release), BENCH_KEEP_TMP=1.
# Never run by `cargo test` except as --smoke (tests/bench_smoke.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PAIRS=6
SECS=5
CONNS=64
BACKEND=sqlite
SMOKE=0
OUT=""
BUILDS=()
while (( $# )); do
  case "$1" in
    --pairs) PAIRS=${2:?--pairs needs a number}; shift ;;
    --secs) SECS=${2:?--secs needs a number of seconds}; shift ;;
    --conns) CONNS=${2:?--conns needs a number of connections}; shift ;;
    --postgres) BACKEND=postgres ;;
    --smoke) SMOKE=1 ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
    *) BUILDS+=("$1") ;;
  esac
  shift
done
(( SMOKE )) && { PAIRS=1; SECS=1; CONNS=4; }
(( ${#BUILDS[@]} <= 2 )) || { echo "at most two builds (A and B)" >&2; exit 2; }

log() { printf '[ab %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
# Something this machine lacks: exit 3 (tests/bench_smoke.rs skips on it, or fails under CI).
cannot_run() { log "CANNOT RUN: $*"; exit 3; }
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

for tool in wrk curl jq python3; do
  command -v "$tool" >/dev/null 2>&1 || cannot_run "$tool is missing (bench/run.sh --install-tools installs what the harness needs)"
done
if [[ $BACKEND == postgres ]]; then
  command -v psql >/dev/null 2>&1 || cannot_run "psql is missing"
  psql -h 127.0.0.1 -U postgres -Atqc 'select 1' >/dev/null 2>&1 \
    || cannot_run "PostgreSQL is not reachable at 127.0.0.1:5432 (user postgres, trust auth)"
fi
if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  log "cargo build --release"
  cargo build --release --quiet
  cargo build --release --quiet --example bare_proxy
fi
BIN_DIR=${BENCH_BIN_DIR:-$ROOT/target/release}
MOCK_BIN=$BIN_DIR/tollgate
BARE_BIN=$BIN_DIR/examples/bare_proxy
[[ -x $MOCK_BIN && -x $BARE_BIN ]] || cannot_run "binaries missing in $BIN_DIR (tollgate, examples/bare_proxy)"
case ${#BUILDS[@]} in
  0) GATEWAYS=(B); BIN_B=$MOCK_BIN ;;
  1) GATEWAYS=(A B); BIN_A=${BUILDS[0]}; BIN_B=$MOCK_BIN ;;
  2) GATEWAYS=(A B); BIN_A=${BUILDS[0]}; BIN_B=${BUILDS[1]} ;;
esac
for g in "${GATEWAYS[@]}"; do
  bin=BIN_$g
  [[ -x ${!bin} ]] || die "build $g: ${!bin} is not an executable"
done

TMP=$(mktemp -d /tmp/tollgate-ab.XXXXXX)
PIDS=()
PG_DBS=()
trap_cleanup

spawn() { # name command… → LAST_PID
  local name=$1; shift
  "$@" >"$TMP/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

NEXT_PORT=22100
alloc_port MOCK_PORT; alloc_port BARE_PORT
spawn mock "$MOCK_BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --chunks 16
MOCK_PID=$LAST_PID
wait_http "http://127.0.0.1:$MOCK_PORT/" "$MOCK_PID" mock
spawn hyper-bare "$BARE_BIN" "127.0.0.1:$BARE_PORT" "http://127.0.0.1:$MOCK_PORT"
declare -A PID URL KEY
PID[bare]=$LAST_PID; URL[bare]=http://127.0.0.1:$BARE_PORT; KEY[bare]=none
wait_http "${URL[bare]}/" "${PID[bare]}" hyper-bare

ADMIN=ab-admin-token
for g in "${GATEWAYS[@]}"; do
  alloc_port port
  if [[ $BACKEND == postgres ]]; then
    new_pg_db db "tollgate_ab_${g,,}"
    url="postgres://postgres@127.0.0.1:5432/$db"
  else
    url="sqlite://$TMP/store-$g.db"
  fi
  cat >"$TMP/gateway-$g.toml" <<EOF
listen = "127.0.0.1:$port"
database_url = "$url"
admin_token = "$ADMIN"
log_format = "text"

[ledger]
journal_dir = "$TMP/journal-$g"

[limits]
max_connections = 30000
EOF
  { provider_toml mock "http://127.0.0.1:$MOCK_PORT/v1" 'max_concurrency = 30000'
    model_toml gpt-4o-mini mock; } >>"$TMP/gateway-$g.toml"
  bin=BIN_$g
  spawn "gateway-$g" env -u DATABASE_URL -u TOLLGATE_ADMIN_TOKEN -u TOLLGATE_LISTEN \
    -u TOLLGATE_DATABASE_URL -u TOLLGATE_LOG_FORMAT -u RUST_LOG -u TOKIO_WORKER_THREADS \
    "${!bin}" serve --config "$TMP/gateway-$g.toml"
  PID[$g]=$LAST_PID; URL[$g]=http://127.0.0.1:$port
  wait_http "${URL[$g]}/healthz" "${PID[$g]}" "gateway-$g"
  read -r _ KEY[$g] < <(seed_account "${URL[$g]}" "$ADMIN" "ab-$g@example.com" 1000000)
done
TARGETS=(bare "${GATEWAYS[@]}")

# CPU ticks (user, system) of a process, and of its threads grouped by name, with their context
# switches: "name user system voluntary involuntary" lines, the process's total as "all".
threads() { # pid
  local task
  for task in /proc/"$1"/task/*; do
    printf '%s %s %s\n' "$(tr ' ' _ <"$task/comm")" \
      "$(stat_ticks "$task/stat")" \
      "$(awk '/^voluntary_ctxt_switches/ { v = $2 } /^nonvoluntary_ctxt_switches/ { n = $2 } END { print v + 0, n + 0 }' "$task/status" 2>/dev/null || echo '0 0')"
  done | awk '{ u[$1] += $2; s[$1] += $3; v[$1] += $4; n[$1] += $5 }
    END { for (k in u) print k, u[k], s[k], v[k], n[k] }'
  # Threads that ended are counted in the process's own figures, not in any task's.
  printf 'all %s\n' "$(stat_ticks /proc/"$1"/stat)"
}

RAW=$TMP/raw.txt
CLK_TCK=$(getconf CLK_TCK)
echo "settings pairs=$PAIRS secs=$SECS conns=$CONNS backend=$BACKEND clk_tck=$CLK_TCK" >"$RAW"
echo "builds A=${BIN_A:-none} B=$BIN_B" >>"$RAW"

run() { # pair target
  local t=$1 p=$2 before after out line
  # Postgres's processes as the run starts, counted again at its end (on --postgres).
  local pg_pids="" pg0=0 pg1=0
  [[ $BACKEND == postgres ]] && { pg_pids=$(postgres_pids); pg0=$(sum_ticks $pg_pids); }
  before=$(threads "${PID[$t]}"); local mock0; mock0=$(stat_ticks /proc/"$MOCK_PID"/stat)
  out=$(TG_KEY=${KEY[$t]} wrk -t2 -c"$CONNS" -d"${SECS}s" -s "$ROOT/bench/chat.lua" \
    "${URL[$t]}/v1/chat/completions") || die "wrk failed against $t: $out"
  after=$(threads "${PID[$t]}"); local mock1; mock1=$(stat_ticks /proc/"$MOCK_PID"/stat)
  [[ -n $pg_pids ]] && pg1=$(sum_ticks $pg_pids)
  line=$(grep '^WRK ' <<<"$out") || die "no WRK line from wrk against $t: $out"
  grep -q ' non2xx=0 sock_connect=0 sock_read=0 sock_write=0 sock_timeout=0' <<<"$line" \
    || die "errors against $t: $line"
  python3 - "$t" "$p" "$CLK_TCK" "$line" "$before" "$after" "$mock0" "$mock1" "$((pg1 - pg0))" >>"$RAW" <<'EOF'
import sys
t, p, tck, line, before, after, mock0, mock1, pg = sys.argv[1:]
wrk = dict(f.split("=", 1) for f in line.split()[1:])
n = int(wrk["requests"])
per = 1e6 / int(tck) / n  # µs a call per tick
def table(text):
    return {f[0]: [int(x) for x in f[1:]] for f in (l.split() for l in text.splitlines())}
b, a = table(before), table(after)
d = {k: [y - x for x, y in zip(b.get(k, [0] * len(v)), v)] for k, v in a.items()}
fields = [f"run pair={p} target={t} rps={wrk['rps']} p50_us={wrk['p50_us']} p99_us={wrk['p99_us']}",
          f"user_us={d['all'][0] * per:.2f} sys_us={d['all'][1] * per:.2f}"]
threads = {k: v for k, v in d.items() if k != "all"}
vol = sum(v[2] for v in threads.values()) / n
invol = sum(v[3] for v in threads.values()) / n
fields.append(f"voluntary_csw={vol:.3f} involuntary_csw={invol:.3f}")
for name in sorted(threads):
    u, s = threads[name][:2]
    fields.append(f"thread:{name}_us={(u + s) * per:.2f}")
m0, m1 = [int(x) for x in mock0.split()], [int(x) for x in mock1.split()]
fields.append(f"mock_us={((m1[0] - m0[0]) + (m1[1] - m0[1])) * per:.2f} postgres_us={int(pg) * per:.2f}")
print(" ".join(fields))
EOF
  log "pair $p: $t $(sed -nE 's/.* rps=([0-9.]+).*/\1 req\/s/p' <<<"$line")"
}

log "warming up"
for t in "${TARGETS[@]}"; do
  TG_KEY=${KEY[$t]} wrk -t2 -c"$CONNS" -d1s -s "$ROOT/bench/chat.lua" "${URL[$t]}/v1/chat/completions" >/dev/null
done
log "$PAIRS pairs of ${SECS} s at $CONNS connections, $BACKEND"
for p in $(seq 1 "$PAIRS"); do
  n=${#TARGETS[@]}
  for i in $(seq 0 $((n - 1))); do run "${TARGETS[$(( (i + p - 1) % n ))]}" "$p"; done
done

python3 - "$RAW" >"$TMP/summary.txt" <<'EOF'
import statistics, sys
runs = {}
header = []
for line in open(sys.argv[1]):
    f = line.split()
    if f[0] != "run":
        header.append(line.rstrip())
        continue
    kv = dict(x.split("=", 1) for x in f[1:])
    runs.setdefault(kv["target"], []).append(kv)
def med(t, k):
    vals = [float(r[k]) for r in runs.get(t, []) if k in r]
    return statistics.median(vals) if vals else float("nan")
def total(r):
    return float(r["user_us"]) + float(r["sys_us"])
names = {"bare": "hyper-bare", "A": "A", "B": "B"}
targets = [t for t in ("bare", "A", "B") if t in runs]
print("\n".join(header))
print()
print("Medians over the pairs (CPU in µs a call; threads by name, user + system)")
threads = sorted({k for rs in runs.values() for r in rs for k in r if k.startswith("thread:")})
cols = ["req/s", "p50 µs", "p99 µs", "CPU", "user", "sys", "vol csw", "invol csw", "mock CPU", "PG CPU"]
keys = ["rps", "p50_us", "p99_us", None, "user_us", "sys_us", "voluntary_csw", "involuntary_csw", "mock_us", "postgres_us"]
print(f"  {'':12}" + "".join(f"{c:>11}" for c in cols))
for t in targets:
    row = [statistics.median(total(r) for r in runs[t]) if k is None else med(t, k) for k in keys]
    fmt = lambda v, k: f"{v:>11.3f}" if k and k.endswith("csw") else f"{v:>11.1f}"
    print(f"  {names[t]:12}" + "".join(fmt(v, k) for v, k in zip(row, keys)))
for t in targets:
    parts = [f"{k[7:-3]} {med(t, k):.1f}" for k in threads if any(k in r for r in runs[t])]
    print(f"  {names[t]:12} threads: " + ", ".join(parts))
if "A" in runs and "B" in runs:
    pairs = list(zip(runs["A"], runs["B"]))
    faster = sum(float(b["rps"]) > float(a["rps"]) for a, b in pairs)
    cheaper = sum(total(b) < total(a) for a, b in pairs)
    print()
    print(f"B against A: req/s {med('B', 'rps') / med('A', 'rps'):.3f}x (more in {faster} of {len(pairs)} pairs), "
          f"CPU a call {statistics.median(total(r) for r in runs['B']) / statistics.median(total(r) for r in runs['A']):.3f}x "
          f"(less in {cheaper} of {len(pairs)} pairs)")
if "bare" in runs:
    for t in ("A", "B"):
        if t in runs:
            own = statistics.median(total(r) for r in runs[t]) - statistics.median(total(r) for r in runs["bare"])
            print(f"{names[t]}: {med(t, 'rps') / med('bare', 'rps'):.3f}x hyper-bare's req/s; its own CPU beyond hyper-bare's, {own:.1f} µs a call")
EOF
{ cat "$RAW"; echo; cat "$TMP/summary.txt"; } >"$TMP/all.txt"
[[ -n $OUT ]] && cp "$TMP/all.txt" "$OUT"
sed -n '/^Medians/,$p' "$TMP/summary.txt"

#!/usr/bin/env bash
# Side-by-side benchmark of Tollgate against a bare nginx reverse proxy, on loopback.
#
#   bench/run.sh            full run (3 interleaved rounds, 5 s per wrk run; ~8 minutes)
#   bench/run.sh --quick    smoke check (1 round, short runs, 500 held streams; ~2.5 minutes)
#   bench/run.sh --smoke    every part once, as briefly as it can run (what the test suite runs,
#                           against the debug build: tests/bench_smoke.rs); its figures mean nothing
#   bench/run.sh --summarize bench/results/latest.txt   redo the summary from saved raw lines
#   bench/run.sh --peers    also LiteLLM (PyPI) and Portkey's gateway (npm) on the same mock
#   bench/run.sh --install-tools   install the tools a run needs where missing, and stop (.ci/run)
#
# Targets: the mock upstream directly, nginx in front of it, the gateway's HTTP stack with
# nothing else (hyper-bare, examples/bare_proxy.rs), Tollgate on SQLite, Tollgate on
# Postgres (a fresh database at 127.0.0.1:5432, dropped at exit). Every request to a gateway is
# authenticated, reserved, settled and durably recorded (a real funded account and key).
# Raw numbers go to bench/results/latest.txt; a summary table is printed at the end.
# See BENCHMARKS.md for the method and the latest figures. `cargo test` runs `--smoke` only, on
# the debug build, to keep the harness working; its figures are never judged there.
#
# Knobs (environment): BENCH_ROUNDS, BENCH_LAT_SECS, BENCH_THR_SECS, BENCH_THR_CONNS,
# BENCH_STREAMS (sequential streams per round), BENCH_HELD (concurrent held streams),
# BENCH_PACE_MS (pause per connection in the paced run), BENCH_BIG_BYTES (the long conversations'
# size, default 32768), BENCH_KEEP_TMP=1 (keep the temp
# dir with configs and logs), BENCH_SKIP_BUILD=1, BENCH_PEER_DIR (where --peers installs the peer
# gateways; default ~/.cache/tollgate-bench), BENCH_GATEWAY_WORKERS=N (the gateways' tokio
# worker threads, as TOKIO_WORKER_THREADS; default: one per core; the other processes keep
# theirs). BENCH_BIN_DIR (where `tollgate` and `examples/` are; default target/release),
# BENCH_OUT (the results file; default bench/results/latest.txt), BENCH_NO_INSTALL=1 (a missing
# tool is an error, not something to install from Debian). A run that cannot start here (a
# tool, a binary or PostgreSQL missing) exits with 3, any other failure with 1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=0
SMOKE=0
INSTALL_ONLY=0
PEERS=0
SUMMARIZE=""
while (( $# )); do
  case "$1" in
    --quick) QUICK=1 ;;
    --smoke) SMOKE=1 ;;
    --install-tools) INSTALL_ONLY=1 ;;
    --peers) PEERS=1 ;;
    --summarize) SUMMARIZE=${2:?--summarize needs a results file}; shift ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done

# The held streams' mock: 40 chunks 500 ms apart (see section 2); the smoke run's are short.
LONG_CHUNKS=40; LONG_INTERVAL_MS=500
if (( SMOKE )); then
  ROUNDS=1; LAT_SECS=1; THR_SECS=1; STREAMS=5; HELD=50; WARM_SECS=1
  LONG_CHUNKS=4; LONG_INTERVAL_MS=250
elif (( QUICK )); then
  ROUNDS=${BENCH_ROUNDS:-1}; LAT_SECS=${BENCH_LAT_SECS:-2}; THR_SECS=${BENCH_THR_SECS:-2}
  STREAMS=${BENCH_STREAMS:-20}; HELD=${BENCH_HELD:-500}; WARM_SECS=1
else
  ROUNDS=${BENCH_ROUNDS:-3}; LAT_SECS=${BENCH_LAT_SECS:-5}; THR_SECS=${BENCH_THR_SECS:-5}
  STREAMS=${BENCH_STREAMS:-100}; HELD=${BENCH_HELD:-10000}; WARM_SECS=2
fi
THR_CONNS=${BENCH_THR_CONNS:-64}
BIG_BYTES=${BENCH_BIG_BYTES:-32768}
BIG_TARGETS=(direct nginx hyper-bare tollgate-sqlite tollgate-postgres)
THR_THREADS=2
PACE_MS=${BENCH_PACE_MS:-3}
ADMIN=bench-admin-token
TARGETS=(direct nginx hyper-bare tollgate-sqlite tollgate-postgres)
# Peer gateways for --peers, pinned so that a rerun measures the same thing.
LITELLM_VERSION=1.108.7
PORTKEY_VERSION=1.15.2

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
# Something this machine lacks, not something that went wrong: exit 3 (tests/bench_smoke.rs
# skips on it, or fails under CI=true).
cannot_run() { log "CANNOT RUN: $*"; exit 3; }
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

# ---------------------------------------------------------------------------------------------
# The summary, computed from the raw lines alone (so `--summarize FILE` can redo it).
# ---------------------------------------------------------------------------------------------
# median: the median of the numbers on stdin, one a line ("nan" if none).
median() {
  sort -g | awk '{v[NR] = $1} END { if (NR == 0) { print "nan"; exit }
      if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# med KIND TARGET FIELD: the median across rounds.
med() {
  awk -v k="$1" -v t="$2" -v f="$3" '$1 == k {
      tgt = ""; val = ""
      for (i = 2; i <= NF; i++) { split($i, a, "="); if (a[1] == "target") tgt = a[2]; if (a[1] == f) val = a[2] }
      if (tgt == t && val != "") print val }' "$RAW" | median
}
# paired KIND TARGET FIELD: the median across rounds of TARGET's FIELD less the direct mock's in
# the same round (a round without both is left out). Beside an "added" figure, which is the
# median of TARGET's rounds less the median of the mock's: the two differ when the rounds do.
paired() {
  awk -v k="$1" -v t="$2" -v f="$3" '$1 == k {
      tgt = ""; val = ""; rnd = ""
      for (i = 2; i <= NF; i++) {
        split($i, a, "="); if (a[1] == "target") tgt = a[2]; if (a[1] == f) val = a[2]; if (a[1] == "round") rnd = a[2]
      }
      if (val == "" || rnd == "") next
      if (tgt == t) tv[rnd] = val; else if (tgt == "direct") dv[rnd] = val }
      END { for (r in tv) if (r in dv) print tv[r] - dv[r] }' "$RAW" | median
}
# paired_ratio KIND TARGET BASE FIELD: the median across rounds of TARGET's FIELD divided by
# BASE's in the same round, to two places: a machine that changes speed between rounds moves
# both sides of each ratio alike.
paired_ratio() {
  awk -v k="$1" -v t="$2" -v b="$3" -v f="$4" '$1 == k {
      tgt = ""; val = ""; rnd = ""
      for (i = 2; i <= NF; i++) {
        split($i, a, "="); if (a[1] == "target") tgt = a[2]; if (a[1] == f) val = a[2]; if (a[1] == "round") rnd = a[2]
      }
      if (val == "" || rnd == "") next
      if (tgt == t) tv[rnd] = val; else if (tgt == b) bv[rnd] = val }
      END { for (r in tv) if (r in bv && bv[r] > 0) print tv[r] / bv[r] }' "$RAW" | median \
    | awk '{ if ($1 == "nan") print "nan"; else printf "%.2f\n", $1 }'
}
field() { sed -nE "s/.* $2=([^ ]+).*/\1/p" <<<"$1"; }
calc() { awk "BEGIN { printf \"%.${2:-0}f\", $1 }"; }
verdict() { awk "BEGIN { print (($1) ? \"met\" : \"MISSED\") }"; }

summarize() { # raw-file → summary on stdout
  local RAW=$1
  eval "$(awk '$1 == "settings" { for (i = 2; i <= NF; i++) { split($i, a, "="); printf "local %s=%s\n", toupper(a[1]), a[2] } }' "$RAW")"
  # The targets this run had (older results files do not say: the four without peers).
  local -a TARGETS=(direct nginx tollgate-sqlite tollgate-postgres) PEER_LIST=()
  if [[ -n ${TARGET_LIST:-} ]]; then IFS=, read -ra TARGETS <<<"$TARGET_LIST"; fi
  local t
  for t in "${TARGETS[@]}"; do [[ $t == litellm || $t == portkey ]] && PEER_LIST+=("$t"); done
  printf '\nTollgate benchmark summary — %s rounds, medians across rounds (µs unless noted)\n' "$ROUNDS"
  printf '\nLatency at concurrency 1 (wrk -t1 -c1 -d%ss), non-streamed, max_tokens 16\n' "$LAT_SECS"
  printf '  %-18s %8s %8s %10s %10s %10s\n' target p50 p99 'added p50' 'added p99' 'cpu/req'
  printf '  (floor: nginx answering by itself, no upstream; cpu/req: the target process, µs)\n'
  d50=$(med lat direct p50_us); d99=$(med lat direct p99_us)
  for t in floor "${TARGETS[@]}"; do
    p50=$(med lat "$t" p50_us); p99=$(med lat "$t" p99_us); cpu=$(med lat "$t" cpu_us_per_req)
    if [[ $t == direct || $t == floor ]]; then a50=-; a99=-; else a50=$(calc "$p50 - $d50"); a99=$(calc "$p99 - $d99"); fi
    printf '  %-18s %8s %8s %10s %10s %10s\n' "$t" "$p50" "$p99" "$a50" "$a99" "$cpu"
  done
  printf '\nThroughput (wrk -t%s -c%s -d%ss)\n' "$THR_THREADS" "$THR_CONNS" "$THR_SECS"
  printf '  %-18s %9s %8s %8s %8s %9s %10s %10s %9s\n' target req/s p50 p99 non2xx sock_err '/ nginx' 'cpu/req' 'pg cpu/req'
  ng=$(med thr nginx rps)
  for t in "${TARGETS[@]}"; do
    rps=$(med thr "$t" rps)
    errs=$(awk -v t="$t" '$1 == "thr" && $0 ~ ("target=" t " ") {
        for (i = 2; i <= NF; i++) { split($i, a, "="); if (a[1] == "non2xx") n += a[2]
          if (a[1] ~ /^sock_/) s += a[2] } } END { printf "%d %d", n, s }' "$RAW")
    printf '  %-18s %9s %8s %8s %8s %9s %10s %10s %9s\n' "$t" "$(calc "$rps")" "$(med thr "$t" p50_us)" \
      "$(med thr "$t" p99_us)" "${errs% *}" "${errs#* }" "$(calc "$rps / $ng" 2)" \
      "$(med thr "$t" cpu_us_per_req)" "$(med thr "$t" pg_cpu_us_per_req)"
  done
  printf '  (non2xx and socket errors are totals over all rounds)\n'
  if grep -q '^big ' "$RAW"; then
    printf '\nThroughput with %s-byte conversations (same wrk settings; TG_PROMPT_BYTES in bench/chat.lua)\n' "$BIG_BYTES"
    printf '  %-18s %9s %8s %8s %8s %9s %10s\n' target req/s p50 p99 non2xx '/ nginx' 'cpu/req'
    local bng; bng=$(med big nginx rps)
    for t in direct nginx hyper-bare tollgate-sqlite tollgate-postgres; do
      grep -q "^big .*target=$t " "$RAW" || continue
      errs=$(awk -v t="$t" '$1 == "big" && $0 ~ ("target=" t " ") {
          for (i = 2; i <= NF; i++) { split($i, a, "="); if (a[1] == "non2xx") n += a[2] } } END { printf "%d", n }' "$RAW")
      printf '  %-18s %9s %8s %8s %8s %9s %10s\n' "$t" "$(calc "$(med big "$t" rps)")" "$(med big "$t" p50_us)" \
        "$(med big "$t" p99_us)" "$errs" "$(calc "$(med big "$t" rps) / $bng" 2)" "$(med big "$t" cpu_us_per_req)"
    done
  fi
  printf '\nInside the gateway (its /metrics, per run; medians across rounds)\n'
  printf '  %-18s %-8s %12s %15s %15s %24s\n' target run 'commit mean' 'commit p99 ≤' 'records/commit' 'start→upstream headers'
  for t in tollgate-sqlite tollgate-postgres; do
    for k in lat thr; do
      printf '  %-18s %-8s %12s %13s %15s %22s\n' "$t" "$([[ $k == lat ]] && echo 'c=1' || echo "c=$THR_CONNS")" \
        "$(med "$k" "$t" commit_us_mean)" "$(med "$k" "$t" commit_p99_le_us)" "$(med "$k" "$t" records_per_commit)" \
        "$(med "$k" "$t" to_upstream_headers_us_mean)"
    done
  done
  printf '  (commit p99 ≤: the upper bound of the /metrics histogram bucket holding the p99 commit)\n'
  printf '  (start→upstream headers: from the request'"'"'s arrival to the mock'"'"'s response headers,\n'
  printf '   i.e. auth + reservation + provider lease + the mock'"'"'s own time)\n'
  printf '\nGateway RSS (MB)\n'
  printf '  %-18s %8s %16s %16s %14s %22s\n' target idle 'steady (thr run)' 'peak (thr run)' 'after thr run' \
    'steady (paced run)'
  for t in tollgate-sqlite tollgate-postgres; do
    idle=$(awk -v t="$t" '$1 == "rss" && $0 ~ ("target=" t " ") && /phase=idle/ { sub(/.*kb=/, ""); print }' "$RAW")
    after=$(awk -v t="$t" '$1 == "rss" && $0 ~ ("target=" t " ") && /phase=after/ { sub(/.*kb=/, ""); v = $0 } END { print v }' "$RAW")
    printf '  %-18s %8s %16s %16s %14s %22s\n' "$t" "$(calc "$idle / 1024" 1)" \
      "$(calc "$(med thr "$t" rss_steady_kb) / 1024" 1)" "$(calc "$(med thr "$t" rss_peak_kb) / 1024" 1)" \
      "$(calc "$after / 1024" 1)" "$(calc "$(med paced "$t" rss_steady_kb) / 1024" 1) @$(calc "$(med paced "$t" rps)")/s"
  done
  printf '  (paced run: 16 connections, each pausing %s ms between requests, to hold about 5k req/s)\n' "$PACE_MS"
  printf '\nStreaming, %s sequential streams per round (mock: 32 chunks, 5 ms apart)\n' "$STREAMS"
  printf '  %-24s %9s %9s %9s %9s %10s %10s %10s %10s\n' target 'TTFT p50' 'TTFT p99' 'gap p50' 'gap p99' \
    '+TTFT p50' '+TTFT p99' '+gap p50' '+gap p99'
  s_t50=$(med stream direct ttft_p50_us); s_t99=$(med stream direct ttft_p99_us)
  s_g50=$(med stream direct gap_p50_us); s_g99=$(med stream direct gap_p99_us)
  # stream_rows F1 F2 F3 F4: a row per streaming target that has the fields (results from
  # before nginx, hyper-bare or the send stamps have none), the four medians and each less
  # the direct mock's; a target whose streams all failed says so.
  stream_rows() {
    local f t v base=() row x
    for f in "$@"; do base+=("$(med stream direct "$f")"); done
    for t in direct nginx hyper-bare tollgate-sqlite tollgate-postgres "${PEER_LIST[@]}"; do
      if ! grep -q "^stream .*target=$t .*ok=[1-9]" "$RAW"; then
        grep -q "^stream-failed .*target=$t " "$RAW" && printf '  %-24s %s\n' "$t" \
          "no stream completed: $(grep -m1 "^stream-failed .*target=$t " "$RAW" | sed 's/.*error=//')"
        continue
      fi
      grep -q "^stream .*target=$t .* $1=" "$RAW" || continue
      row=(); x=()
      for f in 0 1 2 3; do
        v=$(med stream "$t" "${@:f+1:1}"); row+=("$v")
        if [[ $t == direct ]]; then x+=(-); else x+=("$(calc "$v - ${base[f]}")"); fi
      done
      printf '  %-24s %9s %9s %9s %9s %10s %10s %10s %10s\n' "$t" "${row[@]}" "${x[@]}"
    done
  }
  stream_rows ttft_p50_us ttft_p99_us gap_p50_us gap_p99_us
  # From the mock's send stamps (results from before them have none).
  local stamped=0; grep -q '^stream .*target=direct .*transit_p50_us=' "$RAW" && stamped=1
  if (( stamped )); then
    printf '  Per content chunk after the first, from the mock'"'"'s send stamps (one clock, the machine'"'"'s):\n'
    printf '  transit = send to arrival; excess = a gap between arrivals less the gap between the sends\n'
    printf '  %-24s %9s %9s %9s %9s %10s %10s %10s %10s\n' target 'transit50' 'transit99' 'excess50' 'excess99' \
      '+trans p50' '+trans p99' '+exc p50' '+exc p99'
    s_r50=$(med stream direct transit_p50_us); s_r99=$(med stream direct transit_p99_us)
    s_e50=$(med stream direct gap_excess_p50_us); s_e99=$(med stream direct gap_excess_p99_us)
    stream_rows transit_p50_us transit_p99_us gap_excess_p50_us gap_excess_p99_us
  fi
  # Older results files do not record the long mock's settings: theirs were 40 and 500.
  printf '\nHeld streams (mock: %s chunks, %s ms apart; started 2000/s; descriptor limit %s)\n' \
    "${LONG_CHUNKS:-40}" "${LONG_INTERVAL_MS:-500}" "$FD_LIMIT"
  printf '  %-20s %6s %6s %6s %6s %8s %8s %8s %9s %9s %8s %6s %8s\n' target streams ok failed 'peak' 'TTFT' 'TTFT' \
    'length' 'peak' 'RSS' 'peak' 'cpu' 'machine'
  printf '  %-20s %6s %6s %6s %6s %8s %8s %8s %9s %9s %8s %6s %8s\n' '' '' '' '' open 'p50 ms' 'p99 ms' \
    'p99 ms' 'RSS MB' 'after MB' fds cores busy
  for t in direct tollgate-sqlite-fit tollgate-sqlite; do
    held=$(grep "^held target=$t " "$RAW") || continue
    printf '  %-20s %6s %6s %6s %6s %8s %8s %8s %9s %9s %8s %6s %7s%%\n' "$t" "$(field "$held" requested)" \
      "$(field "$held" ok)" "$(field "$held" errors)" "$(field "$held" peak_open)" \
      "$(calc "$(field "$held" ttft_p50_us) / 1000")" "$(calc "$(field "$held" ttft_p99_us) / 1000")" \
      "$(field "$held" duration_p99_ms)" "$(calc "$(field "$held" peak_rss_kb) / 1024" 1)" \
      "$(calc "$(field "$held" rss_after_kb) / 1024" 1)" "$(field "$held" peak_fds)" "$(field "$held" cpu_cores)" \
      "$(field "$held" machine_busy_pct)"
  done
  printf '  (direct: RSS, fds and cpu are the mock'"'"'s; tollgate-*: the gateway'"'"'s. Length: send to last byte.)\n'
  for t in tollgate-sqlite-fit tollgate-sqlite; do
    held=$(grep "^held target=$t " "$RAW") || continue
    printf '  %s: errors %s; gateway log: %s "accept failed", %s "upstream unreachable"; mock peak RSS %s MB\n' \
      "$t" "$(field "$held" error_kinds)" "$(field "$held" gw_accept_failed)" \
      "$(field "$held" gw_upstream_unreachable)" "$(calc "$(field "$held" mock_peak_rss_kb) / 1024" 1)"
  done
  for t in direct tollgate-sqlite-fit tollgate-sqlite; do
    held=$(grep "^held target=$t " "$RAW") || continue
    [[ -n $(field "$held" listen_overflows) ]] || continue
    printf '  %s: %s connections turned away by a full accept queue (the kernel'"'"'s ListenOverflows)\n' \
      "$t" "$(field "$held" listen_overflows)"
  done
  printf '\nDurability: usage records with status 200 in the store (after kill -9 and restart) vs 2xx responses clients saw\n'
  grep '^durable ' "$RAW" | sed -E 's/^durable target=([^ ]+) records_200=([0-9]+) client_2xx=([0-9]+)/  \1: \2 records, \3 responses/'

  # Targets. Each verdict is on the figure the target names; the p50 beside a p99 says how much
  # of a p99 difference is signal (a p99 difference below the p50 one is the mock's timer noise).
  n50=$(calc "$(med lat nginx p50_us) - $d50"); n99=$(calc "$(med lat nginx p99_us) - $d99")
  printf '\nAgainst the targets (added = target − direct mock, µs; nginx adds p50 %s, p99 %s)\n' "$n50" "$n99"
  if grep -q "^stream .*target=nginx " "$RAW"; then
    printf '  (streamed, nginx adds TTFT p50 %s, p99 %s; inter-chunk gap p50 %s, p99 %s)\n' \
      "$(calc "$(med stream nginx ttft_p50_us) - $s_t50")" "$(calc "$(med stream nginx ttft_p99_us) - $s_t99")" \
      "$(calc "$(med stream nginx gap_p50_us) - $s_g50")" "$(calc "$(med stream nginx gap_p99_us) - $s_g99")"
    if (( stamped )); then
      printf '  (nginx stretches each gap by p50 %s, p99 %s more than the mock alone, and delays each chunk by p50 %s, p99 %s)\n' \
        "$(calc "$(med stream nginx gap_excess_p50_us) - $s_e50")" "$(calc "$(med stream nginx gap_excess_p99_us) - $s_e99")" \
        "$(calc "$(med stream nginx transit_p50_us) - $s_r50")" "$(calc "$(med stream nginx transit_p99_us) - $s_r99")"
    fi
  fi
  printf '  %-34s %-22s %-22s %s\n' figure tollgate-sqlite tollgate-postgres target
  row() { printf '  %-34s %-22s %-22s %s\n' "$@"; }
  cell() { # value condition → "value (met|MISSED)"
    printf '%s (%s)' "$1" "$(verdict "$2")"
  }
  declare -A A50 A99 R T50 T99 G50 G99 E50 E99 D50 ST RPS
  for t in tollgate-sqlite tollgate-postgres; do
    A50[$t]=$(calc "$(med lat "$t" p50_us) - $d50"); A99[$t]=$(calc "$(med lat "$t" p99_us) - $d99")
    R[$t]=$(calc "$(med thr "$t" rps) / $ng" 2)
    T50[$t]=$(calc "$(med stream "$t" ttft_p50_us) - $s_t50"); T99[$t]=$(calc "$(med stream "$t" ttft_p99_us) - $s_t99")
    G50[$t]=$(calc "$(med stream "$t" gap_p50_us) - $s_g50"); G99[$t]=$(calc "$(med stream "$t" gap_p99_us) - $s_g99")
    if (( stamped )); then
      E50[$t]=$(calc "$(med stream "$t" gap_excess_p50_us) - $s_e50"); E99[$t]=$(calc "$(med stream "$t" gap_excess_p99_us) - $s_e99")
      D50[$t]=$(calc "$(med stream "$t" transit_p50_us) - $s_r50")
    fi
    ST[$t]=$(calc "$(med paced "$t" rss_steady_kb) / 1024" 1); RPS[$t]=$(calc "$(med paced "$t" rps)")
  done
  local s=tollgate-sqlite p=tollgate-postgres
  row 'added p99 @c=1 (us)' "$(cell "${A99[$s]}" "${A99[$s]} <= 100")" "$(cell "${A99[$p]}" "${A99[$p]} <= 100")" '≤ 100'
  if awk "BEGIN { exit !($n99 > 0) }"; then
    row '  ... / nginx'"'"'s added p99' "$(cell "$(calc "${A99[$s]} / $n99" 1)x" "${A99[$s]} <= 2 * $n99")" \
      "$(cell "$(calc "${A99[$p]} / $n99" 1)x" "${A99[$p]} <= 2 * $n99")" '≤ 2x'
  else
    row '  ... / nginx'"'"'s added p99' 'n/a' 'n/a' "≤ 2x (nginx's added p99, $n99, is within the noise)"
  fi
  row '  (added p50 @c=1, us)' "${A50[$s]}" "${A50[$p]}" ''
  row '  (added p99 @c=1, round by round)' "$(paired lat "$s" p99_us)" "$(paired lat "$p" p99_us)" \
    'median of each round'"'"'s target − mock'
  row 'throughput / nginx' "$(cell "${R[$s]}" "${R[$s]} >= 0.8")" "$(cell "${R[$p]}" "${R[$p]} >= 0.8")" '≥ 0.8'
  row '  (round by round)' "$(paired_ratio thr "$s" nginx rps)" \
    "$(paired_ratio thr "$p" nginx rps)" 'median of each round'"'"'s target ÷ nginx'
  # The same against the gateway's own HTTP stack with nothing else (no target: BENCHMARKS.md,
  # "The budget"). Results from before the hyper-bare target have no such line.
  local hb; hb=$(med thr hyper-bare rps)
  if [[ $hb != nan ]]; then
    row '  (throughput / hyper-bare)' "$(calc "$(med thr "$s" rps) / $hb" 2)" \
      "$(calc "$(med thr "$p" rps) / $hb" 2)" "no target; hyper-bare / nginx $(calc "$hb / $ng" 2)"
  fi
  row 'added TTFT p99 (us)' "$(cell "${T99[$s]}" "${T99[$s]} <= 200")" "$(cell "${T99[$p]}" "${T99[$p]} <= 200")" '≤ 200'
  row '  (added TTFT p50, us)' "${T50[$s]}" "${T50[$p]}" ''
  row '  (added TTFT p99, round by round)' "$(paired stream "$s" ttft_p99_us)" "$(paired stream "$p" ttft_p99_us)" \
    'median of each round'"'"'s target − mock'
  if (( stamped )); then
    # Each gap less the mock's own gap between the two sends, less the same for the mock
    # called directly: what the target adds to a gap, without the mock timer's spread.
    row 'added inter-chunk gap p50 (us)' "$(cell "${E50[$s]}" "${E50[$s]} <= 20")" "$(cell "${E50[$p]}" "${E50[$p]} <= 20")" '≤ 20 (from send stamps)'
    row 'added inter-chunk gap p99 (us)' "$(cell "${E99[$s]}" "${E99[$s]} <= 20")" "$(cell "${E99[$p]}" "${E99[$p]} <= 20")" '≤ 20 (from send stamps)'
    row '  (added delay per chunk p50, us)' "${D50[$s]}" "${D50[$p]}" ''
    row '  (raw gaps: added p50 / p99, us)' "${G50[$s]} / ${G99[$s]}" "${G50[$p]} / ${G99[$p]}" 'the mock timer'"'"'s spread included'
  else
    row 'added inter-chunk gap p50 (us)' "$(cell "${G50[$s]}" "${G50[$s]} <= 20")" "$(cell "${G50[$p]}" "${G50[$p]} <= 20")" '≤ 20'
    row 'added inter-chunk gap p99 (us)' "$(cell "${G99[$s]}" "${G99[$s]} <= 20")" "$(cell "${G99[$p]}" "${G99[$p]} <= 20")" '≤ 20'
  fi
  row 'steady RSS, MB (at req/s)' "$(cell "${ST[$s]} @${RPS[$s]}/s" "${ST[$s]} <= 64")" \
    "$(cell "${ST[$p]} @${RPS[$p]}/s" "${ST[$p]} <= 64")" '≤ 64 at 5k req/s'
  row 'durable charge p99 @c=1 (us)' '' "$(cell "${A99[$p]}" "${A99[$p]} <= 2000")" \
    '≤ 2000 on Postgres (all the gateway adds)'
  local cp99; cp99=$(med lat tollgate-postgres commit_p99_le_us)
  row '  (store commit: p99 bucket, us)' '' "≤ $cp99" 'off the request path since the journal; from /metrics'
}

if [[ -n $SUMMARIZE ]]; then
  raw=$(mktemp)
  grep -E '^(settings|warm|lat|thr|big|paced|rss|stream|stream-failed|held|durable) ' "$SUMMARIZE" >"$raw" \
    || { rm -f "$raw"; die "no raw lines in $SUMMARIZE"; }
  summarize "$raw"
  rm -f "$raw"
  exit 0
fi

# ---------------------------------------------------------------------------------------------
# 1. Tools and builds
# ---------------------------------------------------------------------------------------------
need=()
command -v nginx  >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need+=(nginx-light)
command -v wrk    >/dev/null 2>&1 || need+=(wrk)
command -v curl   >/dev/null 2>&1 || need+=(curl)
command -v jq     >/dev/null 2>&1 || need+=(jq)
command -v psql   >/dev/null 2>&1 || need+=(postgresql-client)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
if (( ${#need[@]} )); then
  [[ ${BENCH_NO_INSTALL:-0} == 1 ]] \
    && cannot_run "missing tools; install them with \`apt-get install ${need[*]}\`"
  log "installing from Debian: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
(( INSTALL_ONLY )) && exit 0

# Peer gateways, installed once into BENCH_PEER_DIR: LiteLLM's proxy in a Python venv, Portkey's
# gateway with npm. Both need the registries the first time.
PEER_DIR=${BENCH_PEER_DIR:-$HOME/.cache/tollgate-bench}
LITELLM=$PEER_DIR/litellm-$LITELLM_VERSION/bin/litellm
PORTKEY=$PEER_DIR/portkey-$PORTKEY_VERSION/node_modules/@portkey-ai/gateway/build/start-server.js
if (( PEERS )); then
  need=()
  python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
  command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
  if (( ${#need[@]} )); then
    log "installing from Debian: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  if [[ ! -x $LITELLM ]]; then
    log "installing LiteLLM $LITELLM_VERSION from PyPI into $PEER_DIR (a few minutes)"
    python3 -m venv "$PEER_DIR/litellm-$LITELLM_VERSION"
    "$PEER_DIR/litellm-$LITELLM_VERSION/bin/pip" install -q "litellm[proxy]==$LITELLM_VERSION" \
      || die "pip install litellm[proxy]==$LITELLM_VERSION failed"
  fi
  if [[ ! -f $PORTKEY ]]; then
    log "installing Portkey's gateway $PORTKEY_VERSION from npm into $PEER_DIR"
    npm install -s --no-audit --no-fund --prefix "$PEER_DIR/portkey-$PORTKEY_VERSION" \
      "@portkey-ai/gateway@$PORTKEY_VERSION" >/dev/null || die "npm install @portkey-ai/gateway failed"
  fi
fi

if [[ "${BENCH_SKIP_BUILD:-0}" != 1 ]]; then
  log "cargo build --release"
  cargo build --release --quiet
  # Built on its own so that the gateway binary is the plain release build: an example pulls
  # in dev-dependency features, which would otherwise be unified into the binary.
  cargo build --release --quiet --example stream_probe --example bare_proxy
fi
BIN_DIR=${BENCH_BIN_DIR:-$ROOT/target/release}
TOLLGATE=$BIN_DIR/tollgate
PROBE=$BIN_DIR/examples/stream_probe
BARE=$BIN_DIR/examples/bare_proxy
[[ -x $TOLLGATE && -x $PROBE && -x $BARE ]] \
  || cannot_run "binaries missing in $BIN_DIR (tollgate, examples/stream_probe, examples/bare_proxy; \`cargo test\` and \`cargo build --examples\` build the examples)"

pg_isready -h 127.0.0.1 -p 5432 -U postgres -q 2>/dev/null \
  || psql -h 127.0.0.1 -U postgres -Atqc 'select 1' >/dev/null \
  || cannot_run "PostgreSQL is not reachable at 127.0.0.1:5432 (user postgres, trust auth)"

# ---------------------------------------------------------------------------------------------
# Process bookkeeping: everything started here is killed at exit; the Postgres database dropped.
# ---------------------------------------------------------------------------------------------
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
TMP=$(mktemp -d /tmp/tollgate-bench.XXXXXX)
PIDS=()
PG_DBS=()
trap_cleanup

# A background helper that has been waited for leaves the list, so that cleanup never signals a
# recycled pid.
forget_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# Runs a command in the background with its output in $TMP/<name>.log; sets LAST_PID.
spawn() {
  local name=$1; shift
  "$@" >"$TMP/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

NEXT_PORT=21100  # alloc_port (bench/lib.sh) hands out free ports from here

wait_port() { # port pid name
  for _ in $(seq 1 200); do
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$TMP/$3.log" >&2; die "$3 exited at start"; }
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  die "$3 did not listen on $1"
}

machine_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6 }' /proc/stat; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
CLK_TCK=$(getconf CLK_TCK)

# A held stream costs the gateway two descriptors (client and upstream sockets). Raise the
# limit as far as this machine lets us; the held-streams result records what it was.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT=$(ulimit -n)

# ---------------------------------------------------------------------------------------------
# 2. Mock upstreams, nginx, the two gateways
# ---------------------------------------------------------------------------------------------
# Three mocks: non-streamed load (16 words), streaming latency (32 chunks 5 ms apart), and
# long streams for the held-streams test (40 chunks 500 ms apart: 20 s streams, so that all of
# them are open at once after a 5 s ramp; at 250 ms apart, 10,000 streams are 40,000 chunks/s,
# which saturates two cores shared by probe, mock and gateway - see BENCHMARKS.md).
alloc_port MOCK_PORT; alloc_port STREAM_PORT; alloc_port LONG_PORT
alloc_port NGINX_PORT; alloc_port NGINX_STREAM_PORT; alloc_port FLOOR_PORT; alloc_port GW_SQLITE_PORT; alloc_port GW_PG_PORT
alloc_port BARE_PORT; alloc_port BARE_STREAM_PORT

spawn mock "$TOLLGATE" mock-upstream --listen "127.0.0.1:$MOCK_PORT" --chunks 16
MOCK_PID=$LAST_PID
spawn mock-stream "$TOLLGATE" mock-upstream \
  --listen "127.0.0.1:$STREAM_PORT" --chunks 32 --chunk-interval-ms 5 --stamp-chunks
STREAM_MOCK_PID=$LAST_PID
spawn mock-long "$TOLLGATE" mock-upstream \
  --listen "127.0.0.1:$LONG_PORT" --chunks "$LONG_CHUNKS" --chunk-interval-ms "$LONG_INTERVAL_MS"
LONG_MOCK_PID=$LAST_PID
wait_port "$MOCK_PORT" "$MOCK_PID" mock
wait_port "$STREAM_PORT" "$STREAM_MOCK_PID" mock-stream
wait_port "$LONG_PORT" "$LONG_MOCK_PID" mock-long

mkdir -p "$TMP/nginx"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile 65536;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  # Request bodies in memory, as the gateway keeps them: by default nginx writes a body over
  # 16 KB to a temporary file (and its worker cannot write into this run's private temp dir).
  client_body_buffer_size 1m;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  upstream mock {
    server 127.0.0.1:$MOCK_PORT;
    keepalive 256;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
  # Streaming: each chunk passed on as it arrives, as a proxy in front of an LLM API must.
  upstream mock_stream {
    server 127.0.0.1:$STREAM_PORT;
    keepalive 256;
  }
  server {
    listen 127.0.0.1:$NGINX_STREAM_PORT;
    location / {
      proxy_pass http://mock_stream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
  # Calibration only (latency runs): what wrk + loopback + one nginx worker cost with no
  # upstream at all, the floor under every other figure.
  server {
    listen 127.0.0.1:$FLOOR_PORT;
    location / { default_type application/json; return 200 '{"floor":true}'; }
  }
}
EOF
spawn nginx "$NGINX" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf"
NGINX_PID=$LAST_PID
wait_port "$NGINX_PORT" "$NGINX_PID" nginx
NGINX_WORKER_PID=$(pgrep -P "$NGINX_PID" | head -n 1)

# The gateway's HTTP stack alone (hyper's server, hyper-util's pooled client, tokio): no auth,
# billing or journal. Gateway minus this is the gateway's own work; this minus nginx, the stack's.
spawn hyper-bare "$BARE" "127.0.0.1:$BARE_PORT" "http://127.0.0.1:$MOCK_PORT"
BARE_PID=$LAST_PID
wait_port "$BARE_PORT" "$BARE_PID" hyper-bare
# The same in front of the streaming mock, for the streamed figures.
spawn hyper-bare-stream "$BARE" "127.0.0.1:$BARE_STREAM_PORT" "http://127.0.0.1:$STREAM_PORT"
wait_port "$BARE_STREAM_PORT" "$LAST_PID" hyper-bare-stream

gateway_config() { # database_url port
  cat <<EOF
listen = "127.0.0.1:$2"
database_url = "$1"
admin_token = "$ADMIN"
log_format = "text"

[ledger]
journal_dir = "$TMP/journal-$2"

[limits]
max_connections = 30000
EOF
  provider_toml mock "http://127.0.0.1:$MOCK_PORT/v1" 'max_concurrency = 30000' \
    'request_timeout_ms = 60000' 'stream_idle_timeout_ms = 60000'
  provider_toml mock-stream "http://127.0.0.1:$STREAM_PORT/v1" 'max_concurrency = 30000'
  provider_toml mock-long "http://127.0.0.1:$LONG_PORT/v1" 'max_concurrency = 30000'
  model_toml gpt-4o-mini mock
  model_toml gpt-4o-mini-stream mock-stream
  model_toml gpt-4o-mini-long mock-long
}

new_pg_db PG_DB tollgate_bench
SQLITE_FILE=$TMP/tollgate.db
gateway_config "sqlite://$SQLITE_FILE" "$GW_SQLITE_PORT" >"$TMP/gw-sqlite.toml"
gateway_config "postgres://postgres@127.0.0.1:5432/$PG_DB" "$GW_PG_PORT" >"$TMP/gw-postgres.toml"

start_gateway() { # name config port → sets LAST_PID
  spawn "$1" env -u DATABASE_URL -u TOLLGATE_ADMIN_TOKEN -u TOLLGATE_LISTEN \
    -u TOLLGATE_DATABASE_URL -u TOLLGATE_LOG_FORMAT -u RUST_LOG -u TOKIO_WORKER_THREADS \
    ${BENCH_GATEWAY_WORKERS:+TOKIO_WORKER_THREADS=$BENCH_GATEWAY_WORKERS} \
    "$TOLLGATE" serve --config "$2"
  local pid=$LAST_PID
  for _ in $(seq 1 400); do
    kill -0 "$pid" 2>/dev/null || { tail -n 30 "$TMP/$1.log" >&2; die "$1 exited at start"; }
    curl -sf -o /dev/null "http://127.0.0.1:$3/healthz" && { LAST_PID=$pid; return 0; }
    sleep 0.05
  done
  die "$1 did not become healthy"
}

seed() { # port → prints the API key
  local acct key
  read -r acct key < <(seed_account "http://127.0.0.1:$1" "$ADMIN" bench@example.com 1000000)
  echo "$acct" >"$TMP/account-$1"
  echo "$key"
}

start_gateway tollgate-sqlite "$TMP/gw-sqlite.toml" "$GW_SQLITE_PORT"; GW_SQLITE_PID=$LAST_PID
start_gateway tollgate-postgres "$TMP/gw-postgres.toml" "$GW_PG_PORT"; GW_PG_PID=$LAST_PID
KEY_SQLITE=$(seed "$GW_SQLITE_PORT")
KEY_PG=$(seed "$GW_PG_PORT")
[[ $KEY_SQLITE == sk-* && $KEY_PG == sk-* ]] || die "seeding: no API key"

declare -A URL KEY PID HDRS
URL[floor]=http://127.0.0.1:$FLOOR_PORT;       KEY[floor]=none;           PID[floor]=$NGINX_WORKER_PID
URL[direct]=http://127.0.0.1:$MOCK_PORT;       KEY[direct]=none;          PID[direct]=$MOCK_PID
URL[nginx]=http://127.0.0.1:$NGINX_PORT;       KEY[nginx]=none;           PID[nginx]=$NGINX_WORKER_PID
URL[hyper-bare]=http://127.0.0.1:$BARE_PORT;   KEY[hyper-bare]=none;      PID[hyper-bare]=$BARE_PID
URL[tollgate-sqlite]=http://127.0.0.1:$GW_SQLITE_PORT;  KEY[tollgate-sqlite]=$KEY_SQLITE;   PID[tollgate-sqlite]=$GW_SQLITE_PID
URL[tollgate-postgres]=http://127.0.0.1:$GW_PG_PORT;    KEY[tollgate-postgres]=$KEY_PG;     PID[tollgate-postgres]=$GW_PG_PID

# Peers: each at its defaults, on the same mocks, one process (one worker) like nginx here.
# Neither authenticates against a store, reserves, or records a charge: they are proxies with
# their own request handling, which is what the comparison is about.
if (( PEERS )); then
  alloc_port LITELLM_PORT; alloc_port PORTKEY_PORT
  cat >"$TMP/litellm.yaml" <<EOF
model_list:
  - model_name: gpt-4o-mini
    litellm_params: {model: openai/gpt-4o-mini, api_base: "http://127.0.0.1:$MOCK_PORT/v1", api_key: none}
  - model_name: gpt-4o-mini-stream
    litellm_params: {model: openai/gpt-4o-mini, api_base: "http://127.0.0.1:$STREAM_PORT/v1", api_key: none}
EOF
  # LiteLLM refuses to start without a master key; with one, it checks it on every call.
  LITELLM_KEY=sk-bench-litellm-$RANDOM$RANDOM$RANDOM
  spawn litellm env LITELLM_MASTER_KEY="$LITELLM_KEY" "$LITELLM" --config "$TMP/litellm.yaml" \
    --host 127.0.0.1 --port "$LITELLM_PORT" --num_workers 1
  LITELLM_PID=$LAST_PID
  spawn portkey node "$PORTKEY" --port="$PORTKEY_PORT" --headless
  PORTKEY_PID=$LAST_PID
  wait_http "http://127.0.0.1:$LITELLM_PORT/health/liveliness" "$LITELLM_PID" litellm
  wait_http "http://127.0.0.1:$PORTKEY_PORT/" "$PORTKEY_PID" portkey
  URL[litellm]=http://127.0.0.1:$LITELLM_PORT; KEY[litellm]=$LITELLM_KEY; PID[litellm]=$LITELLM_PID
  # Portkey routes by headers: the provider, and our mock as a custom host.
  URL[portkey]=http://127.0.0.1:$PORTKEY_PORT; KEY[portkey]=none;         PID[portkey]=$PORTKEY_PID
  HDRS[portkey]="x-portkey-provider: openai|x-portkey-custom-host: http://127.0.0.1:$MOCK_PORT/v1"
  TARGETS+=(litellm portkey)
fi

# Quick sanity: each target answers 200 with usage.
for t in "${TARGETS[@]}"; do
  hdr=()
  IFS='|' read -ra pairs <<<"${HDRS[$t]:-}"
  for h in "${pairs[@]}"; do hdr+=(-H "$h"); done
  code=$(curl -s -o "$TMP/check.json" -w '%{http_code}' -X POST "${URL[$t]}/v1/chat/completions" \
    -H "Authorization: Bearer ${KEY[$t]}" -H 'Content-Type: application/json' "${hdr[@]}" \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":16}')
  [[ $code == 200 ]] && jq -e .usage.total_tokens "$TMP/check.json" >/dev/null \
    || die "$t answered $code: $(head -c 300 "$TMP/check.json")"
done

RAW=$TMP/raw.txt
echo "settings rounds=$ROUNDS lat_secs=$LAT_SECS thr_secs=$THR_SECS thr_threads=$THR_THREADS" \
  "thr_conns=$THR_CONNS big_bytes=$BIG_BYTES streams=$STREAMS held=$HELD fd_limit=$FD_LIMIT" \
  "long_chunks=$LONG_CHUNKS long_interval_ms=$LONG_INTERVAL_MS" \
  "target_list=$(IFS=,; echo "${TARGETS[*]}")" >"$RAW"
for t in tollgate-sqlite tollgate-postgres; do
  echo "rss target=$t phase=idle kb=$(rss_kb "${PID[$t]}")" >>"$RAW"
done

# ---------------------------------------------------------------------------------------------
# 3. wrk: latency at concurrency 1, then throughput, in interleaved rounds
# ---------------------------------------------------------------------------------------------

# The gateway's own account of a run, from /metrics: ledger commits, records, commit time,
# time from request start to upstream response headers, request time (sums and counts).
gw_metrics() { # target → "commits records commit_s upstream_n upstream_s le:count;… (commit histogram)"
  local port=${URL[$1]##*:}
  curl -sf "http://127.0.0.1:$port/metrics" -H "Authorization: Bearer $ADMIN" | awk '
    /^tollgate_ledger_batch_size_count /   { c = $2 }
    /^tollgate_ledger_batch_size_sum /     { r = $2 }
    /^tollgate_ledger_commit_seconds_sum / { cs = $2 }
    /^tollgate_upstream_response_seconds_count\{provider="mock"\}/ { un = $2 }
    /^tollgate_upstream_response_seconds_sum\{provider="mock"\}/   { us = $2 }
    /^tollgate_ledger_commit_seconds_bucket\{/ {
      le = $1; sub(/.*le="/, "", le); sub(/".*/, "", le); h = h le ":" $2 ";" }
    END { printf "%d %d %.9f %d %.9f %s", c, r, cs, un, us, (h == "" ? "none" : h) }'
}

run_wrk() { # kind round target -- wrk args…   (appends one line to $RAW)
  local kind=$1 round=$2 t=$3; shift 4
  local pid=${PID[$t]} rssfile="$TMP/rss.$kind.$round.$t" stop="$TMP/stop.$$"
  local pg_pids="" pg0=0 pg1
  [[ $t == tollgate-postgres ]] && { pg_pids=$(postgres_pids); pg0=$(sum_ticks $pg_pids); }
  local g0="0 0 0 0 0 none" g1="0 0 0 0 0 none"
  [[ $t == tollgate-* ]] && g0=$(gw_metrics "$t")
  local c0 m0; c0=$(cpu_ticks "$pid"); m0=$(cpu_ticks "$MOCK_PID")
  rm -f "$stop"; : >"$rssfile"
  ( while [[ ! -e $stop ]]; do rss_kb "$pid" >>"$rssfile"; sleep 0.25; done ) &
  local sampler=$!
  PIDS+=("$sampler")
  local out
  out=$(TG_KEY=${KEY[$t]} TG_HEADERS=${HDRS[$t]:-} wrk "$@" -s "$ROOT/bench/chat.lua" "${URL[$t]}/v1/chat/completions") \
    || die "wrk failed against $t: $out"
  touch "$stop"; wait "$sampler" 2>/dev/null || true; forget_pid "$sampler"
  local c1 m1; c1=$(cpu_ticks "$pid"); m1=$(cpu_ticks "$MOCK_PID")
  [[ -n $pg_pids ]] && pg1=$(sum_ticks $pg_pids) || pg1=0
  [[ $t == tollgate-* ]] && g1=$(gw_metrics "$t")
  local line; line=$(grep '^WRK ' <<<"$out") || die "no WRK line from wrk against $t: $out"
  local reqs; reqs=$(sed -E 's/.* requests=([0-9]+).*/\1/' <<<"$line")
  # Steady RSS: the median of the samples in the second half of the run; peak: the largest.
  local steady peak
  local n; n=$(wc -l <"$rssfile")
  steady=$(tail -n "$((n - n / 2))" "$rssfile" | sort -n | awk '{v[NR] = $1} END { print (NR ? v[int((NR + 1) / 2)] : 0) }')
  peak=$(sort -n "$rssfile" | tail -n 1)
  awk -v k="$kind" -v r="$round" -v t="$t" -v l="${line#WRK }" -v n="$reqs" -v tck="$CLK_TCK" \
      -v c="$((c1 - c0))" -v m="$((m1 - m0))" -v pg="$((pg1 - pg0))" -v st="${steady:-0}" \
      -v pk="${peak:-0}" -v g0="$g0" -v g1="$g1" 'BEGIN {
    per = (n > 0) ? 1e6 / tck / n : 0
    split(g0, a, " "); split(g1, b, " ")
    commits = b[1] - a[1]; records = b[2] - a[2]; cs = b[3] - a[3]; un = b[4] - a[4]; us = b[5] - a[5]
    printf "%s round=%s target=%s %s cpu_us_per_req=%.1f mock_cpu_us_per_req=%.1f pg_cpu_us_per_req=%.1f rss_steady_kb=%s rss_peak_kb=%s",
      k, r, t, l, c * per, m * per, pg * per, st, pk
    # p99 of the commit time, as the upper bound of the histogram bucket that holds it.
    p99le = "nan"
    if (a[6] != "none" && b[6] != "none") {
      nb = split(b[6], hb, ";"); split(a[6], ha, ";")
      for (i = 1; i <= nb; i++) { split(hb[i], y, ":"); split(ha[i], x, ":"); le[i] = y[1]; cnt[i] = y[2] - x[2] }
      tot = cnt[nb - 1]
      for (i = 1; i < nb; i++) if (le[i] == "+Inf") tot = cnt[i]
      for (i = 1; i < nb; i++) if (tot > 0 && cnt[i] >= 0.99 * tot) { p99le = le[i] * 1e6; break }
    }
    if (t ~ /^tollgate-/)
      printf " ledger_commits=%d records_per_commit=%.1f commit_us_mean=%.0f commit_p99_le_us=%s to_upstream_headers_us_mean=%.0f",
        commits, commits ? records / commits : 0, commits ? cs / commits * 1e6 : 0, p99le, un ? us / un * 1e6 : 0
    printf "\n" }' >>"$RAW"
  if [[ $kind == thr && $t == tollgate-* ]]; then
    sleep 2
    echo "rss target=$t phase=after round=$round kb=$(rss_kb "$pid")" >>"$RAW"
  fi
}

log "warm-up (${WARM_SECS}s per target)"
for t in "${TARGETS[@]}"; do
  run_wrk warm 0 "$t" -- -t2 -c16 -d"${WARM_SECS}s"
done

log "latency at concurrency 1: $ROUNDS round(s) × $((${#TARGETS[@]} + 1)) targets × ${LAT_SECS}s"
for r in $(seq 1 "$ROUNDS"); do
  for t in floor "${TARGETS[@]}"; do
    run_wrk lat "$r" "$t" -- -t1 -c1 -d"${LAT_SECS}s" --latency
    sleep 1
  done
done

# Before the throughput runs: RSS does not come down after a faster run (the allocator keeps
# what it freed), so a paced run after them would report their high-water mark.
# Memory at the rate the target names (5k req/s): wrk cannot set a rate, so each connection
# pauses between requests (bench/chat.lua's `delay`).
log "paced (about 5k req/s): $ROUNDS round(s) × 2 gateways × ${THR_SECS}s"
export TG_DELAY_MS=$PACE_MS
for r in $(seq 1 "$ROUNDS"); do
  for t in tollgate-sqlite tollgate-postgres; do
    run_wrk paced "$r" "$t" -- -t2 -c16 -d"${THR_SECS}s"
    sleep 1
  done
done
unset TG_DELAY_MS

throughput_rounds() { # kind target… (interleaved rounds at -t$THR_THREADS -c$THR_CONNS)
  local kind=$1 r t; shift
  for r in $(seq 1 "$ROUNDS"); do
    for t in "$@"; do
      run_wrk "$kind" "$r" "$t" -- -t"$THR_THREADS" -c"$THR_CONNS" -d"${THR_SECS}s"
      sleep 1
    done
  done
}

log "throughput (-t$THR_THREADS -c$THR_CONNS): $ROUNDS round(s) × ${#TARGETS[@]} targets × ${THR_SECS}s"
throughput_rounds thr "${TARGETS[@]}"

# The same with long conversations: what a proxy does with a request's bytes shows here.
log "throughput with ${BIG_BYTES}-byte conversations: $ROUNDS round(s) × ${#BIG_TARGETS[@]} targets × ${THR_SECS}s"
TG_PROMPT_BYTES=$BIG_BYTES throughput_rounds big "${BIG_TARGETS[@]}"

# ---------------------------------------------------------------------------------------------
# 4. Streaming: TTFT and inter-chunk gaps (mock: 32 chunks, 5 ms apart)
# ---------------------------------------------------------------------------------------------
probe_seq() { # round target base key model n [--header "Name: value"]…
  local out r=$1 t=$2 base=$3 key=$4 model=$5 n=$6
  shift 6
  if ! out=$("$PROBE" --base "$base" --key "$key" --model "$model" --requests "$n" --warmup 5 \
    --label "$t" "$@" 2>&1); then
    # A peer that cannot stream is a finding, not a reason to stop the run.
    [[ $t == litellm || $t == portkey ]] || die "stream probe failed against $t: $out"
    echo "stream-failed round=$r target=$t error=$(sed -n '1,4p' <<<"$out" | tr -s ' \n' ' ' | head -c 200)" >>"$RAW"
    log "  $t could not stream: $(tr '\n' ' ' <<<"$out" | head -c 300)"
    return 0
  fi
  set -- "$r" "$t"
  local line; line=$(grep '^PROBE ' <<<"$out") || die "no PROBE line: $out"
  echo "stream round=$1 target=$2 ${line#PROBE }" >>"$RAW"
}

STREAM_TARGETS=(direct nginx hyper-bare tollgate-sqlite tollgate-postgres)
if (( PEERS )); then STREAM_TARGETS+=(litellm portkey); fi
log "streaming: $ROUNDS round(s) × ${#STREAM_TARGETS[@]} targets × $STREAMS sequential streams"
for r in $(seq 1 "$ROUNDS"); do
  for t in "${STREAM_TARGETS[@]}"; do
    if [[ $t == direct ]]; then
      probe_seq "$r" "$t" "http://127.0.0.1:$STREAM_PORT" none gpt-4o-mini "$STREAMS"
    elif [[ $t == nginx ]]; then
      probe_seq "$r" "$t" "http://127.0.0.1:$NGINX_STREAM_PORT" none gpt-4o-mini "$STREAMS"
    elif [[ $t == hyper-bare ]]; then
      probe_seq "$r" "$t" "http://127.0.0.1:$BARE_STREAM_PORT" none gpt-4o-mini "$STREAMS"
    elif [[ $t == portkey ]]; then
      probe_seq "$r" "$t" "${URL[$t]}" "${KEY[$t]}" gpt-4o-mini "$STREAMS" \
        --header "x-portkey-provider: openai" \
        --header "x-portkey-custom-host: http://127.0.0.1:$STREAM_PORT/v1"
    elif [[ $t == litellm ]]; then
      probe_seq "$r" "$t" "${URL[$t]}" "${KEY[$t]}" gpt-4o-mini-stream "$STREAMS"
    else
      probe_seq "$r" "$t" "${URL[$t]}" "${KEY[$t]}" gpt-4o-mini-stream "$STREAMS"
    fi
  done
done

# ---------------------------------------------------------------------------------------------
# 5. Many held streams through the gateway on SQLite (mock: 40 chunks, 500 ms apart)
# ---------------------------------------------------------------------------------------------
# The same load straight at the mock first (the machine's baseline), then through the gateway.
log_count() { grep -c "$1" "$TMP/tollgate-sqlite.log" || true; }
# The kernel's count of connections a full accept queue turned away (machine-wide; on this
# loopback-only machine, the probe's to the target and the target's to the mock).
listen_overflows() { awk '/^TcpExt:/ { if (!n) { for (i = 2; i <= NF; i++) if ($i == "ListenOverflows") c = i; n = 1 } else print $c }' /proc/net/netstat; }
held_run() { # target base key model sampled-pid streams
  local t=$1 pid=$5 n=$6 samples="$TMP/held.$1" stop="$TMP/stop.held.$1"
  local acc0 unr0 ovf0; acc0=$(log_count 'accept failed'); unr0=$(log_count 'upstream unreachable')
  ovf0=$(listen_overflows)
  rm -f "$stop"; : >"$samples"
  ( while [[ ! -e $stop ]]; do
      echo "$(rss_kb "$pid") $(ls "/proc/$pid/fd" 2>/dev/null | wc -l) $(rss_kb "$LONG_MOCK_PID")" >>"$samples"
      sleep 0.25
    done ) &
  local sampler=$!; PIDS+=("$sampler")
  local c0 t0 c1 t1 out line m0 m1
  c0=$(cpu_ticks "$pid"); t0=$(date +%s.%N); m0=$(machine_ticks)
  out=$("$PROBE" --base "$2" --key "$3" --model "$4" --concurrent "$n" --ramp-per-sec 2000 \
    --timeout-secs 120 --label "held-$t" 2>"$TMP/held-progress.$t.log") \
    || die "held-streams probe failed against $t: $out"
  c1=$(cpu_ticks "$pid"); t1=$(date +%s.%N); m1=$(machine_ticks)
  touch "$stop"; wait "$sampler" 2>/dev/null || true; forget_pid "$sampler"
  line=$(grep '^PROBE ' <<<"$out")
  grep -v '^PROBE ' <<<"$out" | sed 's/^/  /' >&2 || true
  sleep 2
  echo "held target=$t ${line#PROBE } fd_limit=$FD_LIMIT" \
    "peak_rss_kb=$(awk '{print $1}' "$samples" | sort -n | tail -n 1)" \
    "peak_fds=$(awk '{print $2}' "$samples" | sort -n | tail -n 1)" \
    "mock_peak_rss_kb=$(awk '{print $3}' "$samples" | sort -n | tail -n 1)" \
    "rss_after_kb=$(rss_kb "$pid")" \
    "cpu_cores=$(awk -v c="$((c1 - c0))" -v a="$t0" -v b="$t1" -v k="$CLK_TCK" 'BEGIN { printf "%.2f", c / k / (b - a) }')" \
    "gw_accept_failed=$(( $(log_count 'accept failed') - acc0 ))" \
    "gw_upstream_unreachable=$(( $(log_count 'upstream unreachable') - unr0 ))" \
    "listen_overflows=$(( $(listen_overflows) - ovf0 ))" \
    "machine_busy_pct=$(awk -v a="$m0" -v b="$m1" 'BEGIN { split(a, x, " "); split(b, y, " ")
      busy = y[1] - x[1]; idle = y[2] - x[2]; printf "%.0f", 100 * busy / (busy + idle) }')" \
    >>"$RAW"
}
# Each stream through the gateway holds two of its descriptors. If $HELD does not fit under the
# descriptor limit, a run at the largest round count that fits goes first (so that its peak RSS
# is not the 10k run's leftover heap), then the full count as asked.
HELD_FIT=$(( (FD_LIMIT - 200) / 2 / 500 * 500 ))
log "held streams: $HELD at once, straight at the mock, then through tollgate-sqlite (each ~$((LONG_CHUNKS * LONG_INTERVAL_MS / 1000)) s; fd limit $FD_LIMIT)"
held_run direct "http://127.0.0.1:$LONG_PORT" none gpt-4o-mini "$LONG_MOCK_PID" "$HELD"
if (( HELD_FIT < HELD )); then
  sleep 3
  log "held streams: $HELD_FIT through tollgate-sqlite (what fits in $FD_LIMIT descriptors)"
  held_run tollgate-sqlite-fit "${URL[tollgate-sqlite]}" "$KEY_SQLITE" gpt-4o-mini-long "$GW_SQLITE_PID" "$HELD_FIT"
fi
sleep 3
held_run tollgate-sqlite "${URL[tollgate-sqlite]}" "$KEY_SQLITE" gpt-4o-mini-long "$GW_SQLITE_PID" "$HELD"

# ---------------------------------------------------------------------------------------------
# Durability check: every 2xx a client saw has its usage record committed, after kill -9.
# Both gateways are killed without warning, started again (which ships what their journals
# hold), asked for the bench account, and then waited for until nothing they replayed is left
# unshipped (an account's actor need not wait for the replay: docs/guarantees.md 5.5).
# ---------------------------------------------------------------------------------------------
sleep 1
kill -9 "$GW_SQLITE_PID" "$GW_PG_PID"
wait "$GW_SQLITE_PID" "$GW_PG_PID" 2>/dev/null || true
start_gateway tollgate-sqlite-after-kill "$TMP/gw-sqlite.toml" "$GW_SQLITE_PORT"
start_gateway tollgate-postgres-after-kill "$TMP/gw-postgres.toml" "$GW_PG_PORT"
for port in "$GW_SQLITE_PORT" "$GW_PG_PORT"; do
  curl -sf -o /dev/null -H "Authorization: Bearer $ADMIN" \
    "http://127.0.0.1:$port/admin/accounts/$(cat "$TMP/account-$port")" \
    || die "reading the bench account on :$port after the restart"
  for _ in $(seq 1 600); do
    depth=$(curl -sf -H "Authorization: Bearer $ADMIN" "http://127.0.0.1:$port/metrics" \
      | awk '$1 == "tollgate_ledger_queue_depth" { print $2 + 0 }')
    [[ $depth == 0 ]] && break
    sleep 0.1
  done
  [[ $depth == 0 ]] || die "the gateway on :$port still had $depth replayed records unshipped after 60 s"
done
seen() { # target → 2xx responses the clients saw (wrk runs, probes incl. their warm-ups, sanity)
  awk -v t="$1" '
    { tgt=""; req=0; non=0; ok=0; mode=""
      for (i = 2; i <= NF; i++) { split($i, a, "=")
        if (a[1] == "target") tgt = a[2]; if (a[1] == "requests") req = a[2]
        if (a[1] == "non2xx") non = a[2]; if (a[1] == "ok") ok = a[2]; if (a[1] == "mode") mode = a[2] }
      if ($1 == "held") sub(/-fit$/, "", tgt)
      if (tgt != t) next
      if ($1 == "warm" || $1 == "lat" || $1 == "thr" || $1 == "paced") s += req - non
      if ($1 == "stream") s += ok + 5
      if ($1 == "held") s += ok }
    END { print s + 1 }' "$RAW"
}
rec_sqlite=$(sqlite3 "$SQLITE_FILE" "SELECT COUNT(*) FROM usage_records WHERE status = 200")
rec_pg=$(psql -h 127.0.0.1 -U postgres -d "$PG_DB" -Atc "SELECT COUNT(*) FROM usage_records WHERE status = 200")
echo "durable target=tollgate-sqlite records_200=$rec_sqlite client_2xx=$(seen tollgate-sqlite)" >>"$RAW"
echo "durable target=tollgate-postgres records_200=$rec_pg client_2xx=$(seen tollgate-postgres)" >>"$RAW"

# ---------------------------------------------------------------------------------------------
# 6. Summary
# ---------------------------------------------------------------------------------------------
SUMMARY=$TMP/summary.txt
summarize "$RAW" >"$SUMMARY"

mkdir -p "$ROOT/bench/results"
OUT=${BENCH_OUT:-$ROOT/bench/results/latest.txt}
{
  echo "# bench/run.sh$( ((QUICK)) && echo ' --quick')$( ((SMOKE)) && echo ' --smoke') — $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "# git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet -- . ':(exclude)bench/results' 2>/dev/null || echo ' (working tree modified)')"
  echo "# machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1), $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)"
  echo "# tools: $("$NGINX" -v 2>&1), $(wrk -v 2>&1 | head -n 1 | cut -d' ' -f1-2), $(psql -h 127.0.0.1 -U postgres -Atc 'show server_version'| sed 's/^/PostgreSQL /'), sqlite $(sqlite3 --version | cut -d' ' -f1), $(cargo --version 2>/dev/null)"
  echo "# load average (1/5/15 min): $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end"
  echo "# gateway worker threads: ${BENCH_GATEWAY_WORKERS:-one per core, tokio default}"
  echo
  echo "# raw lines: one per run; latencies in µs; cpu_us_per_req = process CPU time / requests"
  cat "$RAW"
  cat "$SUMMARY"
} >"$OUT"
cat "$SUMMARY"
log "raw numbers in $OUT"
# The one check that fails the run: every 2xx a client saw has its record in the store.
for t in tollgate-sqlite tollgate-postgres; do
  line=$(grep "^durable target=$t " "$RAW")
  (( $(field "$line" records_200) >= $(field "$line" client_2xx) )) \
    || die "$t: fewer usage records than 2xx responses after kill -9 ($line)"
done

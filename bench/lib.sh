# Helpers shared by the bench scripts (sourced). Each script defines its own `log` and `die`,
# and keeps the processes it starts in `PIDS` and their logs in `$TMP/<name>.log`.

# A free loopback port at or above $NEXT_PORT (below the ephemeral range), into the named var.
alloc_port() {
  while ss -Htln "sport = :$NEXT_PORT" | grep -q .; do NEXT_PORT=$((NEXT_PORT + 1)); done
  printf -v "$1" '%s' "$NEXT_PORT"
  NEXT_PORT=$((NEXT_PORT + 1))
}

# Waits until `url` answers at all, checking that `pid` is still alive; gives up after `tries`
# tenths of a second (default 1200: LiteLLM takes seconds to import, valgrind longer).
wait_http() { # url pid name [tries]
  for _ in $(seq 1 "${4:-1200}"); do
    kill -0 "$2" 2>/dev/null || { tail -n 20 "$TMP/$3.log" >&2; die "$3 exited at start"; }
    curl -s -o /dev/null "$1" && return 0
    sleep 0.1
  done
  die "$3 did not answer at $1"
}

# Creates a funded account with one API key through a gateway's admin API; prints
# "<account id> <key>".
seed_account() { # base-url admin-token email amount
  local acct key
  acct=$(curl -sf -X POST "$1/admin/accounts" -H "Authorization: Bearer $2" \
    -H 'Content-Type: application/json' -d "{\"email\":\"$3\"}" | jq -r .id)
  [[ -n $acct && $acct != null ]] || die "creating an account at $1"
  curl -sf -o /dev/null -X POST "$1/admin/accounts/$acct/credits" -H "Authorization: Bearer $2" \
    -H 'Content-Type: application/json' -d "{\"amount\":\"$4\",\"reason\":\"benchmark funding\"}" \
    || die "crediting at $1"
  key=$(curl -sf -X POST "$1/admin/accounts/$acct/keys" -H "Authorization: Bearer $2" \
    -H 'Content-Type: application/json' -d '{"name":"bench"}' | jq -r .key)
  [[ $key == sk-* ]] || die "no API key from $1"
  printf '%s %s\n' "$acct" "$key"
}

# A gateway config's `[[providers]]` entry for an OpenAI-compatible upstream at `base-url`;
# each further argument is one more `key = value` line of it.
provider_toml() { # name base-url [setting…]
  printf '\n[[providers]]\nname = "%s"\nkind = "openai-compatible"\nbase_url = "%s"\n' "$1" "$2"
  shift 2
  (( $# == 0 )) || printf '%s\n' "$@"
}

# A `[[models]]` entry for a model the mock serves, at gpt-4o-mini's prices (what every bench
# script charges).
model_toml() { # id provider
  printf '\n[[models]]\nid = "%s"\nprovider = "%s"\nupstream_model = "gpt-4o-mini"\n' "$1" "$2"
  printf 'input_per_mtok = "0.15"\noutput_per_mtok = "0.60"\nmax_output_tokens = 4096\n'
}

# "user system": the CPU ticks in a /proc stat file (fields 14 and 15, counted after the name
# in brackets, which may hold spaces); "0 0" for a process or thread that is gone.
stat_ticks() { # stat-file
  local fields
  fields=$(sed 's/.*) //' "$1" 2>/dev/null | cut -d' ' -f12,13) || true
  echo "${fields:-0 0}"
}

# A process's CPU ticks, user and system together (0 for one that is gone).
cpu_ticks() { # pid
  local t
  t=$(stat_ticks "/proc/$1/stat")
  echo $((${t% *} + ${t#* }))
}

# The CPU ticks of the listed processes together.
sum_ticks() { # pid…
  local s=0 p
  for p in "$@"; do s=$((s + $(cpu_ticks "$p"))); done
  echo "$s"
}

# Postgres's processes now, for `sum_ticks` before and after a run.
postgres_pids() { pgrep -u postgres -d ' ' postgres || true; }

# A fresh Postgres database at 127.0.0.1:5432 (user postgres), dropped at exit by
# `bench_cleanup`; its name into the named var.
new_pg_db() { # var name-prefix
  local name="$2_$$_$(date +%s)_${#PG_DBS[@]}"
  PG_DBS+=("$name")
  psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -qc "CREATE DATABASE $name" >/dev/null \
    || die "could not create database $name (Postgres at 127.0.0.1:5432, user postgres)"
  printf -v "$1" '%s' "$name"
}

# Every script's exit: stops the processes in PIDS (TERM, then KILL after 10 s), drops the
# databases in PG_DBS, and removes TMP unless BENCH_KEEP_TMP=1 or the script failed.
bench_cleanup() {
  local status=$? pid db
  set +e
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  for db in "${PG_DBS[@]}"; do
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
  done
  if [[ ${BENCH_KEEP_TMP:-0} == 1 || $status -ne 0 ]]; then log "temp dir kept: $TMP"; else rm -rf "$TMP"; fi
  exit "$status"
}

# Installs `bench_cleanup`; the script has set TMP, PIDS=() and PG_DBS=() first.
trap_cleanup() {
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

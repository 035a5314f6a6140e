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

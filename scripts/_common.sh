# Sourced by every script here: the bridge address, the API key, and a curl that shows itself.
#   BRIDGE          bridge address (default http://127.0.0.1:8000)
#   BRIDGE_API_KEY  sent as "Authorization: Bearer <key>" when set
set -euo pipefail
BRIDGE=${BRIDGE:-http://127.0.0.1:8000}
BRIDGE=${BRIDGE%/}
AUTH=()
if [ -n "${BRIDGE_API_KEY:-}" ]; then
  AUTH=(-H "Authorization: Bearer $BRIDGE_API_KEY")
fi

# Print the command (key hidden) on stderr, then run it. The body is printed with a final
# newline; an HTTP status of 400 or more makes curl exit with 22 after printing the body.
call() {
  show curl "$@"
  curl -sS --fail-with-body -w '\n' ${AUTH[@]+"${AUTH[@]}"} "$@"
}

# "+ command args" on stderr, quoted so it can be pasted back into a shell.
show() {
  local line="+" arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      line+=" $arg"
    else
      line+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  echo "$line" >&2
}

usage() {
  echo "usage: $(basename "$0") $1" >&2
  exit 2
}

# Sourced by every script here: the command line, the bridge address, the API key, and a curl
# that shows itself.
#   BRIDGE          bridge address (default http://127.0.0.1:8000)
#   BRIDGE_API_KEY  sent as "Authorization: Bearer <key>" when set
# A script sets SCRIPT_USAGE (its arguments, for the usage line) and, if it takes options of its
# own, SCRIPT_OPTIONS ("--all"; each one given sets OPT_ALL=1) before sourcing this file.
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

usage() {   # a wrong command line: exit 2, nothing sent
  echo "usage: $(basename "$0")${SCRIPT_USAGE:+ $SCRIPT_USAGE}" >&2
  [ $# -eq 0 ] || echo "$(basename "$0"): $*" >&2
  echo "(--help says more)" >&2
  exit 2
}

help_text() {   # the script's own header comment, and what every script shares
  echo "usage: $(basename "$0")${SCRIPT_USAGE:+ $SCRIPT_USAGE}"
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
  cat <<'EOF'

Environment: BRIDGE, the bridge's address (default http://127.0.0.1:8000); BRIDGE_API_KEY,
sent as "Authorization: Bearer <key>" when set (never printed). The curl command is printed
on stderr. Exit status: 0 done; 22 the bridge answered 400 or more (its {"detail": ...} is
printed); 2 a wrong command line (nothing was sent).
EOF
}

# Options are read here, before anything is sent: -h/--help anywhere shows the help and sends
# nothing (a clientId may not be "--help"); "--" ends the options, for an argument that starts
# with "-"; any other option the script does not take is an error.
_args=()
_options_done=
for _arg in "$@"; do
  if [ -z "$_options_done" ]; then
    case $_arg in
      -h|--help) help_text; exit 0 ;;
      --) _options_done=1; continue ;;
      -?*)
        if [[ " ${SCRIPT_OPTIONS:-} " == *" $_arg "* ]]; then
          _name=${_arg#--}
          _name=${_name//-/_}
          printf -v "OPT_${_name^^}" 1
          continue
        fi
        usage "unknown option '$_arg'" ;;
    esac
  fi
  _args+=("$_arg")
done
set -- ${_args[@]+"${_args[@]}"}
unset _args _arg _options_done _name

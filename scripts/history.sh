#!/usr/bin/env bash
# GET /history?clientId=ID: the job's files as one multipart/form-data body, saved to OUTPUT
# (default out/history-ID.multipart; out/ is git-ignored). The bridge deletes the results once
# they were sent.
# Exit status: 0 saved; 3 nothing yet (204, reason in X-Bridge-Detail); 22 the job failed (400).
SCRIPT_USAGE="CLIENT_ID [OUTPUT]"
. "$(dirname "$0")/_common.sh"
[ $# -ge 1 ] && [ $# -le 2 ] || usage
out=${2:-out/history-$1.multipart}
mkdir -p "$(dirname "$out")"
# The body goes to a file beside OUTPUT first: a 204 or an error leaves an earlier OUTPUT alone.
headers=$(mktemp)
body=$(mktemp "$out.partial.XXXXXX")
trap 'rm -f "$headers" "$body"' EXIT
show curl -X GET "$BRIDGE/history?clientId=$1" -o "$out"
code=$(curl -sS ${AUTH[@]+"${AUTH[@]}"} -X GET "$BRIDGE/history?clientId=$1" -D "$headers" -o "$body" -w '%{http_code}')
case $code in
  200)
    mv "$body" "$out"
    echo "saved $(wc -c < "$out") bytes to $out; parts:"
    grep -a -o 'filename="[^"]*"' "$out" | sed 's/^filename=/  /' || echo "  (none)"
    ;;
  204)
    echo "204 No Content: $(grep -i '^X-Bridge-Detail:' "$headers" | cut -d' ' -f2- | tr -d '\r')"
    exit 3
    ;;
  *)
    cat "$body"; echo
    exit 22
    ;;
esac

#!/usr/bin/env bash
# POST /upload: one request with one multipart part per file. Answers {identifier: saved name}.
#   upload.sh photo.png                         -> {"file": "<saved name>"}
#   upload.sh 10/image=face.png mask=mask.png   -> {"10/image": "...", "mask": "..."}
# Without IDENTIFIER= the parts are named file (one file) or file_1, file_2, ... (several).
SCRIPT_USAGE="[IDENTIFIER=]FILE [[IDENTIFIER=]FILE ...]"
. "$(dirname "$0")/_common.sh"
[ $# -ge 1 ] || usage
parts=()
n=0
for arg in "$@"; do
  n=$((n + 1))
  if [[ $arg == *=* ]]; then
    id=${arg%%=*} path=${arg#*=}
  elif [ $# -eq 1 ]; then
    id=file path=$arg
  else
    id=file_$n path=$arg
  fi
  [ -f "$path" ] || { echo "no such file: $path" >&2; exit 2; }
  parts+=(-F "$id=@$path;filename=$(basename "$path")")
done
call -X POST "$BRIDGE/upload" "${parts[@]}"

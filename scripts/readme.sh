#!/usr/bin/env bash
# Prints one of the README's own command lines, so CI runs them as written:
#   readme.sh setup   the set-up line (first indented line of "## Quick start")
#   readme.sh test    the test command (the second)
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    setup) n=1 ;;
    test) n=2 ;;
    *) echo "usage: $0 setup|test" >&2; exit 2 ;;
esac
line=$(awk '/^## /{q=($0 ~ /^## Quick start/)} q && /^    [^ ]/{sub(/^    /, ""); print}' README.md | sed -n "${n}p")
[ -n "$line" ] || { echo "$0: README.md has no command line $n under '## Quick start'" >&2; exit 1; }
printf '%s\n' "$line"

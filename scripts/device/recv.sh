#!/usr/bin/env bash
# Device side: copy the payload part(s) this call carried (.gpu/p*/payload.part*) into
# /tmp/llship/parts, which outlives the call while the machine stays warm (30 s after each call),
# verify them against .gpu/bin/MANIFEST.parts and say which parts are still to come.
# Usage (repo root): bash .gpu/bin/recv.sh
# exit 0: all parts here; 10: some still to come (carry them next, right away); 1: a bad part
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
D=/tmp/llship/parts
mkdir -p "$D"
for f in "$REPO"/.gpu/p*/payload.part*; do
  [ -f "$f" ] || continue
  b=$(basename "$f")
  if [ ! -f "$D/$b" ] || ! cmp -s "$f" "$D/$b"; then cp "$f" "$D/$b.tmp" && mv "$D/$b.tmp" "$D/$b"; fi
done
bad=0 have=0 want=0 todo=""
while read -r sum name dir; do
  want=$((want + 1))
  if [ -f "$D/$name" ] && [ "$(sha256sum "$D/$name" | cut -d' ' -f1)" = "$sum" ]; then
    have=$((have + 1)); echo "part $name: ok"
  else
    if [ -f "$D/$name" ]; then echo "part $name: BAD CHECKSUM, removed"; rm -f "$D/$name"; bad=1; fi
    todo="$todo $dir"
  fi
done < "$REPO/.gpu/bin/MANIFEST.parts"
echo "llship parts: $have of $want in $D"
if [ -n "$todo" ]; then
  set -- $todo
  echo "LLSHIP NEXT: run the same command again at once (the machine is given back 30 s after a call)," \
       "with carry [\".gpu/bin\", \"$1\"]; still to come:$todo (one part per call: each is ~49 MiB)"
fi
[ $bad = 1 ] && exit 1
[ -n "$todo" ] && exit 10
exit 0

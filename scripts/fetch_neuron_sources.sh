#!/usr/bin/env bash
# Lay out the upstream Neuron sources the ports are checked against, at the commits recorded in
# vllm_hybrid_neuron/neuron/api_surface.json and docs/neuron.md. Nothing here is committed to this repo.
#
# usage: scripts/fetch_neuron_sources.sh [DEST] [--git-dir NAME=PATH]...
#   DEST              where to lay the trees out (default ~/.cache/vllm-hybrid-neuron/neuron-src)
#   --git-dir NAME=P  take repository NAME (nxdi | nxd | vllm-neuron) from the local git dir P
#                     (bare or not) instead of cloning it from GitHub
# Prints the export lines for NXDI_SRC / NXD_SRC / VLLM_NEURON_SRC. Each tree gets a SOURCE file naming
# the repository and the commit it holds; if the recorded commit is missing from a local git dir, the
# newest commit there is used and SOURCE says so.
set -euo pipefail

# name  github repository                         recorded commit (full SHA)
REPOS=(
  "nxdi        aws-neuron/neuronx-distributed-inference 4bcdc54bf3b6ccdad490e5cd0680a3dc95270b8e"
  "nxd         aws-neuron/neuronx-distributed           fbac349b61a3adbb123c2983835af692840ff62f"
  "vllm-neuron vllm-project/vllm-neuron                 a5ef7c88c3e4e44bea9af9051d8fb113588c0a21"
)

dest="${HOME}/.cache/vllm-hybrid-neuron/neuron-src"
declare -A local_git=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --git-dir) local_git["${2%%=*}"]="${2#*=}"; shift 2 ;;
    --git-dir=*) v="${1#--git-dir=}"; local_git["${v%%=*}"]="${v#*=}"; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) dest="$1"; shift ;;
  esac
done
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"

for row in "${REPOS[@]}"; do
  read -r name repo commit <<<"$row"
  out="$dest/$name"
  if [[ -f "$out/SOURCE" ]] && grep -q "^commit $commit\$" "$out/SOURCE"; then
    echo "# $name: already at $commit" >&2; continue
  fi
  gitdir="${local_git[$name]:-}"
  tmp=""
  if [[ -z "$gitdir" ]]; then
    tmp="$(mktemp -d)"; gitdir="$tmp/repo.git"
    git init -q --bare "$gitdir"
    # fetch the one commit (GitHub allows fetching reachable SHAs); fall back to a full fetch
    git -C "$gitdir" fetch -q --depth 1 "https://github.com/$repo" "$commit" \
      || git -C "$gitdir" fetch -q "https://github.com/$repo" '+refs/heads/*:refs/heads/*'
  fi
  used="$commit"; note="recorded commit"
  if ! git -C "$gitdir" cat-file -e "$commit^{commit}" 2>/dev/null; then
    used="$(git -C "$gitdir" log --all -1 --format=%H)"
    note="RECORDED COMMIT $commit ABSENT from $gitdir; newest commit there used instead"
    echo "# WARNING $name: $note" >&2
  fi
  rm -rf "$out"; mkdir -p "$out"
  git -C "$gitdir" archive --format=tar "$used" | tar -x -C "$out"
  printf 'repo %s\ncommit %s\nnote %s\ndate %s\n' "$repo" "$used" "$note" \
    "$(git -C "$gitdir" log -1 --format=%cI "$used")" >"$out/SOURCE"
  [[ -n "$tmp" ]] && rm -rf "$tmp"
  echo "# $name: $repo @ $used ($note)" >&2
done

echo "export NXDI_SRC=$dest/nxdi/src"
echo "export NXD_SRC=$dest/nxd/src"
echo "export VLLM_NEURON_SRC=$dest/vllm-neuron"

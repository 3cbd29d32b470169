#!/usr/bin/env bash
# Refresh the JavaScript that the built book serves itself, so that it reads offline:
# MathJax 3 (math), RequireJS + @jupyter-widgets/html-manager (saved widget state).
# Fetches the npm packages with `npm pack` into a temporary folder, keeps only the files the
# pages load, and rewrites book/_static/vendor/README.md with the versions and licences.
# Usage: tools/vendor_js.sh            (run from anywhere; needs npm and the npm registry)
set -euo pipefail

MATHJAX_VERSION=3.2.2
REQUIREJS_VERSION=2.3.8
HTML_MANAGER_VERSION=1.0.15   # the @jupyter-widgets/html-manager that matches ipywidgets 8.1

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENDOR="$ROOT/book/_static/vendor"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

unpack() {  # unpack NAME@VERSION into $WORK/<dir> and print that dir
  local spec="$1" dir="$WORK/$2"
  (cd "$WORK" && npm pack --silent "$spec" >"$WORK/$2.name")
  mkdir -p "$dir"
  tar xzf "$WORK/$(cat "$WORK/$2.name")" -C "$dir"
  echo "$dir/package"
}

MJ="$(unpack "mathjax@$MATHJAX_VERSION" mathjax)"
RJ="$(unpack "requirejs@$REQUIREJS_VERSION" requirejs)"
HM="$(unpack "@jupyter-widgets/html-manager@$HTML_MANAGER_VERSION" html-manager)"

rm -rf "$VENDOR/mathjax" "$VENDOR/requirejs" "$VENDOR/html-manager"
mkdir -p "$VENDOR/mathjax/output/chtml/fonts" "$VENDOR/requirejs" "$VENDOR/html-manager"

# MathJax: the all-in-one TeX -> CommonHTML component (every TeX extension included, so
# nothing is autoloaded) and the CommonHTML woff-v2 fonts it loads relative to itself.
cp "$MJ/es5/tex-chtml-full.js" "$VENDOR/mathjax/"
cp -r "$MJ/es5/output/chtml/fonts/woff-v2" "$VENDOR/mathjax/output/chtml/fonts/"
cp "$MJ/LICENSE" "$VENDOR/mathjax/LICENSE"

# RequireJS: the AMD loader that embed-amd.js registers its modules with.
cp "$RJ/require.js" "$VENDOR/requirejs/require.js"

# html-manager: the AMD embed bundle (base, controls, output widgets) and the woff2 icon
# fonts it loads from its own folder; the licences of what the bundle contains.
cp "$HM/dist/embed-amd.js" "$VENDOR/html-manager/"
cp "$HM"/dist/*.woff2 "$VENDOR/html-manager/"
cp "$HM/dist/embed.js.LICENSE.txt" "$VENDOR/html-manager/THIRD-PARTY-LICENSES.txt"
cat >"$VENDOR/html-manager/LICENSE" <<'LICENSE'
Copyright (c) 2015 Project Jupyter Contributors
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

3. Neither the name of the copyright holder nor the names of its
   contributors may be used to endorse or promote products derived from
   this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
LICENSE

SIZE="$(du -sh "$VENDOR" --exclude=README.md | cut -f1)"
cat >"$VENDOR/README.md" <<README
# Vendored JavaScript (written by tools/vendor_js.sh; do not edit by hand)

The built book loads these from \`_static/vendor/\` instead of a CDN, so it reads offline.
\`book/_config.yml\` points Sphinx's \`mathjax_path\` and myst-nb's \`nb_ipywidgets_js\` here.
Refresh with \`tools/vendor_js.sh\` (bump the versions at its top). Total size: $SIZE.

| folder | npm package | version | licence | files kept |
| --- | --- | --- | --- | --- |
| \`mathjax/\` | \`mathjax\` | $MATHJAX_VERSION | Apache-2.0 (\`mathjax/LICENSE\`) | \`es5/tex-chtml-full.js\`, \`es5/output/chtml/fonts/woff-v2/*.woff\` |
| \`requirejs/\` | \`requirejs\` | $REQUIREJS_VERSION | MIT (header of \`require.js\`) | \`require.js\` |
| \`html-manager/\` | \`@jupyter-widgets/html-manager\` | $HTML_MANAGER_VERSION | BSD-3-Clause (\`html-manager/LICENSE\`); bundled code: \`THIRD-PARTY-LICENSES.txt\` | \`dist/embed-amd.js\`, \`dist/*.woff2\` (Font Awesome, SIL OFL 1.1) |
README
echo "vendored into $VENDOR ($SIZE)"

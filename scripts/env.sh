# Sourced by the quickstart scripts: makes (once) and activates .venv with a
# Python >= 3.12 and the pinned dependencies, every extra the tests, training
# and evaluation scripts need included.

_jsparse_find_python() {
  local candidate
  for candidate in python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; assert sys.version_info >= (3, 12)' \
          >/dev/null 2>&1; then
      command -v "$candidate"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local root; root="$(pyenv root)"
    for candidate in "$root"/versions/3.12*/bin/python3 \
                     "$root"/versions/3.13*/bin/python3; do
      if [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
    done
  fi
  echo "jsparse needs Python >= 3.12 (tried python3.12, python3.13," \
       "python3 and pyenv's versions)" >&2
  return 1
}

_jsparse_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$_jsparse_root/.venv/bin/python" ]; then
  _jsparse_python="$(_jsparse_find_python)"
  echo "creating .venv with $_jsparse_python" >&2
  "$_jsparse_python" -m venv "$_jsparse_root/.venv"
fi
# shellcheck disable=SC1091
source "$_jsparse_root/.venv/bin/activate"
_jsparse_stamp="$_jsparse_root/.venv/.jsparse-installed"
if [ ! -f "$_jsparse_stamp" ] \
    || [ "$_jsparse_root/pyproject.toml" -nt "$_jsparse_stamp" ] \
    || [ "$_jsparse_root/constraints.txt" -nt "$_jsparse_stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -c "$_jsparse_root/constraints.txt" \
    -e "$_jsparse_root[test,train,viz,models]"
  touch "$_jsparse_stamp"
fi
cd "$_jsparse_root"

"""The server's packages are an extra: the library and the rest of the command line never import them, and
``diffusekit serve`` without them is one line saying what to install."""

from __future__ import annotations

import subprocess
import sys

from serving import MODEL, needs_model


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_library_and_the_command_line_do_not_import_the_server_stack():
    r = run_python("import sys, diffusekit.cli.main, diffusekit.pipelines.recipe\n"
                   "stack = ('fastapi', 'uvicorn', 'starlette')\n"
                   "sys.exit(sorted(m for m in stack if m in sys.modules) != [])")  # fmt: skip
    assert r.returncode == 0, r.stderr


@needs_model
def test_serve_without_the_extra_says_what_to_install():
    r = run_python(f"import sys; sys.modules['uvicorn'] = None\nfrom diffusekit.cli.main import main\n"
                   f"sys.exit(main(['serve', {str(MODEL)!r}]))")  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().startswith("diffusekit serve: error:") and "diffusekit[serve]" in r.stderr


def test_lora_options_are_read_as_file_and_weight(tmp_path):
    from diffusekit.cli.serve import _lora_spec

    f = tmp_path / "style:v2.safetensors"
    f.write_bytes(b"")
    assert _lora_spec(str(f)) == (str(f), 1.0)  # a colon inside the name is not a weight
    assert _lora_spec(f"{f}:0.5") == (str(f), 0.5)

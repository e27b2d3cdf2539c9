import subprocess
import sys


def run(*args):
    return subprocess.run([sys.executable, "-m", "kernelplane.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_only_the_text():
    out = run("generate", "--max-tokens", "8", "The capital of France is")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("Paris")
    assert "INFO" not in out.stdout and "candidate" not in out.stdout


def test_generate_chat():
    out = run("generate", "--chat", "--max-tokens", "12", "What is the capital of France?")
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_impossible_backend_exits_2_with_candidates():
    out = run("generate", "--attention-backend", "no_such_backend", "hi")
    assert out.returncode == 2
    assert "no_such_backend" in out.stderr and "reference" in out.stderr and "Traceback" not in out.stderr


def test_missing_model_is_a_clear_error():
    out = run("generate", "--model", "/nonexistent/model.gguf", "hi")
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
